"""Runs stages in order over one lake, skipping those whose outputs are current, and keeps the manifest.

Each stage is one function of (run, writer) that reads its input tables at pinned versions and
writes its outputs through the writer. What decides whether a stage must run is its fingerprint:
its config section(s) and the Delta versions of its inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from clustermix import __version__, faults
from clustermix import lake as lk
from clustermix.config import Config
from clustermix.errors import DataError
from clustermix.manifest import write_json

if TYPE_CHECKING:
    from threading import Thread

    from pyspark.sql import SparkSession

    from clustermix.ingest import InputSpec

log = logging.getLogger(__name__)

STAGES = ("ingest", "embed", "cluster", "stats", "sample", "blend")
# every stage in pipeline order; ``search`` runs in ``clustermix run`` only when a target is set
ALL_STAGES = ("ingest", "embed", "cluster", "stats", "sample", "search", "blend")
OUTPUTS = {
    "ingest": ("docs", "quarantine", "duplicates", "bad_files"),
    "embed": ("embeddings",),
    "cluster": ("centroids", "assignments"),
    "assign": ("assignments",),  # refresh only: new documents to the existing centroids (or a refit)
    "stats": ("cluster_stats",),
    "sample": ("sample_plan",),
    "search": ("mixtures",),
    "blend": ("blended",),
}
INPUTS = {
    "ingest": (),
    "embed": ("docs",),
    "cluster": ("embeddings",),
    "assign": ("embeddings", "centroids"),
    "stats": ("docs", "assignments", "centroids"),
    "sample": ("cluster_stats", "assignments", "docs"),
    "search": ("docs", "assignments", "centroids"),
    "blend": ("sample_plan", "cluster_stats", "assignments", "docs"),
}


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


class Run:
    """One invocation: config, lake, lazily created engines, and the manifest being written."""

    def __init__(self, cfg: Config, run_id: str | None = None, spark: SparkSession | None = None) -> None:
        self.cfg = cfg
        self.lake = lk.Lake(cfg.lake.root)
        self.run_id = run_id or new_run_id()
        self._spark = spark
        self.input_spec: InputSpec | None = None
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
        return self._spark

    def ray(self) -> None:
        from clustermix.runtime import ray_init

        ray_init(self.cfg)

    def settle(self) -> None:
        """Wait for the background loads that no stage's write reaped (a stage skipped or failed)."""
        while self._ahead:
            self._ahead.popitem()[1].join()

    @property
    def manifest_uri(self) -> str:
        return f"{self.lake.run_dir(self.run_id)}/manifest.json"

    def save(self) -> None:
        write_json(self.manifest_uri, self.manifest)

    def input_versions(self, stage: str) -> dict[str, int]:
        out = {}
        for t in INPUTS[stage]:
            v = lk.version(self.lake.table(t))
            if v is None:
                raise DataError(f"stage {stage!r} needs table {t!r}, which does not exist yet: run "
                                f"`clustermix {_producer(t)}` (or `clustermix run`) first")
            out[t] = v
        return out

    def run_stage(self, stage: str, fn: Callable[[Run, lk.TableWriter, dict[str, Any]], dict[str, Any]],
                  extra_inputs: dict[str, Any] | None = None, then: str | None = None) -> dict[str, Any]:
        """Run ``stage`` unless its outputs are current; record what happened in the manifest.

        ``then``: the stage expected to run next, whose outputs' state loads in the background while
        this one runs (:meth:`lake.TableWriter.prefetch_next`)."""
        inputs: dict[str, Any] = dict(self.input_versions(stage))
        inputs.update(extra_inputs or {})
        fp = lk.fingerprint(stage, config_hash(self.cfg, stage), inputs)
        outs = [self.lake.table(t) for t in OUTPUTS[stage]]
        if lk.is_current(outs, fp):
            rec = {"status": "skipped", "reason": "outputs current for these inputs and config",
                   "versions": {t: lk.version(self.lake.table(t)) for t in OUTPUTS[stage]}, "inputs": inputs}
            prev = lk.last_commit_meta(outs[0]) or {}
            rec["written_by_run"] = prev.get("run_id")
            self.manifest["stages"][stage] = rec
            self.save()
            log.info("%s: skipped (outputs current)", stage)
            return rec
        meta = {"run_id": self.run_id, "stage": stage, "fingerprint": fp, "inputs": inputs,
                "config_hash": config_hash(self.cfg, stage), "clustermix_version": __version__}
        ahead = {t: self._ahead.pop(t) for t in OUTPUTS[stage] if t in self._ahead}
        writer = lk.TableWriter(self.lake, meta, loading=ahead)
        writer.prefetch(self.spark, OUTPUTS[stage])  # every stage commits its outputs through Spark
        if then is not None:
            later = [t for t in OUTPUTS[then] if t not in OUTPUTS[stage] and t not in self._ahead]
            if later:
                self._ahead.update(writer.prefetch_next(self.spark, later))
        self.manifest["stages"][stage] = {"status": "running", "started_at": _now()}
        self.save()
        log.info("%s: running", stage)
        faults.hold(f"stage.{stage}")
        t0 = time.time()
        try:
            counts = fn(self, writer, inputs)
        finally:
            writer.settle()
        if self._spark is not None:
            self._spark.catalog.clearCache()
        rec = {"status": "ran", "seconds": round(time.time() - t0, 2), "counts": counts,
               "versions": writer.versions, "inputs": inputs}
        self.manifest["stages"][stage] = rec
        self.save()
        return rec


