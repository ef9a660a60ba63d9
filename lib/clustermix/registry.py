"""Every stage, declared once, in pipeline order. Adding a stage is one module with a
``run(ctx, inputs)`` plus one entry here: the runner, the CLI, the refresh and the report follow."""

from __future__ import annotations

from typing import TYPE_CHECKING

from clustermix.holdout import FINGERPRINT as HOLDOUT
from clustermix.stage import Stage

if TYPE_CHECKING:
    from collections.abc import Iterable

    from clustermix.config import Config


def _has_search_target(cfg: Config) -> bool:
    return cfg.search.target_path is not None or cfg.search.target_domain is not None


def _evaluates(cfg: Config) -> bool:
    return cfg.evaluate.enabled


PROXY_SHAPE = tuple(f"search.{k}" for k in ("proxy_d_model", "proxy_layers", "proxy_heads", "proxy_context",
                                             "proxy_batch_size", "proxy_lr"))

STAGES: tuple[Stage, ...] = (
    Stage("ingest", reads=(), writes=("docs", "quarantine", "duplicates", "near_duplicates", "minhash_signatures",
                                      "bad_files"),
          fingerprint=("input", "ingest", "dedup.near"), ignore=("dedup.near.max_iterations",),
          help="raw corpus -> docs, quarantine, duplicates (exact), near_duplicates (MinHash, dedup.near.*); "
               "unreadable input files -> bad_files (Spark)",
          run="clustermix.ingest:run", inputs="clustermix.ingest:stage_inputs"),
    Stage("embed", reads=("docs",), writes=("embeddings",),
          fingerprint=("embed.model", "embed.max_seq_length", "embed.long_docs", "embed.precision"),
          help="docs -> embeddings (Ray Data actor pool of sentence-transformers)",
          run="clustermix.embed:run", engine="ray"),
    Stage("cluster", reads=("embeddings",), writes=("centroids", "assignments"),
          fingerprint=("cluster", "embed.model"),
          help="embeddings -> centroids, assignments (distributed FAISS k-means on Ray)",
          run="clustermix.cluster:run", engine="ray"),
    Stage("assign", reads=("embeddings", "centroids"), writes=("assignments",),
          fingerprint=("cluster", "refresh", "embed.model"),
          help="embeddings without an assignment -> assignments to the existing centroids, or a refit when "
               "drift passes the refresh.* thresholds (what a refresh runs instead of cluster)",
          run="clustermix.assign:run", inputs="clustermix.assign:stage_inputs", in_run=False, engine="ray"),
    # the block size and the actors change how the duplicates are found, never which
    Stage("dedup", reads=("embeddings", "assignments", "docs"), writes=("semantic_duplicates",),
          fingerprint=("dedup.semantic", "embed.model"),
          ignore=("dedup.semantic.block_rows", "dedup.semantic.num_actors", "dedup.semantic.cpus_per_actor",
                  "dedup.semantic.gpus_per_actor"),
          help="embeddings + assignments -> semantic_duplicates: documents within dedup.semantic.threshold "
               "(cosine) of a kept one in their cluster (SemDeDup; Ray + FAISS; off: an empty table)",
          run="clustermix.semantic:run", engine="ray"),
    # the cells of cell_stats are (cluster, value of sample.group_column)
    Stage("stats", reads=("docs", "assignments", "centroids", "semantic_duplicates"), writes=("cluster_stats", "cell_stats"),
          fingerprint=("stats", "sample.group_column", *HOLDOUT),
          help="docs + assignments -> cluster_stats, cell_stats (Spark)", run="clustermix.stats:run"),
    # the whole sample section: budget, clip, order, and balance, group_column, group_weights
    Stage("sample", reads=("cluster_stats", "cell_stats", "assignments", "docs", "semantic_duplicates"), writes=("sample_plan",),
          fingerprint=("sample", *HOLDOUT),
          help="cluster_stats (+ cell_stats) -> sample_plan (ClusterClip, optionally across groups first; Spark)",
          run="clustermix.sample:run"),
    Stage("search", reads=("docs", "assignments", "centroids", "semantic_duplicates"), writes=("mixtures",),
          fingerprint=("search", "sample.clip", *HOLDOUT),
          ignore=("search.gpus_per_proxy", "search.cpus_per_proxy", "search.torch_threads", "search.device"),
          help="docs + assignments + a target set -> mixtures, search/best_mixture.json (CLIMB: pools drawn "
               "with Ray Data, proxies trained as Ray tasks)",
          run="clustermix.search.stage:run", inputs="clustermix.search.stage:stage_inputs",
          in_run=_has_search_target, engine="ray"),
    # the join strategy changes how blended is computed, never what it holds; the layout salt is the
    # shape of blended's files (2: each file one contiguous run of positions): a change reruns old blends
    Stage("blend", reads=("sample_plan", "cluster_stats", "assignments", "docs", "semantic_duplicates"), writes=("blended",),
          fingerprint=("blend", "sample", *HOLDOUT), ignore=("blend.broadcast_max_rows",), salt={"layout": 2},
          help="sample_plan + docs -> blended, the training mix (Spark)",
          run="clustermix.blend:run", inputs="clustermix.blend:stage_inputs"),
    # off unless evaluate.enabled (it trains seeds x mixes proxies); the proxies' shape is the search's
    Stage("evaluate", reads=("blended", "docs", "assignments", "semantic_duplicates"), writes=("evaluations",),
          fingerprint=("evaluate", *PROXY_SHAPE), ignore=("evaluate.cpus_per_proxy", "evaluate.gpus_per_proxy"),
          help="blended + docs -> evaluations: proxy LMs trained on the mix and on baselines of the same size "
               "(random, natural, the CLIMB mixture), scored on held-out documents per source and cluster, over "
               "evaluate.seeds seeds (Ray; needs evaluate.enabled, which keeps the held-out documents out of "
               "every plan)",
          run="clustermix.evaluate:run", inputs="clustermix.evaluate:stage_inputs",
          in_run=_evaluates, engine="ray"),
)

BY_NAME = {s.name: s for s in STAGES}
ORDER = tuple(s.name for s in STAGES)


def get(name: str) -> Stage:
    return BY_NAME[name]


def engines_of(stages: Iterable[str]) -> set[str]:
    """The engines (``spark``, ``ray``) that ``stages`` run on."""
    return {BY_NAME[s].engine for s in stages}


def producer(table: str) -> Stage:
    """The stage that first writes ``table`` in pipeline order."""
    return next(s for s in STAGES if table in s.writes)


def tables() -> tuple[str, ...]:
    """Every table a stage writes, once each, in pipeline order."""
    return tuple(dict.fromkeys(t for s in STAGES for t in s.writes))


def default_stages(cfg: Config) -> tuple[str, ...]:
    """What ``clustermix run`` runs: the stages that are part of a run for this config."""
    return tuple(s.name for s in STAGES if s.runs_in(cfg))


def config_hash(cfg: Config, stage: str) -> str:
    return get(stage).config_hash(cfg)
