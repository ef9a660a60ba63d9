"""k-means: the math on tiny arrays, and the distributed Ray fit against single-process FAISS."""

from __future__ import annotations

import numpy as np
import pytest

from clustermix import kmeans
from clustermix.config import ClusterConfig


def blobs(n: int, d: int, k: int, seed: int = 0, spread: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = kmeans.normalize(rng.standard_normal((k, d)))
    x = centers[rng.integers(0, k, n)] + spread * rng.standard_normal((n, d)) / np.sqrt(d)
    return kmeans.normalize(x)


def test_assign_matches_brute_force():
    x = blobs(500, 16, 5)
    c = kmeans.normalize(np.random.default_rng(1).standard_normal((7, 16)))
    labels, scores = kmeans.assign(x, c, chunk=64)
    sims = x @ c.T
    assert (labels == sims.argmax(1)).all()
    assert np.allclose(scores, sims.max(1), atol=1e-5)


def test_partial_stats_are_sums_and_counts():
    x = kmeans.quantize(blobs(300, 8, 3))
    c = kmeans.normalize(x[:3])
    p = kmeans.partial_stats(x, c)
    labels = (x @ c.T).argmax(1)
    for j in range(3):
        assert p.counts[j] == (labels == j).sum()
        assert np.allclose(p.sums[j], x[labels == j].sum(0), atol=1e-4)
    assert p.n == 300
    # fixed-point sums: any split of the points gives bit-identical totals
    halves = kmeans.partial_stats(x[:120], c) + kmeans.partial_stats(x[120:], c, chunk=7)
    assert (halves.sums == p.sums).all() and (halves.counts == p.counts).all() and halves.qscore == p.qscore


def test_update_renormalises_and_reseeds_empty_clusters():
    x = blobs(200, 8, 2)
    c = kmeans.normalize(np.vstack([x[:2], -x[:1]]))  # third centroid attracts nothing
    p = kmeans.partial_stats(x, c)
    p.counts[2], p.sums[2] = 0, 0
    new, reseeded = kmeans.update(p, c, np.random.default_rng(0))
    assert reseeded == 1
    assert np.allclose(np.linalg.norm(new, axis=1), 1.0, atol=1e-5)
    assert np.linalg.norm(new[2] - new[int(np.argmax(p.counts))]) < 0.05  # split off the largest


def _faiss_objective(x: np.ndarray, k: int, niter: int, seed: int) -> float:
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed, max_points_per_centroid=10**9)
    km.train(x)
    _, scores = kmeans.assign(x, kmeans.normalize(km.centroids))
    return float(scores.mean())


@pytest.fixture(scope="module")
def points():
    return blobs(4000, 32, 12, seed=3)


def _dataset(x: np.ndarray):
    import pyarrow as pa
    import ray

    flat = pa.array(x.reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32))
    table = pa.table({"id": [f"p{i}" for i in range(len(x))], "embedding": pa.ListArray.from_arrays(offsets, flat)})
    return ray.data.from_arrow(table).repartition(4)


def test_distributed_fit_within_half_a_percent_of_faiss(ray_local, points, tmp_path):
    import pyarrow.parquet as pq

    from clustermix.kmeans_dist import distributed_kmeans

    cfg = ClusterConfig(k=12, niter=30, seed=5, num_shards=2, cpus_per_shard=0.25, nredo=2)
    res = distributed_kmeans(_dataset(points), cfg, str(tmp_path / "asg"))
    ref = max(_faiss_objective(points, 12, 30, s) for s in (5, 6))
    assert res.fit.objective >= ref * 0.995, (res.fit.objective, ref)
    assert res.n_points == res.n_fitted == len(points)
    # every point's written assignment is its brute-force nearest centroid
    t = pq.read_table(tmp_path / "asg").to_pandas()
    assert len(t) == len(points) and t["id"].is_unique
    idx = t["id"].str[1:].astype(int).to_numpy()
    sims = points[idx] @ res.fit.centroids.T
    assert (t["cluster_id"].to_numpy() == sims.argmax(1)).all()
    assert np.allclose(t["score"].to_numpy(), sims.max(1), atol=1e-5)


def test_fit_on_a_fraction_is_reported(ray_local, points):
    from clustermix.kmeans_dist import distributed_kmeans

    cfg = ClusterConfig(k=12, niter=10, seed=5, num_shards=2, cpus_per_shard=0.25, fit_max_points=1000)
    res = distributed_kmeans(_dataset(points), cfg)
    assert res.fraction == pytest.approx(0.25)
    assert 800 < res.n_fitted < 1200
    assert res.meta(cfg)["n_fitted"] == res.n_fitted


def test_k_greater_than_points_fails_clearly(ray_local):
    from clustermix.errors import DataError
    from clustermix.kmeans_dist import distributed_kmeans

    with pytest.raises(DataError, match=r"cluster\.k=50"):
        distributed_kmeans(_dataset(blobs(20, 8, 2)), ClusterConfig(k=50, num_shards=2, cpus_per_shard=0.25))


def test_the_fit_does_not_depend_on_how_points_are_sharded(ray_local, points):
    from clustermix.kmeans_dist import distributed_kmeans

    fits = [distributed_kmeans(_dataset(points[:1500]),
                               ClusterConfig(k=6, niter=8, seed=2, num_shards=s, cpus_per_shard=0.25, fit_fraction=0.7)).fit
            for s in (1, 2)]
    assert np.array_equal(fits[0].centroids, fits[1].centroids)
    assert fits[0].history == fits[1].history
