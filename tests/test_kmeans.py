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


def test_segment_sums_are_exact_whatever_the_chunks_and_threads():
    x = kmeans.quantize(blobs(3000, 16, 4))
    labels = np.random.default_rng(2).integers(0, 9, len(x))
    ref = np.zeros((9, 16))
    np.add.at(ref, labels, x.astype(np.float64))
    for chunk, threads in ((4096, 1), (100, 1), (37, 3)):
        assert np.array_equal(kmeans.segment_sums(x, labels, 9, threads, chunk), ref)


def test_the_sample_threshold_keeps_a_margin_over_the_target():
    assert kmeans.sample_size(10_000, 20, 256) == 5120
    assert kmeans.sample_size(1000, 20, 256) == 1000
    assert kmeans.read_threshold(1000, 1000) == kmeans.HASH_RANGE - 1
    t = kmeans.read_threshold(1_000_000, 5120)
    kept = (kmeans.id_hashes(np.array([f"d{i}" for i in range(1_000_000)], dtype=object), 7) <= np.uint64(t)).sum()
    assert 5120 < kept < 5120 + 12 * np.sqrt(5120) + 64
    # another seed orders the same points differently, with no ties
    h = kmeans.id_hashes(np.array([f"d{i}" for i in range(1000)], dtype=object), 7)
    a, b = kmeans.remix(h, 1), kmeans.remix(h, 2)
    assert len(set(a.tolist())) == 1000 and not np.array_equal(np.argsort(a), np.argsort(b))


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
    assert (halves.sums == p.sums).all() and (halves.counts == p.counts).all()
    assert halves.objective(c) == p.objective(c)
    assert p.objective(c) == pytest.approx(float((x * c[labels]).sum(1).mean()), abs=1e-6)


def test_labels_and_exact_scores_do_not_depend_on_the_batching():
    """FAISS's float32 products change in the last bits with the batch; labels (near-ties rescored in
    float64) and exact scores do not."""
    x = kmeans.quantize(blobs(3000, 64, 6, seed=5))
    c = kmeans.normalize(np.vstack([x[:20], x[:5] + 1e-7]))  # near-duplicate centroids: ties on purpose
    whole = kmeans.assign(x, c, exact_scores=True)
    for chunk in (7, 19, 1000):
        part = kmeans.assign(x, c, chunk=chunk, exact_scores=True)
        assert np.array_equal(part[0], whole[0]) and np.array_equal(part[1], whole[1])


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

    cfg = ClusterConfig(k=12, niter=30, seed=5, num_shards=2, cpus_per_shard=0.25, nredo=2, max_points_per_centroid=10**6)
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


def test_the_fit_keeps_a_capped_sample_and_reports_it(ray_local, points, tmp_path):
    """k × max_points_per_centroid points exactly; every actor holds at most its sample share plus one
    block; every document is still assigned."""
    import pyarrow.parquet as pq

    from clustermix.kmeans_dist import distributed_kmeans

    cfg = ClusterConfig(k=12, niter=10, seed=5, num_shards=2, cpus_per_shard=0.25, max_points_per_centroid=50,
                        block_rows=256)
    res = distributed_kmeans(_dataset(points), cfg, str(tmp_path / "asg"))
    assert res.n_points == len(points) and res.n_fitted == 12 * 50
    assert res.fraction == pytest.approx(600 / len(points))
    meta = res.meta(cfg)
    assert meta["n_fitted"] == 600 and meta["sample_fraction"] == pytest.approx(0.15)
    assert sum(c.rows_read for c in res.loads) == len(points)
    margin = 600 + 6 * np.sqrt(600) + 64  # what the read may keep before the exact cut
    assert sum(c.kept for c in res.loads) <= margin
    for c in res.loads:
        assert c.max_block <= 256
        assert c.peak_rows <= c.kept + c.max_block  # its sample share plus the block in hand, never the shard
        assert c.peak_rows < c.rows_read / 2
    assert sum(u["rows"] for u in res.usage) == 600
    t = pq.read_table(tmp_path / "asg")
    assert t.num_rows == len(points) and len(set(t.column("id").to_pylist())) == len(points)
    assert sum(p.rows for p in res.parts) == len(points)
    assert res.objective_all is not None and abs(res.objective_all - res.fit.objective) < 0.02


