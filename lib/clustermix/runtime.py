"""Build the engines' sessions from config: one Spark session and one Ray connection per process.

Stages never create sessions: they take ``spark`` as an argument and use the Ray that is already
initialised. Local and cluster mode differ only in config (``spark.master``, ``ray.address``).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clustermix.config import Config, ConfigError, SparkConfig
from clustermix.errors import ClustermixError

if TYPE_CHECKING:
    from collections.abc import Callable

    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

DELTA_SCALA = "2.13"


def delta_package() -> str:
    """The Maven coordinate of the Delta jar matching the installed delta-spark."""
    from importlib.metadata import version

    return f"io.delta:delta-spark_{DELTA_SCALA}:{version('delta-spark')}"


def hadoop_version() -> str:
    """The Hadoop version pyspark bundles (its hadoop-client-api jar): hadoop-aws must be the same."""
    from pyspark.find_spark_home import _find_spark_home

    # Spark's home, not pyspark's folder: under spark-submit pyspark is imported from a zip in it
    home = Path(os.environ.get("SPARK_HOME") or _find_spark_home())
    jars = sorted((home / "jars").glob("hadoop-client-api-*.jar"))
    if not jars:
        raise ClustermixError(f"no hadoop-client-api jar in {home}/jars: cannot tell which hadoop-aws to use")
    return jars[0].name.removeprefix("hadoop-client-api-").removesuffix(".jar")


def s3a_package() -> str:
    """hadoop-aws (s3a) at pyspark's Hadoop version; Ivy brings the AWS SDK v2 bundle its POM names."""
    return f"org.apache.hadoop:hadoop-aws:{hadoop_version()}"


def spark_packages(cfg: Config) -> list[str]:
    """The Maven packages a Spark session of this config needs: Delta, and s3a when a path is on S3
    (the AWS SDK bundle is a large jar to put on every classpath, so only then)."""
    return [delta_package()] + ([s3a_package()] if uses_s3(cfg) else [])


def uses_s3(cfg: Config) -> bool:
    """Whether this config reads or writes ``s3://`` (then Spark needs s3a)."""
    from clustermix import storage

    paths = (cfg.lake.root, cfg.input.path, cfg.blend.mixture_path, cfg.search.target_path)
    return any(storage.is_s3(p) for p in paths)


def maven_repo(cfg: SparkConfig) -> Path:
    return Path(cfg.maven_repo or os.environ.get("CLUSTERMIX_MAVEN_REPO", "~/.m2/repository")).expanduser()


def _offline_ivy_settings(repo: Path, workdir: Path) -> Path:
    """Ivy settings that resolve only from the local Maven repository: no network at run time."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "ivysettings-local-m2.xml"
    path.write_text(
        "<ivysettings>\n"
        '  <settings defaultResolver="local-m2"/>\n'
        "  <resolvers>\n"
        f'    <ibiblio name="local-m2" m2compatible="true" root="{repo.resolve().as_uri()}"/>\n'
        "  </resolvers>\n"
        "</ivysettings>\n"
    )
    return path


def local_cores(master: str | None) -> int | None:
    """The cores of a ``local``/``local[N]``/``local[*]`` master (``local[N, retries]`` too), else None."""
    if not master or not master.startswith("local"):
        return None
    inside = master[len("local"):].strip("[]").split(",")[0].strip()
    if inside == "":
        return 1
    if inside == "*":
        return os.cpu_count() or 1
    try:
        return max(1, int(inside))
    except ValueError:
        return None


def spark_session(cfg: Config) -> SparkSession:
    """Get or create the process's Spark session with Delta enabled."""
    from pyspark.sql import SparkSession

    sc = cfg.spark
    builder = SparkSession.builder.appName(sc.app_name)
    if sc.master:
        builder = builder.master(sc.master)
    conf = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.shuffle.partitions": str(sc.shuffle_partitions),
        "spark.driver.memory": sc.driver_memory,
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.session.timeZone": "UTC",
        # Ray and delta-rs read our tables file by file: deletion vectors would hide deletes from them.
        "spark.databricks.delta.properties.defaults.enableDeletionVectors": "false",
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
        # PySpark 4 records the Python call site of every Column call for error messages: a stack walk
        # and five Py4J round trips each (bench/RESULTS.md), paid again on every plan built
        "spark.python.sql.dataFrameDebugging.enabled": "false",
    }
    cores = local_cores(sc.master)
    if cores is not None:
        # Delta rebuilds a table's file list with this many tasks after each new version (default 50):
        # on a cluster they run side by side; on one machine each costs tens of ms, a second or two per
        # table operation, so local mode uses one per core
        conf["spark.databricks.delta.snapshotPartitions"] = str(cores)
        # shuffle files never leave this machine: compressing them only spends the cores (lz4 on a
        # shuffle of text costs whole seconds of the cores; bench/RESULTS.md), for disk that stays local
        conf["spark.shuffle.compress"] = "false"
        # likewise a broadcast's compressed copy is only for other machines: here tasks share the
        # driver's object (the blend's plan), so compressing it is work for nothing
        conf["spark.broadcast.compress"] = "false"
    s3 = uses_s3(cfg)
    if s3:
        from clustermix import storage

        conf.update(storage.spark_conf(cfg.storage))  # s3a endpoint, region, retries; Delta's S3 LogStore
    if sc.delta_jars != "none":
        conf["spark.jars.packages"] = ",".join(spark_packages(cfg))
    if sc.delta_jars == "local-m2":
        repo = maven_repo(sc)
        needed = [repo / "io" / "delta" / f"delta-spark_{DELTA_SCALA}"]
        if s3:
            # Ivy learns from hadoop-aws's POM that it needs the AWS SDK bundle: without the POM the
            # session starts and s3a fails later, deep in a write, on a missing SDK class
            hv = hadoop_version()
            needed.append(repo / "org" / "apache" / "hadoop" / "hadoop-aws" / hv / f"hadoop-aws-{hv}.pom")
        for path in needed:
            if not path.exists():
                raise ClustermixError(f"{path} not found; run `make setup` (or deploy/fetch-jars.sh) first")
        ivy_home = Path(os.environ.get("CLUSTERMIX_IVY_HOME", Path.home() / ".cache" / "clustermix" / "ivy"))
        conf["spark.jars.ivySettings"] = str(_offline_ivy_settings(repo, ivy_home))
        conf["spark.jars.ivy"] = str(ivy_home)
    conf.update(sc.conf)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    if cores is not None and "PYSPARK_PYTHON" not in os.environ:
        # local Python workers (the input file checks run as Python tasks) are this machine's
        # processes, which PySpark starts with ``python3`` from PATH: maybe another Python, without
        # clustermix. They run this interpreter instead; a cluster's run its image's (PYSPARK_PYTHON)
        spark.sparkContext.pythonExec = sys.executable
    spark.sparkContext.setLogLevel("ERROR")
    _require_class(spark, "io.delta.sql.DeltaSparkSessionExtension", "spark.delta_jars", sc.delta_jars,
                   lambda: f"the Delta jar ({delta_package()}) is not on Spark's classpath")
    if s3:
        _require_class(spark, "org.apache.hadoop.fs.s3a.S3AFileSystem", "spark.delta_jars", sc.delta_jars,
                       lambda: f"the lake or input is on s3:// but hadoop-aws ({s3a_package()}) is not on Spark's "
                               "classpath")
    from clustermix import console

    console.engines_started()
    return spark


