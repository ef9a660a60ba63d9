"""Distributed spherical Lloyd k-means over embedding shards (Ray + FAISS), and the streaming pass that
assigns documents to fitted centroids: the engine of the ``cluster`` and ``assign`` stages.

Each :class:`ShardActor` holds one shard of ``embeddings`` for the whole fit. Per iteration the
driver sends the centroids (k·d floats), every shard returns sums/counts/objective (k·d), and the
driver updates: driver memory and traffic are O(k·d), never O(n). A last pass writes
``assignments``' files from the shards, which the driver commits in one transaction; ``centroids`` carries the
fit's metadata (k, iterations run, objective per iteration, seed, model, points fitted). No JVM: the
tables are committed with delta-rs (:mod:`clustermix.deltars`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import deltalog, deltars, faults, iddiff, kmeans, rayread
from clustermix import lake as lk
from clustermix.config import ClusterConfig
from clustermix.errors import DataError

if TYPE_CHECKING:
    from clustermix.lake import Lake
    from clustermix.storage import S3Settings
    from clustermix.tableio import TableWriter

log = logging.getLogger(__name__)


class ShardActor:
    """Holds one shard (ids + unit vectors) in memory and answers the driver's k-means calls."""

    def __init__(self, use_gpu: bool) -> None:
        self.use_gpu = use_gpu
        self.ids: np.ndarray = np.empty(0, dtype=object)
        self.x = np.empty((0, 0), dtype=np.float32)
        self.fit_mask: np.ndarray = np.empty(0, dtype=bool)
        self.steps = 0

    def load(self, it: Any) -> int:
        """Consume this shard's stream of (id, embedding) batches."""
        ids, parts = [], []
        for batch in it.iter_batches(batch_format="pyarrow", batch_size=65536):
            emb = batch.column("embedding").combine_chunks()
            d = len(emb[0]) if len(emb) else 0
            parts.append(np.asarray(emb.flatten(), dtype=np.float32).reshape(-1, d))
            ids.append(np.asarray(batch.column("id").to_pylist(), dtype=object))
        if parts:
            self.x = np.ascontiguousarray(kmeans.quantize(np.concatenate(parts)))
            self.ids = np.concatenate(ids)
        self.fit_mask = np.ones(len(self.x), dtype=bool)
        return len(self.x)

    def _hashes(self, seed: int) -> np.ndarray:
        """A seeded 64-bit hash per point id: choices made on it do not depend on the sharding."""
        import pandas as pd

        key = f"{seed & 0xFFFFFFFFFFFF:016x}"[-16:]
        return pd.util.hash_array(self.ids, hash_key=key, categorize=False).astype(np.uint64)

    def choose_fit(self, fraction: float, seed: int) -> int:
        """Keep the points whose seeded id hash falls in the first ``fraction`` of the range."""
        if fraction < 1.0:
            self.fit_mask = self._hashes(seed) < np.uint64(min(fraction, 1.0) * float(2**64 - 1))
        return int(self.fit_mask.sum())

    def sample(self, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """This shard's ``m`` fitted points with the smallest seeded id hashes (and the hashes):
        the union over shards, cut to the ``m`` smallest, is the same sample however the points
        were sharded."""
        pool = np.flatnonzero(self.fit_mask)
        h = self._hashes(seed)[pool]
        take = np.argsort(h, kind="stable")[:m]
        return h[take], self.x[pool[take]]

    def step(self, centroids: np.ndarray) -> kmeans.Partial:
        self.steps += 1
        faults.hold("kmeans.step", self.steps)
        return kmeans.partial_stats(self.x[self.fit_mask], centroids, self.use_gpu)

    def assign(self, centroids: np.ndarray, root: str, folder: str, s3: S3Settings | None) -> deltars.Part | None:
        """Write (id, cluster_id, score) for every point of the shard as one Parquet file under
        ``<root>/<folder>`` (a file of the ``assignments`` table until the driver commits it)."""
        import pyarrow as pa

        table = assignment_table(pa.array(self.ids.tolist(), type=pa.string()), self.x, centroids, self.use_gpu)
        return deltars.write_part(table, root, folder, s3)


def assignment_table(ids: Any, x: np.ndarray, centroids: np.ndarray, use_gpu: bool) -> Any:
    """(id, cluster_id, score) of unit vectors ``x`` (already quantised) against ``centroids``."""
    import pyarrow as pa

    labels, scores = kmeans.assign(x, centroids, use_gpu)
    return pa.table({"id": ids, "cluster_id": pa.array(labels, type=pa.int32()),
                     "score": pa.array(scores, type=pa.float32())})


class Assigner:
    """Ray Data callable class: nearest existing centroid for each embedding of a batch (a refresh
    assigns new documents without refitting). Points are quantised as the fit quantised them."""

    def __init__(self, centroids: np.ndarray, use_gpu: bool = False) -> None:
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.use_gpu = use_gpu

    def __call__(self, batch: Any) -> Any:
        emb = batch.column("embedding").combine_chunks()
        d = self.centroids.shape[1]
        x = kmeans.quantize(np.asarray(emb.flatten(), dtype=np.float32).reshape(-1, d))
        return assignment_table(batch.column("id"), x, self.centroids, self.use_gpu)


@dataclass
class Fit:
    centroids: np.ndarray
    objective: float
    history: list[float] = field(default_factory=list)
    reseeded: int = 0
    seed: int = 0
    loop_seconds: float = 0.0  # time in Lloyd iterations only (no data loading, no seeding)

    @property
    def seconds_per_iteration(self) -> float:
        return self.loop_seconds / max(len(self.history) - 1, 1)


def _gpu_wanted(cfg: ClusterConfig) -> bool:
    if cfg.use_gpu == "never":
        return False
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.use_gpu == "always" and not gpus:
        raise DataError("cluster.use_gpu='always' but the Ray cluster has no GPU")
    return bool(gpus)


def shard_cpus(cfg: ClusterConfig) -> float:
    """CPUs per shard actor, lowered when the shards would leave no CPU for the tasks that feed them
    (Ray Data read tasks need one while the actors wait for their data: a deadlock otherwise)."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1))
    cps = cfg.cpus_per_shard
    if cfg.num_shards * cps > total - 1:
        cps = max(0.01, (total - 1) / cfg.num_shards)
        log.warning("cluster.cpus_per_shard=%s leaves no CPU to read shards on %s CPUs; using %.2f",
                    cfg.cpus_per_shard, total, cps)
    return cps


def fit(shards: list[Any], cfg: ClusterConfig, n_fit: int, seed: int) -> Fit:
    """One Lloyd run from k-means++ seeds drawn on a sample spread over the shards."""
    import ray

    m = min(cfg.init_sample, n_fit)
    parts = ray.get([s.sample.remote(m, seed) for s in shards])  # at most m·shards points
    hashes = np.concatenate([h for h, _ in parts])
    points = np.concatenate([x for _, x in parts if len(x)])
    sample = points[np.argsort(hashes, kind="stable")[:m]]
    centroids = kmeans.init_plusplus(sample, cfg.k, seed)
    rng = np.random.default_rng(seed)
    history: list[float] = []
    reseeded = 0
    t0 = time.perf_counter()
    for it in range(cfg.niter):
        refs = [s.step.remote(centroids) for s in shards]
        total = ray.get(refs[0])
        for p in ray.get(refs[1:]):
            total = total + p
        obj = total.score_sum / max(total.n, 1)
        history.append(obj)
        centroids, empty = kmeans.update(total, centroids, rng)
        reseeded += empty
        if it and (obj - history[-2]) < cfg.tol and not empty:
            break
        if it % 10 == 0:
            log.info("k-means iteration %d: objective %.6f", it, obj)
    # the objective of the final centroids, so it matches what the assignment pass sees
    totals = ray.get([s.step.remote(centroids) for s in shards])
    final = sum(p.score_sum for p in totals) / max(sum(p.n for p in totals), 1)
    history.append(final)
    return Fit(centroids, final, history, reseeded, seed, time.perf_counter() - t0)


@dataclass
class KMeansResult:
    """A finished distributed fit (and, when asked, its assignment files)."""

    fit: Fit
    n_points: int
    n_fitted: int
    fraction: float
    use_gpu: bool
    seconds: float
    attempts: int = 1
    parts: list[deltars.Part] = field(default_factory=list)  # the assignment files, when asked

    def meta(self, cfg: ClusterConfig) -> dict[str, Any]:
        return {"objective_history": [round(v, 6) for v in self.fit.history], "n_points": self.n_points,
                "n_fitted": self.n_fitted, "fit_fraction": self.fraction, "reseeded": self.fit.reseeded,
                "nredo": cfg.nredo, "gpu": self.use_gpu, "attempts": self.attempts,
                "seconds_per_iteration": round(self.fit.seconds_per_iteration, 4)}


MAX_ATTEMPTS = 3


def distributed_kmeans(ds: Any, cfg: ClusterConfig, assign_dir: str | None = None,
                       s3: S3Settings | None = None) -> KMeansResult:
    """Fit spherical k-means on a Ray Dataset of (id, embedding) held by ``cfg.num_shards`` actors;
    with ``assign_dir``, also write every point's (id, cluster_id, score) there as Parquet (the files
    are in the result's ``parts``, named relative to the folder above ``assign_dir``). ``s3``: the
    object-store settings the actors write with.

    A shard actor that dies (node lost, process killed) fails the attempt; the fit is then redone
    from the start on fresh actors. The fit is deterministic, so the result is the same.
    """
    from ray.exceptions import RayActorError

    t0 = time.time()
    use_gpu = _gpu_wanted(cfg)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            best, n, n_fit, fraction, parts = _attempt(ds, cfg, assign_dir, use_gpu, s3)
            return KMeansResult(best, n, n_fit, fraction, use_gpu, time.time() - t0, attempt, parts)
        except RayActorError as exc:
            if assign_dir is not None:  # files of the lost attempt (another sharding): never committed
                filesystem, path = lk.open_fs(assign_dir, s3)
                filesystem.delete_dir_contents(path, missing_dir_ok=True)
            if attempt == MAX_ATTEMPTS:
                raise
            log.warning("k-means attempt %d lost a shard actor (%s); redoing the fit", attempt,
                        str(exc).splitlines()[0])
    raise AssertionError("unreachable")


def _attempt(ds: Any, cfg: ClusterConfig, assign_dir: str | None, use_gpu: bool,
             s3: S3Settings | None) -> tuple[Fit, int, int, float, list[deltars.Part]]:
    import ray

    actor_cls = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=shard_cpus(cfg), max_restarts=0)(ShardActor)
    shards: list[Any] = [actor_cls.remote(use_gpu) for _ in range(cfg.num_shards)]  # actor handles
    try:
        iters = ds.select_columns(["id", "embedding"]).streaming_split(cfg.num_shards, equal=False)
        n = int(sum(ray.get([s.load.remote(it) for s, it in zip(shards, iters, strict=False)])))
        if cfg.k > n:
            raise DataError(f"config error: cluster.k={cfg.k}: greater than the {n} embedded documents")
        fraction = cfg.fit_fraction
        if cfg.fit_max_points is not None:
            fraction = min(fraction, cfg.fit_max_points / n)
        n_fit = int(sum(ray.get([s.choose_fit.remote(fraction, cfg.seed) for s in shards])))
        if n_fit < cfg.k:
            raise DataError(f"config error: cluster.fit_fraction={cfg.fit_fraction}: leaves {n_fit} points "
                            f"for k={cfg.k}")
        if fraction < 1.0:
            log.info("k-means fits on %d of %d points (fraction %.4f)", n_fit, n, fraction)
        best: Fit | None = None
        for r in range(cfg.nredo):
            f = fit(shards, cfg, n_fit, cfg.seed + 1000 * r)
            log.info("k-means run %d/%d: objective %.6f after %d iterations", r + 1, cfg.nredo, f.objective,
                     len(f.history) - 1)
            if best is None or f.objective > best.objective:
                best = f
        assert best is not None
        parts: list[deltars.Part] = []
        if assign_dir is not None:
            root, folder = assign_dir.rstrip("/").rsplit("/", 1)
            parts = [p for p in ray.get([a.assign.remote(best.centroids, root, folder, s3) for a in shards]) if p]
    finally:
        for a in shards:
            ray.kill(a)
    return best, n, n_fit, fraction, parts


def run_cluster(lake: Lake, cfg: ClusterConfig, model: str, emb_version: int, run_id: str,
                write: TableWriter) -> dict[str, Any]:
    """Fit k-means on the embeddings of ``model`` and write ``centroids`` and ``assignments`` (Ray and
    delta-rs only: the shards write the assignment files, the driver commits them)."""
    import pyarrow as pa
    import ray

    from clustermix import storage

    uri = lake.table("assignments")
    s3 = storage.settings() if storage.is_s3(uri) else None
    files = deltalog.file_uris(lake.table("embeddings"), emb_version)
    if not files:
        raise DataError("embeddings table is empty: nothing to cluster")
    ds = ray.data.read_datasource(rayread.files_source(files, [None] * len(files), ["id", "embedding"], 65536,
                                                       rayread.Filter(model=model), s3))
    res = distributed_kmeans(ds, cfg, f"{uri}/{run_id}-{uuid.uuid4().hex[:8]}", s3)
    best = res.fit
    niter = len(best.history) - 1
    schema = deltars.arrow_schema("centroids")
    centroids = pa.table({"cluster_id": list(range(cfg.k)), "centroid": [c.tolist() for c in best.centroids],
                          "k": [cfg.k] * cfg.k, "niter": [niter] * cfg.k, "seed": [best.seed] * cfg.k,
                          "objective": [float(best.objective)] * cfg.k, "model": [model] * cfg.k,
                          "fit_meta": [json.dumps(res.meta(cfg))] * cfg.k}, schema=schema)
    write.record("centroids", deltars.overwrite(lake.table("centroids"), centroids, write.meta))
    write.record("assignments", deltars.commit_parts(uri, deltars.arrow_schema("assignments"), res.parts,
                                                     write.meta, "overwrite"))
    return {"k": cfg.k, "n_points": res.n_points, "n_fitted": res.n_fitted, "fit_fraction": res.fraction,
            "niter_run": niter, "objective": round(best.objective, 6), "reseeded": best.reseeded,
            "gpu": res.use_gpu, "seconds": round(res.seconds, 2)}


def read_centroids(lake: Lake, at_version: int | None = None) -> np.ndarray:
    """The centroids (latest, or at a pinned version) as a (k, d) float32 array (K rows, by delta-rs)."""
    t = deltars.read_small(lake.table("centroids"), at_version, ["cluster_id", "centroid"]).sort_by("cluster_id")
    return np.asarray(t.column("centroid").to_pylist(), dtype=np.float32)


@dataclass
class AssignPass:
    """What :func:`assign_missing` found and wrote: the staging folder of the new (id, cluster_id,
    score) rows (None when nothing was missing), how many, and the assigned ids whose embedding is gone."""

    staging: str | None
    n_new: int
    stale: Any  # a pyarrow string array


def assign_missing(lake: Lake, cfg: ClusterConfig, model: str, emb_version: int, centroids: np.ndarray,
                   run_id: str) -> AssignPass:
    """Assign every embedding of ``model`` that has no assignment yet to its nearest centroid.

    The ids come from the id columns of ``embeddings`` and ``assignments`` (:mod:`clustermix.iddiff`);
    Ray Data reads only those embeddings and writes their assignments to a staging folder, which the
    caller commits, or drops when it refits instead.
    """
    import ray

    from clustermix import storage

    s3 = storage.settings() if storage.is_s3(lake.root) else None
    emb_files, emb_rows = deltalog.file_counts(lake.table("embeddings"), emb_version)
    d = iddiff.diff(iddiff.IdSide(emb_files, emb_rows, model),
                    iddiff.IdSide(*deltalog.file_counts(lake.table("assignments"))), s3)
    n = len(d.missing)
    if not n:
        return AssignPass(None, 0, d.stale)
    log.info("assigning %d new documents to the %d existing centroids", n, len(centroids))
    use_gpu = _gpu_wanted(cfg)
    out_dir = lake.staging("assignments", run_id)
    filesystem, out_path = lk.open_fs(out_dir, s3)
    todo = rayread.Filter(ids=ray.put(d.missing), model=model)
    (ray.data.read_datasource(rayread.files_source(emb_files, list(d.missing_per_file), ["id", "embedding"], 65536,
                                                   todo, s3))
     .map_batches(Assigner, fn_constructor_kwargs={"centroids": centroids, "use_gpu": use_gpu},
                  batch_format="pyarrow", batch_size=65536, concurrency=cfg.num_shards,
                  num_cpus=shard_cpus(cfg), num_gpus=1 if use_gpu else None, max_task_retries=3)
     .write_parquet(out_path, filesystem=filesystem))
    return AssignPass(out_dir, n, d.stale)
