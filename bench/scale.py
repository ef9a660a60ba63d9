"""Benchmark (issue #26): the pipeline at 1M, 4M and 16M documents on this machine, stage by stage,
with the peak resident memory of every process it starts.

For each size N, in a work folder of its own:
  * input: N JSONL records in files of --file-rows lines; each a distinct text of --words words drawn
    from a fixed vocabulary (realistic length, no accidental near-copies), a domain from a skewed
    distribution, and --dup-rate exact duplicates (a repeated id or a repeated text);
  * ingest (Spark), then embeddings written straight to the Delta table with delta-rs (no model: unit
    vectors around --true-k centres, so k-means finds real structure), then cluster (Ray k-means on a
    sample, streaming assignment), stats, sample and blend (Spark), each as `run_stages(cfg, (stage,))`;
  * a sampler thread reads the RSS of this process and every child (Spark's JVM, Ray's system
    processes, every Ray worker and actor, named by its process title) every 0.5 s and keeps each
    one's peak, per stage.

Goals (issue #26): the peak RSS of every process within 20% from 4M to 16M; the time of 16M over 4M
at most 4.4; and, with --objective, the k-means objective (mean cosine to the assigned centroid) of
the sample-fit within 0.5% of a fit on every point (at the smallest size).

    .venv/bin/python bench/scale.py --sizes 1000000 4000000 16000000 --work /work/scale
    .venv/bin/python bench/scale.py --sizes 200000 --k 200 --objective   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Peaks, save

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["news", "forum", "code", "legal", "science", "fiction", "recipes", "sports", "finance", "travel"]


# --- data --------------------------------------------------------------------------------------------

def vocabulary(n: int = 20_000, seed: int = 7) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 11, n)
    return sorted({"".join(rng.choice(letters, size=int(m))) for m in lengths})


def write_input(folder: Path, n: int, file_rows: int, words: int, dup_rate: float, seed: int) -> dict[str, int]:
    """N records in JSONL files; returns the planted counts (duplicate ids, duplicate texts)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = np.array(vocabulary())
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, len(DOMAINS) + 1)
    p_dom = zipf / zipf.sum()
    planted = {"duplicate_ids": 0, "duplicate_texts": 0}
    for f, start in enumerate(range(0, n, file_rows)):
        m = min(file_rows, n - start)
        word_ids = rng.integers(0, len(vocab), (m, words))
        doms = rng.choice(len(DOMAINS), m, p=p_dom)
        dups = rng.random(m) < dup_rate
        with open(folder / f"part-{f:05d}.jsonl", "w") as fh:
            last_text = ""
            for i in range(m):
                doc = start + i
                text = " ".join(vocab[word_ids[i]])
                doc_id = f"doc-{doc:09d}"
                if dups[i] and i > 0:
                    if i % 2:
                        doc_id = f"doc-{doc - 1:09d}"  # the same id as the record before it
                        planted["duplicate_ids"] += 1
                    else:
                        text = last_text  # the same text under a new id
                        planted["duplicate_texts"] += 1
                fh.write(json.dumps({"id": doc_id, "text": text, "domain": DOMAINS[doms[i]]}) + "\n")
                last_text = text
    return planted


