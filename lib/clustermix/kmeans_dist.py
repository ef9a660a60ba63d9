"""Distributed spherical Lloyd k-means over embedding shards (Ray + FAISS), and the streaming passes that
assign documents to fitted centroids: the engine of the ``cluster`` and ``assign`` stages.

Memory is bounded by config, not by the corpus. While reading, each :class:`ShardActor` keeps only
the points of the **fit sample** (a seeded hash of the document id under a threshold computed from
N, k and ``cluster.max_points_per_centroid``, so the sample is the same documents however the
points are sharded or ordered) plus the block being read. Per iteration the driver sends the
centroids (k·d floats), every shard returns sums/counts/objective (k·d), and the driver updates:
driver memory and traffic are O(k·d), never O(n). Once fitted, the actors are released and a
streaming Ray Data pass (:class:`PartWriter`) assigns **every** document and writes
``assignments``' files, which the driver commits in one delta-rs transaction (no shuffle, no JVM);
``centroids`` carries the fit's metadata (k, iterations, objective per iteration, seed, model, the
sample's size and fraction).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import deltalog, deltars, iddiff, kmeans, rayread
from clustermix import lake as lk
from clustermix.config import ClusterConfig
from clustermix.errors import DataError
from clustermix.kmeans_shard import LoadCounts, ShardActor, cut_sample

if TYPE_CHECKING:
    from clustermix.lake import Lake
    from clustermix.storage import S3Settings
    from clustermix.tableio import TableWriter

log = logging.getLogger(__name__)


def assignment_table(ids: Any, x: np.ndarray, centroids: np.ndarray, use_gpu: bool, threads: int = 1) -> Any:
    """(id, cluster_id, score) of unit vectors ``x`` (already quantised) against ``centroids``."""
    import pyarrow as pa

    labels, scores = kmeans.assign(x, centroids, use_gpu, exact_scores=True, threads=threads)
    return pa.table({"id": ids, "cluster_id": pa.array(labels, type=pa.int32()),
                     "score": pa.array(scores, type=pa.float32())})


class Assigner:
    """Ray Data callable class: nearest centroid for each embedding of a batch (the cluster stage's
    pass over every document, and a refresh's over the new ones). Points are quantised as the fit
    quantised them."""

    def __init__(self, centroids: np.ndarray, use_gpu: bool = False, threads: int = 1) -> None:
        kmeans.set_threads(threads)
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.use_gpu, self.threads = use_gpu, threads

    def __call__(self, batch: Any) -> Any:
        emb = batch.column("embedding").combine_chunks()
        d = self.centroids.shape[1]
        x = kmeans.quantize(np.asarray(emb.flatten(), dtype=np.float32).reshape(-1, d))
        return assignment_table(batch.column("id"), x, self.centroids, self.use_gpu, self.threads)


class PartWriter(Assigner):
    """An :class:`Assigner` that writes each batch's assignments as one file of the ``assignments``
    table (:func:`clustermix.deltars.write_part`: named by its ids, so a retried task rewrites its own
    file) and returns one row per file (path, size, rows, summed score in fixed point) for the commit."""

    def __init__(self, centroids: np.ndarray, use_gpu: bool, threads: int, table_uri: str, folder: str,
                 s3: S3Settings | None) -> None:
        super().__init__(centroids, use_gpu, threads)
        self.table_uri, self.folder, self.s3 = table_uri, folder, s3

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        table = super().__call__(batch)
        part = deltars.write_part(table, self.table_uri, self.folder, self.s3)
        scores = table.column("score").to_numpy().astype(np.float64)
        qscore = int(np.rint(scores * kmeans.SCORE_SCALE).astype(np.int64).sum())
        return pa.table({"path": [part.path if part else None], "size": [part.size if part else 0],
                         "rows": [table.num_rows], "qscore": pa.array([qscore], type=pa.int64())})


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


def shard_threads(cfg: ClusterConfig) -> int:
    """Threads of one shard actor (FAISS and the sums): its configured CPUs, at least one."""
    return max(1, int(cfg.cpus_per_shard))


def fit(shards: list[Any], cfg: ClusterConfig, n_fit: int, redo: int = 0) -> Fit:
    """One Lloyd run over the shards' sample (run ``redo`` of ``cfg.nredo``: its seed is
    ``cfg.seed + 1000·redo``), seeded by :func:`clustermix.config.ClusterConfig.init_method`: k sample
    points (FAISS's way, O(k·d) on the driver whatever k) or k-means++ on ``init_sample`` points."""
    import ray

    seed = cfg.seed + 1000 * redo
    plusplus = cfg.init_method() == "kmeans++"
    m = min(cfg.init_sample, n_fit) if plusplus else cfg.k
    parts = ray.get([s.smallest.remote(m, redo) for s in shards])  # at most m·shards points
    keys = np.concatenate([h for h, _ in parts])
    points = np.concatenate([x for _, x in parts if len(x)])
    first = points[np.argsort(keys, kind="stable")[:m]]
    centroids = kmeans.init_plusplus(first, cfg.k, seed) if plusplus else kmeans.init_random(first, cfg.k)
    rng = np.random.default_rng(seed)
    history: list[float] = []
    reseeded = 0
    t0 = time.perf_counter()
    for it in range(cfg.niter):
        refs = [s.step.remote(centroids) for s in shards]
        total = ray.get(refs[0])
        for p in ray.get(refs[1:]):
            total = total + p
        obj = total.objective(centroids)
        history.append(obj)
        centroids, empty = kmeans.update(total, centroids, rng)
        reseeded += empty
        if it and (obj - history[-2]) < cfg.tol and not empty:
            break
        if it % 10 == 0:
            log.info("k-means iteration %d: objective %.6f", it, obj)
    loop = time.perf_counter() - t0
    # the objective of the final centroids on the sample
    refs = [s.step.remote(centroids) for s in shards]
    total = ray.get(refs[0])
    for p in ray.get(refs[1:]):
        total = total + p
    final = total.objective(centroids)
    history.append(final)
    return Fit(centroids, final, history, reseeded, seed, loop)


@dataclass
class KMeansResult:
    """A finished distributed fit (and, when asked, its assignment files)."""

    fit: Fit
    n_points: int
    n_fitted: int
    use_gpu: bool
    seconds: float
    attempts: int = 1
    loads: list[LoadCounts] = field(default_factory=list)  # per shard actor, as it read
    usage: list[dict[str, int]] = field(default_factory=list)  # per shard actor, after the fit
    parts: list[deltars.Part] = field(default_factory=list)  # the assignment files, when asked
    objective_all: float | None = None  # mean cosine of every document to its centroid, when assigned

    @property
    def fraction(self) -> float:
        """The share of the documents the fit saw (the rest were assigned, not fitted)."""
        return self.n_fitted / max(self.n_points, 1)

    def meta(self, cfg: ClusterConfig) -> dict[str, Any]:
        return {"objective_history": [round(v, 6) for v in self.fit.history], "n_points": self.n_points,
                "n_fitted": self.n_fitted, "sample_fraction": round(self.fraction, 6),
                "max_points_per_centroid": cfg.max_points_per_centroid, "init": cfg.init_method(),
                "objective_all": None if self.objective_all is None else round(self.objective_all, 6),
                "reseeded": self.fit.reseeded, "nredo": cfg.nredo, "gpu": self.use_gpu, "attempts": self.attempts,
                "seconds_per_iteration": round(self.fit.seconds_per_iteration, 4),
                "actor_peak_rows": max((c.peak_rows for c in self.loads), default=0)}


MAX_ATTEMPTS = 3


def distributed_kmeans(ds: Any, cfg: ClusterConfig, assign_dir: str | None = None,
                       s3: S3Settings | None = None, n_rows: int | None = None) -> KMeansResult:
    """Fit spherical k-means on a Ray Dataset of (id, embedding) whose sample is held by ``cfg.num_shards``
    actors; with ``assign_dir``, then assign every point in a streaming pass and write its (id,
    cluster_id, score) there as Parquet (the files are in the result's ``parts``, named relative to
    the folder above ``assign_dir``). ``n_rows``: the dataset's rows when the caller knows them (from
    the Delta log), else counted. ``s3``: the object-store settings the workers write with.

    A shard actor that dies (node lost, process killed) fails the attempt; the fit is then redone
    from the start on fresh actors. The fit is deterministic, so the result is the same.
    """
    from ray.exceptions import RayActorError

    t0 = time.time()
    use_gpu = _gpu_wanted(cfg)
    n = int(ds.count()) if n_rows is None else n_rows
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            res = _attempt(ds, cfg, n, use_gpu)
            res.attempts = attempt
            break
        except RayActorError as exc:
            if attempt == MAX_ATTEMPTS:
                raise
            log.warning("k-means attempt %d lost a shard actor (%s); redoing the fit", attempt,
                        str(exc).splitlines()[0])
    if assign_dir is not None:
        res.parts, res.objective_all = assign_all(ds, res.fit.centroids, cfg, use_gpu, assign_dir, s3)
    res.seconds = time.time() - t0
    return res


def _attempt(ds: Any, cfg: ClusterConfig, n: int, use_gpu: bool) -> KMeansResult:
    import ray

    actor_cls: Any = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=shard_cpus(cfg), max_restarts=0)(ShardActor)
    shards: list[Any] = [actor_cls.remote(use_gpu, shard_threads(cfg)) for _ in range(cfg.num_shards)]
    try:
        target = kmeans.sample_size(n, cfg.k, cfg.max_points_per_centroid)
        threshold = kmeans.read_threshold(n, target)
        iters = ds.select_columns(["id", "embedding"]).streaming_split(cfg.num_shards, equal=False)
        loads: list[LoadCounts] = ray.get([s.load.remote(it, cfg.seed, threshold, cfg.block_rows)
                                           for s, it in zip(shards, iters, strict=False)])
        n_read = sum(c.rows_read for c in loads)
        if n_read != n:
            log.warning("k-means expected %d embeddings and read %d: the sample is drawn for %d", n, n_read, n)
        if cfg.k > n_read:
            raise DataError(f"config error: cluster.k={cfg.k}: greater than the {n_read} embedded documents")
        m = kmeans.sample_size(n_read, cfg.k, cfg.max_points_per_centroid)
        n_fit = sum(c.kept for c in loads)
        if n_fit > m:  # the read kept a margin: cut to exactly the m smallest hashes
            t = cut_sample(shards, m, threshold)
            n_fit = int(sum(ray.get([s.trim.remote(t) for s in shards])))
        if n_fit < cfg.k:
            raise DataError(f"config error: cluster.k={cfg.k}: the fit sample holds only {n_fit} points")
        log.info("k-means fits on %d of %d points (%.4f; cluster.max_points_per_centroid=%d)", n_fit, n_read,
                 n_fit / n_read, cfg.max_points_per_centroid)
        best: Fit | None = None
        for r in range(cfg.nredo):
            f = fit(shards, cfg, n_fit, r)
            log.info("k-means run %d/%d: objective %.6f after %d iterations", r + 1, cfg.nredo, f.objective,
                     len(f.history) - 1)
            if best is None or f.objective > best.objective:
                best = f
        assert best is not None
        usage = ray.get([s.usage.remote() for s in shards])
    finally:
        for a in shards:
            ray.kill(a)
    return KMeansResult(best, n_read, n_fit, use_gpu, 0.0, loads=loads, usage=usage)


