#!/usr/bin/env python3
"""Rehearse the cluster deployment on one machine: real clusters, the README's commands.

Starts a Ray cluster (a head and two worker nodes, ``ray start``, each node with a resource of its
own, none of them with Java on its PATH) and a Spark standalone cluster (a master and two workers,
``spark-class``), then submits the pipeline as the README's "Running on a cluster" says:

    STAGES=ingest deploy/spark-submit.sh --config C
    deploy/ray-job.sh --config C
    STAGES="stats sample blend" deploy/spark-submit.sh --config C

and, with ``--new-file``, two nightly refreshes against the same clusters (``STAGES=refresh
deploy/spark-submit.sh ... --set ray.address=<head>:<port>`` from a Ray node: the first adopts the lake,
the second takes one new input file). ``--lake`` may be given more than once: the same clusters then
run the README's steps for each lake in turn (each with a config of its own), and the nightly
refreshes for the last one. Every process it starts is stopped when it ends, also on failure or Ctrl-C.

    .venv/bin/python deploy/rehearse.py --workdir /tmp/rehearsal --input data/ [--lake s3://b/lake ...]
        [--new-file extra.jsonl] [--set KEY=VALUE ...]

``--set`` overrides go into the config the jobs get (``<workdir>/cluster.yaml``, or
``cluster-<n>.yaml`` for the n-th of several lakes, made from ``conf/cluster.yaml`` with this
machine's sizes). For an ``s3://`` lake, the S3 endpoint and
credentials come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), which every
node inherits. It prints one JSON line at the end: the commands run, the processes started (and
any node restarted because its raylet could not bind a port), and the wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the project's environment: ray, spark-submit, clustermix
JAVA_FREE_CHECK = "import shutil, sys; sys.exit('java on PATH: ' + shutil.which('java') if shutil.which('java') else 0)"


def log(msg: str) -> None:
    print(f"rehearse: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """Every long-lived process the rehearsal starts, each in a process group of its own, so that
    stopping one stops what it started (Ray's daemons, Spark's executors) and nothing else: no
    ``ray stop``, which would stop every Ray instance on the machine."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append((name, proc))
        return proc

    def stop_last(self) -> None:
        """Stop what the last started process left (a node that failed to start leaves daemons)."""
        _, proc = self.started[-1]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            time.sleep(2)

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for _, proc in reversed(self.started):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
            deadline = time.time() + 15
            while sig == signal.SIGTERM and time.time() < deadline and any(_group_alive(p.pid) for _, p in self.started):
                time.sleep(0.5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def java_free_path(tmp: Path) -> str:
    """A PATH on which ``java`` cannot be found: this environment's bin, then a folder of links to
    every other command on PATH except the JDK's, as a Ray image without a JVM has it."""
    shim = tmp / "bin-nojava"
    shim.mkdir(parents=True, exist_ok=True)
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not d or not os.path.isdir(d) or Path(d) == BIN:
            continue
        for entry in os.scandir(d):
            if entry.name in ("java", "javac", "jshell", "jar", "spark-submit", "spark-class", "pyspark"):
                continue
            link = shim / entry.name
            if not link.exists() and not link.is_symlink():
                with contextlib.suppress(OSError):
                    link.symlink_to(entry.path)
    return os.pathsep.join([str(BIN), str(shim)])


def wait_for(what: str, check: Any, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(1)
    raise SystemExit(f"rehearse: {what} did not come up within {timeout:.0f} s")


def start_ray(procs: Processes, tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    """A head and two workers; the job server (dashboard) on the head."""
    gcs, dash = free_port(), free_port()

    def node_ports() -> list[str]:  # a node's agents on ports of their own: not the defaults another Ray holds
        return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]

    common = ["--num-gpus", "0", "--disable-usage-stats", "--block"]
    # the dashboard gives each of its modules 30 s to start, which a busy machine can miss
    env = {"RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "180", **env}
    for attempt in range(1, 4):
        head = procs.start("ray-head" + (f"-retry{attempt - 1}" if attempt > 1 else ""), [
            str(BIN / "ray"), "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dash), "--ray-client-server-port", str(free_port()), "--num-cpus", "1",
            "--resources", '{"rehearsal_head": 1}', "--temp-dir", str(tmp / "ray"), *node_ports(), *common], env)
        url = f"http://127.0.0.1:{dash}"
        wait_for("the Ray head's job server", lambda p=head, u=url: p.poll() is not None or
                 urllib.request.urlopen(f"{u}/api/version", timeout=2).status == 200, timeout=300)
        if head.poll() is None:
            break
        # a port taken before the head bound it, or a dashboard module that missed its start-up time
        log(f"the Ray head exited with {head.returncode} while starting (attempt {attempt}); see its log")
        procs.stop_last()
        gcs, dash = free_port(), free_port()
    else:
        raise SystemExit("rehearse: the Ray head did not start in 3 attempts")
    host = _gcs_host(tmp / "ray")
    for i in (1, 2):  # one after the other: two raylets registering at once time out on a busy machine
        for attempt in range(1, 4):
            # a port that was free when picked can be taken before the raylet binds it (other processes
            # of a busy machine): a node whose raylet died that way is started again, on fresh ports
            proc = procs.start(f"ray-worker-{i}" + (f"-retry{attempt - 1}" if attempt > 1 else ""), [
                str(BIN / "ray"), "start", "--address", f"{host}:{gcs}", "--num-cpus", "1",
                "--resources", json.dumps({f"rehearsal_worker_{i}": 1}), *node_ports(), *common], env)
            wait_for(f"Ray worker node {i}", lambda n=i + 1, p=proc: _alive_nodes(url) == n or p.poll() is not None,
                     timeout=300)
            if proc.poll() is None:
                break
            log(f"Ray worker node {i} exited with {proc.returncode} while starting (attempt {attempt}); "
                "see its log")
            procs.stop_last()
        else:
            raise SystemExit(f"rehearse: Ray worker node {i} did not start in 3 attempts")
    return {"address": f"{host}:{gcs}", "dashboard": url}


def _gcs_host(temp_dir: Path) -> str:
    """The address the head registered (Ray picks the machine's address, not loopback)."""
    wait_for("the Ray head's session", lambda: (temp_dir / "session_latest" / "node_ip_address.json").exists()
             or any(temp_dir.glob("session_latest/*")))
    with contextlib.suppress(Exception):
        return str(json.loads((temp_dir / "session_latest" / "node_ip_address.json").read_text())["node_ip_address"])
    return socket.gethostbyname(socket.gethostname())


def _alive_nodes(url: str) -> int:
    with urllib.request.urlopen(f"{url}/nodes?view=summary", timeout=5) as r:
        nodes = json.load(r)["data"]["summary"]
    return sum(1 for n in nodes if n.get("raylet", {}).get("state") == "ALIVE")


def start_spark(procs: Processes, tmp: Path, env: dict[str, str]) -> str:
    """A standalone master and two workers (one core, 2 GiB each) from the spark-class pyspark ships."""
    import pyspark

    spark_home = Path(pyspark.__file__).parent
    # made here, not by the workers: each worker runs `exists() || mkdirs()` on it at its first executor,
    # and the one that loses that race caches "no local dir" and fails every executor it launches
    local = tmp / "spark-local"
    local.mkdir(parents=True, exist_ok=True)
    env = {**env, "SPARK_HOME": str(spark_home), "SPARK_LOG_DIR": str(tmp / "spark-logs"),
           "SPARK_LOCAL_DIRS": str(local), "SPARK_NO_DAEMONIZE": "1"}
    cls = str(spark_home / "bin" / "spark-class")
    port, ui = free_port(), free_port()
    procs.start("spark-master", [cls, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                 "--port", str(port), "--webui-port", str(ui)], env)
    master = f"spark://127.0.0.1:{port}"
    wait_for("the Spark master", lambda: urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2).status == 200)
    for i in (1, 2):
        procs.start(f"spark-worker-{i}", [cls, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                                          "--cores", "1", "--memory", "2g", "--webui-port", str(free_port()),
                                          "--work-dir", str(tmp / f"spark-worker-{i}"), master], env)

    def workers() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2) as r:
            return sum(1 for w in json.load(r)["workers"] if w["state"] == "ALIVE")

    wait_for("two Spark workers", lambda: workers() == 2)
    return master


def rehearsal_config(path: Path, lake: str, input_path: str, input_format: str, overrides: list[str]) -> Path:
    """conf/cluster.yaml with this rehearsal's lake and input, sized for one small machine."""
    import yaml

    tree = yaml.safe_load((ROOT / "conf" / "cluster.yaml").read_text())
    tree["lake"]["root"] = lake
    tree["input"].update(path=input_path, format=input_format)
    # Delta rebuilds a table's file list with snapshotPartitions tasks after each new version (50 by
    # default, for a big cluster): on two one-core workers that is most of each small job's time
    tree["spark"].update(shuffle_partitions=4, conf={**(tree["spark"].get("conf") or {}),
                                                    "spark.databricks.delta.snapshotPartitions": "2"})
    # two actors of half a CPU each: Ray Data's read tasks need a CPU beside them, also where local
    # mode runs this config on two CPUs
    tree["embed"].update(device="cpu", num_actors=2, cpus_per_actor=0.5, gpus_per_actor=0, batch_size=32,
                         precision="float32", torch_threads=1)
    tree["cluster"].update(k=4, niter=20, num_shards=2, cpus_per_shard=0.25, use_gpu="never")
    tree["sample"].update(budget=150, clip=3)
    tree["blend"].update(broadcast_max_rows=1000)
    for item in overrides:
        key, _, value = item.partition("=")
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def cluster_errors(logs: Path, limit: int = 20) -> str:
    """The ERROR lines of the cluster daemons' logs (a failed submission's cause is often there, not in
    the driver's output: an executor a worker could not launch, a node that died)."""
    out = []
    for path in sorted(logs.glob("*.log")):
        with contextlib.suppress(OSError):
            errors = [ln for ln in path.read_text(errors="replace").splitlines() if " ERROR " in ln or "Exception:" in ln]
            if errors:
                out.append(f"--- {path.name}: {len(errors)} error lines, the first {min(limit, len(errors))}:")
                out.extend(errors[:limit])
    return "\n".join(out) + "\n" if out else ""


def run(cmd: list[str], env: dict[str, str], commands: list[str], logs: Path, shown: str | None = None) -> None:
    """Run one of the README's commands in the checkout; its output goes to this script's stderr, and
    on failure the ERROR lines of the daemons' logs under ``logs`` follow it."""
    shown = shown or " ".join(cmd)
    commands.append(shown)
    log(f"$ {shown}")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=sys.stderr, stderr=sys.stderr, check=False)
    if proc.returncode != 0:
        sys.stderr.write(cluster_errors(logs))
        raise SystemExit(f"rehearse: `{shown}` exited with {proc.returncode}")
    log(f"  done in {time.time() - t0:.0f} s")


