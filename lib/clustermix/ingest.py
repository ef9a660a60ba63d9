"""Ingest (Spark): raw corpus -> ``docs``, ``quarantine``, ``duplicates``.

Every record read ends in exactly one place: ``docs`` (accepted), ``duplicates`` (the same text
as an accepted document, under any id), or ``quarantine`` with a machine-readable reason.
JSON lines are parsed with Spark's VARIANT functions, so no Python runs per record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clustermix import contracts
from clustermix.config import BUILTIN_PREFIX, Config, InputConfig
from clustermix.errors import AccountingError, InputError
from clustermix.lake import is_hidden, open_fs

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from clustermix.lake import Lake, TableWriter

log = logging.getLogger(__name__)

# Quarantine reasons, in the order they are tested: the first that applies is recorded.
REASONS = (
    "invalid_utf8", "malformed_json", "not_an_object", "missing_text", "text_not_string", "blank_text",
    "nul_in_text", "too_long", "bad_id", "quality_not_a_number", "duplicate_id",
)
_NUMERIC = r"^(TINYINT|SMALLINT|INT|BIGINT|FLOAT|DOUBLE|DECIMAL.*)$"
_INTEGRAL = r"^(TINYINT|SMALLINT|INT|BIGINT|DECIMAL\(\d+,0\))$"


@dataclass(frozen=True)
class InputSpec:
    """Where the raw corpus is, resolved (builtin corpora materialised), with its listing."""

    path: str
    format: str
    listing: dict[str, Any]
    # set by a refresh: only these files (as Spark spells them) are read, not everything under path
    files: tuple[str, ...] | None = None

    def spark_files(self) -> list[str]:
        """Every listed file as Spark spells it (local path, or s3a://bucket/key)."""
        from clustermix.lake import spark_path

        scheme = self.path.split("://", 1)[0] + "://" if "://" in self.path and not self.path.startswith(
            "file://") else ""
        return [spark_path(scheme + p) for p in sorted(self.listing.get("files", {}))]


def resolve_input(cfg: Config, lake_root: str) -> InputSpec:
    """Resolve ``input.path`` and list its files (their sizes and times make the fingerprint)."""
    from pyarrow import fs as pafs

    path, fmt = cfg.input.path, cfg.input.format
    if path.startswith(BUILTIN_PREFIX):
        from clustermix.corpus import materialize

        path, fmt = materialize(path[len(BUILTIN_PREFIX) :], lake_root), "jsonl"
    if fmt == "delta":
        from clustermix.lake import version

        v = version(path)
        if v is None:
            raise InputError(f"input.path {path!r} is not a Delta table")
        return InputSpec(path, fmt, {"delta_version": v})
    try:
        filesystem, base = open_fs(path)
        info = filesystem.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"input.path {path!r} does not exist")
        infos = [info] if info.type == pafs.FileType.File else filesystem.get_file_info(
            pafs.FileSelector(base, recursive=True))
    except OSError as exc:
        raise InputError(f"input.path {path!r} cannot be listed: {exc}") from None
    files = {i.path: [i.size, i.mtime_ns] for i in infos if i.type == pafs.FileType.File and not is_hidden(i.path)}
    if not files:
        raise InputError(f"input.path {path!r} holds no files")
    return InputSpec(path, fmt, {"files": files})


def _vpath(field: str) -> str:
    return f"$['{field}']"


def _lines(spark: SparkSession, spec: InputSpec) -> DataFrame:
    """JSON lines as normalised candidate records (one row per non-blank line)."""
    from pyspark.sql import functions as F

    raw = (
        # only \n ends a record: Spark's default also splits on a bare \r, which would cut a record
        # in two (a CRLF's \r is stripped below)
        spark.read.option("recursiveFileLookup", "true").option("pathGlobFilter", "[!._]*")
        .option("lineSep", "\n").text(list(spec.files) if spec.files is not None else spec.path)
        .select(
            F.col("value"),
            F.col("_metadata.file_path").alias("source_file"),
            F.col("_metadata.file_block_start").alias("_block"),
            F.monotonically_increasing_id().alias("_row"),
        )
    )
    valid = F.expr("is_valid_utf8(value)")
    line = F.when(valid, F.regexp_replace(F.regexp_replace("value", "^\uFEFF", ""), "\r$", ""))
    return raw.select(
        valid.alias("_utf8"),
        line.alias("_line"),
        F.when(valid, line).otherwise(F.expr("make_valid_utf8(value)")).alias("raw"),
        "source_file", "_block", "_row",
    ).where(~(F.col("_utf8") & F.col("_line").rlike(r"(?U)^\s*$")))