# the shape of blended's files for the same rows: 2 = each file one contiguous run of positions (before,
# several ranges could share a file); a change reruns blends written before it
BLENDED_LAYOUT = 2


def config_hash(cfg: Config, stage: str) -> str:
    """Hash of the config that shapes ``stage``'s output (not resource knobs like batch sizes)."""
    if stage == "ingest":
        return cfg.section_hash("input", "ingest")
    if stage == "embed":
        e = cfg.embed
        keys = {"model": e.model, "max_seq_length": e.max_seq_length, "long_docs": e.long_docs,
                "precision": e.precision}
        return hashlib.sha256(repr(sorted(keys.items())).encode()).hexdigest()[:16]
    if stage == "cluster":
        return cfg.section_hash("cluster") + _model_hash(cfg)
    if stage == "assign":
        return cfg.section_hash("cluster", "refresh") + _model_hash(cfg)
    if stage == "stats":
        return cfg.section_hash("stats")
    if stage == "sample":
        return cfg.section_hash("sample")
    if stage == "search":
        keys = cfg.search.model_dump(mode="json", exclude={"gpus_per_proxy", "cpus_per_proxy", "torch_threads",
                                                           "device"})
        keys["clip"] = cfg.search.clip or cfg.sample.clip
        return _digest(keys)
    # the join strategy changes how blended is computed, never what it holds
    return _digest({"blend": cfg.blend.model_dump(mode="json", exclude={"broadcast_max_rows"}),
                    "sample": cfg.sample.model_dump(mode="json"), "layout": BLENDED_LAYOUT})


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _model_hash(cfg: Config) -> str:
    from clustermix.models import model_id

    return hashlib.sha256(model_id(cfg.embed.model).encode()).hexdigest()[:8]


def _producer(table: str) -> str:
    return next(s for s, outs in OUTPUTS.items() if table in outs)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- the stages -------------------------------------------------------------------------------


def _ingest(run: Run, write: lk.TableWriter, inputs: dict[str, Any]) -> dict[str, Any]:
    from clustermix.ingest import run_ingest

    assert run.input_spec is not None
    return run_ingest(run.spark, run.cfg, run.input_spec, run.run_id, write)


def _embed(run: Run, write: lk.TableWriter, inputs: dict[str, Any]) -> dict[str, Any]:
    from clustermix.embed import run_embed

    run.ray()
    return run_embed(run.spark, run.lake, run.cfg.embed, inputs["docs"], run.run_id, write)


def _cluster(run: Run, write: lk.TableWriter, inputs: dict[str, Any]) -> dict[str, Any]:
    from clustermix.cluster import run_cluster
    from clustermix.models import model_id

    run.ray()
    return run_cluster(run.spark, run.lake, run.cfg.cluster, model_id(run.cfg.embed.model), inputs["embeddings"],
                       run.run_id, write)


