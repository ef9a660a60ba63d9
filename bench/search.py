"""Benchmark: the CLIMB mixture search on the default corpus, and whether its best mixture holds up.

    .venv/bin/python bench/search.py --lake /tmp/lake-search-bench

On ``builtin://bbc-unbalanced`` (conf/local.yaml) with one topic held out as the target
(``--target tech``, a minority topic: 8% of BBC's tech articles are kept):

1. builds the lake's docs/assignments/centroids if they are missing (``ingest``, ``embed``,
   ``cluster``; skipped when current) — not part of the search's time;
2. runs the search stage (``run_search``, the code ``clustermix search`` runs) and times it:
   wall time and proxies per minute;
3. replays the search's best proxy (its seed, its pool) and checks it scores the same;
4. retrains proxies with ``--seeds`` fresh seeds the search never saw (a fresh pool order, a
   fresh model initialisation and a fresh window order per seed) on three mixtures: the search's
   best, ClusterClip-uniform (equal share per cluster within the clip cap) and natural (cluster
   sizes, i.e. random sampling) — plus, when the uniform baseline itself scored best in the
   search, the best mixture the search proposed (``best_searched``); reports target loss mean,
   std, min and max per mixture, and the paired differences seed by seed;
5. fits the predictor on every proxy the search trained, draws ``--heldout`` fresh prior
   mixtures it was not fitted on, trains each as a proxy the way the search does, and reports the
   Spearman rank correlation of predicted vs actual target loss (scipy.stats.spearmanr).

Proxies are trained by the project's own code: ``clustermix.search.climb.ray_evaluate`` ->
``train_proxy`` (pool rows via ``read_pool``, ``proxy.train_and_score``), on pools drawn by the
stage's ``pools.draw_pools``. Prints a table and writes ``bench/out/search.json``. Sizes are flags;
``--set KEY=VALUE`` overrides any config key (e.g. ``--set search.proxy_tokens=80000``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from clustermix import deltalog, deltars, tableio
from clustermix import lake as lk
from clustermix.config import Config, load_config
from clustermix.search import pools
from clustermix.search.climb import Proxy, predictor_settings, proxy_seed, ray_evaluate
from clustermix.search.mixtures import SearchSpace, build_space, cap_project, merge_clusters
from clustermix.search.predictor import fit_predictor, predict
from clustermix.search.stage import proxy_spec, run_search
from common import save, timed

HELDOUT_ITERATION = 1000  # the proxy_seed "iteration" of held-out mixtures: the search never uses it
FRESH_SEED_BASE = 10_000  # fresh seeds are FRESH_SEED_BASE + i (the search's seeds derive from search.seed)


@dataclasses.dataclass
class Staged:
    """What the search stage stages, rebuilt for the evaluation (same functions, same seeds)."""

    cluster_ids: np.ndarray
    tokens: np.ndarray  # (K,) trainable proxy tokens per cluster
    space: SearchSpace
    target_uri: str
    target: Any  # the target texts (pyarrow), which every fresh pool leaves out
    inputs: dict[str, int]
    domain_tokens: dict[int, dict[str, int]]  # cluster -> domain -> trainable tokens
    target_docs: dict[int, int]  # cluster -> documents of the target domain assigned to it


def _token_estimate(text: Any, tokenizer: str) -> Any:
    """The proxy's token estimate as a Spark column (the pools count the same in Python)."""
    from pyspark.sql import functions as F

    from clustermix.search.proxy import WORD_PATTERN

    if tokenizer == "bytes":
        return F.octet_length(text).cast("bigint")
    return F.regexp_count(F.lower(text), F.lit(WORD_PATTERN)).cast("bigint")