def write_embeddings(lake: Any, dim: int, true_k: int, model: str, seed: int, block: int = 262_144) -> int:
    """One unit vector per accepted document of ``docs``, read in blocks of ids (never the whole
    table), around ``true_k`` centres picked by a hash of the id; appended to ``embeddings`` with
    delta-rs in files of ``block`` rows."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import DeltaTable, write_deltalake

    from clustermix import deltars

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((true_k, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    schema = deltars.arrow_schema("embeddings")
    uri = lake.table("embeddings")
    docs = DeltaTable(lake.table("docs")).to_pyarrow_dataset()
    n = 0
    mode = "overwrite"
    for batch in docs.to_batches(columns=["id"], batch_size=block):
        ids = batch.column(0)
        if not len(ids):
            continue
        # "doc-000000042" -> 42, spread over the centres by a multiplicative hash
        num = np.asarray(pc.cast(pc.utf8_slice_codeunits(ids, 4), pa.int64()), dtype=np.uint64)
        owner = ((num * np.uint64(2654435761)) % np.uint64(2**32) % np.uint64(true_k)).astype(np.int64)
        noise = rng.standard_normal((len(ids), dim)).astype(np.float32) * np.float32(0.6 / np.sqrt(dim))
        vecs = centres[owner] + noise
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        offsets = pa.array(np.arange(0, (len(ids) + 1) * dim, dim, dtype=np.int32))
        emb = pa.ListArray.from_arrays(offsets, pa.array(vecs.reshape(-1), pa.float32()),
                                       type=schema.field("embedding").type)
        table = pa.table({"id": ids, "embedding": emb,
                          "model": pa.array([model] * len(ids), pa.string())}, schema=schema)
        write_deltalake(uri, table, mode=mode)
        mode, n = "append", n + len(ids)
    return n


# --- the run -----------------------------------------------------------------------------------------

@contextmanager
def stage(name: str, peaks: Peaks, out: dict[str, Any]) -> Iterator[None]:
    peaks.take()
    t0 = time.perf_counter()
    yield
    out[name] = {"s": round(time.perf_counter() - t0, 1), "peak_rss_mib": peaks.take()}
    top = sorted(out[name]["peak_rss_mib"].items(), key=lambda kv: -kv[1])[:4]
    print(f"  {name:<12} {out[name]['s']:8.1f} s   peak RSS: "
          + ", ".join(f"{k} {v:.0f} MiB" for k, v in top), flush=True)


def objective(lake: Any) -> float:
    """Mean cosine of every document to its assigned centroid (the ``score`` of ``assignments``),
    streamed in batches."""
    from deltalake import DeltaTable

    total, n = 0.0, 0
    for b in DeltaTable(lake.table("assignments")).to_pyarrow_dataset().to_batches(columns=["score"]):
        s = np.asarray(b.column(0), dtype=np.float64)
        total, n = total + float(s.sum()), n + len(s)
    return total / max(n, 1)


def run_size(n: int, args: argparse.Namespace, spark: Any, peaks: Peaks) -> dict[str, Any]:
    from clustermix import deltalog
    from clustermix.config import load_config
    from clustermix.lake import Lake
    from clustermix.models import model_id
    from clustermix.pipeline import run_stages

    work = Path(args.work) / f"n{n}"
    if work.exists():
        shutil.rmtree(work)
    t0 = time.perf_counter()
    planted = write_input(work / "input", n, args.file_rows, args.words, args.dup_rate, seed=n)
    input_bytes = sum(p.stat().st_size for p in (work / "input").glob("*.jsonl"))
    print(f"n={n:,}: input {input_bytes / 2**30:.2f} GiB written in {time.perf_counter() - t0:.0f} s", flush=True)
    overrides = [f"lake.root={work / 'lake'}", f"input.path={work / 'input'}", "input.format=jsonl",
                 f"cluster.k={args.k}", f"cluster.niter={args.niter}", "cluster.num_shards=2",
                 f"sample.budget={max(1, n // 4)}", f"dedup.near.enabled={str(args.near).lower()}"]
    cfg = load_config(ROOT / "conf" / "local.yaml", overrides)
    lake = Lake.from_config(cfg)
    out: dict[str, Any] = {"n": n, "input_gib": round(input_bytes / 2**30, 3), "planted": planted, "stages": {}}
    st = out["stages"]
    with stage("ingest", peaks, st):
        run_stages(cfg, ("ingest",), spark=spark)
    out["docs"] = deltalog.num_records(lake.table("docs"), s3=lake.s3)
    with stage("embeddings", peaks, st):  # the bench's stand-in for the embed stage (no model)
        write_embeddings(lake, args.dim, args.true_k, model_id(cfg.embed.model), seed=n)
    for name in ("cluster", "dedup", "stats", "sample", "blend"):  # dedup: semantic, off by default
        with stage(name, peaks, st):
            run_stages(cfg, (name,), spark=spark)
    out["blended"] = deltalog.num_records(lake.table("blended"), s3=lake.s3)
    out["objective_sample_fit"] = objective(lake)
    if args.objective:
        full = load_config(ROOT / "conf" / "local.yaml", [*overrides, "cluster.max_points_per_centroid=1000000000"])
        with stage("cluster-full-fit", peaks, st):
            run_stages(full, ("cluster",), spark=spark)
        out["objective_full_fit"] = objective(lake)
        out["objective_gap"] = 1 - out["objective_sample_fit"] / out["objective_full_fit"]
        print(f"  k-means objective: sample-fit {out['objective_sample_fit']:.5f}, full fit "
              f"{out['objective_full_fit']:.5f}, gap {100 * out['objective_gap']:.3f}%", flush=True)
    out["total_s"] = round(sum(v["s"] for k, v in st.items() if k != "cluster-full-fit"), 1)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return out


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The goals between the two largest sizes: time ratio and each process role's peak RSS ratio."""
    if len(results) < 2:
        return {}
    a, b = results[-2], results[-1]
    grow = b["n"] / a["n"]

    def peak(r: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in r["stages"].values():
            for k, v in s["peak_rss_mib"].items():
                out[k] = max(out.get(k, 0.0), v)
        return out

    pa_, pb = peak(a), peak(b)
    rss = {k: round(pb[k] / pa_[k], 3) for k in sorted(set(pa_) & set(pb)) if pa_[k] > 50}
    out = {"sizes": [a["n"], b["n"]], "time_ratio": round(b["total_s"] / a["total_s"], 2), "rows_ratio": grow,
           "per_stage_time_ratio": {k: round(b["stages"][k]["s"] / a["stages"][k]["s"], 2)
                                    for k in a["stages"] if k in b["stages"] and a["stages"][k]["s"] > 0},
           "peak_rss_ratio": rss}
    print(f"{b['n']:,} vs {a['n']:,}: time x{out['time_ratio']} (goal <= {1.1 * grow:.1f}); peak RSS ratio per "
          f"process (goal <= 1.2): " + ", ".join(f"{k} {v}" for k, v in rss.items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    ap.add_argument("--work", default="/tmp/clustermix-scale", help="a folder with room for the input and lake")
    ap.add_argument("--k", type=int, default=1000, help="cluster.k")
    ap.add_argument("--true-k", type=int, default=2000, help="centres the synthetic embeddings are drawn around")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--words", type=int, default=250, help="words per document (about 6 characters each)")
    ap.add_argument("--file-rows", type=int, default=250_000)
    ap.add_argument("--dup-rate", type=float, default=0.01)
    ap.add_argument("--near", action=argparse.BooleanOptionalAction, default=True,
                    help="MinHash near-duplicates at ingest (the product's default: on)")
    ap.add_argument("--objective", action="store_true",
                    help="at each size, also fit on every point and compare the k-means objective")
    ap.add_argument("--keep", action="store_true", help="keep each size's input and lake")
    args = ap.parse_args()

    from clustermix import runtime
    from clustermix.config import load_config

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"lake.root={Path(args.work) / 'spark'}"])
    peaks = Peaks()
    peaks.start()
    spark = runtime.spark_session(cfg)
    results = []
    try:
        for n in args.sizes:
            results.append(run_size(n, args, spark, peaks))
            save("scale", {"args": vars(args), "results": results, "summary": summary(results)})
    finally:
        peaks.stop()
        spark.stop()


if __name__ == "__main__":
    main()