def _from_json(df: DataFrame, icfg: InputConfig) -> DataFrame:
    from pyspark.sql import functions as F

    v = F.expr("try_parse_json(_line)")
    df = df.withColumn("_v", v)

    def kind(field: str | None) -> Column:
        if field is None:
            return F.lit(None).cast("string")
        return F.expr(f"schema_of_variant(variant_get(_v, \"{_vpath(field)}\"))")

    def get(field: str | None, typ: str) -> Column:
        if field is None:
            return F.lit(None).cast(typ)
        return F.expr(f"try_variant_get(_v, \"{_vpath(field)}\", '{typ}')")

    return df.select(
        "raw", "source_file", "_block", "_row", "_utf8",
        F.col("_v").isNotNull().alias("_parsed"),
        F.expr("schema_of_variant(_v)").startswith("OBJECT").alias("_object"),
        kind(icfg.id_field).alias("_id_kind"), get(icfg.id_field, "string").alias("_id"),
        kind(icfg.text_field).alias("_text_kind"), get(icfg.text_field, "string").alias("_text"),
        kind(icfg.quality_field).alias("_q_kind"), get(icfg.quality_field, "double").alias("_q"),
        get(icfg.domain_field, "string").alias("domain"), get(icfg.lang_field, "string").alias("lang"),
    )


def _columnar(spark: SparkSession, spec: InputSpec, icfg: InputConfig) -> DataFrame:
    """Parquet or Delta rows as the same normalised candidate records."""
    from pyspark.sql import functions as F

    reader = spark.read.format(spec.format)
    if spec.format == "parquet":
        reader = reader.option("recursiveFileLookup", "true").option("pathGlobFilter", "[!._]*")
    df = reader.load(list(spec.files)) if spec.files is not None else reader.load(spec.path)
    names = set(df.columns)
    if icfg.text_field not in names:
        raise InputError(
            f"{_first_file(spec)}: column {icfg.text_field!r} (input.text_field) not found; columns: {sorted(names)}")
    types = {f.name: f.dataType.simpleString() for f in df.schema.fields}

    def kind(field: str | None) -> Column:
        if field is None or field not in names:
            return F.lit(None).cast("string")
        t = types[field].upper()
        return F.when(F.col(field).isNull(), F.lit("VOID")).otherwise(F.lit("STRING" if t == "STRING" else t))

    def get(field: str | None, typ: str) -> Column:
        if field is None or field not in names:
            return F.lit(None).cast(typ)
        return F.expr(f"try_cast(`{field}` AS {typ})")

    text_col = F.col(icfg.text_field)
    if types[icfg.text_field] == "binary":
        text_kind = F.when(text_col.isNull(), "VOID").otherwise("STRING")
        utf8 = F.coalesce(F.expr(f"is_valid_utf8(cast(`{icfg.text_field}` AS string))"), F.lit(True))
    else:
        text_kind, utf8 = kind(icfg.text_field), F.lit(True)
    return df.select(
        F.expr("make_valid_utf8(to_json(struct(*)))").alias("raw"),
        F.col("_metadata.file_path").alias("source_file"),
        F.col("_metadata.file_block_start").alias("_block"),
        F.monotonically_increasing_id().alias("_row"),
        utf8.alias("_utf8"), F.lit(True).alias("_parsed"), F.lit(True).alias("_object"),
        kind(icfg.id_field).alias("_id_kind"), get(icfg.id_field, "string").alias("_id"),
        text_kind.alias("_text_kind"), get(icfg.text_field, "string").alias("_text"),
        kind(icfg.quality_field).alias("_q_kind"), get(icfg.quality_field, "double").alias("_q"),
        get(icfg.domain_field, "string").alias("domain"), get(icfg.lang_field, "string").alias("lang"),
    )


