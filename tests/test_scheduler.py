"""The nightly schedule for real: Airflow loads and runs the DAG, and the cron entry's command runs.

Airflow's pins clash with the project's, so it lives in its own virtual environment, built once from
``deploy/airflow/requirements.txt`` (the one place its version is pinned) and cached under
``~/.cache/clustermix/`` by that version and the lock's hash. The cron command is taken from
``deploy/cron/clustermix-nightly.cron`` as shipped and run with ``sh -c`` in the environment cron
gives a job (``PATH=/usr/bin:/bin``, no virtual environment active), on a small corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DAG_FOLDER = ROOT / "deploy" / "airflow"
CRON = ROOT / "deploy" / "cron" / "clustermix-nightly.cron"
AIRFLOW_LOCK = DAG_FOLDER / "requirements.txt"
CACHE = Path.home() / ".cache" / "clustermix"

# what a crontab job gets from cron(8) on Debian: no profile, no virtual environment
CRON_ENV = {"PATH": "/usr/bin:/bin", "SHELL": "/bin/sh", "HOME": str(Path.home()),
            "LOGNAME": os.environ.get("LOGNAME", "root"), "LANG": "C.UTF-8"}


def airflow_version() -> str:
    pins = re.findall(r"^apache-airflow==(\S+)$", AIRFLOW_LOCK.read_text(), re.MULTILINE)
    assert len(pins) == 1, f"{AIRFLOW_LOCK}: one apache-airflow==VERSION line expected"
    return pins[0]


def _uv() -> list[str]:
    """uv as deploy/setup.sh installs it: a module of python3 (or $PYTHON_BIN)."""
    return [os.environ.get("PYTHON_BIN", "python3"), "-m", "uv"]


@pytest.fixture(scope="session")
def airflow_venv() -> Path:
    """A virtual environment with the pinned Airflow: built once, then reused from the cache."""
    digest = hashlib.sha256(AIRFLOW_LOCK.read_bytes()).hexdigest()[:12]
    py = f"py{sys.version_info.major}.{sys.version_info.minor}"
    venv = CACHE / f"airflow-{airflow_version()}-{py}-{digest}"
    if (venv / ".complete").exists():
        return venv
    CACHE.mkdir(parents=True, exist_ok=True)
    building = venv.with_name(f"{venv.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    for cmd in ([*_uv(), "venv", "-q", "--relocatable", "-p", sys._base_executable, str(building)],
                [*_uv(), "pip", "install", "-q", "-p", str(building / "bin" / "python"), "-r", str(AIRFLOW_LOCK)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stderr[-3000:]}"
    (building / ".complete").touch()
    try:
        building.rename(venv)  # atomic: a second test run at once either wins or finds it complete
    except OSError:
        shutil.rmtree(building, ignore_errors=True)
        assert (venv / ".complete").exists()
    return venv


def _airflow_env(airflow_home: Path, **extra: str) -> dict[str, str]:
    return {**CRON_ENV, "AIRFLOW_HOME": str(airflow_home), "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", **extra}


_LOAD_DAGBAG = """
import json, airflow
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder={folder!r})
out = {{"version": airflow.__version__, "import_errors": {{str(k): str(v) for k, v in bag.import_errors.items()}},
        "dag_ids": sorted(bag.dag_ids), "dags": {{}}}}
for dag_id, dag in bag.dags.items():
    out["dags"][dag_id] = {{
        "timetable": type(dag.timetable).__name__, "cron": dag.timetable.expression,
        "timezone": str(dag.timetable.timezone),
        "catchup": dag.catchup, "max_active_runs": dag.max_active_runs,
        "retries": dag.default_args.get("retries"),
        "tasks": [{{"task_id": t.task_id, "operator": type(t).__name__, "bash_command": t.bash_command,
                    "cwd": t.cwd, "downstream": sorted(t.downstream_task_ids)}} for t in dag.topological_sort()],
    }}
print("DAGBAG " + json.dumps(out))
"""


def _readme_commands() -> dict[str, list[str]]:
    """The commands of the README's "Nightly refresh" block, by the scheduler its comment names."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Nightly refresh", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    out: dict[str, list[str]] = {"deploy/cron": [], "deploy/airflow": []}
    for line in block.splitlines():
        cmd, _, comment = line.partition("#")
        for scheduler, commands in out.items():
            if scheduler in comment:
                commands.append(cmd.strip())
    return out


