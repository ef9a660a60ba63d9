"""The runner: stages in order over one lake, skipping those whose outputs are current, and the manifest.

What a stage is comes from :mod:`clustermix.registry`. Each stage reads its input tables at pinned
versions and writes its outputs through the writer. What decides whether a stage must run is its
fingerprint: the config keys it declares and the Delta versions of its inputs (plus what its
``inputs`` function adds). While one stage runs, the state of the next stage's output tables loads
in the background.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clustermix import __version__, deltalog, faults, registry, tableio
from clustermix import lake as lk
from clustermix.config import BUILTIN_PREFIX, Config, ConfigError
from clustermix.errors import DataError
from clustermix.lock import LakeLock
from clustermix.manifest import write_json
from clustermix.stage import Context, fingerprint

if TYPE_CHECKING:
    from threading import Thread

    from pyspark.sql import SparkSession

    from clustermix.inputs import InputSpec

log = logging.getLogger(__name__)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


class Run:
    """One invocation: config, lake, lazily created engines, and the manifest being written."""

    def __init__(self, cfg: Config, run_id: str | None = None, spark: SparkSession | None = None) -> None:
        self.cfg = cfg
        self.lake = lk.Lake.from_config(cfg)  # its object-store settings go wherever its tables do
        self.run_id = run_id or new_run_id()
        self._spark = spark
        self._checkpoints: str | None = None
        if spark is not None:
            self._use_checkpoints(spark)
        self.input_spec: InputSpec | None = None
        self.options: dict[str, Any] = {}  # run-wide choices a stage reads (a refresh's ``recluster``)
        self.manifest: dict[str, Any] = {
            "run_id": self.run_id, "clustermix_version": __version__, "started_at": _now(),
            "lake_root": self.lake.root, "config": cfg.to_dict(), "stages": {}, "outcome": "running",
        }
        # background loads of the state of tables a later stage writes, started by the stage before it
        self._ahead: dict[str, Thread] = {}

    @property
    def spark(self) -> SparkSession:
        if self._spark is None:
            from clustermix.runtime import spark_session

            self._spark = spark_session(self.cfg)
            self._use_checkpoints(self._spark)
        return self._spark

    def _use_checkpoints(self, spark: SparkSession) -> None:
        """Spark checkpoints of this run (the MinHash groups' rounds) go under the lake's staging folder:
        files every executor can read, so losing one executor loses no round (a local checkpoint would)."""
        from clustermix.minhash import CHECKPOINT_DIR_CONF

        self._checkpoints = self.lake.staging("checkpoints", self.run_id)
        spark.conf.set(CHECKPOINT_DIR_CONF, lk.spark_path(self._checkpoints))

    def _spark_if_started(self) -> SparkSession | None:
        return self._spark

    def ray(self) -> None:
        from clustermix.runtime import ray_init

        ray_init(self.cfg)

    def settle(self) -> None:
        """Wait for the background loads that no stage's write reaped (a stage skipped or failed)."""
        while self._ahead:
            self._ahead.popitem()[1].join()
        if self._checkpoints is not None:
            from clustermix.minhash import CHECKPOINT_DIR_CONF

            if self._spark is not None:
                self._spark.conf.unset(CHECKPOINT_DIR_CONF)  # a later run of this session sets its own
            self.lake.remove(self._checkpoints)

    @property
    def manifest_uri(self) -> str:
        return f"{self.lake.run_dir(self.run_id)}/manifest.json"

    def save(self) -> None:
        write_json(self.manifest_uri, self.manifest, s3=self.lake.s3)

    def input_versions(self, stage: str) -> dict[str, int]:
        out = {}
        for t in registry.get(stage).reads:
            v = deltalog.version(self.lake.table(t), s3=self.lake.s3)
            if v is None:
                raise DataError(f"stage {stage!r} needs table {t!r}, which does not exist yet: run "
                                f"`clustermix {registry.producer(t).name}` (or `clustermix run`) first")
            out[t] = v
        return out

    def data_versions(self, stage: str, inputs: dict[str, Any]) -> dict[str, int]:
        """The inputs' last data-changing versions (:func:`deltalog.data_version`), for those whose
        latest version differs."""
        out = {}
        for t in registry.get(stage).reads:
            v = deltalog.data_version(self.lake.table(t), s3=self.lake.s3)
            if v is not None and v != inputs.get(t):
                out[t] = v
        return out

    def run_stage(self, stage: str, then: str | None = None) -> dict[str, Any]:
        """Run ``stage`` unless its outputs are current; record what happened in the manifest.

        ``then``: the stage that runs next, whose outputs' state loads in the background while this
        one runs (:meth:`lake.TableWriter.prefetch_next`)."""
        decl = registry.get(stage)
        inputs: dict[str, Any] = dict(self.input_versions(stage))
        inputs.update(decl.extra_inputs(Context(self)))
        chash = decl.config_hash(self.cfg)
        # the fingerprint names the inputs' last data-changing versions: a compaction or vacuum by
        # `clustermix maintain` leaves every stage current (the stage itself reads the latest version)
        fp = fingerprint(stage, chash, {**inputs, **self.data_versions(stage, inputs)})
        outs = [self.lake.table(t) for t in decl.writes]
        if deltalog.is_current(outs, fp, s3=self.lake.s3):
            rec: dict[str, Any] = {"status": "skipped", "reason": "outputs current for these inputs and config",
                   "versions": {t: deltalog.version(self.lake.table(t), s3=self.lake.s3) for t in decl.writes}, "inputs": inputs}
            prev = deltalog.last_commit_meta(outs[0], s3=self.lake.s3) or {}
            rec["written_by_run"] = prev.get("run_id")
            self.manifest["stages"][stage] = rec
            self.save()
            log.info("%s: skipped (outputs current)", stage)
            return rec
        meta = {"run_id": self.run_id, "stage": stage, "fingerprint": fp, "inputs": inputs,
                "config_hash": chash, "clustermix_version": __version__}
        ahead = {t: self._ahead.pop(t) for t in decl.writes if t in self._ahead}
        writer = tableio.TableWriter(self.lake, meta, loading=ahead)
        # the Spark stages' commits need delta-spark's table state, loaded ahead; a Ray stage commits
        # with delta-rs and must not start a JVM (there is none on a Ray image), nor make one start
        # for a Ray stage after it
        if decl.engine == "spark":
            writer.prefetch(self.spark, decl.writes)
        if then is not None and registry.get(then).engine == "spark" and (decl.engine == "spark" or self._spark):
            later = [t for t in registry.get(then).writes if t not in decl.writes and t not in self._ahead]
            if later:
                self._ahead.update(writer.prefetch_next(self.spark, later))
        self.manifest["stages"][stage] = {"status": "running", "started_at": _now()}
        self.save()
        log.info("%s: running", stage)
        faults.hold(f"stage.{stage}")
        t0 = time.time()
        try:
            with _heartbeat(stage, self._spark_if_started):
                counts = decl.function()(Context(self, writer, decl.engine), inputs)
        finally:
            writer.settle()
        if self._spark is not None:
            self._spark.catalog.clearCache()
        done: dict[str, Any] = {"status": "ran", "seconds": round(time.time() - t0, 2), "counts": counts,
               "versions": writer.versions, "inputs": inputs}
        self.manifest["stages"][stage] = done
        self.save()
        return done

    def run_in_order(self, stages: Sequence[str], after: dict[str, Callable[[], None]] | None = None) -> None:
        """Run ``stages`` in the order given, each prefetching the next one's tables; ``after[name]()``
        runs once stage ``name`` has finished (run or skipped)."""
        for i, stage in enumerate(stages):
            self.run_stage(stage, then=stages[i + 1] if i + 1 < len(stages) else None)
            if after and stage in after:
                after[stage]()


PROGRESS_EVERY_S = 15.0


@contextlib.contextmanager
def _heartbeat(stage: str, spark: Callable[[], SparkSession | None]) -> Iterator[None]:
    """A progress line every :data:`PROGRESS_EVERY_S` seconds while a stage runs: its time so far and,
    while Spark works for it, the tasks done of the stages running (the Ray stages log their own)."""
    import threading

    stop = threading.Event()
    t0 = time.time()

    def beat() -> None:
        while not stop.wait(PROGRESS_EVERY_S):
            log.info("%s: running, %.0f s%s", stage, time.time() - t0, _spark_progress(spark()))

    thread = threading.Thread(target=beat, name=f"progress-{stage}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _spark_progress(spark: SparkSession | None) -> str:
    """``; Spark: 12/40 tasks`` over the Spark stages running now (empty when none)."""
    if spark is None:
        return ""
    try:
        tracker = spark.sparkContext.statusTracker()
        infos = [tracker.getStageInfo(s) for s in tracker.getActiveStageIds()]
        done = sum(i.numCompletedTasks for i in infos if i)
        total = sum(i.numTasks for i in infos if i)
    except Exception:  # a progress line must never fail the stage
        return ""
    return f"; Spark: {done}/{total} tasks" if total else ""


def check_paths(cfg: Config) -> None:
    """Fail early, before any work, on local paths and names that cannot work (remote paths are checked
    by the stage that opens them)."""
    p = cfg.input.path
    if p.startswith(BUILTIN_PREFIX):
        from clustermix.corpus import BUILTIN_CORPORA

        name = p[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_CORPORA:
            raise ConfigError("input.path", p, f"unknown builtin corpus; known: {sorted(BUILTIN_CORPORA)}")
    elif not _is_remote(p) and not Path(p.removeprefix("file://")).exists():
        raise ConfigError("input.path", p, "path does not exist")
    mp = cfg.blend.mixture_path
    if cfg.blend.mode == "mixture" and mp is None:
        raise ConfigError("blend.mixture_path", mp, "mode 'mixture' needs a mixture file (or 'search')")
    if mp is not None and mp != "search" and not _is_remote(mp) and not Path(mp).exists():
        raise ConfigError("blend.mixture_path", mp, "path does not exist")
    from clustermix.models import resolve_model

    resolve_model(cfg.embed.model)


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def session(cfg: Config, run_id: str | None = None, spark: SparkSession | None = None,
            mode: str = "run", stages: Sequence[str] = ()) -> Iterator[Run]:
    """A run under the lake lock: its outcome, tables and error land in the manifest and the ``runs`` table
    whatever happens. The engines of ``stages`` are checked first, before the lock or any work."""
    from clustermix.runtime import check_engines

    check_engines(cfg, registry.engines_of(stages) - ({"spark"} if spark else set()))
    run = Run(cfg, run_id, spark)
    run.manifest["mode"] = mode
    lock = LakeLock(run.lake, run.run_id, cfg.lake.lock_stale_seconds)
    lock.acquire()
    try:
        yield run
        run.manifest["outcome"] = "succeeded"
    except BaseException as exc:
        run.manifest["outcome"] = "failed"
        run.manifest["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise
    finally:
        run.settle()
        run.manifest["finished_at"] = _now()
        run.manifest["tables"] = {t: deltalog.version(run.lake.table(t), s3=run.lake.s3) for t in registry.tables()}
        try:
            run.save()
            _record(run)
        finally:
            lock.release()


def _record(run: Run) -> None:
    """Append the run to the ``runs`` table; a failure here must not hide the run's own error."""
    from clustermix.runs import record_run

    try:
        record_run(run.lake, run.manifest)
    except Exception:
        if run.manifest["outcome"] == "succeeded":
            raise
        log.exception("could not record failed run %s in the runs table", run.run_id)


def run_stages(cfg: Config, stages: tuple[str, ...] | None = None, run_id: str | None = None,
               spark: SparkSession | None = None) -> Run:
    """Run ``stages`` (default: :func:`registry.default_stages`) in pipeline order under the lake lock."""
    chosen = registry.default_stages(cfg) if stages is None else stages
    order = [s for s in registry.ORDER if s in chosen]
    with session(cfg, run_id, spark, stages=order) as run:
        run.run_in_order(order, {"ingest": partial(check_k, run)} if "cluster" in order else None)
    return run


def check_k(run: Run) -> None:
    """Before hours of embedding: a k larger than the accepted documents cannot be fitted."""
    n_docs = deltalog.num_records(run.lake.table("docs"), s3=run.lake.s3)
    if run.cfg.cluster.k > n_docs:
        raise DataError(f"config error: cluster.k={run.cfg.cluster.k}: greater than the {n_docs} accepted documents")