def _require_class(spark: SparkSession, name: str, key: str, value: str, problem: Callable[[], str]) -> None:
    """A missing jar, named at once: otherwise Spark only warns and the first Delta or s3a call fails
    deep inside a stage. ``problem`` is worded only on failure (naming the jar reads Spark's home)."""
    jvm: Any = spark._jvm
    try:
        jvm.java.lang.Class.forName(name, False, jvm.java.lang.Thread.currentThread().getContextClassLoader())
    except Exception:
        raise ConfigError(key, value, f"{problem()}: give it to spark-submit (--packages "
                          "`clustermix spark-packages`; deploy/spark-submit.sh does) or bake it into the image") from None


def check_engines(cfg: Config, engines: set[str]) -> None:
    """Fail fast, before any work, on an engine setting that cannot work on a cluster (ConfigError,
    exit code 2, naming the key): Spark that would quietly run inside this one process while the lake
    is remote, and a Ray address that nothing answers on."""
    from clustermix import storage

    if ("spark" in engines and cfg.spark.master is None and "PYSPARK_GATEWAY_PORT" not in os.environ
            and storage.is_s3(cfg.lake.root)):
        raise ConfigError("spark.master", None, "unset and not started by spark-submit, so Spark would run inside "
                          f"this one process while lake.root is {cfg.lake.root}: submit with deploy/spark-submit.sh, "
                          "or set it (spark://host:7077, k8s://..., or local[*] to run locally on purpose)")
    address = cfg.ray.address
    if "ray" in engines and address and address != "auto":
        hostport = address.split("://", 1)[-1].rstrip("/")
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError("ray.address", address, "expected host:port, ray://host:port or auto")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as exc:
            raise ConfigError("ray.address", address, f"nothing answers at {host}:{port} ({exc.strerror or exc})") \
                from None


def ray_init(cfg: Config) -> None:
    """Connect to (or start) Ray once per process; later calls are no-ops."""
    import ray

    if ray.is_initialized():
        return
    from clustermix import console

    kwargs: dict[str, object] = {
        "include_dashboard": False,
        # with the console routed to the run's log, workers' output stays in Ray's session logs
        "log_to_driver": not console.routed(),
        "configure_logging": True,
        "logging_level": logging.WARNING,
    }
    from clustermix import faults, storage

    env = storage.ray_env(cfg.storage)  # workers on other machines reach the object store as configured
    if os.environ.get(faults.ENV):
        env[faults.ENV] = os.environ[faults.ENV]
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    if cfg.ray.address:
        kwargs["address"] = cfg.ray.address
    else:
        if cfg.ray.num_cpus:
            kwargs["num_cpus"] = cfg.ray.num_cpus
        if cfg.ray.object_store_memory_mb:
            kwargs["object_store_memory"] = cfg.ray.object_store_memory_mb * 1024 * 1024
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        if cfg.ray.address != "auto":
            raise
        raise ConfigError("ray.address", "auto", "no running Ray cluster found from this machine (start one with "
                          "`ray start`, submit with deploy/ray-job.sh, or give its address)") from exc
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # live bars on a terminal; in logs (CI, cluster jobs) the stages log their own progress
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False
    console.engines_started()
    log.debug("Ray: %s (workers' logs under its session folder)", ray.get_runtime_context().gcs_address)
