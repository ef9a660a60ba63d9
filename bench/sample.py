"""Benchmark: ClusterClip sample + blend + Delta write vs a plain df.sample + Delta write.

Builds synthetic docs/assignments/cluster_stats tables of N rows with a skewed (Zipf-like) cluster
distribution, then times, in one process on the same cores:
  (a) clustermix sample (allocation + per-document plan + order) and blend (join + ordered write),
  (b) docs.sample(fraction) + Delta write of the same number of rows,
and prints (a)/(b) (goal <= 2) and the time ratio between the largest and smallest N (goal: linear,
<= 4.4 for 4x the rows). Each round also prints how long the JVM's JIT compilers ran during each
side: a side still compiling much is not yet warm.

    .venv/bin/python bench/sample.py --sizes 1000000 4000000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from clustermix import deltalog, tableio
from clustermix import lake as lk
from clustermix.config import build_config
from common import save, timed


def text_column(spark, text_chars: int):
    """A document's text: its id, then (``text_chars`` > 0) the first ``text_chars`` characters of one
    of the BBC articles the package ships, picked by a hash of the id. Real prose of a set length,
    so the cost of moving text is measured, not only the per-row overhead."""
    from pyspark.sql import functions as F

    from clustermix.corpus import iter_records

    if text_chars <= 0:
        return lambda ids: ids.withColumn("text", F.concat(F.lit("text of "), F.col("id")))
    texts = [str(r["text"]) for r in iter_records("bbc")]
    # articles shorter than text_chars are repeated up to it
    passages = [(i, (t + "\n") * (text_chars // max(len(t), 1) + 1)) for i, t in enumerate(texts)]
    table = spark.createDataFrame([(i, t[:text_chars]) for i, t in passages], "_p int, _passage string")
    return lambda ids: (ids.withColumn("_p", F.pmod(F.xxhash64(F.col("id")), F.lit(len(passages))).cast("int"))
                        .join(F.broadcast(table), "_p")
                        .withColumn("text", F.concat(F.col("id"), F.lit("\n"), F.col("_passage"))))


def make_tables(spark, lake: lk.Lake, n: int, k: int, text_chars: int) -> None:
    """Synthetic docs + assignments (+ centroids rows for stats) with skewed cluster sizes."""
    from pyspark.sql import functions as F

    from clustermix.stats import cluster_stats

    ids = spark.range(n).withColumn("id", F.format_string("doc-%09d", F.col("id")))
    # Zipf-like: cluster = floor(k * u^3) puts most rows in the first clusters
    u = F.rand(seed=1)
    docs = text_column(spark, text_chars)(ids).select(
        "id", "text",
        F.when(u < 0.5, "web").when(u < 0.8, "code").otherwise("books").alias("domain"),
        F.rand(seed=2).alias("quality"), (F.rand(seed=3) * 1000 + 50).cast("bigint").alias("n_tokens"))
    tableio.write(docs, lake, "docs", {"bench": True})
    asg = ids.select("id", F.floor(F.pow(F.rand(seed=4), 3) * k).cast("int").alias("cluster_id"),
                     F.rand(seed=5).cast("float").alias("score"))
    tableio.write(asg, lake, "assignments", {"bench": True})
    cents = spark.createDataFrame([(i,) for i in range(k)], "cluster_id int")
    stats = cluster_stats(tableio.read(spark, lake, "docs"), tableio.read(spark, lake, "assignments"), cents, 0.007, 3)
    tableio.write(stats, lake, "cluster_stats", {"bench": True})


def check_position_runs(uri: str, total: int) -> None:
    """Every file of ``blended`` is one contiguous run of positions and the runs tile 0..total-1
    (from the Delta log's per-file min/max statistics: no data read)."""
    import pyarrow as pa
    from deltalake import DeltaTable

    actions = pa.record_batch(DeltaTable(uri).get_add_actions(flatten=True)).to_pylist()
    runs = sorted((a["min.position"], a["max.position"], a["num_records"]) for a in actions)
    assert all(hi - lo + 1 == n for lo, hi, n in runs), "a file of blended is not one contiguous run"
    starts = [lo for lo, _, _ in runs]
    ends = [hi + 1 for _, hi, _ in runs]
    assert starts == [0, *ends[:-1]] and ends[-1] == total, "the files' runs do not tile the positions"
    print(f"  blended: {len(runs)} files, each one contiguous run of positions", flush=True)


def jit_seconds(spark) -> float:
    """Seconds the JVM's JIT compilers have spent so far, summed over their threads. On two cores
    they compete with the tasks: a side whose rounds still compile much is not yet warm."""
    beans = spark.sparkContext._jvm.java.lang.management.ManagementFactory
    return beans.getCompilationMXBean().getTotalCompilationTime() / 1000


def bench_one(spark, n: int, k: int, text_chars: int, rounds: int, work: Path) -> dict[str, Any]:
    from clustermix.blend import run_blend
    from clustermix.sample import run_sample

    lake = lk.Lake(str(work / f"lake-{n}"))
    print(f"N={n:,}: building synthetic tables (not timed)", flush=True)
    make_tables(spark, lake, n, k, text_chars)
    budget = n // 4
    cfg = build_config({"lake": {"root": lake.root}, "input": {"path": "builtin://bbc"},
                        "sample": {"budget": budget, "clip": 4, "order": "random"},
                        "spark": {"shuffle_partitions": spark.conf.get("spark.sql.shuffle.partitions")}})
    parts = cfg.spark.shuffle_partitions
    # pinned versions, as the pipeline's stages read their inputs (lake.read)
    docs, asg, stats = (tableio.read(spark, lake, x, deltalog.version(lake.table(x), s3=lake.s3)) for x in ("docs", "assignments", "cluster_stats"))
    best: dict[str, float] = {}
    per_round: list[dict[str, float]] = []
    # rounds alternate the two sides and keep each side's fastest time: the first rounds also warm the
    # JVM (at 1M the ClusterClip side still fell from round 3 to 4: 20.6 -> 15.7 s), and on a shared
    # host one slow round says more about the neighbours than about the code
    for rnd in range(rounds):
        t: dict[str, float] = {}
        jit_start = jit_seconds(spark)
        print(f" round {rnd + 1}", flush=True)
        with timed("df.sample + write (baseline)", t):
            tableio.write(docs.sample(fraction=budget / n, seed=7), lake, "baseline", {"bench": True})
        jit_mid = jit_seconds(spark)
        with timed("clusterclip sample+blend+write", t):
            # as the pipeline runs the two stages: each stage's outputs' state loads in the background
            # from its start, and the next stage's after it (Run.run_stage)
            writer = tableio.TableWriter(lake, {"bench": True})
            writer.prefetch(spark, ["sample_plan"])
            ahead = writer.prefetch_next(spark, ["blended"])
            run_sample(spark, stats, asg, docs, cfg.sample, 0.007, parts, writer)
            blend_writer = tableio.TableWriter(lake, {"bench": True}, loading=ahead)
            blend_writer.prefetch(spark, ["blended"])
            run_blend(spark, stats, asg, docs, writer.read("sample_plan"), cfg.blend, cfg.sample, parts, blend_writer,
                      plan_rows=deltalog.num_records(lake.table("sample_plan"), writer.versions["sample_plan"], s3=lake.s3))
            blend_writer.settle()
        jit_b, jit_c = jit_mid - jit_start, jit_seconds(spark) - jit_mid
        print(f"  JIT compilation meanwhile (compiler threads, summed): baseline {jit_b:.1f} s, "
              f"clusterclip {jit_c:.1f} s", flush=True)
        per_round.append({**t, "jit baseline": jit_b, "jit clusterclip": jit_c})
        best = {k: min(v, best.get(k, v)) for k, v in t.items()}
    t = best
    check_position_runs(lake.table("blended"), budget)  # also: exactly `budget` rows
    t["ratio"] = t["clusterclip sample+blend+write"] / t["df.sample + write (baseline)"]
    print(f"  ratio clusterclip/baseline: {t['ratio']:.2f} (goal <= 2)", flush=True)
    lake.remove(lake.root)
    return {**t, "rounds": per_round}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--shuffle-partitions", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5, help="rounds per size; each side's fastest counts")
    ap.add_argument("--text-chars", type=int, default=1000,
                    help="characters of prose per document after its id (0: only 'text of <id>')")
    args = ap.parse_args()
    from clustermix.runtime import spark_session

    cfg = build_config({"input": {"path": "builtin://bbc"}, "sample": {"budget": 1},
                        "spark": {"shuffle_partitions": args.shuffle_partitions, "driver_memory": "8g"}})
    spark = spark_session(cfg)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            results[n] = bench_one(spark, n, args.k, args.text_chars, args.rounds, Path(tmp))
    lo, hi = min(args.sizes), max(args.sizes)
    scale = results[hi]["clusterclip sample+blend+write"] / results[lo]["clusterclip sample+blend+write"]
    print(f"scaling {hi:,}/{lo:,} rows: time ratio {scale:.2f} (goal <= {4.4 * hi / lo / 4:.1f})")
    save("sample", {"k": args.k, "text_chars": args.text_chars, "rounds": args.rounds, "results": {str(n): r for n, r in results.items()}, "scaling": scale})
    spark.stop()


if __name__ == "__main__":
    main()