def check_java_free(dashboard: str, env: dict[str, str], commands: list[str]) -> None:
    """A first job: no ``java`` on the PATH of a Ray job. It also waits for the head's job agent,
    which registers some seconds after the nodes do."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--", "python", "-c", JAVA_FREE_CHECK]
    commands.append("ray job submit -- python -c <no java on the PATH of a Ray job>")
    deadline = time.time() + 180
    while True:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        if "No available agent" not in proc.stderr + proc.stdout or time.time() > deadline:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit("rehearse: the Java-free check job failed")
        time.sleep(3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="configs and logs (the lake too, unless --lake)")
    ap.add_argument("--input", required=True, help="the input folder (JSONL or Parquet files)")
    ap.add_argument("--format", default="jsonl", choices=["jsonl", "parquet"])
    ap.add_argument("--lake", dest="lakes", action="append", default=[],
                    help="the lake root (default <workdir>/lake); s3://... for an S3 lake; repeat it to rehearse "
                         "several lakes on the same clusters (the nightly runs on the last)")
    ap.add_argument("--new-file", type=Path, help="a file to add to the input before the second refresh")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)

    t_start = time.time()
    work = args.workdir.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    lakes = args.lakes or [str(work / "lake")]
    cfgs = [rehearsal_config(work / ("cluster.yaml" if len(lakes) == 1 else f"cluster-{n}.yaml"), lake, args.input,
                             args.format, args.overrides) for n, lake in enumerate(lakes, 1)]
    # Ray's socket paths must stay short (108 bytes): its temp folder is not under a long workdir
    tmp = Path(tempfile.mkdtemp(prefix="cmr-", dir="/tmp"))
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SPARK_HOME", "PYSPARK_PYTHON")}
    base.update(PYSPARK_PYTHON=sys.executable, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    ray_env = {k: v for k, v in base.items() if k != "JAVA_HOME"}
    ray_env["PATH"] = java_free_path(tmp)
    procs = Processes(work / "logs")
    commands: list[str] = []
    try:
        ray_info = start_ray(procs, tmp, ray_env)
        master = start_spark(procs, tmp, base)
        log(f"Ray cluster at {ray_info['dashboard']} (3 nodes), Spark standalone at {master} (2 workers)")
        env = {**base, "PATH": os.pathsep.join([str(BIN), base.get("PATH", "")]), "SPARK_MASTER": master,
               "RAY_ADDRESS": ray_info["dashboard"], "SPARK_SUBMIT": str(BIN / "spark-submit"), "RAY": str(BIN / "ray")}
        check_java_free(ray_info["dashboard"], env, commands)
        for cfg in cfgs:
            c = ["--config", str(cfg)]
            run(["bash", "deploy/spark-submit.sh", *c], {**env, "STAGES": "ingest"}, commands, procs.logs,
                f"STAGES=ingest deploy/spark-submit.sh --config {cfg}")
            run(["bash", "deploy/ray-job.sh", *c], env, commands, procs.logs, f"deploy/ray-job.sh --config {cfg}")
            run(["bash", "deploy/spark-submit.sh", *c], {**env, "STAGES": "stats sample blend"}, commands, procs.logs,
                f'STAGES="stats sample blend" deploy/spark-submit.sh --config {cfg}')
        cfg = cfgs[-1]
        if args.new_file:
            # the refresh drives both engines from one driver: Spark's, submitted like the Spark stages,
            # on a machine that is a node of the Ray cluster (here the head's), connected to the head's
            # GCS address. Not Ray Client (ray://): Ray Data cannot run through it (rehearsed: its
            # executor fails with "'Worker' object has no attribute 'core_worker'")
            c = ["--config", str(cfg), "--set", f"ray.address={ray_info['address']}"]
            shown = f"STAGES=refresh deploy/spark-submit.sh --config {cfg} --set ray.address=<head>:<port>"
            run(["bash", "deploy/spark-submit.sh", *c], {**env, "STAGES": "refresh"}, commands, procs.logs, shown)
            shutil.copy(args.new_file, Path(args.input) / args.new_file.name)
            run(["bash", "deploy/spark-submit.sh", *c], {**env, "STAGES": "refresh"}, commands, procs.logs,
                shown + "   # one new input file")
    finally:
        started = [name for name, _ in procs.started]
        procs.stop()
        # Ray's own logs (raylets, job drivers, actors) live in its temp folder: keep them with ours
        with contextlib.suppress(OSError):
            shutil.copytree(tmp / "ray" / "session_latest" / "logs", work / "logs" / "ray", dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"lakes": lakes, "seconds": round(time.time() - t_start, 1), "commands": commands,
                      "processes": list(dict.fromkeys(n.split("-retry")[0] for n in started)),
                      "restarted": [n for n in started if "-retry" in n]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
