"""The CLIMB loop (sample, train proxies, fit the predictor, prune, repeat) and its Ray tasks.

Where the data comes from: the stage pre-draws once, with Spark, a bounded sample per cluster
(at most ``pool_tokens_per_cluster`` tokens, in a seeded order) into a Parquet folder partitioned
by ``cluster_id``, plus the target texts into a small Parquet folder (see :mod:`.stage`). Each
proxy task reads from the pool only the rows its mixture needs (a pyarrow filter on the partition
column and on each document's cumulative token offset), so a task reads about ``proxy_tokens``
tokens whatever the corpus size, and nothing of the corpus passes through the driver.

The driver holds the records (mixtures trained × K weights) and one iteration's candidates
(``candidates`` × S weights): O(K·mixtures). Every proxy's seed is derived from
``(search.seed, iteration, index)``, so a rerun trains the same proxies on the same data.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix.clusterclip import round_to_total
from clustermix.search.predictor import PredictorSettings, choose, fit_predictor, predict

if TYPE_CHECKING:
    from clustermix.config import SearchConfig
    from clustermix.search.mixtures import SearchSpace
    from clustermix.search.proxy import ProxySpec
    from clustermix.storage import S3Settings

log = logging.getLogger(__name__)


@dataclass
class Proxy:
    """One mixture given a proxy: what it trained on and how it scored."""

    iteration: int
    mixture_id: str
    kind: str  # "uniform" (the ClusterClip baseline), "prior" (Dirichlet draw) or "predicted"
    weights: np.ndarray  # (K,) weight per cluster, what the proxy trained on
    dims: np.ndarray  # (S,) the same mixture over the search dimensions (the predictor's input)
    seed: int
    predicted: float | None = None
    score: float = math.nan
    info: dict[str, Any] = field(default_factory=dict)


Evaluate = Callable[[list[Proxy]], list[dict[str, Any]]]


def proxy_seed(seed: int, iteration: int, index: int) -> int:
    """A stable 32-bit seed for proxy ``index`` of ``iteration``."""
    return int(np.random.SeedSequence([seed, iteration, index]).generate_state(1)[0])


def predictor_settings(scfg: SearchConfig) -> PredictorSettings:
    """The LightGBM settings of ``search.predictor_*``."""
    return PredictorSettings(scfg.predictor_estimators, scfg.predictor_learning_rate, scfg.predictor_num_leaves,
                             scfg.predictor_min_child_samples, scfg.predictor_reg_lambda, scfg.seed)


def run_climb(space: SearchSpace, scfg: SearchConfig, evaluate: Evaluate) -> list[Proxy]:
    """Run ``scfg.iterations`` rounds and return every trained proxy, in training order.

    Iteration 1 trains ``iterations[0]`` Dirichlet-prior mixtures (plus the ClusterClip-uniform
    baseline when ``scfg.baseline``). Each later iteration fits the predictor on every score so
    far, ranks ``scfg.candidates`` fresh prior mixtures with it and trains ``iterations[i]`` of
    them (:func:`~clustermix.search.predictor.choose`). ``evaluate`` trains a list of proxies and
    returns one result dict (with ``score``) per proxy, in order.
    """
    records: list[Proxy] = []
    for it, n in enumerate(scfg.iterations, start=1):
        rng = np.random.default_rng([scfg.seed, it])
        jobs: list[Proxy] = []
        if it == 1:
            if scfg.baseline:
                u = space.uniform()
                jobs.append(Proxy(it, "it1-uniform", "uniform", u, space.to_dims(u)[0], proxy_seed(scfg.seed, it, 0)))
            preds: list[float | None] = [None] * n
            dims, kind = space.sample(rng, scfg.dirichlet_strength, n), "prior"
        else:
            model = fit_predictor(np.stack([r.dims for r in records]), np.array([r.score for r in records]),
                                  predictor_settings(scfg))
            cand = space.sample(rng, scfg.dirichlet_strength, scfg.candidates)
            pred = predict(model, cand)
            idx = choose(pred, n, scfg.top_fraction, rng)
            dims, preds, kind = cand[idx], [float(p) for p in pred[idx]], "predicted"
            log.info("search: iteration %d: predictor ranked %d candidates, best predicted %.4f", it, len(cand),
                     float(pred.min()))
        weights = space.to_clusters(dims)
        for j in range(len(dims)):
            jobs.append(Proxy(it, f"it{it}-{j:03d}", kind, weights[j], dims[j], proxy_seed(scfg.seed, it, j + 1),
                              preds[j]))
        t0 = time.time()
        for job, res in zip(jobs, evaluate(jobs), strict=True):
            job.score, job.info = float(res["score"]), res
        log.info("search: iteration %d: %d proxies in %.1fs, best score %.4f", it, len(jobs), time.time() - t0,
                 min(j.score for j in jobs))
        records.extend(jobs)
    return records


def apportion(weights: dict[int, float], total: int) -> dict[int, int]:
    """Integer token counts per cluster summing to ``total`` (largest remainders; ties to the
    lower cluster id)."""
    keys = sorted(k for k, w in weights.items() if w > 0)
    w = np.array([weights[k] for k in keys], dtype=np.float64)
    out = round_to_total(w / w.sum() * total, total)
    return {k: int(n) for k, n in zip(keys, out, strict=True)}


def read_pool(pool_uri: str, need: dict[int, int], s3: S3Settings | None = None) -> dict[int, list[str]]:
    """The pool rows a mixture needs: per cluster, documents in pool order until their estimated
    tokens cover ``need[k]`` (every document whose offset ``before`` is below it). ``s3``: the
    driver's object-store settings when the pool is on ``s3://``."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from clustermix.lake import open_fs

    expr = None
    for k, n in sorted(need.items()):
        if n > 0:
            e = (ds.field("cluster_id") == k) & (ds.field("before") < n)
            expr = e if expr is None else expr | e
    out: dict[int, list[str]] = {k: [] for k in need}
    if expr is None:
        return out
    filesystem, path = open_fs(pool_uri, s3)
    table = ds.dataset(path, filesystem=filesystem, format="parquet", partitioning="hive").to_table(
        columns=["cluster_id", "rank", "text"], filter=expr)
    table = table.take(pc.sort_indices(table, [("cluster_id", "ascending"), ("rank", "ascending")]))
    for c, text in zip(table.column("cluster_id").to_pylist(), table.column("text").to_pylist(), strict=True):
        out[int(c)].append(text)
    return out


