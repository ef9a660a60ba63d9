"""Benchmark: MinHash shingles with Spark ML's RegexTokenizer + NGram (clustermix.minhash.with_shingles)
against the SQL-lambda construction they replaced (which re-split the text for every n-gram), on the
same cached documents in one Spark session; also checks both give the same shingle sets.

    .venv/bin/python bench/shingles.py --docs 2000 --words 250
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import save
from scale import vocabulary


def lambda_shingles(text, words: int):
    """The construction before: n-grams by a lambda over a split expression."""
    from pyspark.sql import functions as F

    norm = F.trim(F.regexp_replace(F.lower(text), r"[^\p{L}\p{N}]+", " "))
    tokens = F.filter(F.split(norm, " "), lambda t: t != "")
    n = F.greatest(F.size(tokens) - words + 1, F.lit(1))
    grams = F.transform(F.sequence(F.lit(1), n), lambda i: F.array_join(F.slice(tokens, i, words), " "))
    return F.when(F.size(tokens) > 0, F.array_distinct(grams)).otherwise(F.array().cast("array<string>"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--words", type=int, default=250)
    ap.add_argument("--shingle-words", type=int, default=5)
    args = ap.parse_args()

    from pyspark.sql import functions as F

    from clustermix import minhash, runtime
    from clustermix.config import load_config

    root = Path(__file__).resolve().parents[1]
    spark = runtime.spark_session(load_config(root / "conf" / "local.yaml", ["lake.root=/tmp/clustermix-shingles"]))
    vocab, rng = vocabulary(), np.random.default_rng(0)
    rows = [(f"d{i}", " ".join(rng.choice(vocab, args.words))) for i in range(args.docs)]
    df = spark.createDataFrame(rows, "id string, text string").repartition(2).cache()
    df.count()
    w = args.shingle_words
    t0 = time.perf_counter()
    minhash.with_shingles(df, "text", w).select(F.sum(F.size("_sh"))).collect()
    new_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    df.select(F.sum(F.size(lambda_shingles(F.col("text"), w)))).collect()
    old_s = time.perf_counter() - t0
    old = sorted((r[0], sorted(r[1])) for r in df.select("id", lambda_shingles(F.col("text"), w)).collect())
    new = sorted((r[0], sorted(r[1])) for r in minhash.with_shingles(df, "text", w).select("id", "_sh").collect())
    print(f"{args.docs} documents of {args.words} words: tokenizer+ngram {new_s:.1f} s, sql lambda {old_s:.1f} s "
          f"(x{old_s / new_s:.1f}); same shingles: {old == new}")
    save("shingles", {"args": vars(args), "new_s": new_s, "old_s": old_s, "same": old == new})
    spark.stop()


if __name__ == "__main__":
    main()