def assign_all(ds: Any, centroids: np.ndarray, cfg: ClusterConfig, use_gpu: bool, assign_dir: str,
               s3: S3Settings | None) -> tuple[list[deltars.Part], float]:
    """Assign every document of ``ds`` to ``centroids`` in a streaming Ray Data pass that writes the
    ``assignments`` files under ``assign_dir``; returns the files (for one commit) and the mean cosine.
    Only one row per file comes back to the driver."""
    root, folder = assign_dir.rstrip("/").rsplit("/", 1)
    out = ds.select_columns(["id", "embedding"]).map_batches(
        PartWriter, fn_constructor_kwargs={"centroids": centroids, "use_gpu": use_gpu, "threads": shard_threads(cfg),
                                           "table_uri": root, "folder": folder, "s3": s3},
        batch_format="pyarrow", batch_size=cfg.block_rows, concurrency=cfg.num_shards, num_cpus=shard_cpus(cfg),
        num_gpus=1 if use_gpu else None, max_task_retries=3)
    parts, n, qscore = [], 0, 0
    for row in out.iter_rows():
        n += int(row["rows"])
        qscore += int(row["qscore"])
        if row["path"]:
            parts.append(deltars.Part(row["path"], int(row["size"]), int(row["rows"])))
    return parts, qscore / kmeans.SCORE_SCALE / max(n, 1)