def stage_inputs(spark: Any, lake: lk.Lake, cfg: Config, inputs: dict[str, int], tag: str) -> Staged:
    """The search's inputs as ``run_search`` builds them (the stage's own functions: target texts,
    tokens per cluster, the space); the per-domain figures with Spark, for the report only."""
    import pyarrow.parquet as pq
    from pyspark.sql import functions as F

    scfg = cfg.search
    clip = scfg.clip or cfg.sample.clip
    pool_tokens = scfg.pool_tokens_per_cluster or scfg.proxy_tokens
    cents = deltars.read_small(lake.table("centroids"), inputs["centroids"], ["cluster_id", "centroid"], s3=lake.s3)
    cents = cents.take(np.argsort(cents.column("cluster_id").to_numpy()))
    cluster_ids = cents.column("cluster_id").to_numpy().astype(np.int64)
    target = pools.draw_target(scfg, deltalog.file_counts(lake.table("docs"), inputs["docs"], s3=lake.s3), None)
    target_uri = lake.staging("bench_search_target", tag)
    Path(target_uri).mkdir(parents=True, exist_ok=True)
    pq.write_table(target, f"{target_uri}/part-0.parquet")
    staged = Staged(cluster_ids, np.zeros(len(cluster_ids), np.int64), None, target_uri, target, inputs, {}, {})  # type: ignore[arg-type]
    per = pools.draw_pools(scfg, lake.table("docs"), inputs["docs"], lake.table("assignments"), inputs["assignments"],
                           target, pool_tokens, lake.staging("bench_search_tokens", tag), 2, None)
    lake.remove(lake.staging("bench_search_tokens", tag))
    staged.tokens = np.array([per.get(int(c), 0) for c in cluster_ids], dtype=np.int64)
    groups = None
    if scfg.merge_threshold is not None or scfg.merge_to is not None:
        groups = merge_clusters(np.array(cents.column("centroid").to_pylist(), dtype=np.float64), staged.tokens,
                                scfg.merge_threshold, scfg.merge_to)
    staged.space = build_space(cluster_ids, staged.tokens, scfg.proxy_tokens, clip, pool_tokens, scfg.size_power,
                               groups)
    docs = tableio.read(spark, lake, "docs", inputs["docs"])
    assignments = tableio.read(spark, lake, "assignments", inputs["assignments"])
    trainable = docs.where(F.col("domain").isNull() | (F.col("domain") != F.lit(scfg.target_domain or ""))) \
        .join(F.broadcast(spark.createDataFrame([(h,) for h in target.column("text_hash").to_pylist()] or [("",)],
                                                "text_hash string")), "text_hash", "left_anti")
    for r in assignments.join(trainable.select("id", "domain", _token_estimate(F.col("text"), scfg.tokenizer)
                                               .alias("ptokens")), "id").groupBy("cluster_id", "domain") \
            .agg(F.sum("ptokens").alias("t")).collect():  # K x domains rows
        staged.domain_tokens.setdefault(int(r["cluster_id"]), {})[str(r["domain"])] = int(r["t"])
    staged.target_docs = {int(r["cluster_id"]): int(r["n"]) for r in assignments.join(
        docs.where(F.col("domain") == scfg.target_domain).select("id"), "id").groupBy("cluster_id")
        .agg(F.count("*").alias("n")).collect()} if scfg.target_domain else {}
    return staged


def write_pool(staged: Staged, lake: lk.Lake, cfg: Config, seed: int, tag: str) -> str:
    """One per-cluster pool, drawn by the stage's ``pools.draw_pools`` in the order of ``seed``."""
    scfg = cfg.search.model_copy(update={"seed": seed})
    uri = lake.staging("bench_search_pool", f"{tag}-{seed}")
    pools.draw_pools(scfg, lake.table("docs"), staged.inputs["docs"], lake.table("assignments"),
                     staged.inputs["assignments"], staged.target, scfg.pool_tokens_per_cluster or scfg.proxy_tokens,
                     uri, 2, None)
    return uri


def natural_mixture(staged: Staged) -> np.ndarray:
    """Random sampling: weight per cluster proportional to its trainable tokens, within the clip cap."""
    return cap_project(staged.tokens[None, :].astype(np.float64), staged.space.cluster_caps)[0]


def domain_shares(w: np.ndarray, staged: Staged) -> dict[str, float]:
    """Share of a mixture's training tokens per domain (each cluster's tokens split by domain)."""
    out: dict[str, float] = {}
    for c, wk in zip(staged.cluster_ids, w, strict=True):
        dt = staged.domain_tokens.get(int(c), {})
        tot = sum(dt.values())
        for d, t in dt.items():
            out[d] = out.get(d, 0.0) + float(wk) * t / tot
    return {d: round(v, 4) for d, v in sorted(out.items(), key=lambda kv: -kv[1])}


