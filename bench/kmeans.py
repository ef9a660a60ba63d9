"""Benchmark: distributed FAISS k-means on Ray vs single-process faiss.Kmeans.

In one process on the same cores:
  * seconds per Lloyd iteration for faiss.Kmeans(spherical=True) on all points, and for
    clustermix's distributed fit with 1 and 2 shard actors, on n and 4n synthetic unit vectors
    (the cost must grow linearly in n);
  * quality: final mean cosine of the distributed fit vs faiss on the same points, same k and
    iterations (goal: within 0.5%);
  * with --lake (a lake after `make run`): the same on the default corpus's real embeddings, and
    the NMI of the clusters against the corpus's topic labels, next to sklearn KMeans's NMI.

    .venv/bin/python bench/kmeans.py --n 50000 --lake lake
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from clustermix import kmeans
from clustermix.config import ClusterConfig
from common import save


def synthetic(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = kmeans.normalize(rng.standard_normal((k, d)))
    return kmeans.normalize(centers[rng.integers(0, k, n)] + 0.6 * rng.standard_normal((n, d)) / np.sqrt(d))


def faiss_fit(x: np.ndarray, k: int, niter: int, seed: int) -> tuple[float, float, np.ndarray]:
    """(seconds per iteration, mean cosine, labels) of single-process FAISS on all points."""
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed, max_points_per_centroid=10**9)
    t0 = time.perf_counter()
    km.train(x)
    dt = time.perf_counter() - t0
    labels, scores = kmeans.assign(x, kmeans.normalize(km.centroids))
    return dt / niter, float(scores.mean()), labels


def dataset(x: np.ndarray, ids: list[str] | None = None):
    import pyarrow as pa
    import ray

    flat = pa.array(x.reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32))
    ids = ids or [str(i) for i in range(len(x))]
    t = pa.table({"id": ids, "embedding": pa.ListArray.from_arrays(offsets, flat)})
    return ray.data.from_arrow(t).repartition(8)


def ours(x: np.ndarray, k: int, niter: int, seed: int, shards: int, tmp: Path) -> tuple[float, float, np.ndarray]:
    import pyarrow.parquet as pq

    from clustermix.kmeans_dist import distributed_kmeans

    cfg = ClusterConfig(k=k, niter=niter, seed=seed, tol=0.0, num_shards=shards, cpus_per_shard=0.5)
    out = tmp / f"asg-{shards}-{len(x)}-{time.time_ns()}"
    res = distributed_kmeans(dataset(x), cfg, str(out))
    t = pq.read_table(out).to_pandas()
    labels = np.empty(len(x), dtype=np.int64)
    labels[t["id"].astype(int).to_numpy()] = t["cluster_id"].to_numpy()
    return res.fit.seconds_per_iteration, res.fit.objective, labels


def lake_embeddings(root: str) -> tuple[np.ndarray, list[str], list[str]]:
    """Embeddings of a lake with the docs' domain labels (bench-sized: the default corpus)."""
    from deltalake import DeltaTable

    emb = DeltaTable(f"{root}/embeddings").to_pandas(columns=["id", "embedding"])
    docs = DeltaTable(f"{root}/docs").to_pandas(columns=["id", "domain"])
    m = emb.merge(docs, on="id")
    return np.stack(m["embedding"].to_numpy()).astype(np.float32), m["id"].tolist(), m["domain"].fillna("").tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--lake", default=None, help="a lake with embeddings and docs (after `make run`)")
    args = ap.parse_args()
    import tempfile

    import ray
    from sklearn.metrics import normalized_mutual_info_score as nmi

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    result: dict[str, object] = {"k": args.k, "niter": args.niter, "d": args.d}
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for n in (args.n, 4 * args.n):
            x = synthetic(n, args.d, args.k)
            f_it, f_obj, _ = faiss_fit(x, args.k, args.niter, 1)
            o1_it, _, _ = ours(x, args.k, args.niter, 1, 1, Path(tmp))
            o2_it, o2_obj, _ = ours(x, args.k, args.niter, 1, 2, Path(tmp))
            rows[n] = {"faiss_s_per_iter": f_it, "ours_1_actor_s_per_iter": o1_it, "ours_2_actors_s_per_iter": o2_it,
                       "ratio_2_actors_vs_faiss": o2_it / f_it, "faiss_objective": f_obj,
                       "ours_objective": o2_obj, "objective_gap_pct": 100 * (f_obj - o2_obj) / f_obj}
            print(f"n={n:,}: s/iter faiss {f_it:.4f}  ours(1) {o1_it:.4f}  ours(2) {o2_it:.4f}  "
                  f"ratio {o2_it / f_it:.2f}; objective faiss {f_obj:.5f} ours {o2_obj:.5f} "
                  f"(gap {rows[n]['objective_gap_pct']:+.3f}%)", flush=True)
        result["synthetic"] = {str(n): r for n, r in rows.items()}
        growth = rows[4 * args.n]["ours_2_actors_s_per_iter"] / rows[args.n]["ours_2_actors_s_per_iter"]
        result["time_growth_4x_points"] = growth
        print(f"time per iteration, 4n vs n: {growth:.2f}x (linear = 4)")
        if args.lake:
            x, _, labels = lake_embeddings(args.lake)
            k = min(args.k, 20)
            f_it, f_obj, f_lab = faiss_fit(x, k, 50, 1)
            _, o_obj, o_lab = ours(x, k, 50, 1, 2, Path(tmp))
            from sklearn.cluster import KMeans

            sk = KMeans(k, n_init=1, random_state=1).fit_predict(x)
            result["default_corpus"] = {
                "n": len(x), "k": k, "faiss_objective": f_obj, "ours_objective": o_obj,
                "objective_gap_pct": 100 * (f_obj - o_obj) / f_obj,
                "nmi_ours_vs_topics": nmi(labels, o_lab), "nmi_faiss_vs_topics": nmi(labels, f_lab),
                "nmi_sklearn_vs_topics": nmi(labels, sk)}
            print("default corpus:", result["default_corpus"])
    save("kmeans", result)


if __name__ == "__main__":
    main()
