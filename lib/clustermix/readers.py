"""Reading input records with Spark: JSON lines, Parquet and Delta rows as one normalised shape of
candidate record, and the ``source_file`` keys that tie a table's rows to the files they came from.

Shared by ingest (which classifies the records) and the bad-file checks (which read only the files
that passed); neither reaches into the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clustermix.errors import InputError

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from clustermix.config import InputConfig
    from clustermix.inputs import InputSpec


def _vpath(field: str) -> str:
    return f"$['{field}']"


def lines(spark: SparkSession, spec: InputSpec) -> DataFrame:
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


def from_json(df: DataFrame, icfg: InputConfig) -> DataFrame:
    """Parsed lines (:func:`lines`) as normalised candidate records; what went wrong stays visible
    in the ``_*`` columns for ingest's classification."""
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


def columnar(spark: SparkSession, spec: InputSpec, icfg: InputConfig) -> DataFrame:
    """Parquet or Delta rows as the same normalised candidate records."""
    from pyspark.sql import functions as F

    reader = spark.read.format(spec.format)
    if spec.format == "parquet":
        reader = reader.option("recursiveFileLookup", "true").option("pathGlobFilter", "[!._]*")
    df = reader.load(list(spec.files)) if spec.files is not None else reader.load(spec.path)
    names = set(df.columns)
    if icfg.text_field not in names:
        raise InputError(
            f"{first_file(spec)}: column {icfg.text_field!r} (input.text_field) not found; columns: {sorted(names)}")
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


def first_file(spec: InputSpec) -> str:
    """The input's first file (for an error message), or its path."""
    files = sorted(spec.listing.get("files", {}))
    return files[0] if files else spec.path



def candidates(spark: SparkSession, spec: InputSpec, icfg: InputConfig) -> DataFrame:
    """Read the raw corpus as normalised candidate records, whatever its format."""
    if spec.format == "jsonl":
        return from_json(lines(spark, spec), icfg)
    return columnar(spark, spec, icfg)



# ``source_file`` as stored (Spark's ``_metadata.file_path``) spells a local file ``file:/x``, while a
# qualified Hadoop path spells it ``file:///x``: rows are matched on this normal form of both.
SOURCE_KEY = "regexp_replace(source_file, '^file:/+', 'file:///')"


def spark_source_uris(spark: SparkSession, paths: list[str]) -> list[str]:
    """``paths`` qualified and URL-encoded as Spark records them, in the normal form of :data:`SOURCE_KEY`,
    so the rows already ingested from them can be found."""
    import re

    jvm: Any = spark._jvm
    conf = spark._jsc.hadoopConfiguration()
    out = []
    for p in paths:
        hp = jvm.org.apache.hadoop.fs.Path(p)
        out.append(re.sub(r"^file:/+", "file:///", str(hp.getFileSystem(conf).makeQualified(hp).toUri().toString())))
    return out


def sql_in(column: str, values: list[str]) -> str:
    """A SQL ``column IN (...)`` predicate over string literals (escaped for Spark SQL)."""
    lits = ", ".join("'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'" for v in values)
    return f"{column} IN ({lits})"
