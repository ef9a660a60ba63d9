"""MinHash near-duplicates in Spark: signatures, LSH bands, verified candidate pairs, connected groups.

Signatures are Spark ML's ``MinHashLSH`` over a binary ``HashingTF`` of word shingles of normalised
text (JVM code: no Python runs per document). Spark's own ``approxSimilarityJoin`` is not used: its
hash tables are single MinHash values (OR-amplification only, no bands), so at a Jaccard threshold
of 0.8 it pairs up far more documents than it keeps, and it emits every pair inside a bucket,
quadratic in a templated family of thousands of copies. Here the signature is cut into bands of
``rows`` values (a candidate agrees on a whole band), a small bucket emits its pairs, a large one
links each member to its first member only (a family of near-copies is connected either way), and
every candidate pair is verified on the whole signature before it counts.

Groups are the connected components of the verified pairs, found by min-label propagation with
pointer jumping, every round a Spark join cut from its lineage by a checkpoint: nothing is
collected to the driver but counts. Each group keeps its least *key*: ``key`` is a string the caller
orders (a refresh puts the documents already accepted first), so the result does not depend on
partitioning or on the order documents were read in.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from clustermix.errors import DataError

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

    from clustermix.config import NearDedupConfig

log = logging.getLogger(__name__)

NUM_FEATURES = 1 << 28  # hashed shingle space: collisions inside one document's set are negligible
SMALL_BUCKET = 16  # a bucket of at most this many members emits all its pairs; a larger one, a star


def scheme(cfg: NearDedupConfig) -> str:
    """What makes two signatures comparable: shingle size, bands, rows, seed."""
    return f"w{cfg.shingle_words}-b{cfg.bands}-r{cfg.rows}-s{cfg.seed}"


def with_shingles(docs: DataFrame, text: str, words: int, out: str = "_sh") -> DataFrame:
    """``docs`` with column ``out``: the distinct word ``words``-grams of ``text`` lower-cased, every
    run of characters that are not letters or digits a word break. A text of fewer words is one
    shingle; a text with no word has none.

    Spark ML's ``RegexTokenizer`` and ``NGram`` (JVM code) split each text once: n-grams built with
    SQL lambdas over a split *expression* re-split the text for every n-gram (quadratic in its words)."""
    from pyspark.ml.feature import NGram, RegexTokenizer
    from pyspark.sql import functions as F

    tok = RegexTokenizer(inputCol="_txt", outputCol="_tok", pattern=r"[^\p{L}\p{N}]+", gaps=True,
                         toLowercase=True, minTokenLength=1)
    grams = NGram(n=words, inputCol="_tok", outputCol="_ng")
    df = grams.transform(tok.transform(docs.withColumn("_txt", F.coalesce(F.col(text), F.lit("")))))
    sh = (F.when(F.size("_ng") > 0, F.array_distinct("_ng"))
          .when(F.size("_tok") > 0, F.array(F.array_join("_tok", " ")))
          .otherwise(F.array().cast("array<string>")))
    return df.withColumn(out, sh).drop("_txt", "_tok", "_ng")


def signatures(docs: DataFrame, cfg: NearDedupConfig, text: str = "text") -> DataFrame:
    """``docs`` with ``signature`` (array<int> of ``bands·rows`` MinHash values); rows without a word
    are dropped (they have no shingle to compare)."""
    from pyspark.ml.feature import HashingTF, MinHashLSH
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    with_sh = with_shingles(docs, text, cfg.shingle_words).where(F.size("_sh") > 0)
    tf = HashingTF(inputCol="_sh", outputCol="_tf", numFeatures=NUM_FEATURES, binary=True).transform(with_sh)
    lsh = MinHashLSH(inputCol="_tf", outputCol="_mh", numHashTables=cfg.bands * cfg.rows, seed=cfg.seed)
    hashed = lsh.fit(tf).transform(tf)  # fit draws the hash coefficients from the seed; it reads no data
    sig = F.transform(F.col("_mh"), lambda v: vector_to_array(v)[0].cast("int"))
    return hashed.withColumn("signature", sig).drop("_sh", "_tf", "_mh")


def band_rows(sigs: DataFrame, cfg: NearDedupConfig) -> DataFrame:
    """One row per (document, band): ``key``, ``band``, ``bucket`` (a 64-bit hash of the band's values)."""
    from pyspark.sql import functions as F

    r = cfg.rows
    buckets = F.transform(F.sequence(F.lit(0), F.lit(cfg.bands - 1)),
                          lambda b: F.xxhash64(b, F.slice("signature", b * r + 1, r)))
    return sigs.select("key", F.posexplode(buckets).alias("band", "bucket"))


def candidate_pairs(bands: DataFrame) -> DataFrame:
    """Distinct pairs ``(a, b)``, ``a < b``, that share a bucket: every pair of a small bucket, and in a
    larger one each member with the bucket's least key."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    w = Window.partitionBy("band", "bucket")
    sized = bands.withColumn("_n", F.count("*").over(w)).withColumn("_first", F.min("key").over(w)).where(
        F.col("_n") > 1)
    small = sized.where(F.col("_n") <= SMALL_BUCKET).select("band", "bucket", "key")
    pairs = small.alias("x").join(small.alias("y"), ["band", "bucket"]).where(F.col("x.key") < F.col("y.key")) \
        .select(F.col("x.key").alias("a"), F.col("y.key").alias("b"))
    star = sized.where((F.col("_n") > SMALL_BUCKET) & (F.col("key") != F.col("_first"))) \
        .select(F.col("_first").alias("a"), F.col("key").alias("b"))
    return pairs.unionByName(star).distinct()


def agreement(x: Column, y: Column) -> Column:
    """The share of equal positions of two signatures: the MinHash estimate of their Jaccard similarity."""
    from pyspark.sql import functions as F

    same = F.aggregate(F.zip_with(x, y, lambda p, q: F.when(p == q, 1).otherwise(0)), F.lit(0), lambda s, v: s + v)
    return same / F.size(x)


def matches(pairs: DataFrame, sigs: DataFrame, threshold: float) -> DataFrame:
    """The candidate pairs whose signatures agree on at least ``threshold`` of their values."""
    from pyspark.sql import functions as F

    s = sigs.select("key", "signature")
    joined = pairs.join(s.withColumnRenamed("key", "a").withColumnRenamed("signature", "_sa"), "a") \
        .join(s.withColumnRenamed("key", "b").withColumnRenamed("signature", "_sb"), "b")
    return joined.where(agreement(F.col("_sa"), F.col("_sb")) >= threshold).select("a", "b")


# the folder a run gives its checkpoints (a session setting, so a session outside a run has none)
CHECKPOINT_DIR_CONF = "spark.clustermix.checkpointDir"
_CHECKPOINT_DIR_SET = "spark.clustermix.checkpointDirSet"


def cut(df: DataFrame) -> DataFrame:
    """``df`` computed once and cut from its lineage: a reliable checkpoint in the folder of
    :data:`CHECKPOINT_DIR_CONF` when the session has one (a run sets it under the lake), else a local
    one (executors' storage, lost with an executor). The folder is made on the first checkpoint only,
    so a run that makes none leaves nothing behind."""
    spark = df.sparkSession
    folder = spark.conf.get(CHECKPOINT_DIR_CONF, None)
    if not folder:
        return df.localCheckpoint()
    if spark.conf.get(_CHECKPOINT_DIR_SET, None) != folder:
        spark.sparkContext.setCheckpointDir(folder)
        spark.conf.set(_CHECKPOINT_DIR_SET, folder)
    return df.checkpoint(eager=True)  # eager: one job computes df and writes it (no second pass)


def components(edges: DataFrame, max_iterations: int) -> DataFrame:
    """``(key, label)`` for every key on an edge: ``label`` is the least key of its connected component.

    Min-label propagation (each key takes the least label among itself and its neighbours) with a
    pointer jump (a key takes its label's label) per round, until a round changes nothing."""
    from pyspark.sql import functions as F

    und = edges.select("a", "b").unionByName(edges.select(F.col("b").alias("a"), F.col("a").alias("b")))
    und = cut(und)
    labels = und.groupBy("a").agg(F.least(F.col("a"), F.min("b")).alias("label")).withColumnRenamed("a", "key")
    labels = cut(labels)
    for i in range(max_iterations):
        sent = und.join(labels.withColumnRenamed("key", "b"), "b").select(F.col("a").alias("key"), "label")
        step = labels.unionByName(sent).groupBy("key").agg(F.min("label").alias("label"))
        jump = step.select(F.col("key").alias("label"), F.col("label").alias("_ll"))
        step = step.join(jump, "label", "left").select("key", F.least("label", F.coalesce("_ll", "label")).alias("label"))
        step = cut(step)
        changed = step.join(labels.withColumnRenamed("label", "_old"), "key").where(
            F.col("label") != F.col("_old")).count()
        labels = step
        log.debug("minhash: label propagation round %d: %d labels changed", i + 1, changed)
        if changed == 0:
            return labels
    raise DataError(f"near-duplicate groups did not settle in dedup.near.max_iterations={max_iterations} rounds "
                    "of label propagation; raise it")


def near_duplicates(sigs: DataFrame, cfg: NearDedupConfig, candidates: DataFrame | None = None) -> DataFrame:
    """The documents of ``candidates`` (default: all of ``sigs``) that are not the kept one of their group:
    ``(key, kept_key, jaccard)``, ``jaccard`` estimated between the document and the kept one.

    ``sigs`` has ``key`` and ``signature``; with ``candidates`` (keys), pairs between two keys that are
    not candidates are left out, and such keys are never reported (a refresh: old documents stay)."""
    from pyspark.sql import functions as F

    pairs = candidate_pairs(band_rows(sigs, cfg))
    if candidates is not None:
        c = candidates.select("key").withColumn("_c", F.lit(True))
        pairs = pairs.join(c.withColumnRenamed("key", "a").withColumnRenamed("_c", "_ca"), "a", "left") \
            .join(c.withColumnRenamed("key", "b").withColumnRenamed("_c", "_cb"), "b", "left") \
            .where(F.col("_ca").isNotNull() | F.col("_cb").isNotNull()).select("a", "b")
    edges = cut(matches(pairs, sigs, cfg.threshold))
    if edges.isEmpty():
        return sigs.sparkSession.createDataFrame([], "key string, kept_key string, jaccard double")
    groups = components(edges, cfg.max_iterations).where(F.col("key") != F.col("label"))
    if candidates is not None:
        groups = groups.join(candidates.select("key"), "key", "left_semi")
    s = sigs.select("key", "signature")
    return groups.join(s, "key").join(s.select(F.col("key").alias("label"), F.col("signature").alias("_ks")), "label") \
        .select("key", F.col("label").alias("kept_key"), agreement(F.col("signature"), F.col("_ks")).cast("double")
                .alias("jaccard"))
