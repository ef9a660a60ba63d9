"""Ingest (Spark): raw corpus -> ``docs``, ``quarantine``, ``duplicates``, ``near_duplicates``.

Every record read ends in exactly one place: ``docs`` (accepted), ``duplicates`` (the same text
as an accepted document, under any id), ``near_duplicates`` (a MinHash near-copy of an accepted
document: :mod:`clustermix.minhash`, under ``dedup.near``), or ``quarantine`` with a
machine-readable reason. The MinHash signatures of the accepted documents are kept in
``minhash_signatures``, so a refresh compares new documents with old ones without hashing old text.
JSON lines are parsed with Spark's VARIANT functions, so no Python runs per record.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from clustermix import contracts
from clustermix.errors import AccountingError
from clustermix.inputs import InputSpec, resolve_input
from clustermix.readers import SOURCE_KEY, spark_source_uris, sql_in
from clustermix.tableio import persist_corpus

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pyspark.sql import DataFrame, SparkSession

    from clustermix.badfiles import Checked
    from clustermix.config import Config
    from clustermix.lake import Lake
    from clustermix.stage import Context
    from clustermix.tableio import TableWriter

log = logging.getLogger(__name__)

# Quarantine reasons, in the order they are tested: the first that applies is recorded.
REASONS = (
    "invalid_utf8", "malformed_json", "not_an_object", "missing_text", "text_not_string", "blank_text",
    "nul_in_text", "too_long", "bad_id", "quality_not_a_number", "duplicate_id",
)
SIGNATURES = "minhash_signatures"
SNIPPET_CHARS = 300
_NUMERIC = r"^(TINYINT|SMALLINT|INT|BIGINT|FLOAT|DOUBLE|DECIMAL.*)$"
_INTEGRAL = r"^(TINYINT|SMALLINT|INT|BIGINT|DECIMAL\(\d+,0\))$"


def classify(df: DataFrame, max_chars: int, chars_per_token: float, cached: list[DataFrame]) -> DataFrame:
    """Give every candidate record an ``outcome`` (accepted/duplicate/quarantined) and a reason.

    The records are classified row by row (and persisted, in ``cached``, with the verdicts: the caller
    unpersists them once it is done with the result, as the row keys are drawn on them), then the duplicates are found by windows over narrow rows only (a
    row key, id, text hash and the order of the records), never over the text or the raw line; their
    verdicts are joined back to the wide rows by the row key. A record quarantined before the windows
    (null id and hash) takes part in neither window nor join, so no task receives all of them; the
    raw line is carried only by quarantined records."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    text = F.col("_text")
    qk, ik = F.col("_q_kind"), F.col("_id_kind")
    reason = (
        F.when(~F.col("_utf8"), "invalid_utf8")
        .when(~F.col("_parsed"), "malformed_json")
        .when(~F.col("_object"), "not_an_object")
        .when(F.col("_text_kind").isNull() | (F.col("_text_kind") == "VOID"), "missing_text")
        .when(F.col("_text_kind") != "STRING", "text_not_string")
        .when(text.rlike(r"(?U)^\s*$"), "blank_text")
        .when(F.instr(text, "\u0000") > 0, "nul_in_text")
        .when(F.char_length(text) > max_chars, "too_long")
        .when(ik.isNotNull() & (ik != "VOID") & ~((ik == "STRING") | ik.rlike(_INTEGRAL)), "bad_id")
        .when((ik == "STRING") & F.col("_id").rlike(r"(?U)^\s*$"), "bad_id")
        .when(qk.isNotNull() & (qk != "VOID") & ~qk.rlike(_NUMERIC), "quality_not_a_number")
    )
    # A refresh adds the already-accepted documents its new records could clash with as ``_prior``
    # rows: valid whatever today's checks say, and first in every window, so they always win.
    prior = "_prior" in df.columns
    if prior:
        reason = F.when(F.col("_prior"), F.lit(None).cast("string")).otherwise(reason)
    text_hash = F.sha2(text, 256)
    df = df.withColumn("reason", reason).withColumn("text_hash", F.when(reason.isNull(), text_hash))
    df = df.withColumn("id", F.when(F.col("reason").isNull(),
                                    F.coalesce(F.col("_id"), F.substring("text_hash", 1, 24))))
    # the row key is drawn once, on the persisted records: every branch below reads the same values
    df = persist_corpus(df.withColumn(KEY, F.monotonically_increasing_id()))
    cached.append(df)
    valid = F.col("reason").isNull()
    order = ["source_file", "_block", "_row", *(["_prior"] if prior else [])]
    # the verdicts (and the keys of the duplicate_ids among them) are persisted and counted before they
    # are joined: their size is then known, so a small side is broadcast and the wide rows stay put
    verdicts = persist_corpus(dedup_verdicts(df.where(valid).select(KEY, "id", "text_hash", *order)))
    clash_keys = verdicts.where(F.col("reason") == "duplicate_id").select(KEY, "reason", "outcome").persist(
        StorageLevel.MEMORY_AND_DISK)
    cached += [verdicts, clash_keys]
    clash_keys.count()
    accepted_or_duplicate = df.where(valid).drop("raw", "reason").join(verdicts, KEY, "left").where(
        F.col("reason").isNull()).withColumn("outcome", F.coalesce("outcome", F.lit("accepted")))
    # a duplicate_id is quarantined with its raw line: only those records' lines are joined (by a
    # broadcast of their keys unless there are millions)
    clashes = df.where(valid).select(KEY, "raw", "source_file", *(["_prior"] if prior else [])).join(
        clash_keys, KEY)
    bad = df.where(~valid).withColumn("outcome", F.lit("quarantined"))
    out = bad.unionByName(accepted_or_duplicate, allowMissingColumns=True).unionByName(
        clashes, allowMissingColumns=True)
    return out.drop(KEY).withColumn("n_chars", F.char_length(text).cast("bigint")).withColumn(
        "n_tokens", F.ceil(F.char_length(text) / F.lit(chars_per_token)).cast("bigint"))