def _first_file(spec: InputSpec) -> str:
    files = sorted(spec.listing.get("files", {}))
    return files[0] if files else spec.path


def classify(df: DataFrame, max_chars: int, chars_per_token: float) -> DataFrame:
    """Give every candidate record an ``outcome`` (accepted/duplicate/quarantined) and a reason."""
    from pyspark.sql import Window
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
    order: list[Any] = ["source_file", "_block", "_row"]
    if prior:
        order = [F.col("_prior").desc(), *order]
    valid = F.col("reason").isNull()
    # An id's first record wins; a later one with the same text is a duplicate, other text is quarantined.
    w_id = Window.partitionBy("id").orderBy(*order)
    df = df.withColumn("_id_rn", F.when(valid, F.row_number().over(w_id))) \
           .withColumn("_id_first_hash", F.when(valid, F.first("text_hash").over(w_id))) \
           .withColumn("_id_first", F.when(valid, F.first("id").over(w_id)))
    id_clash = valid & (F.col("_id_rn") > 1) & (F.col("text_hash") != F.col("_id_first_hash"))
    id_dup = valid & (F.col("_id_rn") > 1) & (F.col("text_hash") == F.col("_id_first_hash"))
    df = df.withColumn("reason", F.when(id_clash, F.lit("duplicate_id")).otherwise(F.col("reason")))
    survivor = F.col("reason").isNull() & ~id_dup
    w_hash = Window.partitionBy("text_hash").orderBy(*order)
    df = df.withColumn("_survivor", survivor) \
           .withColumn("_h_rn", F.when(survivor, F.row_number().over(w_hash))) \
           .withColumn("_h_first", F.when(survivor, F.first("id").over(w_hash)))
    outcome = (
        F.when(F.col("reason").isNotNull(), "quarantined")
        .when(id_dup | (F.col("_h_rn") > 1), "duplicate")
        .otherwise("accepted")
    )
    return df.withColumn("outcome", outcome).withColumn(
        "duplicate_of", F.when(id_dup, F.col("_id_first")).when(F.col("_h_rn") > 1, F.col("_h_first"))
    ).withColumn("n_chars", F.char_length(text).cast("bigint")).withColumn(
        "n_tokens", F.ceil(F.char_length(text) / F.lit(chars_per_token)).cast("bigint"))


def candidates(spark: SparkSession, spec: InputSpec, icfg: InputConfig) -> DataFrame:
    """Read the raw corpus as normalised candidate records, whatever its format."""
    if spec.format == "jsonl":
        return _from_json(_lines(spark, spec), icfg)
    return _columnar(spark, spec, icfg)


def run_ingest(spark: SparkSession, cfg: Config, spec: InputSpec, run_id: str, write: TableWriter) -> dict[str, Any]:
    """Check every input file, classify every record of the usable ones, write the three tables through
    ``write(name, df)`` and the bad files to ``bad_files``, prove the accounting of records and files."""
    from clustermix import badfiles

    checked = badfiles.check_input(spark, cfg, spec, write.lake, run_id)  # under fail: raises, writes nothing
    df, counts, per_file, checked = badfiles.read_counted(
        spark, checked, cfg, lambda c: classify(c, cfg.ingest.max_chars, cfg.ingest.chars_per_token))
    try:
        versions = {name: write(name, contracts.check(frame, name)) for name, frame in _outputs(df, run_id).items()}
    finally:
        df.unpersist()
        checked.cleanup(write.lake)
    result = {**_result(counts, versions), **badfiles.file_counts(checked, per_file)}
    verify_accounting(result, write.lake)
    versions[badfiles.TABLE] = write(badfiles.TABLE, contracts.check(badfiles.frame(spark, checked, result, run_id),
                                                                     badfiles.TABLE))
    badfiles.verify(result, write.lake)
    return result


def _outputs(df: DataFrame, run_id: str) -> dict[str, DataFrame]:
    """The three ingest tables from classified records."""
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
    }