def _stats(run: Run, write: lk.TableWriter, inputs: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from clustermix.stats import cluster_stats, share_summary

    s, lake, c = run.spark, run.lake, run.cfg.stats
    df = cluster_stats(lk.read(s, lake, "docs", inputs["docs"]), lk.read(s, lake, "assignments", inputs["assignments"]),
                       lk.read(s, lake, "centroids", inputs["centroids"]), c.min_share, c.n_exemplars)
    write("cluster_stats", df)
    sizes = [r["n_docs"] for r in lk.read(s, lake, "cluster_stats").select("n_docs").collect()]  # K rows
    return {"summary": share_summary(np.array(sizes), c.min_share)}


def _sample(run: Run, write: lk.TableWriter, inputs: dict[str, Any]) -> dict[str, Any]:
    from clustermix.sample import run_sample

    s, lake = run.spark, run.lake
    return run_sample(s, lk.read(s, lake, "cluster_stats", inputs["cluster_stats"]),
                      lk.read(s, lake, "assignments", inputs["assignments"]), lk.read(s, lake, "docs", inputs["docs"]),
                      run.cfg.sample, run.cfg.stats.min_share, run.cfg.spark.shuffle_partitions, write)


def _blend(run: Run, write: lk.TableWriter, inputs: dict[str, Any]) -> dict[str, Any]:
    from clustermix.blend import domain_mix, run_blend

    s, lake = run.spark, run.lake
    bcfg = run.cfg.blend.model_copy(update={"mixture_path": mixture_file(run.cfg, lake)})
    info = run_blend(s, lk.read(s, lake, "cluster_stats", inputs["cluster_stats"]),
                     lk.read(s, lake, "assignments", inputs["assignments"]), lk.read(s, lake, "docs", inputs["docs"]),
                     lk.read(s, lake, "sample_plan", inputs["sample_plan"]), bcfg, run.cfg.sample,
                     run.cfg.spark.shuffle_partitions, write)
    info["draws_by_domain"] = domain_mix(lk.read(s, lake, "blended"))
    return info


def _search(run: Run, write: lk.TableWriter, inputs: dict[str, Any]) -> dict[str, Any]:
    from clustermix.search.stage import run_search

    run.ray()
    return run_search(run.spark, run.lake, run.cfg, inputs, run.run_id, write)


STAGE_FNS: dict[str, Callable[[Run, lk.TableWriter, dict[str, Any]], dict[str, Any]]] = {
    "ingest": _ingest, "embed": _embed, "cluster": _cluster, "stats": _stats, "sample": _sample, "search": _search,
    "blend": _blend,
}


def default_stages(cfg: Config) -> tuple[str, ...]:
    """What ``clustermix run`` runs: the six core stages, and the search when it has a target."""
    has_target = cfg.search.target_path is not None or cfg.search.target_domain is not None
    return tuple(s for s in ALL_STAGES if s != "search" or has_target)


def mixture_file(cfg: Config, lake: lk.Lake) -> str | None:
    """The blend's mixture file: ``blend.mixture_path``, where ``search`` names the search's output."""
    p = cfg.blend.mixture_path
    return f"{lake.root}/search/best_mixture.json" if p == "search" else p


def _mixture_input(cfg: Config, lake: lk.Lake) -> dict[str, Any]:
    """The blend depends on the mixture file's content, not just its name."""
    p = mixture_file(cfg, lake)
    if cfg.blend.mode != "mixture" or not p:
        return {}
    filesystem, path = lk.open_fs(p)
    with filesystem.open_input_stream(path) as fh:
        return {"mixture_sha256": hashlib.sha256(fh.read()).hexdigest()[:16]}


def run_one(run: Run, stage: str, stages: tuple[str, ...] = ALL_STAGES, then: str | None = None) -> dict[str, Any]:
    """Run (or skip, when current) one core stage of ``run`` with the inputs it depends on. ``then``:
    the stage to run next (default: the next of ``stages`` in pipeline order)."""
    cfg = run.cfg
    extra: dict[str, Any] = {}
    if stage == "ingest":
        from clustermix.ingest import resolve_input

        run.input_spec = resolve_input(cfg, run.lake.root)
        extra = {"input": run.input_spec.listing, "path": run.input_spec.path}
    if stage == "blend":
        extra = _mixture_input(cfg, run.lake)
    if stage == "search":
        from clustermix.search.stage import target_fingerprint

        extra = target_fingerprint(cfg.search)
    if then is None:
        then = next((s for s in ALL_STAGES[ALL_STAGES.index(stage) + 1:] if s in stages), None)
    rec = run.run_stage(stage, STAGE_FNS[stage], extra, then)
    if stage == "ingest" and "cluster" in stages:
        n_docs = lk.num_records(run.lake.table("docs"))
        if cfg.cluster.k > n_docs:
            raise DataError(f"config error: cluster.k={cfg.cluster.k}: greater than the {n_docs} accepted documents")
    return rec


@contextlib.contextmanager
def session(cfg: Config, run_id: str | None = None, spark: SparkSession | None = None,
            mode: str = "run") -> Iterator[Run]:
    """A run under the lake lock: its outcome, tables and error land in the manifest and the ``runs`` table
    whatever happens."""
    run = Run(cfg, run_id, spark)
    run.manifest["mode"] = mode
    lock = lk.LakeLock(run.lake, run.run_id, cfg.lake.lock_stale_seconds)
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
        run.manifest["tables"] = {t: lk.version(run.lake.table(t)) for outs in OUTPUTS.values() for t in outs}
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
    """Run ``stages`` (default: :func:`default_stages`) in pipeline order under the lake lock."""
    stages = default_stages(cfg) if stages is None else stages
    with session(cfg, run_id, spark) as run:
        for stage in ALL_STAGES:
            if stage in stages:
                run_one(run, stage, stages)
    return run