def cron_entry() -> tuple[dict[str, str], str]:
    """The shipped crontab's variable lines and the command of its one job line."""
    variables, jobs = {}, []
    for line in CRON.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if m := re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line):
            variables[m[1]] = m[2]
        else:
            jobs.append(line.split(None, 5))
    assert len(jobs) == 1 and len(jobs[0]) == 6, jobs
    schedule, command = " ".join(jobs[0][:5]), jobs[0][5]
    assert schedule == "0 2 * * *"
    assert "%" not in command, "cron(8) turns % into a newline"
    return variables, command


def test_airflow_loads_the_dag_as_the_readme_says(airflow_venv, tmp_path):
    script = _LOAD_DAGBAG.format(folder=str(DAG_FOLDER))
    proc = subprocess.run([str(airflow_venv / "bin" / "python"), "-c", script], capture_output=True, text=True,
                          timeout=300, check=False, env=_airflow_env(tmp_path / "airflow"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    bag = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("DAGBAG "))[len("DAGBAG "):])
    assert bag["version"] == airflow_version()
    assert bag["import_errors"] == {}
    assert bag["dag_ids"] == ["clustermix_nightly"]
    dag = bag["dags"]["clustermix_nightly"]
    # what the scheduler runs by: a cron trigger at 02:00 (UTC, Airflow's default time zone)
    assert dag["timetable"] == "CronTriggerTimetable"
    assert (dag["cron"], dag["timezone"]) == ("0 2 * * *", "UTC")
    assert (dag["catchup"], dag["max_active_runs"], dag["retries"]) == (False, 1, 2)
    tasks = dag["tasks"]
    assert [(t["task_id"], t["downstream"]) for t in tasks] == [("refresh", ["report"]), ("report", ["maintain"]),
                                                                ("maintain", [])]
    assert {t["operator"] for t in tasks} == {"BashOperator"}
    assert [t["bash_command"] for t in tasks] == _readme_commands()["deploy/airflow"]
    # where it runs by default: the checkout the cron entry names too
    assert {t["cwd"] for t in tasks} == {cron_entry()[0]["CLUSTERMIX_HOME"]}


def test_the_cron_entry_runs_the_readme_command():
    variables, command = cron_entry()
    assert variables == {"CLUSTERMIX_HOME": "/opt/clustermix"}
    inner = re.search(r"sh -c '([^']*)'", command)
    assert inner, command
    # with CLUSTERMIX_CONFIG unset, the job runs exactly the README's command
    setup, *steps = inner[1].replace('"${CLUSTERMIX_CONFIG:-conf/nightly.yaml}"', "conf/nightly.yaml").split(" && ")
    assert setup == "make setup"
    # the refresh, then table upkeep (only after a refresh that succeeded)
    assert steps == _readme_commands()["deploy/cron"]
    assert [s.split()[1] for s in steps] == ["refresh", "maintain"]


def test_make_setup_is_a_fast_noop_on_an_installed_checkout():
    """The cron job runs `make setup` every night, with cron's PATH: it must install nothing."""
    t0 = time.monotonic()
    proc = subprocess.run(["make", "setup"], cwd=ROOT, env=CRON_ENV, capture_output=True, text=True, timeout=300,
                          check=False)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "installing" not in proc.stdout + proc.stderr and "downloading" not in proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("setup: done")
    assert seconds < 30, f"make setup took {seconds:.1f} s"


def _table_versions(lake: Path) -> dict[str, int]:
    from deltalake import DeltaTable

    return {p.parent.name: DeltaTable(str(p.parent)).version() for p in sorted(lake.glob("*/_delta_log"))}


def _runs(lake: Path) -> list[dict]:
    from deltalake import DeltaTable

    rows = DeltaTable(str(lake / "runs")).to_pyarrow_table().to_pylist()
    return sorted(rows, key=lambda r: r["recorded_at"])