def target_affine_weight(w: np.ndarray, staged: Staged, top: int = 3) -> float:
    """Weight a mixture puts on the ``top`` clusters that hold most of the target domain's documents."""
    ranked = sorted(staged.target_docs, key=lambda c: -staged.target_docs[c])[:top]
    idx = [int(np.flatnonzero(staged.cluster_ids == c)[0]) for c in ranked]
    return round(float(w[idx].sum()), 4)


class LoadSampler:
    """The 1-minute load average every ``every`` seconds in a daemon thread (other work on the machine
    shows up as load well above the 2 this benchmark's proxies take themselves)."""

    def __init__(self, every: float = 10.0) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict[str, float]:
        self._stop.set()
        a = np.array(self.samples or [os.getloadavg()[0]])
        return {"mean": round(float(a.mean()), 2), "max": round(float(a.max()), 2), "samples": len(a)}


def describe(scores: list[float]) -> dict[str, float]:
    a = np.asarray(scores, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": len(a)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lake", default="/tmp/lake-search-bench", help="lake root (built when missing)")
    ap.add_argument("--config", default=None, help="YAML config (default: conf/local.yaml)")
    ap.add_argument("--target", default="tech", help="the corpus domain held out as the target")
    ap.add_argument("--iterations", default=None, help="proxies per search iteration, e.g. 8,4,4 (default: config)")
    ap.add_argument("--seeds", type=int, default=5, help="fresh seeds per evaluated mixture")
    ap.add_argument("--heldout", type=int, default=40, help="held-out mixtures for the predictor's Spearman")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("py4j", "pyspark", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from scipy.stats import spearmanr

    from clustermix.pipeline import run_stages
    from clustermix.runtime import ray_init, spark_session

    overrides = [f"lake.root={args.lake}", f"search.target_domain={args.target}"]
    if args.iterations:
        overrides.append(f"search.iterations=[{args.iterations}]")
    cfg = load_config(args.config, overrides + args.set)
    scfg = cfg.search
    load_before = os.getloadavg()
    sampler = LoadSampler()
    times: dict[str, float] = {}
    spark = spark_session(cfg)
    with timed("lake: ingest, embed, cluster (if stale)", times):
        run_stages(cfg, ("ingest", "embed", "cluster"), spark=spark)
    ray_init(cfg)
    lake = lk.Lake.from_config(cfg)
    inputs = {t: deltalog.version(lake.table(t), s3=lake.s3) for t in ("docs", "assignments", "centroids")}
    tag = f"bench-search-{time.strftime('%Y%m%dT%H%M%S')}"
    writer = tableio.TableWriter(lake, {"run_id": tag, "stage": "search", "inputs": inputs, "bench": True})
    print(f"search: target domain {args.target!r}, iterations {scfg.iterations}, proxy {scfg.proxy_tokens} tokens",
          flush=True)
    with timed("search (run_search: staging + all proxies)", times):
        counts = run_search(lake, cfg, inputs, tag, writer)  # type: ignore[arg-type]
    rows = tableio.read(spark, lake, "mixtures", writer.versions["mixtures"]).collect()  # one row per proxy
    with timed("evaluation: stage target, members, space", times):
        staged = stage_inputs(spark, lake, cfg, inputs, tag)  # type: ignore[arg-type]
    space, ids = staged.space, staged.cluster_ids
    vec = {r["mixture_id"]: np.array([r["weights"][int(c)] for c in ids]) for r in rows}
    best_row = next(r for r in rows if r["is_best"])
    uni_row = next(r for r in rows if r["kind"] == "uniform")
    assert np.allclose(vec[uni_row["mixture_id"]], space.uniform(), atol=1e-9), "rebuilt space differs from the search's"
    mixtures = {"best": vec[best_row["mixture_id"]], "uniform": space.uniform(), "natural": natural_mixture(staged)}
    searched_row = min((r for r in rows if r["kind"] != "uniform"), key=lambda r: (r["proxy_score"], r["mixture_id"]))
    if searched_row["mixture_id"] != best_row["mixture_id"]:  # the baseline won: also test the best the search proposed
        mixtures = {"best": mixtures["best"], "best_searched": vec[searched_row["mixture_id"]],
                    "uniform": mixtures["uniform"], "natural": mixtures["natural"]}
    spec = proxy_spec(scfg)
    cpus, gpus = scfg.cpus_per_proxy, scfg.gpus_per_proxy

    def job(name: str, w: np.ndarray, seed: int, predicted: float | None = None) -> Proxy:
        return Proxy(0, name, "bench", w, space.to_dims(w)[0], seed, predicted)

    # the search's own pool (same seed, so the same rows) for the replay and the held-out mixtures
    search_pool = write_pool(staged, lake, cfg, scfg.seed, tag)
    try:
        evaluate = ray_evaluate(search_pool, staged.target_uri, ids, spec, cpus, gpus)
        with timed("replay of the search's best proxy", times):
            replay = evaluate([job("replay", mixtures["best"], int(best_row["seed"]))])[0]["score"]
        print(f"  replayed best: {replay:.6f} (search: {best_row['proxy_score']:.6f})", flush=True)

        model = fit_predictor(np.stack([space.to_dims(vec[r["mixture_id"]])[0] for r in rows]),
                              np.array([r["proxy_score"] for r in rows]), predictor_settings(scfg))
        held = space.sample(np.random.default_rng([scfg.seed, HELDOUT_ITERATION]), scfg.dirichlet_strength,
                            args.heldout)
        pred = predict(model, held)
        held_w = space.to_clusters(held)
        jobs = [job(f"heldout-{j:03d}", held_w[j], proxy_seed(scfg.seed, HELDOUT_ITERATION, j), float(pred[j]))
                for j in range(args.heldout)]
        t0 = time.perf_counter()
        with timed(f"held-out mixtures ({args.heldout} proxies)", times):
            actual = np.array([r["score"] for r in evaluate(jobs)])
        heldout_s = time.perf_counter() - t0
    finally:
        lake.remove(search_pool)
    rho, pval = spearmanr(pred, actual)
    in_sample = predict(model, np.stack([space.to_dims(vec[r["mixture_id"]])[0] for r in rows]))
    rho_fit = spearmanr(in_sample, [r["proxy_score"] for r in rows])[0]

    fresh: dict[str, list[float]] = {k: [] for k in mixtures}
    eval_s = 0.0
    seeds = [FRESH_SEED_BASE + i for i in range(args.seeds)]
    for s in seeds:
        with timed(f"fresh seed {s}: pool", times):
            pool = write_pool(staged, lake, cfg, s, tag)
        try:
            ev = ray_evaluate(pool, staged.target_uri, ids, dataclasses.replace(spec, init_seed=s), cpus, gpus)
            t0 = time.perf_counter()
            with timed(f"fresh seed {s}: {len(mixtures)} proxies", times):
                res = ev([job(name, w, s) for name, w in mixtures.items()])
            eval_s += time.perf_counter() - t0
        finally:
            lake.remove(pool)
        for name, r in zip(mixtures, res, strict=True):
            fresh[name].append(float(r["score"]))
    lake.remove(staged.target_uri)
    load_after = os.getloadavg()
    load = sampler.stop()

    stats = {k: describe(v) for k, v in fresh.items()}
    distinct = [k for k in stats if not (k == "best" and np.array_equal(mixtures["best"], mixtures["uniform"]))]
    seed_std = float(np.sqrt(np.mean([stats[k]["std"] ** 2 for k in distinct])))  # pooled over distinct mixtures
    paired = {}
    for name in [m for m in mixtures if m.startswith("best")]:
        for other in ("uniform", "natural"):
            d = np.array(fresh[name]) - np.array(fresh[other])
            paired[f"{name}_minus_{other}"] = {**describe(d.tolist()), "wins": int((d < 0).sum()), "of": len(d)}
    search_s = times["search (run_search: staging + all proxies)"]
    proxy_train_s = [float(r["seconds"]) for r in rows]
    n_eval = args.seeds * len(mixtures) + args.heldout
    result: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "bench/search.py", *sys.argv[1:]]),
        "corpus": cfg.input.path, "target_domain": args.target, "lake": cfg.lake.root,
        "search_config": scfg.model_dump(mode="json"), "clip": scfg.clip or cfg.sample.clip,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "load_during": load, "contended": load_before[0] > 1.0 or load["mean"] > 3.0,
        "times_s": times, "search_counts": counts,
        "search_wall_s": search_s, "proxies_per_minute_search": counts["proxies_trained"] / search_s * 60,
        "proxies_per_minute_ray": n_eval / (eval_s + heldout_s) * 60,
        "proxy_train_seconds": describe(proxy_train_s),
        "search_scores": [{"mixture_id": r["mixture_id"], "kind": r["kind"], "score": r["proxy_score"],
                           "predicted": r["predicted_score"]} for r in rows],
        "replayed_best": replay, "search_best": best_row["proxy_score"], "search_uniform": uni_row["proxy_score"],
        "best_mixture_id": best_row["mixture_id"], "best_searched_mixture_id": searched_row["mixture_id"],
        "best_searched_score": searched_row["proxy_score"], "fresh_seeds": seeds, "fresh": fresh, "fresh_stats": stats,
        "paired": paired, "seed_std_pooled": seed_std,
        "predictor": {"heldout": args.heldout, "spearman": float(rho), "p_value": float(pval),
                      "in_sample_spearman": float(rho_fit),
                      "search_predicted_vs_proxy_spearman": counts["predicted_vs_proxy_spearman"],
                      "heldout_actual": describe(actual.tolist()), "heldout_predicted": describe(pred.tolist()),
                      "predicted": pred.tolist(), "actual": actual.tolist()},
        "mixtures": {k: {"weights": {str(int(c)): round(float(x), 5) for c, x in zip(ids, w, strict=True)},
                         "domain_shares": domain_shares(w, staged),
                         "weight_on_3_most_target_clusters": target_affine_weight(w, staged) if staged.target_docs
                         else None, "max_weight": round(float(w.max()), 4)}
                     for k, w in mixtures.items()},
        "target_docs_per_cluster": staged.target_docs,
    }
    print()
    print(f"corpus {cfg.input.path}, target {args.target!r} ({counts['target_texts']} texts), k={len(ids)}, "
          f"{counts['trainable_tokens']:,} trainable proxy tokens; load {load_before[0]:.2f} before, "
          f"{load['mean']:.2f} mean / {load['max']:.2f} max during")
    print(f"search: {counts['proxies_trained']} proxies {counts['proxies_per_iteration']} in {search_s:.1f} s "
          f"({result['proxies_per_minute_search']:.1f} proxies/min end to end; "
          f"{result['proxies_per_minute_ray']:.1f}/min in the evaluation); best {best_row['mixture_id']} "
          f"{best_row['proxy_score']:.4f}, uniform {uni_row['proxy_score']:.4f}; best non-baseline "
          f"{searched_row['mixture_id']} {searched_row['proxy_score']:.4f}; replayed best {replay:.4f}")
    print(f"\nfresh seeds {seeds} (target loss, nats/token, lower is better):")
    print(f"  {'mixture':<14}{'mean':>9}{'std':>9}{'min':>9}{'max':>9}   target-cluster weight   domains")
    for k, st in stats.items():
        m = result["mixtures"][k]
        top = ", ".join(f"{d} {v:.2f}" for d, v in list(m["domain_shares"].items())[:3])
        print(f"  {k:<14}{st['mean']:9.4f}{st['std']:9.4f}{st['min']:9.4f}{st['max']:9.4f}   "
              f"{m['weight_on_3_most_target_clusters']!s:>21}   {top}")
    for k, p in paired.items():
        print(f"  {k}: mean {p['mean']:+.4f} (std {p['std']:.4f}), lower in {p['wins']}/{p['of']} seeds")
    print(f"  seed noise (std pooled over the distinct mixtures): {seed_std:.4f}")
    print(f"\npredictor: Spearman predicted vs actual on {args.heldout} held-out mixtures {rho:+.3f} "
          f"(p={pval:.3g}); in-sample {rho_fit:+.3f}; within the search (iterations 2+) "
          f"{counts['predicted_vs_proxy_spearman']}")
    print(f"  held-out actual loss spread: std {result['predictor']['heldout_actual']['std']:.4f}, "
          f"range {actual.min():.4f}..{actual.max():.4f} (seed noise {seed_std:.4f})")
    save("search", result)


if __name__ == "__main__":
    main()
