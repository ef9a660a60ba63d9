"""The shard actor of the distributed k-means (:mod:`clustermix.kmeans_dist`): it reads its share of
the embeddings as a stream and keeps only the fit sample's points, then answers the driver's calls.

A point is in the sample when a seeded hash of its document id is at most a threshold
(:func:`clustermix.kmeans.read_threshold`), so the sample is the same documents however the stream
was split or ordered; the driver then cuts the union to exactly k × ``max_points_per_centroid``
points (:func:`cut_sample`). An actor holds its share of the sample plus the block it is reading
(and the one Ray Data prefetches), whatever the corpus size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clustermix import faults, kmeans


@dataclass(frozen=True)
class LoadCounts:
    """What one shard actor read and kept: the structural proof that its memory is bounded."""

    rows_read: int
    kept: int  # points of the fit sample (before the driver's exact cut)
    peak_rows: int  # most points held at once while reading: those kept so far plus the block in hand
    max_block: int  # largest block read
    peak_private_bytes: int = 0  # most private memory (RssAnon) seen after a block (0: no /proc)


def private_bytes() -> int:
    """This process's private resident memory (Linux RssAnon), without the pages of Ray's shared
    object store that reading blocks maps in (those count in RSS but belong to the store, whose size
    is configured). 0 where /proc is not there."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ShardActor:
    """Holds one shard's part of the fit sample (id hashes + unit vectors) and answers the driver's
    k-means calls. It never holds more than its part of the sample plus one block."""

    def __init__(self, use_gpu: bool, threads: int = 1) -> None:
        kmeans.set_threads(threads)  # the products and the sums use the actor's CPUs, no more
        self.use_gpu, self.threads = use_gpu, threads
        self.h: np.ndarray = np.empty(0, dtype=np.uint64)
        self.x: np.ndarray = np.empty((0, 0), dtype=np.float32)
        self.steps = 0

    def load(self, it: Any, seed: int, threshold: int, block_rows: int) -> LoadCounts:
        """Stream this shard's (id, embedding) blocks, keeping the points whose seeded id hash is at
        most ``threshold``."""
        import pyarrow as pa

        hs, xs = [], []
        rows = kept = peak = biggest = private = 0
        t = np.uint64(threshold)
        for batch in it.iter_batches(batch_format="pyarrow", batch_size=block_rows):
            rows += batch.num_rows
            biggest = max(biggest, batch.num_rows)
            peak = max(peak, kept + batch.num_rows)
            h = kmeans.id_hashes(batch.column("id").to_numpy(zero_copy_only=False), seed)
            keep = h <= t
            if not keep.any():
                continue
            # convert only the kept rows' vectors
            kept_rows = batch if keep.all() else batch.filter(pa.array(keep))
            emb = kept_rows.column("embedding").combine_chunks()
            flat = np.asarray(emb.flatten(), dtype=np.float32)
            hs.append(h[keep])
            xs.append(kmeans.quantize(flat.reshape(len(emb), -1)))
            kept += len(emb)
            private = max(private, private_bytes())
        if xs:
            self.h, self.x = np.concatenate(hs), np.ascontiguousarray(np.concatenate(xs))
        return LoadCounts(rows, kept, peak, biggest, max(private, private_bytes()))

    def count_at_most(self, t: int) -> int:
        return int((self.h <= np.uint64(t)).sum())

    def trim(self, t: int) -> int:
        """Drop the points whose hash is above ``t`` (the driver's exact cut of the sample)."""
        keep = self.h <= np.uint64(t)
        if not keep.all():
            self.h, self.x = self.h[keep], np.ascontiguousarray(self.x[keep])
        return len(self.h)

    def smallest(self, m: int, redo: int) -> tuple[np.ndarray, np.ndarray]:
        """This shard's ``m`` points first in the order of run ``redo`` (and their keys): the sample
        hash itself for the first run, a seeded remix of it for each redo. The union over shards, cut
        to the ``m`` first, is the same points in the same order however they were sharded."""
        keys = self.h if redo == 0 else kmeans.remix(self.h, redo)
        take = np.argsort(keys, kind="stable")[:m]
        return keys[take], self.x[take]

    def step(self, centroids: np.ndarray) -> kmeans.Partial:
        self.steps += 1
        faults.hold("kmeans.step", self.steps)
        return kmeans.partial_stats(self.x, centroids, self.use_gpu, threads=self.threads)

    def usage(self) -> dict[str, int]:
        """Points resident, the private memory now, and the peak RSS (which also counts the object
        store's shared pages the process has touched), in bytes."""
        import resource

        return {"rows": len(self.x), "private_bytes": private_bytes(),
                "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def cut_sample(shards: list[Any], m: int, hi: int) -> int:
    """The smallest hash ``t`` with at least ``m`` sample points at or below it, over all shards (a
    binary search over the hash range: at most 64 rounds of one integer per shard)."""
    import ray

    lo = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(ray.get([s.count_at_most.remote(mid) for s in shards])) >= m:
            hi = mid
        else:
            lo = mid + 1
    return lo
