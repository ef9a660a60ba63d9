"""Where bench/sample.py's time goes: its two sides cut into cumulative pieces, each timed alone.

On the same synthetic tables as bench/sample.py, every round times each piece once, in order;
each piece's fastest round is printed. A piece to the ``noop`` sink runs the whole query and
writes nothing, so the difference between consecutive lines is what the added step costs:

  baseline: scan + sample (noop), then the same to Parquet
  blend:    broadcast join (noop), + shuffle into position ranges and sort (noop), + Parquet
  sample:   scan assignments (noop), + draws per document (noop), + training order (noop,
            driver planning included), + Parquet, + Delta (table state loaded ahead)

and the fixed cost of a 1,000-row overwrite: Parquet, Delta, Delta with the state loaded ahead.

    .venv/bin/python bench/sample_pieces.py --n 1000000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from clustermix import deltalog, tableio
from clustermix import lake as lk
from clustermix.config import build_config
from common import save
from sample import make_tables


def pieces(spark, lake: lk.Lake, n: int, parts: int, work: Path) -> dict:
    """Label -> a function that runs that piece once, or (untimed preparation, that function)."""
    from clustermix import blend as bl
    from clustermix import clusterclip as cc
    from clustermix import plan

    budget = n // 4
    cfg = build_config({"lake": {"root": lake.root}, "input": {"path": "builtin://bbc"},
                        "sample": {"budget": budget, "clip": 4, "order": "random"},
                        "spark": {"shuffle_partitions": parts}})
    docs, asg, stats = (tableio.read(spark, lake, x, deltalog.version(lake.table(x), s3=lake.s3)) for x in ("docs", "assignments", "cluster_stats"))
    writer = tableio.TableWriter(lake, {"bench": True})
    members = plan.members_frame(asg, docs, "uniform")

    def whole_plan():  # as run_sample builds it, from the K rows of cluster_stats on
        s = cc.ClusterSizes.from_stats(stats)
        d, _ = cc.allocate_docs(s, cc.uniform_targets(s), cfg.sample)
        return plan.make_plan(spark, members, s, d, cfg.sample, parts)

    # the plan the blend joins: written once, read pinned as run_blend reads it
    writer("sample_plan", whole_plan())
    planned = writer.read("sample_plan")
    # the K numbers the draws piece starts from
    sizes = cc.ClusterSizes.from_stats(stats)
    draws, _ = cc.allocate_docs(sizes, cc.uniform_targets(sizes), cfg.sample)
    counts = plan.Counts.of(sizes.cluster_id, sizes.n_docs, draws)

    def noop(df) -> None:
        df.write.format("noop").mode("overwrite").save()

    def parquet(df, name: str) -> None:
        df.write.mode("overwrite").parquet(str(work / name))

    def plan_delta() -> None:
        writer.prefetch(spark, ["sample_plan"])
        writer("sample_plan", whole_plan())

    joined = lambda: bl.join_docs(planned, docs, "broadcast")  # noqa: E731
    ranged = lambda: bl.by_position_range(joined(), bl.position_ranges(budget, 250_000, parts), budget)  # noqa: E731
    sampled = lambda: docs.sample(fraction=budget / n, seed=7)  # noqa: E731
    tiny = spark.range(1000).selectExpr("cast(id as string) as id", "id as position").cache()
    tiny.count()

    def load_ahead() -> None:  # untimed: the load gets the time a stage's reads and planning give it
        writer.prefetch(spark, ["tiny_ahead"])
        time.sleep(1.5)

    return {
        "baseline: scan + sample, noop": lambda: noop(sampled()),
        "baseline: + Parquet": lambda: parquet(sampled(), "baseline"),
        "blend: broadcast join, noop": lambda: noop(joined()),
        "blend: + position ranges + sort, noop": lambda: noop(ranged()),
        "blend: + Parquet": lambda: parquet(ranged(), "blended"),
        "sample: scan assignments, noop": lambda: noop(members),
        "sample: + draws per document, noop": lambda: noop(plan.doc_draws(members, counts, cfg.sample.seed, "uniform")),
        "sample: + training order, noop": lambda: noop(whole_plan()),
        "sample: + Parquet": lambda: parquet(whole_plan(), "sample_plan"),
        "sample: + Delta, state loaded ahead": plan_delta,
        "1,000 rows: Parquet": lambda: parquet(tiny, "tiny"),
        "1,000 rows: Delta": lambda: writer("tiny", tiny),
        "1,000 rows: Delta, state loaded ahead": (load_ahead, lambda: writer("tiny_ahead", tiny)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--shuffle-partitions", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4, help="rounds; each piece's fastest counts")
    ap.add_argument("--text-chars", type=int, default=1000)
    args = ap.parse_args()
    from clustermix.runtime import spark_session

    cfg = build_config({"input": {"path": "builtin://bbc"}, "sample": {"budget": 1},
                        "spark": {"shuffle_partitions": args.shuffle_partitions, "driver_memory": "8g"}})
    spark = spark_session(cfg)
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        lake = lk.Lake(str(Path(tmp) / "lake"))
        print(f"N={args.n:,}: building synthetic tables (not timed)", flush=True)
        make_tables(spark, lake, args.n, args.k, args.text_chars)
        runs = pieces(spark, lake, args.n, args.shuffle_partitions, Path(tmp))
        for rnd in range(args.rounds):
            print(f" round {rnd + 1}", flush=True)
            for label, run in runs.items():
                prepare, fn = run if isinstance(run, tuple) else (None, run)
                if prepare:
                    prepare()
                t0 = time.perf_counter()
                fn()
                took = time.perf_counter() - t0
                best[label] = min(took, best.get(label, took))
                print(f"  {label:<42} {took:7.2f} s", flush=True)
    print("fastest per piece:")
    for label, t in best.items():
        print(f"  {label:<42} {t:7.2f} s")
    save("sample_pieces", {"n": args.n, "k": args.k, "rounds": args.rounds, "fastest": best})
    spark.stop()


if __name__ == "__main__":
    main()
