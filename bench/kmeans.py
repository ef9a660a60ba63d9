"""Benchmark: distributed FAISS k-means on Ray vs single-process faiss.Kmeans, and the shard actors'
memory as the corpus grows.

In one process, every figure as a ratio against a baseline measured in the same run:
  * speed: seconds per Lloyd iteration of faiss.Kmeans(spherical=True) on all points with T threads,
    and of clustermix's fit on the same points with the same T threads in all (one shard actor of
    T threads; T shard actors of one thread), the sample cap lifted so that both fit every point;
    for each n in --n. Quality (final mean cosine) of both is printed next to it;
  * memory: the shard actors' peak private memory (RssAnon, sampled after every block) and peak
    RSS (which also counts the pages of Ray's shared object store they have read blocks from) for
    each n in --rss-n, with the sample capped by ``cluster.max_points_per_centroid`` (flat in n) and,
    as the baseline, with the cap lifted (every point resident, as before the cap existed);
  * with --big-k: k = 20,000 on 4 points per centroid, seeded FAISS's way, vs faiss.Kmeans;
  * with --lake (a lake after `make run`): quality on the default corpus's real embeddings and the
    NMI of the clusters against the corpus's topic labels, next to faiss's and sklearn KMeans's.

    .venv/bin/python bench/kmeans.py --n 200000 1000000 --niter 5 --rss-n 100000 200000 400000 800000
    .venv/bin/python bench/kmeans.py --n --big-k 20000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from clustermix import kmeans
from clustermix.config import ClusterConfig
from common import save

NO_CAP = 10**9


def synthetic(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around k random centres, made in blocks (no n×d float64 temporary)."""
    rng = np.random.default_rng(seed)
    centers = kmeans.normalize(rng.standard_normal((k, d)))
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        noise = rng.standard_normal((m, d), dtype=np.float32) * np.float32(0.6 / np.sqrt(d))
        out[s : s + m] = kmeans.normalize(centers[rng.integers(0, k, m)] + noise)
    return out


def faiss_fit(x: np.ndarray, k: int, niter: int, seed: int, threads: int) -> tuple[float, float, np.ndarray]:
    """(seconds per iteration, mean cosine, labels) of single-process FAISS on all points."""
    import faiss

    faiss.omp_set_num_threads(threads)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed, max_points_per_centroid=NO_CAP)
    t0 = time.perf_counter()
    km.train(x)
    dt = time.perf_counter() - t0
    labels, scores = kmeans.assign(x, kmeans.normalize(km.centroids))
    return dt / niter, float(scores.mean()), labels


def dataset(x: np.ndarray, ids: list[str] | None = None, block_rows: int = 8192) -> Any:
    """(id, embedding) in blocks of ``block_rows``, as the cluster stage reads a table's files: a block
    does not grow with n."""
    import pyarrow as pa
    import ray

    flat = pa.array(x.reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32))
    ids = ids or [str(i) for i in range(len(x))]
    t = pa.table({"id": ids, "embedding": pa.ListArray.from_arrays(offsets, flat)})
    return ray.data.from_arrow([t.slice(s, block_rows) for s in range(0, len(x), block_rows)])


def ours(ds: Any, n: int, cfg: ClusterConfig, assign_to: Path | None = None) -> Any:
    from clustermix.kmeans_dist import distributed_kmeans

    return distributed_kmeans(ds, cfg, str(assign_to) if assign_to else None, n_rows=n)