KEY = "_key"  # a record's row key within one classification (a bigint drawn on the persisted records)


def dedup_verdicts(narrow: DataFrame) -> DataFrame:
    """The verdicts of the duplicate rule on narrow rows (``_key``, ``id``, ``text_hash`` and the order
    columns ``source_file``, ``_block``, ``_row``, and ``_prior`` in a refresh) of valid records: one
    row (``_key``, ``outcome``, ``reason``, ``duplicate_of``) per record that is not accepted.

    An id's first record wins; a later one with the same text is a duplicate of it, with another text
    a ``duplicate_id`` (quarantined). Among the records that are an id's first, a text's first record
    wins and a later one is a duplicate of its id: a quarantined repeat never names a text, so a text
    first seen under a clashing id and later under a new id is accepted under the new one. A refresh's
    ``_prior`` rows come first in both windows."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order: list[Any] = ["source_file", "_block", "_row"]
    if "_prior" in narrow.columns:
        order = [F.col("_prior").desc(), *order]
    w_id = Window.partitionBy("id").orderBy(*order)
    df = narrow.withColumn("_id_rn", F.row_number().over(w_id)) \
               .withColumn("_id_first_hash", F.first("text_hash").over(w_id))
    repeat = F.col("_id_rn") > 1
    id_clash = F.col("text_hash") != F.col("_id_first_hash")
    repeats = df.where(repeat).select(
        KEY,
        F.when(id_clash, "quarantined").otherwise("duplicate").alias("outcome"),
        F.when(id_clash, F.lit("duplicate_id")).alias("reason"),
        F.when(~id_clash, F.col("id")).alias("duplicate_of"))
    w_hash = Window.partitionBy("text_hash").orderBy(*order)
    firsts = df.where(~repeat).withColumn("_h_rn", F.row_number().over(w_hash)) \
               .withColumn("_h_first", F.first("id").over(w_hash))
    h_dups = firsts.where(F.col("_h_rn") > 1).select(
        KEY, F.lit("duplicate").alias("outcome"), F.lit(None).cast("string").alias("reason"),
        F.col("_h_first").alias("duplicate_of"))
    return repeats.unionByName(h_dups)


class NearMarker:
    """Marks the accepted records that are MinHash near-copies of another accepted document (of this
    ingest or, in a refresh, an earlier one) as ``near_duplicate``; keeps the kept ones' signatures
    for ``minhash_signatures``. Holds what it cached until :meth:`release`."""

    def __init__(self, cfg: Config, prior: DataFrame | None = None) -> None:
        self.cfg, self.prior = cfg.dedup.near, prior
        self.signatures: DataFrame | None = None
        self._cached: list[DataFrame] = []

    def __call__(self, df: DataFrame) -> DataFrame:
        from pyspark import StorageLevel
        from pyspark.sql import functions as F

        from clustermix import minhash

        if not self.cfg.enabled:
            self.signatures = None
            return df.withColumn("jaccard", F.lit(None).cast("double"))
        df = self._cache(persist_corpus(df))  # the MinHash pass reads it several times
        accepted = df.where(F.col("outcome") == "accepted").select("id", F.col("_text").alias("text"), "source_file")
        # keys order the documents of a group: "0"+id for an earlier ingest's (they stay), "1"+id for new ones
        sigs = self._cache(persist_corpus(minhash.signatures(accepted, self.cfg).withColumn(
            "key", F.concat(F.lit("1"), "id"))))
        both, candidates = sigs.select("key", "signature"), None
        if self.prior is not None:
            old = self.prior.select(F.concat(F.lit("0"), "id").alias("key"), "signature")
            new_buckets = minhash.band_rows(sigs, self.cfg).select("band", "bucket").distinct()
            near_new = minhash.band_rows(old, self.cfg).join(new_buckets, ["band", "bucket"], "left_semi").select(
                "key").distinct()
            both = both.unionByName(old.join(near_new, "key", "left_semi"))
            candidates = sigs.select("key")
        found = minhash.near_duplicates(both, self.cfg, candidates).select(
            F.expr("substring(key, 2)").alias("id"), F.expr("substring(kept_key, 2)").alias("_near_of"), "jaccard")
        found = self._cache(found.persist(StorageLevel.MEMORY_AND_DISK))
        self.signatures = sigs.join(found, "id", "left_anti")
        # only the accepted record of an id is marked: an exact duplicate of it shares its id
        # (the others, quarantined ones with a null id among them, are not joined: no task gets them all)
        near = F.col("_near_of").isNotNull()
        is_accepted = F.col("outcome") == "accepted"
        marked = df.where(is_accepted).join(found, "id", "left").withColumn(
            "duplicate_of", F.when(near, F.col("_near_of")).otherwise(F.col("duplicate_of"))).withColumn(
            "outcome", F.when(near, F.lit("near_duplicate")).otherwise(F.col("outcome"))).drop("_near_of")
        return marked.unionByName(df.where(~is_accepted).withColumn("jaccard", F.lit(None).cast("double")))

    def _cache(self, df: DataFrame) -> DataFrame:
        self._cached.append(df)
        return df

    def frame(self, spark: SparkSession, run_id: str) -> DataFrame:
        """The ``minhash_signatures`` rows of this ingest's kept documents (none when disabled)."""
        from pyspark.sql import functions as F

        schema = "id string, signature array<int>, scheme string, source_file string, run_id string"
        if self.signatures is None:
            return spark.createDataFrame([], schema)
        from clustermix.minhash import scheme

        return self.signatures.select("id", "signature", F.lit(scheme(self.cfg)).alias("scheme"), "source_file",
                                      F.lit(run_id).alias("run_id"))

    def release(self) -> None:
        while self._cached:
            self._cached.pop().unpersist()


