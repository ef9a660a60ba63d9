"""Distributed spherical Lloyd k-means over embedding shards (Ray + FAISS), and the streaming pass that
assigns documents to fitted centroids: the engine of the ``cluster`` and ``assign`` stages.

Each :class:`ShardActor` holds one shard of ``embeddings`` for the whole fit. Per iteration the
driver sends the centroids (k·d floats), every shard returns sums/counts/objective (k·d), and the
driver updates: driver memory and traffic are O(k·d), never O(n). A last pass writes
``assignments`` from the shards to a staging folder that Spark commits; ``centroids`` carries the
fit's metadata (k, iterations run, objective per iteration, seed, model, points fitted).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import contracts, deltalog, faults, kmeans, tableio
from clustermix import lake as lk
from clustermix.config import ClusterConfig
from clustermix.errors import DataError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from clustermix.lake import Lake
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

    def assign(self, centroids: np.ndarray, out_dir: str, shard: int) -> int:
        """Write (id, cluster_id, score) for every point of the shard as one Parquet file."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = assignment_table(pa.array(self.ids.tolist(), type=pa.string()), self.x, centroids, self.use_gpu)
        filesystem, base = lk.open_fs(out_dir)
        filesystem.create_dir(base, recursive=True)
        pq.write_table(table, f"{base}/shard-{shard:05d}.parquet", filesystem=filesystem)
        return len(table)


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

    def meta(self, cfg: ClusterConfig) -> dict[str, Any]:
        return {"objective_history": [round(v, 6) for v in self.fit.history], "n_points": self.n_points,
                "n_fitted": self.n_fitted, "fit_fraction": self.fraction, "reseeded": self.fit.reseeded,
                "nredo": cfg.nredo, "gpu": self.use_gpu, "attempts": self.attempts,
                "seconds_per_iteration": round(self.fit.seconds_per_iteration, 4)}


MAX_ATTEMPTS = 3


def distributed_kmeans(ds: Any, cfg: ClusterConfig, assign_dir: str | None = None) -> KMeansResult:
    """Fit spherical k-means on a Ray Dataset of (id, embedding) held by ``cfg.num_shards`` actors;
    with ``assign_dir``, also write every point's (id, cluster_id, score) there as Parquet.

    A shard actor that dies (node lost, process killed) fails the attempt; the fit is then redone
    from the start on fresh actors. The fit is deterministic, so the result is the same.
    """
    from ray.exceptions import RayActorError

    t0 = time.time()
    use_gpu = _gpu_wanted(cfg)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            best, n, n_fit, fraction = _attempt(ds, cfg, assign_dir, use_gpu)
            return KMeansResult(best, n, n_fit, fraction, use_gpu, time.time() - t0, attempt)
        except RayActorError as exc:
            if attempt == MAX_ATTEMPTS:
                raise
            log.warning("k-means attempt %d lost a shard actor (%s); redoing the fit", attempt,
                        str(exc).splitlines()[0])
    raise AssertionError("unreachable")


def _attempt(ds: Any, cfg: ClusterConfig, assign_dir: str | None, use_gpu: bool) -> tuple[Fit, int, int, float]:
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
        if assign_dir is not None:
            ray.get([s.assign.remote(best.centroids, assign_dir, i) for i, s in enumerate(shards)])
    finally:
        for s in shards:
            ray.kill(s)
    return best, n, n_fit, fraction


def run_cluster(spark: SparkSession, lake: Lake, cfg: ClusterConfig, model: str, emb_version: int, run_id: str,
                write: TableWriter) -> dict[str, Any]:
    """Fit k-means on the embeddings of ``model`` and write ``centroids`` and ``assignments``."""
    import ray
    from pyspark.sql import functions as F

    files = deltalog.file_uris(lake.table("embeddings"), emb_version)
    if not files:
        raise DataError("embeddings table is empty: nothing to cluster")
    ds = ray.data.read_parquet(files, columns=["id", "embedding", "model"])
    ds = ds.filter(expr=f"model == '{model.replace(chr(39), chr(92) + chr(39))}'")
    out_dir = lake.staging("assignments", run_id)
    res = distributed_kmeans(ds, cfg, out_dir)
    best = res.fit
    niter = len(best.history) - 1
    meta = json.dumps(res.meta(cfg))
    rows = [(i, best.centroids[i].tolist(), cfg.k, niter, best.seed, float(best.objective), model, meta)
            for i in range(cfg.k)]
    centroids = spark.createDataFrame(
        rows, "cluster_id int, centroid array<float>, k int, niter int, seed bigint, objective double, "
              "model string, fit_meta string")
    write("centroids", contracts.check(centroids, "centroids"))
    assignments = spark.read.parquet(lk.spark_path(out_dir)).select("id", F.col("cluster_id").cast("int"),
                                                                      F.col("score").cast("float"))
    write("assignments", contracts.check(assignments, "assignments"))
    lake.remove(out_dir)
    return {"k": cfg.k, "n_points": res.n_points, "n_fitted": res.n_fitted, "fit_fraction": res.fraction,
            "niter_run": niter, "objective": round(best.objective, 6), "reseeded": best.reseeded,
            "gpu": res.use_gpu, "seconds": round(res.seconds, 2)}


def read_centroids(spark: SparkSession, lake: Lake, at_version: int | None = None) -> np.ndarray:
    """The centroids (latest, or at a pinned version) as a (k, d) float32 array (K rows to the driver)."""
    rows = tableio.read(spark, lake, "centroids", at_version).select("cluster_id", "centroid").orderBy("cluster_id").collect()
    return np.asarray([r["centroid"] for r in rows], dtype=np.float32)


def assign_missing(spark: SparkSession, lake: Lake, cfg: ClusterConfig, model: str, emb_version: int,
                   centroids: np.ndarray, run_id: str) -> tuple[str | None, int]:
    """Assign every embedding of ``model`` that has no assignment yet to its nearest centroid.

    Returns the staging folder of (id, cluster_id, score) Parquet (None when nothing was missing)
    and the number of documents assigned; the caller commits it or refits instead.
    """
    import ray
    from pyspark.sql import functions as F

    emb = tableio.read(spark, lake, "embeddings", emb_version).where(F.col("model") == model).select("id", "embedding")
    todo = emb.join(tableio.read(spark, lake, "assignments").select("id"), "id", "left_anti")
    staging_in = lake.staging("assign_todo", run_id)
    todo.write.mode("overwrite").parquet(lk.spark_path(staging_in))
    files = lk.list_parquet(staging_in)
    n = sum(c or 0 for c in lk.parquet_rows(files))
    if not n:
        lake.remove(staging_in)
        return None, 0
    log.info("assigning %d new documents to the %d existing centroids", n, len(centroids))
    use_gpu = _gpu_wanted(cfg)
    out_dir = lake.staging("assignments", run_id)
    (ray.data.read_parquet(files)
     .map_batches(Assigner, fn_constructor_kwargs={"centroids": centroids, "use_gpu": use_gpu},
                  batch_format="pyarrow", batch_size=65536, concurrency=cfg.num_shards,
                  num_cpus=shard_cpus(cfg), num_gpus=1 if use_gpu else None, max_task_retries=3)
     .write_parquet(out_dir))
    lake.remove(staging_in)
    return out_dir, n