def run_cluster(lake: Lake, cfg: ClusterConfig, model: str, emb_version: int, run_id: str,
                write: TableWriter) -> dict[str, Any]:
    """Fit k-means on a sample of the embeddings of ``model``, assign every one of them, and write
    ``centroids`` and ``assignments`` (Ray and delta-rs only: workers write the assignment files, the
    driver commits them)."""
    import pyarrow as pa
    import ray

    uri = lake.table("assignments")
    s3 = lake.s3  # handed to the Ray workers explicitly
    emb_uri = lake.table("embeddings")
    files = deltalog.file_uris(emb_uri, emb_version, s3=s3)
    if not files:
        raise DataError("embeddings table is empty: nothing to cluster")
    n = deltalog.rows_where(emb_uri, emb_version, "model", model, s3)
    ds = ray.data.read_datasource(rayread.files_source(files, [None] * len(files), ["id", "embedding"], cfg.block_rows,
                                                       rayread.Filter(model=model), s3))
    res = distributed_kmeans(ds, cfg, f"{uri}/{run_id}-{uuid.uuid4().hex[:8]}", s3, n_rows=n)
    best = res.fit
    niter = len(best.history) - 1
    schema = deltars.arrow_schema("centroids")
    centroids = pa.table({"cluster_id": list(range(cfg.k)), "centroid": [c.tolist() for c in best.centroids],
                          "k": [cfg.k] * cfg.k, "niter": [niter] * cfg.k, "seed": [best.seed] * cfg.k,
                          "objective": [float(best.objective)] * cfg.k, "model": [model] * cfg.k,
                          "fit_meta": [json.dumps(res.meta(cfg))] * cfg.k}, schema=schema)
    write.record("centroids", deltars.overwrite(lake.table("centroids"), centroids, write.meta, s3=lake.s3))
    write.record("assignments", deltars.commit_parts(uri, deltars.arrow_schema("assignments"), res.parts,
                                                     write.meta, "overwrite", s3=s3))
    return {"k": cfg.k, "n_points": res.n_points, "n_fitted": res.n_fitted, "sample_fraction": round(res.fraction, 6),
            "max_points_per_centroid": cfg.max_points_per_centroid, "niter_run": niter,
            "objective": round(best.objective, 6),
            "objective_all": None if res.objective_all is None else round(res.objective_all, 6),
            "reseeded": best.reseeded, "gpu": res.use_gpu, "seconds": round(res.seconds, 2),
            "actor_peak_rows": max((c.peak_rows for c in res.loads), default=0)}