def run_ingest(spark: SparkSession, cfg: Config, spec: InputSpec, run_id: str, write: TableWriter) -> dict[str, Any]:
    """Check every input file, classify every record of the usable ones, write the record tables through
    ``write(name, df)`` and the bad files to ``bad_files``, prove the accounting of records and files."""
    from clustermix import badfiles

    checked = badfiles.check_input(spark, cfg, spec, write.lake, run_id)  # under fail: raises, writes nothing
    marker = NearMarker(cfg)
    cached: list[DataFrame] = []
    # the records as read stay persisted until the end: unpersisting them could make Spark plan the
    # classified records again, and a new plan draws new row keys
    with shuffle_partitions(spark, partitions_for(spark, cfg, checked)):
        try:
            df, counts, per_file, checked = badfiles.read_counted(spark, checked, cfg, lambda c: marker(
                classify(c, cfg.ingest.max_chars, cfg.ingest.chars_per_token, cached)))
            try:
                versions = {name: write(name, contracts.check(frame, name))
                            for name, frame in _outputs(df, run_id).items()}
                versions[SIGNATURES] = write(SIGNATURES, marker.frame(spark, run_id))
            finally:
                df.unpersist()
        finally:
            marker.release()
            _release(cached)
            checked.cleanup(write.lake)
    result = {**_result(counts, versions), **badfiles.file_counts(checked, per_file)}
    verify_accounting(result, write.lake)
    versions[badfiles.TABLE] = write(badfiles.TABLE, contracts.check(badfiles.frame(spark, checked, result, run_id),
                                                                     badfiles.TABLE))
    badfiles.verify(result, write.lake)
    return result