@pytest.fixture(scope="module")
def nightly(tmp_path_factory, bbc_slice):
    """A config file for the nightly job on a small corpus: lake and input folder in tmp."""
    base = tmp_path_factory.mktemp("nightly")
    incoming = base / "incoming"
    incoming.mkdir()
    shutil.copy(bbc_slice, incoming / "day1.jsonl")
    config = base / "nightly.yaml"
    config.write_text(yaml.safe_dump({
        "lake": {"root": str(base / "lake")},
        "spark": {"master": "local[2]", "shuffle_partitions": 2, "driver_memory": "2g"},
        "ray": {"num_cpus": 2},
        "input": {"path": str(incoming), "format": "jsonl"},
        "embed": {"device": "cpu", "batch_size": 32, "torch_threads": 1, "cpus_per_actor": 1},
        "cluster": {"k": 4, "niter": 20, "num_shards": 2, "cpus_per_shard": 0.25},
        "sample": {"budget": 150, "clip": 3, "order": "g2s"},
    }))
    return config, base / "lake"


def _run_cron_job(config: Path) -> tuple[int, str]:
    """The job line's command as cron runs it, with CLUSTERMIX_HOME at this checkout; returns the exit
    status and what it appended to $CLUSTERMIX_HOME/nightly.log (which is put back as it was)."""
    _, command = cron_entry()
    log = ROOT / "nightly.log"
    before = log.read_bytes() if log.exists() else None
    try:
        proc = subprocess.run(["sh", "-c", command], env={**CRON_ENV, "CLUSTERMIX_HOME": str(ROOT),
                                                          "CLUSTERMIX_CONFIG": str(config)},
                              capture_output=True, text=True, timeout=900, check=False)
        written = log.read_bytes()[len(before or b""):].decode(errors="replace")
    finally:
        if before is None:
            log.unlink(missing_ok=True)
        else:
            log.write_bytes(before)
    assert proc.stdout == proc.stderr == "", "the job's output all goes to nightly.log"
    return proc.returncode, written


def test_the_cron_job_runs_a_refresh_then_one_that_writes_nothing(nightly):
    config, lake = nightly
    rc, log = _run_cron_job(config)
    assert rc == 0, log[-4000:]
    assert "setup: done" in log and "succeeded" in log
    first = _table_versions(lake)
    assert {"docs", "embeddings", "centroids", "assignments", "cluster_stats", "sample_plan", "blended",
            "input_files", "runs"} <= set(first), first
    (run,) = _runs(lake)
    assert (run["mode"], run["outcome"], run["files_taken"]) == ("bootstrap", "succeeded", 1)

    assert "compaction / vacuum" in log  # maintain's per-table summary, after the refresh

    rc, log = _run_cron_job(config)
    assert rc == 0, log[-4000:]
    second = _table_versions(lake)
    # the first night's maintain compacted what there was: nothing else to do but the new runs row
    assert {t: v for t, v in second.items() if t != "runs"} == {t: v for t, v in first.items() if t != "runs"}
    from deltalake import DeltaTable

    from clustermix.deltalog import data_version

    assert data_version(str(lake / "runs")) == first["runs"] + 1  # one row appended, then compacted
    assert len(DeltaTable(str(lake / "runs")).file_uris()) == 1
    last = _runs(lake)[-1]
    assert (last["mode"], last["outcome"], last["files_taken"]) == ("refresh", "succeeded", 0)
    assert json.loads(last["versions_written"]) == {}


def test_airflow_runs_the_dag(airflow_venv, nightly, tmp_path):
    """`airflow dags test`: both tasks run for real through Airflow's task runner (sqlite metadata DB)."""
    config, lake = nightly
    env = _airflow_env(tmp_path / "airflow", CLUSTERMIX_HOME=str(ROOT), CLUSTERMIX_CONFIG=str(config))
    airflow = [str(airflow_venv / "bin" / "python"), "-m", "airflow"]
    runs_before = len(_runs(lake)) if (lake / "runs").exists() else 0
    for cmd in ([*airflow, "db", "migrate"], [*airflow, "dags", "test", "clustermix_nightly"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert "state=success" in out, out[-4000:]
    assert all(f"[DAG TEST] end task task_id={t}" in out for t in ("refresh", "report", "maintain"))
    runs = _runs(lake)
    assert len(runs) == runs_before + 1 and runs[-1]["outcome"] == "succeeded"
    assert (lake / "runs" / runs[-1]["run_id"] / "report.html").is_file()