def speed(ns: list[int], args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    t = args.threads
    for n in ns:
        x = synthetic(n, args.d, args.k)
        ds = dataset(x)
        f_it, f_obj, _ = faiss_fit(x, args.k, args.niter, 1, t)
        cfg = {"k": args.k, "niter": args.niter, "seed": 1, "tol": 0.0, "max_points_per_centroid": NO_CAP}
        one = ours(ds, n, ClusterConfig(**cfg, num_shards=1, cpus_per_shard=t))
        many = ours(ds, n, ClusterConfig(**cfg, num_shards=t, cpus_per_shard=1))
        r = {"faiss_s_per_iter": f_it, "ours_1_actor_s_per_iter": one.fit.seconds_per_iteration,
             f"ours_{t}_actors_s_per_iter": many.fit.seconds_per_iteration,
             "ratio_1_actor_vs_faiss": one.fit.seconds_per_iteration / f_it,
             f"ratio_{t}_actors_vs_faiss": many.fit.seconds_per_iteration / f_it,
             "faiss_objective": f_obj, "ours_objective": one.fit.objective,
             "identical_1_vs_many_actors": bool(np.array_equal(one.fit.centroids, many.fit.centroids))}
        rows[str(n)] = r
        print(f"n={n:,} k={args.k} d={args.d} threads={t}: s/iter faiss {f_it:.3f}  ours 1x{t} threads "
              f"{r['ours_1_actor_s_per_iter']:.3f} (ratio {r['ratio_1_actor_vs_faiss']:.2f})  ours {t}x1 "
              f"{r[f'ours_{t}_actors_s_per_iter']:.3f} (ratio {r[f'ratio_{t}_actors_vs_faiss']:.2f}); objective "
              f"faiss {f_obj:.5f} ours {one.fit.objective:.5f}; 1 vs {t} actors identical: "
              f"{r['identical_1_vs_many_actors']}", flush=True)
        del x, ds
    return rows


def memory(ns: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of the shard actors while they read and fit, capped sample vs every point resident."""
    rows: dict[str, Any] = {}
    for n in ns:
        x = synthetic(n, args.d, args.k, seed=2)
        ds = dataset(x)
        row: dict[str, Any] = {}
        for label, cap in (("capped", args.mppc), ("uncapped", NO_CAP)):
            cfg = ClusterConfig(k=args.k, niter=3, seed=1, tol=0.0, num_shards=2, cpus_per_shard=0.5,
                                max_points_per_centroid=cap, block_rows=args.block_rows)
            res = ours(ds, n, cfg)
            row[label] = {"n_fitted": res.n_fitted, "peak_rows": max(c.peak_rows for c in res.loads),
                          "actor_peak_private_mb": max([c.peak_private_bytes for c in res.loads]
                                                       + [u["private_bytes"] for u in res.usage]) / 2**20,
                          "actor_peak_rss_mb": max(u["max_rss_bytes"] for u in res.usage) / 2**20}
        rows[str(n)] = row
        c, u = row["capped"], row["uncapped"]
        print(f"n={n:,}: actor peak private memory capped {c['actor_peak_private_mb']:.0f} MiB ({c['n_fitted']:,} "
              f"fitted, peak {c['peak_rows']:,} rows held)  uncapped {u['actor_peak_private_mb']:.0f} MiB "
              f"({u['n_fitted']:,} fitted); ratio uncapped/capped "
              f"{u['actor_peak_private_mb'] / c['actor_peak_private_mb']:.2f}; peak RSS with the object store's "
              f"shared pages: capped {c['actor_peak_rss_mb']:.0f}, uncapped {u['actor_peak_rss_mb']:.0f} MiB", flush=True)
        del x, ds
    first, last = rows[str(ns[0])], rows[str(ns[-1])]
    growth = {f"{k}_{m}": last[k][f"actor_peak_{m}_mb"] / first[k][f"actor_peak_{m}_mb"]
              for k in ("capped", "uncapped") for m in ("private", "rss")}
    print(f"at n={ns[-1]:,} vs n={ns[0]:,} ({ns[-1] / ns[0]:.0f}x the points): actor peak private memory capped "
          f"{growth['capped_private']:.2f}x, uncapped {growth['uncapped_private']:.2f}x; peak RSS capped "
          f"{growth['capped_rss']:.2f}x, uncapped {growth['uncapped_rss']:.2f}x")
    return {"rows": rows, "growth_last_vs_first": growth}


def big_k(k: int, args: argparse.Namespace) -> dict[str, Any]:
    """A large k on a sample of 4 points per centroid (d=32 so that it runs on a laptop): seconds per
    iteration vs faiss.Kmeans on the same number of (its own sampled) points and threads."""
    import faiss

    n, d, mppc = 5 * k, 32, 4
    x = synthetic(n, d, 500, seed=3)
    cfg = ClusterConfig(k=k, niter=3, tol=0.0, seed=1, num_shards=args.threads, cpus_per_shard=1,
                        max_points_per_centroid=mppc)
    t0 = time.perf_counter()
    res = ours(dataset(x), n, cfg)
    total = time.perf_counter() - t0
    faiss.omp_set_num_threads(args.threads)
    km = faiss.Kmeans(d, k, niter=3, spherical=True, seed=1, max_points_per_centroid=mppc)
    t0 = time.perf_counter()
    km.train(x)
    f_it = (time.perf_counter() - t0) / 3
    out = {"k": k, "n": n, "d": d, "n_fitted": res.n_fitted, "ours_s_per_iter": res.fit.seconds_per_iteration,
           "ours_total_s": total, "faiss_s_per_iter": f_it, "ratio": res.fit.seconds_per_iteration / f_it,
           "objective": res.fit.objective}
    print(f"k={k:,} n={n:,} d={d}: fitted {res.n_fitted:,}; s/iter ours ({args.threads} actors x 1 thread) "
          f"{out['ours_s_per_iter']:.2f}, faiss {f_it:.2f} (ratio {out['ratio']:.2f}); whole fit with reading and "
          f"seeding {total:.1f} s", flush=True)
    return out


def lake_embeddings(root: str) -> tuple[np.ndarray, list[str], list[str]]:
    """Embeddings of a lake with the docs' domain labels (bench-sized: the default corpus)."""
    from deltalake import DeltaTable

    emb = DeltaTable(f"{root}/embeddings").to_pandas(columns=["id", "embedding"])
    docs = DeltaTable(f"{root}/docs").to_pandas(columns=["id", "domain"])
    m = emb.merge(docs, on="id")
    return np.stack(m["embedding"].to_numpy()).astype(np.float32), m["id"].tolist(), m["domain"].fillna("").tolist()


def on_lake(root: str, tmp: Path, threads: int) -> dict[str, Any]:
    import pyarrow.parquet as pq
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score as nmi

    x, ids, labels = lake_embeddings(root)
    k = 20
    _, f_obj, f_lab = faiss_fit(x, k, 50, 1, threads)
    res = ours(dataset(x, ids), len(x), ClusterConfig(k=k, niter=50, seed=1, num_shards=2, cpus_per_shard=0.5),
               tmp / "asg")
    t = pq.read_table(tmp / "asg").to_pandas().set_index("id").loc[ids]
    sk = KMeans(k, n_init=1, random_state=1).fit_predict(x)
    out = {"n": len(x), "k": k, "faiss_objective": f_obj, "ours_objective": res.objective_all,
           "objective_gap_pct": 100 * (f_obj - (res.objective_all or 0)) / f_obj,
           "nmi_ours_vs_topics": nmi(labels, t["cluster_id"].to_numpy()), "nmi_faiss_vs_topics": nmi(labels, f_lab),
           "nmi_sklearn_vs_topics": nmi(labels, sk)}
    print("default corpus:", out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[200_000], help="points for the speed comparison")
    ap.add_argument("--rss-n", type=int, nargs="*", default=[], help="points for the actor memory comparison")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--niter", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="threads of faiss.Kmeans and, in all, of our actors")
    ap.add_argument("--mppc", type=int, default=256, help="cluster.max_points_per_centroid of the memory runs")
    ap.add_argument("--block-rows", type=int, default=8192, help="cluster.block_rows of the memory runs")
    ap.add_argument("--big-k", type=int, default=None, help="also fit this k on 5k points, d=32 (e.g. 20000)")
    ap.add_argument("--lake", default=None, help="a lake with embeddings and docs (after `make run`)")
    args = ap.parse_args()
    import tempfile

    import ray

    # one CPU more than the actors' threads, for the tasks that feed them (see shard_cpus)
    ray.init(num_cpus=args.threads + 1, include_dashboard=False, logging_level="ERROR")
    result: dict[str, Any] = {"k": args.k, "niter": args.niter, "d": args.d, "threads": args.threads}
    if args.n:
        result["speed"] = speed(args.n, args)
    if args.rss_n:
        result["memory"] = {"max_points_per_centroid": args.mppc, "block_rows": args.block_rows,
                            **memory(args.rss_n, args)}
    if args.big_k:
        result["big_k"] = big_k(args.big_k, args)
    if args.lake:
        with tempfile.TemporaryDirectory() as tmp:
            result["default_corpus"] = on_lake(args.lake, Path(tmp), args.threads)
    save("kmeans", result)


if __name__ == "__main__":
    main()