def partitions_for(spark: SparkSession, cfg: Config, checked: Checked) -> int:
    """Shuffle partitions for ingest: one per ``ingest.partition_mb`` of the usable input files (bytes as
    stored), at least Spark's default parallelism (a task per core)."""
    size = sum(v.size for v in checked.verdicts if v.status != "skipped")
    return max(spark.sparkContext.defaultParallelism, -(-size // (cfg.ingest.partition_mb << 20)))


@contextmanager
def shuffle_partitions(spark: SparkSession, n: int) -> Iterator[None]:
    """``spark.sql.shuffle.partitions`` is ``n`` inside the block (ingest's joins, windows and MinHash),
    as it was (``spark.shuffle_partitions``) after it."""
    key = "spark.sql.shuffle.partitions"
    before = spark.conf.get(key)
    spark.conf.set(key, str(n))
    log.info("ingest: %d shuffle partitions", n)
    try:
        yield
    finally:
        if before is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, before)


def _release(cached: list[DataFrame]) -> None:
    while cached:
        cached.pop().unpersist()


def _outputs(df: DataFrame, run_id: str) -> dict[str, DataFrame]:
    """The record tables of ingest from classified records."""
    from pyspark.sql import functions as F

    run = F.lit(run_id)
    return {
        "docs": df.where(F.col("outcome") == "accepted").select(
            "id", F.col("_text").alias("text"), "domain", F.col("_q").alias("quality"), "lang", "n_chars",
            "n_tokens", "text_hash", "source_file", F.current_timestamp().alias("ingested_at"), run.alias("run_id")),
        "quarantine": df.where(F.col("outcome") == "quarantined").select("raw", "reason", "source_file",
                                                                         run.alias("run_id")),
        "duplicates": df.where(F.col("outcome") == "duplicate").select("id", "duplicate_of", "source_file",
                                                                       run.alias("run_id")),
        # the text of a near-copy is in no table: a snippet keeps it visible to the report's examples
        "near_duplicates": df.where(F.col("outcome") == "near_duplicate").select(
            "id", "duplicate_of", "jaccard", "domain", F.substring("_text", 1, SNIPPET_CHARS).alias("snippet"),
            "source_file", run.alias("run_id")),
    }


# every record read lands in exactly one of these
RECORD_TABLES = ("docs", "duplicates", "near_duplicates", "quarantine")
OUTCOMES = ("accepted", "duplicate", "near_duplicate", "quarantined")


def _result(counts: dict[tuple[str, str | None], int], versions: dict[str, int]) -> dict[str, Any]:
    by_outcome = {o: sum(c for (oo, _), c in counts.items() if oo == o) for o in OUTCOMES}
    reasons = {r: c for (o, r), c in sorted(counts.items(), key=lambda kv: str(kv[0])) if o == "quarantined"}
    return {
        "read": sum(counts.values()),
        "accepted": by_outcome["accepted"],
        "duplicates": by_outcome["duplicate"],
        "near_duplicates": by_outcome["near_duplicate"],
        "quarantined": by_outcome["quarantined"],
        "quarantined_by_reason": reasons,
        "versions": versions,
    }


def verify_accounting(result: dict[str, Any], lake: Lake) -> None:
    """Check, against the committed tables, that read = accepted + duplicates + near duplicates +
    quarantined."""
    from clustermix.deltalog import num_records

    written = {n: num_records(lake.table(n), s3=lake.s3) for n in RECORD_TABLES}
    if sum(written.values()) != result["read"] or written["docs"] != result["accepted"] or \
            written["near_duplicates"] != result["near_duplicates"]:
        raise AccountingError(f"ingest lost records: read {result['read']} but tables hold {written}")


def _prior_rows(spark: SparkSession, lake: Lake, new: DataFrame, replaced: str) -> DataFrame:
    """Accepted documents (not from files being re-taken) that share an id or a text with a new record,
    shaped as candidate records; found with semi-joins so the docs table is scanned, not shuffled."""
    from pyspark.sql import functions as F

    from clustermix.tableio import read

    docs = read(spark, lake, "docs").where(f"NOT ({replaced})")
    keys = new.select(F.col("_id").alias("id"), F.sha2("_text", 256).alias("text_hash")).where(
        F.col("_text").isNotNull())
    by_id = docs.join(keys.select("id").where(F.col("id").isNotNull()).distinct(), "id", "left_semi")
    by_hash = docs.join(keys.select("text_hash").distinct(), "text_hash", "left_semi")
    hits = by_id.unionByName(by_hash).dropDuplicates(["id"])
    return hits.select(
        F.lit(None).cast("string").alias("raw"), "source_file", F.lit(0).cast("bigint").alias("_block"),
        F.lit(0).cast("bigint").alias("_row"), F.lit(True).alias("_utf8"), F.lit(True).alias("_parsed"),
        F.lit(True).alias("_object"), F.lit("STRING").alias("_id_kind"), F.col("id").alias("_id"),
        F.lit("STRING").alias("_text_kind"), F.col("text").alias("_text"), F.lit("DOUBLE").alias("_q_kind"),
        F.col("quality").alias("_q"), "domain", "lang", F.lit(True).alias("_prior"))


def _prior_signatures(spark: SparkSession, lake: Lake, cfg: Config, replaced: str) -> DataFrame | None:
    """The signatures of the documents already accepted (not from files being re-taken), or None when
    near-duplicates are off. Signatures of another scheme cannot be compared: that needs a full ingest."""
    from pyspark.sql import functions as F

    from clustermix.deltalog import version
    from clustermix.errors import DataError
    from clustermix.minhash import scheme
    from clustermix.tableio import read

    if not cfg.dedup.near.enabled:
        return None
    if version(lake.table(SIGNATURES), s3=lake.s3) is None:
        raise DataError(f"dedup.near is on but the lake has no {SIGNATURES} table (it was ingested before "
                        "near-duplicates existed, or with them off): run `clustermix run` once to ingest everything")
    prior = read(spark, lake, SIGNATURES).where(f"NOT ({replaced})")
    other = prior.where(F.col("scheme") != scheme(cfg.dedup.near)).limit(1).collect()
    if other:
        raise DataError(f"dedup.near's shingles, bands, rows or seed changed ({other[0]['scheme']} in the lake, "
                        f"{scheme(cfg.dedup.near)} now): run `clustermix run` once to ingest everything")
    return prior


def run_ingest_increment(spark: SparkSession, cfg: Config, spec: InputSpec, run_id: str, write: TableWriter,
                         lake: Lake) -> dict[str, Any]:
    """Ingest only ``spec.files`` into the existing tables (a nightly refresh).

    Each table gets one Delta transaction that replaces whatever rows came from these files before
    (``replaceWhere`` on ``source_file``): a refresh that died half-way is redone, never doubled, and
    a file taken again (changed since) replaces its earlier rows and its earlier ``bad_files`` row.
    A new record whose text or id is already accepted is a duplicate (or a ``duplicate_id``), exactly
    as if every file had been ingested together.
    """
    from pyspark.sql import functions as F

    from clustermix import badfiles
    from clustermix.tableio import read

    assert spec.files is not None
    checked = badfiles.check_input(spark, cfg, spec, lake, run_id)  # under fail: raises, writes nothing
    replaced = sql_in(SOURCE_KEY, spark_source_uris(spark, list(spec.files)))

    marker = NearMarker(cfg, _prior_signatures(spark, lake, cfg, replaced))
    cached: list[DataFrame] = []

    def classified(records: DataFrame) -> DataFrame:
        new = records.withColumn("_prior", F.lit(False))
        both = new.unionByName(_prior_rows(spark, lake, new, replaced))
        return marker(classify(both, cfg.ingest.max_chars, cfg.ingest.chars_per_token, cached).where(
            ~F.col("_prior")))

    with shuffle_partitions(spark, partitions_for(spark, cfg, checked)):
        try:
            df, counts, per_file, checked = badfiles.read_counted(spark, checked, cfg, classified)
            try:
                versions = {name: write(name, contracts.check(frame, name), replace_where=replaced)
                            for name, frame in _outputs(df, run_id).items()}
                versions[SIGNATURES] = write(SIGNATURES, marker.frame(spark, run_id), replace_where=replaced)
            finally:
                df.unpersist()
        finally:
            marker.release()
            _release(cached)
            checked.cleanup(lake)
    result = {**_result(counts, versions), **badfiles.file_counts(checked, per_file)}
    # count what the committed versions hold from these files (commit metrics would also count rows
    # Delta copied while rewriting a file)
    written = {name: read(spark, lake, name, versions[name]).where(replaced).count() for name in RECORD_TABLES}
    if sum(written.values()) != result["read"] or written["docs"] != result["accepted"] or \
            written["near_duplicates"] != result["near_duplicates"]:
        raise AccountingError(f"refresh ingest lost records: read {result['read']} but wrote {written}")
    versions[badfiles.TABLE] = write(badfiles.TABLE, contracts.check(badfiles.frame(spark, checked, result, run_id),
                                                                     badfiles.TABLE), replace_where=replaced)
    badfiles.verify(result)
    return result


def stage_inputs(ctx: Context) -> dict[str, Any]:
    """What ingest depends on besides config: the input's files (sizes and times) or Delta version.
    A refresh sets ``ctx.input_spec`` to the new files only; a run lists everything under the path."""
    if ctx.input_spec is None:
        ctx.input_spec = resolve_input(ctx.cfg, ctx.lake.root)
    spec = ctx.input_spec
    assert spec is not None
    out: dict[str, Any] = {"input": spec.listing, "path": spec.path}
    if spec.files is not None:
        out["mode"] = "increment"
    return out


def run(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    """The ingest stage: every record of the input (a refresh: of its new files) into the three tables."""
    spec = ctx.input_spec
    assert spec is not None
    if spec.files is not None:
        return run_ingest_increment(ctx.spark, ctx.cfg, spec, ctx.run_id, ctx.write, ctx.lake)
    return run_ingest(ctx.spark, ctx.cfg, spec, ctx.run_id, ctx.write)