def read_target(target_uri: str, s3: S3Settings | None = None) -> list[str]:
    """The target texts the stage wrote (bounded by ``search.target_max_docs``), in their order."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from clustermix.lake import open_fs

    filesystem, path = open_fs(target_uri, s3)
    table = ds.dataset(path, filesystem=filesystem, format="parquet").to_table(columns=["rank", "text_hash", "text"])
    order = pc.sort_indices(table, [("rank", "ascending"), ("text_hash", "ascending")])
    return table.take(order).column("text").to_pylist()


def train_proxy(pool_uri: str, target_uri: str, weights: dict[int, float], spec: ProxySpec,
                seed: int, s3: S3Settings | None = None) -> dict[str, Any]:
    """One proxy, as a Ray task body: draw the mixture's tokens, train, score on the target (``s3``:
    the driver's object-store settings, a worker has none of its own)."""
    from clustermix.search.proxy import stream, train_and_score

    need = apportion(weights, spec.tokens + 1)  # +1: the last window's shifted target
    docs = read_pool(pool_uri, need, s3)
    parts, passes = [], {}
    for k, n in need.items():
        toks, p = stream(docs[k], spec, n, cycle=True)
        if len(toks) < n:
            raise RuntimeError(f"cluster {k}: the pool has no tokens for a weight of {weights[k]:.4g}")
        parts.append(toks)
        passes[k] = p
    target, _ = stream(read_target(target_uri, s3), spec, spec.target_max_tokens + 1)
    res = train_and_score(np.concatenate(parts), target, spec, seed)
    res["max_passes"] = round(max(passes.values()), 4)
    res["docs_read"] = sum(len(v) for v in docs.values())
    return res


def ray_evaluate(pool_uri: str, target_uri: str, cluster_ids: np.ndarray, spec: ProxySpec, num_cpus: float,
                 num_gpus: float, s3: S3Settings | None = None) -> Evaluate:
    """An :data:`Evaluate` that trains each proxy as an independent Ray task (uses the Ray already
    initialised), all of an iteration's in parallel as resources allow. ``s3``: the driver's
    object-store settings, handed to each task."""
    import ray

    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)(train_proxy)

    def evaluate(jobs: list[Proxy]) -> list[dict[str, Any]]:
        refs = [task.remote(pool_uri, target_uri,
                            {int(c): float(w) for c, w in zip(cluster_ids, job.weights, strict=True) if w > 0}, spec, job.seed, s3)
                for job in jobs]
        pending, done = list(refs), 0
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            done += len(ready)
            log.info("search: %d/%d proxies trained", done, len(refs))
        return list(ray.get(refs))

    return evaluate
