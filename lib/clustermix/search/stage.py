"""The search stage (Ray and delta-rs, no JVM): CLIMB over the clusters -> ``mixtures`` and the best
mixture file.

Ray Data pre-draws, once, everything the proxies read (:mod:`.pools`): the target texts (a JSONL
file, or a domain of the corpus held out from training; at most ``search.target_max_docs``) and a
per-cluster sample of the trainable documents, at most ``pool_tokens_per_cluster`` estimated proxy
tokens per cluster in a seeded-hash order, as Parquet folders under ``_staging/`` that are
removed afterwards. The K centroids, the K token totals and the pools' row index reach the driver.
Ray trains the proxies; the driver commits the ``mixtures`` table (one row per trained proxy) with
delta-rs and writes ``<lake.root>/search/best_mixture.json``, which ``blend.mode: mixture`` reads.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import deltalog, deltars, holdout
from clustermix import lake as lk
from clustermix.errors import ConfigError, DataError
from clustermix.manifest import write_json
from clustermix.search import pools
from clustermix.search.climb import Proxy, ray_evaluate, run_climb
from clustermix.search.mixtures import build_space, merge_clusters
from clustermix.search.predictor import spearman
from clustermix.search.proxy import ProxySpec

if TYPE_CHECKING:
    import pyarrow as pa

    from clustermix.config import Config, SearchConfig
    from clustermix.lake import Lake
    from clustermix.stage import Context
    from clustermix.storage import S3Settings
    from clustermix.tableio import TableWriter

log = logging.getLogger(__name__)



def best_mixture_uri(lake: Lake) -> str:
    """Where the best mixture goes: what ``blend.mixture_path`` should point at."""
    return lake.best_mixture_uri()


def proxy_spec(scfg: SearchConfig) -> ProxySpec:
    """The proxy settings of ``search.*``, as the picklable spec each task gets."""
    return ProxySpec(scfg.tokenizer, scfg.vocab_size, scfg.proxy_d_model, scfg.proxy_layers, scfg.proxy_heads,
                     scfg.proxy_context, scfg.proxy_batch_size, scfg.proxy_tokens, scfg.proxy_lr,
                     scfg.target_max_tokens, scfg.device, scfg.torch_threads, scfg.seed)


def target_fingerprint(scfg: SearchConfig, *, s3: S3Settings | None = None) -> dict[str, Any]:
    """What the search depends on besides tables and config: the target file's content (pass it
    as the stage's extra inputs, as the blend does for its mixture file). ``s3``: the object-store
    settings of a target file on ``s3://``."""
    import hashlib

    from clustermix.lake import open_fs

    p = scfg.target_path
    if p is None:
        return {}
    check_target(scfg)
    filesystem, path = open_fs(p, s3)
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return {"target_sha256": digest.hexdigest()[:16]}


def check_target(scfg: SearchConfig) -> None:
    """The search needs a target set; fail before any work when none is configured."""
    if scfg.target_path is None and scfg.target_domain is None:
        raise ConfigError("search.target_path", None, "the search needs a target set: set search.target_path "
                          "(JSONL with a text field) or search.target_domain (a domain held out from training)")
    p = scfg.target_path
    if p is not None and "://" not in p and not Path(p).is_file():
        raise ConfigError("search.target_path", p, "file not found")


