"""Near-duplicate removal on synthetic data with a known planted duplicate rate.

MinHash (Spark, what ingest runs: :func:`clustermix.minhash.signatures` and
:func:`clustermix.minhash.near_duplicates`) on generated documents of ~180 words, a share of them
near-copies made by the edits the tests plant (a changed date, two sentences swapped, boilerplate
appended); semantic dedup (:func:`clustermix.semdedup.dedup_sorted`, the walk each dedup actor
runs) on generated unit vectors in K clusters, a share of them near-copies (noise of cosine ~0.99).

Recall: planted copies found (as a copy of a member of their own family) / planted copies.
Precision: found that are planted copies of the family they were matched to / found.
Throughput is documents per second per core (Spark local[N]: N cores; the walk: one process,
FAISS on ``--threads`` threads). Peak memory: MinHash's Spark JVM (sampled while the pass runs; its
heap is capped by ``driver_memory``) and the Python driver's peak (the generated corpus included), and
the walk's process.

    .venv/bin/python bench/dedup.py --docs 50000 --vectors 200000 --dim 128
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import Peaks, peak_rss_mb, save

BOILER = "Subscribe to our newsletter for daily updates. We use cookies to deliver our services. All rights reserved."


def texts(n: int, rate: float, seed: int) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``n`` documents, ``rate`` of them near-copies; returns rows and {copy id: family id}."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(50_000)]
    rows: list[tuple[str, str]] = []
    family: dict[str, str] = {}
    bases: list[tuple[str, list[str]]] = []
    for i in range(n):
        if bases and rng.random() < rate:
            fam, body = rng.choice(bases)
            edit = rng.randrange(3)
            if edit == 0:
                text = f"Published 2024-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}. " + " ".join(body)
            elif edit == 1:
                k = rng.randrange(len(body) - 1)
                text = "Published 2021-01-01. " + " ".join([*body[:k], body[k + 1], body[k], *body[k + 2:]])
            else:
                text = "Published 2021-01-01. " + " ".join(body) + " " + BOILER
            family[f"d{i}"] = fam
        else:
            body = [" ".join(rng.choice(vocab) for _ in range(15)) + "." for _ in range(12)]
            bases.append((f"d{i}", body))
            text = "Published 2021-01-01. " + " ".join(body)
        rows.append((f"d{i}", text))
    return rows, family


def fam_of(doc: str, family: dict[str, str]) -> str:
    return family.get(doc, doc)


def bench_minhash(n: int, rate: float, cores: int, seed: int) -> dict[str, Any]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from clustermix import minhash
    from clustermix.config import build_config
    from clustermix.runtime import spark_session
    from clustermix.tableio import persist_corpus

    rows, family = texts(n, rate, seed)
    tmp = Path(tempfile.mkdtemp(prefix="dedup-bench-"))
    cfg = build_config({"lake": {"root": str(tmp / "lake")}, "sample": {"budget": 1},
                        "spark": {"master": f"local[{cores}]", "shuffle_partitions": cores * 2, "driver_memory": "3g"}})
    spark = spark_session(cfg)
    # as in a run: reliable checkpoints under the lake (the label-propagation rounds), corpus-sized
    # frames persisted to disk
    spark.conf.set(minhash.CHECKPOINT_DIR_CONF, str(tmp / "checkpoints"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows]}), tmp / "docs.parquet")
    del rows
    from pyspark.sql import functions as F

    peaks = Peaks()
    peaks.start()
    peaks.take()  # from here on: the MinHash pass only, not the generator or the session start
    t0 = time.perf_counter()
    docs = spark.read.parquet(str(tmp / "docs.parquet")).repartition(cores * 2)
    sigs = persist_corpus(minhash.signatures(docs, cfg.dedup.near).withColumn("key", F.col("id")))
    found = minhash.near_duplicates(sigs, cfg.dedup.near).collect()  # the result only: the copies found
    seconds = time.perf_counter() - t0
    rss = peaks.take()
    peaks.stop()
    spark.stop()
    good = sum(1 for r in found if fam_of(r["key"], family) == fam_of(r["kept_key"], family))
    return {"docs": n, "planted_rate": rate, "planted_copies": len(family), "found": len(found),
            "recall": round(good / max(len(family), 1), 4), "precision": round(good / max(len(found), 1), 4),
            "threshold": cfg.dedup.near.threshold, "seconds": round(seconds, 1), "cores": cores,
            "docs_per_s_per_core": round(n / seconds / cores, 1),
            "driver_memory": f"{cfg.spark.driver_memory} (JVM heap cap)",
            "spark_jvm_peak_rss_mb": rss.get("spark-jvm"), "python_peak_rss_mb": round(peak_rss_mb())}


def vectors(n: int, d: int, k: int, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors in ``k`` clusters, ``rate`` of them near-copies; returns x, cluster, score, family."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    cluster = rng.integers(0, k, size=n)
    x = centres[cluster] * 0.6 + rng.normal(scale=0.4 / np.sqrt(d), size=(n, d)).astype(np.float32) * 2
    family = np.arange(n)
    copies = np.nonzero(rng.random(n) < rate)[0]
    roots = np.setdiff1d(np.arange(n), copies)
    src = roots[rng.integers(0, len(roots), size=len(copies))]  # each copy is of an original
    x[copies] = x[src] + rng.normal(scale=0.05 / np.sqrt(d), size=(len(copies), d)).astype(np.float32)
    cluster[copies] = cluster[src]
    family[copies] = src
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    score = np.einsum("nd,nd->n", x, centres[cluster])
    return x.astype(np.float32), cluster, score, family


def bench_semantic(n: int, d: int, k: int, rate: float, threshold: float, block: int, threads: int,
                   seed: int) -> dict[str, Any]:
    import faiss

    from clustermix.semdedup import dedup_sorted, member_order

    faiss.omp_set_num_threads(threads)
    x, cluster, score, family = vectors(n, d, k, rate, seed)
    planted = int((family != np.arange(n)).sum())
    rss0 = peak_rss_mb()
    found = good = 0
    t0 = time.perf_counter()
    for c in range(k):
        idx = np.nonzero(cluster == c)[0]
        order = idx[member_order(score[idx], [f"{i:09d}" for i in idx])]
        res = dedup_sorted(x[order], threshold, block)
        dup = np.nonzero(~res.kept)[0]
        found += len(dup)
        good += int((family[order[dup]] == family[order[res.dup_of[dup]]]).sum())
    seconds = time.perf_counter() - t0
    return {"vectors": n, "dim": d, "clusters": k, "planted_rate": rate, "planted_copies": planted, "found": found,
            "recall": round(good / max(planted, 1), 4), "precision": round(good / max(found, 1), 4),
            "threshold": threshold, "block_rows": block, "seconds": round(seconds, 1), "threads": threads,
            "docs_per_s_per_core": round(n / seconds / threads, 1),
            "peak_rss_mb": round(peak_rss_mb()), "rss_before_walk_mb": round(rss0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=1_000_000, help="documents for MinHash (0: skip)")
    ap.add_argument("--vectors", type=int, default=1_000_000, help="embeddings for semantic dedup (0: skip)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--rate", type=float, default=0.1, help="planted near-copy rate")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--block", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    out: dict[str, Any] = {}
    if args.vectors:
        out["semantic"] = bench_semantic(args.vectors, args.dim, args.clusters, args.rate, 0.95, args.block,
                                         args.cores, args.seed)
        print("semantic:", out["semantic"], flush=True)
    if args.docs:
        out["minhash"] = bench_minhash(args.docs, args.rate, args.cores, args.seed)
        print("minhash:", out["minhash"], flush=True)
    save("dedup", out)


if __name__ == "__main__":
    main()