def _result(counts: dict[tuple[str, str | None], int], versions: dict[str, int]) -> dict[str, Any]:
    by_outcome = {o: sum(c for (oo, _), c in counts.items() if oo == o) for o in ("accepted", "duplicate", "quarantined")}
    reasons = {r: c for (o, r), c in sorted(counts.items(), key=lambda kv: str(kv[0])) if o == "quarantined"}
    return {
        "read": sum(counts.values()),
        "accepted": by_outcome["accepted"],
        "duplicates": by_outcome["duplicate"],
        "quarantined": by_outcome["quarantined"],
        "quarantined_by_reason": reasons,
        "versions": versions,
    }


def verify_accounting(result: dict[str, Any], lake: Lake) -> None:
    """Check, against the committed tables, that read = accepted + duplicates + quarantined."""
    from clustermix.lake import num_records

    written = {n: num_records(lake.table(n)) for n in ("docs", "duplicates", "quarantine")}
    total = written["docs"] + written["duplicates"] + written["quarantine"]
    if total != result["read"] or written["docs"] != result["accepted"]:
        raise AccountingError(
            f"ingest lost records: read {result['read']} but tables hold docs={written['docs']} "
            f"duplicates={written['duplicates']} quarantine={written['quarantine']}")


# ``source_file`` as stored (Spark's ``_metadata.file_path``) spells a local file ``file:/x``, while a
# qualified Hadoop path spells it ``file:///x``: rows are matched on this normal form of both.
SOURCE_KEY = "regexp_replace(source_file, '^file:/+', 'file:///')"


def spark_source_uris(spark: SparkSession, paths: list[str]) -> list[str]:
    """``paths`` qualified and URL-encoded as Spark records them, in the normal form of :data:`SOURCE_KEY`,
    so the rows already ingested from them can be found."""
    import re

    jvm, conf = spark._jvm, spark._jsc.hadoopConfiguration()  # type: ignore[union-attr]
    out = []
    for p in paths:
        hp = jvm.org.apache.hadoop.fs.Path(p)
        out.append(re.sub(r"^file:/+", "file:///", str(hp.getFileSystem(conf).makeQualified(hp).toUri().toString())))
    return out


def sql_in(column: str, values: list[str]) -> str:
    """A SQL ``column IN (...)`` predicate over string literals (escaped for Spark SQL)."""
    lits = ", ".join("'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'" for v in values)
    return f"{column} IN ({lits})"


def _prior_rows(spark: SparkSession, lake: Lake, new: DataFrame, replaced: str) -> DataFrame:
    """Accepted documents (not from files being re-taken) that share an id or a text with a new record,
    shaped as candidate records; found with semi-joins so the docs table is scanned, not shuffled."""
    from pyspark.sql import functions as F

    from clustermix.lake import read

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
    from clustermix.lake import read

    assert spec.files is not None
    checked = badfiles.check_input(spark, cfg, spec, lake, run_id)  # under fail: raises, writes nothing
    replaced = sql_in(SOURCE_KEY, spark_source_uris(spark, list(spec.files)))

    def classified(records: DataFrame) -> DataFrame:
        new = records.withColumn("_prior", F.lit(False))
        both = new.unionByName(_prior_rows(spark, lake, new, replaced))
        return classify(both, cfg.ingest.max_chars, cfg.ingest.chars_per_token).where(~F.col("_prior"))

    df, counts, per_file, checked = badfiles.read_counted(spark, checked, cfg, classified)
    try:
        versions = {name: write(name, contracts.check(frame, name), replace_where=replaced)
                    for name, frame in _outputs(df, run_id).items()}
    finally:
        df.unpersist()
        checked.cleanup(lake)
    result = {**_result(counts, versions), **badfiles.file_counts(checked, per_file)}
    # count what the committed versions hold from these files (commit metrics would also count rows
    # Delta copied while rewriting a file)
    written = {name: read(spark, lake, name, v).where(replaced).count() for name, v in versions.items()}
    if sum(written.values()) != result["read"] or written["docs"] != result["accepted"]:
        raise AccountingError(f"refresh ingest lost records: read {result['read']} but wrote {written}")
    versions[badfiles.TABLE] = write(badfiles.TABLE, contracts.check(badfiles.frame(spark, checked, result, run_id),
                                                                     badfiles.TABLE), replace_where=replaced)
    badfiles.verify(result)
    return result