def run_search(lake: Lake, cfg: Config, inputs: dict[str, int], run_id: str, write: TableWriter) -> dict[str, Any]:
    """CLIMB over the clusters of ``assignments``; writes ``mixtures`` and the best mixture file.
    Ray and delta-rs only: no JVM.

    ``inputs`` pins the versions of ``docs``, ``assignments`` and ``centroids``. Returns the
    manifest's counts: iterations, proxies trained, best and uniform-baseline scores, seconds.
    """
    import pyarrow.parquet as pq
    import ray

    t0 = time.time()
    scfg = cfg.search
    check_target(scfg)
    clip = scfg.clip or cfg.sample.clip
    pool_tokens = scfg.pool_tokens_per_cluster or scfg.proxy_tokens
    s3 = lake.s3  # handed to the Ray workers explicitly
    cents = deltars.read_small(lake.table("centroids"), inputs.get("centroids"), ["cluster_id", "centroid"], s3=lake.s3)
    cents = cents.take(np.argsort(cents.column("cluster_id").to_numpy()))  # K rows
    cluster_ids = cents.column("cluster_id").to_numpy().astype(np.int64)
    target_uri, pool_uri = lake.staging("search_target", run_id), lake.staging("search_pool", run_id)
    try:
        docs_files = deltalog.file_counts(lake.table("docs"), inputs.get("docs"), s3=lake.s3)
        target = pools.draw_target(scfg, docs_files, s3)
        if target.num_rows == 0:
            where = f"domain {scfg.target_domain!r}" if scfg.target_domain else scfg.target_path
            raise DataError(f"search: the target set ({where}) has no texts")
        filesystem, base = lk.open_fs(target_uri, s3)
        filesystem.create_dir(base, recursive=True)
        pq.write_table(target, f"{base}/part-0.parquet", filesystem=filesystem)
        partitions = max(2, min(256, int(ray.cluster_resources().get("CPU", 2))))
        dups = lake.table("semantic_duplicates")
        per = pools.draw_pools(scfg, lake.table("docs"), inputs.get("docs"), lake.table("assignments"),
                               inputs.get("assignments"), target, pool_tokens, pool_uri, partitions, s3,
                               (dups, inputs.get("semantic_duplicates")) if deltalog.version(dups, s3=s3) is not None else None,
                               holdout.of(cfg))
        tokens = np.array([per.get(int(c), 0) for c in cluster_ids], dtype=np.int64)
        groups = None
        if scfg.merge_threshold is not None or scfg.merge_to is not None:
            groups = merge_clusters(np.array(cents.column("centroid").to_pylist(), dtype=np.float64), tokens,
                                    scfg.merge_threshold, scfg.merge_to)
        space = build_space(cluster_ids, tokens, scfg.proxy_tokens, clip, pool_tokens, scfg.size_power, groups)
        log.info("search: %d clusters (%d search dimensions), %d target texts", len(cluster_ids), space.dims,
                 target.num_rows)
        evaluate = ray_evaluate(pool_uri, target_uri, cluster_ids, proxy_spec(scfg), scfg.cpus_per_proxy,
                                scfg.gpus_per_proxy, s3)
        records = run_climb(space, scfg, evaluate)
    finally:
        lake.remove(pool_uri)
        lake.remove(target_uri)
    best = min(records, key=lambda r: (r.score, r.iteration, r.mixture_id))
    # the proxies' results are committed with delta-rs, as the Ray stages commit theirs
    write.record("mixtures", deltars.overwrite(lake.table("mixtures"), mixtures_table(records, cluster_ids, best,
                                                                                     run_id), write.meta, s3=lake.s3))
    uniform = next((r for r in records if r.kind == "uniform"), None)
    doc = best_document(best, cluster_ids, uniform, run_id, scfg, clip)
    write_json(best_mixture_uri(lake), doc, s3=lake.s3)
    later = [r for r in records if r.predicted is not None]
    return {
        "iterations": len(scfg.iterations), "proxies_trained": len(records),
        "proxies_per_iteration": [sum(r.iteration == i for r in records) for i in range(1, len(scfg.iterations) + 1)],
        "best_score": best.score, "best_mixture_id": best.mixture_id,
        "uniform_score": uniform.score if uniform else None,
        "predicted_vs_proxy_spearman": spearman(np.array([r.predicted for r in later]),
                                                np.array([r.score for r in later])),
        "clusters": len(cluster_ids), "search_dims": space.dims, "target_texts": target.num_rows,
        "trainable_tokens": int(tokens.sum()), "best_mixture_path": best_mixture_uri(lake),
        "seconds": round(time.time() - t0, 2),
    }


def mixtures_table(records: list[Proxy], cluster_ids: np.ndarray, best: Proxy, run_id: str) -> pa.Table:
    """One row per trained proxy (weights as a map cluster_id -> weight): O(K·proxies), the driver's."""
    import pyarrow as pa

    rows = [{"iteration": r.iteration, "mixture_id": r.mixture_id, "kind": r.kind,
             "weights": [(int(c), float(w)) for c, w in zip(cluster_ids, r.weights, strict=True)],
             "proxy_score": r.score, "predicted_score": r.predicted, "seed": r.seed,
             "tokens": int(r.info.get("tokens", 0)), "max_passes": float(r.info.get("max_passes", 0.0)),
             "seconds": float(r.info.get("seconds", 0.0)), "is_best": r is best, "run_id": run_id} for r in records]
    return pa.Table.from_pylist(rows, schema=deltars.arrow_schema("mixtures"))


def best_document(best: Proxy, cluster_ids: np.ndarray, uniform: Proxy | None, run_id: str, scfg: SearchConfig,
                  clip: int) -> dict[str, Any]:
    """The JSON ``blend.mode: mixture`` reads (``weights``), with how it was found."""
    return {
        "weights": {str(int(c)): round(float(w), 8) for c, w in zip(cluster_ids, best.weights, strict=True)},
        "score": best.score, "uniform_score": uniform.score if uniform else None,
        "mixture_id": best.mixture_id, "iteration": best.iteration, "seed": best.seed, "run_id": run_id,
        "score_is": "proxy cross-entropy on the target set, nats per token (lower is better)",
        "target": {"path": scfg.target_path, "domain": scfg.target_domain},
        "proxy": {"tokenizer": scfg.tokenizer, "tokens": scfg.proxy_tokens, "d_model": scfg.proxy_d_model,
                  "layers": scfg.proxy_layers, "clip": clip},
    }


def stage_inputs(ctx: Context) -> dict[str, Any]:
    return target_fingerprint(ctx.cfg.search, s3=ctx.lake.s3)


def run(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    """The search stage: CLIMB on the pinned inputs (pools drawn with Ray Data, proxies as Ray tasks)."""
    ctx.ray()
    return run_search(ctx.lake, ctx.cfg, inputs, ctx.run_id, ctx.write)