def read_centroids(lake: Lake, at_version: int | None = None) -> np.ndarray:
    """The centroids (latest, or at a pinned version) as a (k, d) float32 array (K rows, by delta-rs)."""
    t = deltars.read_small(lake.table("centroids"), at_version, ["cluster_id", "centroid"], s3=lake.s3).sort_by("cluster_id")
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

    s3 = lake.s3  # handed to the Ray workers explicitly
    emb_files, emb_rows = deltalog.file_counts(lake.table("embeddings"), emb_version, s3=lake.s3)
    d = iddiff.diff(iddiff.IdSide(emb_files, emb_rows, model),
                    iddiff.IdSide(*deltalog.file_counts(lake.table("assignments"), s3=lake.s3)), s3)
    n = len(d.missing)
    if not n:
        return AssignPass(None, 0, d.stale)
    log.info("assigning %d new documents to the %d existing centroids", n, len(centroids))
    use_gpu = _gpu_wanted(cfg)
    out_dir = lake.staging("assignments", run_id)
    filesystem, out_path = lk.open_fs(out_dir, s3)
    todo = rayread.Filter(ids=ray.put(d.missing), model=model)
    (ray.data.read_datasource(rayread.files_source(emb_files, list(d.missing_per_file), ["id", "embedding"], cfg.block_rows,
                                                   todo, s3))
     .map_batches(Assigner, fn_constructor_kwargs={"centroids": centroids, "use_gpu": use_gpu,
                                                  "threads": shard_threads(cfg)},
                  batch_format="pyarrow", batch_size=cfg.block_rows, concurrency=cfg.num_shards,
                  num_cpus=shard_cpus(cfg), num_gpus=1 if use_gpu else None, max_task_retries=3)
     .write_parquet(out_path, filesystem=filesystem))
    return AssignPass(out_dir, n, d.stale)