def test_k_greater_than_points_fails_clearly(ray_local):
    from clustermix.errors import DataError
    from clustermix.kmeans_dist import distributed_kmeans

    with pytest.raises(DataError, match=r"cluster\.k=50"):
        distributed_kmeans(_dataset(blobs(20, 8, 2)), ClusterConfig(k=50, num_shards=2, cpus_per_shard=0.25))


def test_k_large_relative_to_the_points_works_seeded_as_faiss_seeds(ray_local):
    """FAISS's seeding (what ``init: auto`` picks above KMEANSPP_MAX_K), identical across shardings too."""
    from clustermix.config import KMEANSPP_MAX_K
    from clustermix.kmeans_dist import distributed_kmeans

    assert ClusterConfig(k=KMEANSPP_MAX_K + 1).init_method() == "random"
    assert ClusterConfig(k=KMEANSPP_MAX_K).init_method() == "kmeans++"
    x = blobs(1500, 16, 40, seed=4)
    fits = [distributed_kmeans(_dataset(x), ClusterConfig(k=1000, niter=5, seed=1, num_shards=s, cpus_per_shard=0.25,
                                                           init="random"))
            for s in (1, 2)]
    res = fits[1]
    assert res.n_fitted == 1500 and res.fit.centroids.shape == (1000, 16)
    assert np.allclose(np.linalg.norm(res.fit.centroids, axis=1), 1.0, atol=1e-5)
    assert res.meta(ClusterConfig(k=1000, init="random"))["init"] == "random"
    assert np.array_equal(fits[0].fit.centroids, res.fit.centroids)


def test_the_fit_does_not_depend_on_how_points_are_sharded(ray_local, points, tmp_path):
    import pyarrow.parquet as pq

    from clustermix.kmeans_dist import distributed_kmeans

    runs = []
    for s in (1, 2, 3):
        cfg = ClusterConfig(k=6, niter=8, seed=2, num_shards=s, cpus_per_shard=0.25, max_points_per_centroid=150,
                            block_rows=500)
        res = distributed_kmeans(_dataset(points[:2500]), cfg, str(tmp_path / f"asg{s}"))
        asg = pq.read_table(tmp_path / f"asg{s}").sort_by("id")
        runs.append((res, asg))
    (first, asg0), rest = runs[0], runs[1:]
    assert first.n_fitted == 900
    for res, asg in rest:
        assert res.n_fitted == first.n_fitted
        assert np.array_equal(res.fit.centroids, first.fit.centroids)
        assert res.fit.history == first.fit.history
        assert asg.equals(asg0)


def test_replaced_fit_fraction_names_its_replacement():
    from clustermix.config import ConfigError

    with pytest.raises(ConfigError, match=r"cluster\.fit_fraction.*replaced by cluster\.max_points_per_centroid"):
        ClusterConfig.model_validate({"fit_fraction": 0.5})


def test_rows_of_one_model_from_the_log(tmp_path):
    import pyarrow as pa
    from deltalake import write_deltalake

    from clustermix.deltalog import rows_where

    uri = str(tmp_path / "emb")
    write_deltalake(uri, pa.table({"id": ["a", "b"], "model": ["m1", "m1"]}))
    write_deltalake(uri, pa.table({"id": ["c"], "model": ["m2"]}), mode="append")
    write_deltalake(uri, pa.table({"id": ["d", "e", "f"], "model": ["m1", "m2", "m1"]}), mode="append")
    assert rows_where(uri, None, "model", "m1") == 4
    assert rows_where(uri, None, "model", "m2") == 2
    assert rows_where(uri, 0, "model", "m2") == 0
