"""Bad input files (``ingest.on_bad_file``): every input file is checked before Spark reads any of them.

A file that is not the format it claims, cannot be read, is cut short or whose columns do not fit the
contract (:mod:`clustermix.filecheck`) either stops the run before anything is written (``fail``: exit
code 2, one line naming the file and the reason) or is left out and recorded in the ``bad_files`` table
with its reason (``skip``, the default: one bad upload in a landing folder must not stop every night's
run, and nothing is hidden, since the table, the manifest and the report name the file). A compressed
file cut short keeps its complete records, read from a staging copy of its intact part and recorded as
coming from the file itself. The full traces go to the log at DEBUG level; the console gets one line
per file.

The checks run as Spark tasks over the file list, balanced by size: a gzip file's integrity needs one
full decompression, which over a corpus of terabytes is work for the executors, next to the data, not
for the driver; a Parquet footer costs a few KiB wherever it is read. Only the verdicts (one small
record per file) come back to the driver, which already holds the file listing.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from clustermix.errors import AccountingError, InputError
from clustermix.filecheck import Verdict

if TYPE_CHECKING:
    from collections.abc import Callable

    from pyspark.sql import DataFrame, SparkSession

    from clustermix.config import Config, InputConfig
    from clustermix.inputs import InputSpec
    from clustermix.lake import Lake
    from clustermix.storage import S3Settings

log = logging.getLogger(__name__)

TABLE = "bad_files"
SHOWN = 20  # bad files named one per line on the console; the rest are counted (all are in the table)


class BadInputFile(InputError):
    """An input file is bad and ``ingest.on_bad_file`` is ``fail`` (or no input file is usable at all)."""


@dataclass
class Checked:
    """The input as checked: one verdict per file (sorted by path), and where truncated files' complete
    records were staged."""

    spec: InputSpec
    verdicts: list[Verdict]
    staging: str | None = None
    hidden: int = 0  # listed files under a folder Spark ignores (``_temporary/``, ``.tmp/``): not input

    @property
    def bad(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.reason is not None]

    @property
    def plain(self) -> bool:
        """Nothing bad (and, in a folder of columnar files, one schema): the input is read as it is."""
        return not self.bad and not self.hidden and (self.spec.format == "delta"
                                                     or len({v.schema for v in self.verdicts}) <= 1)

    def cleanup(self, lake: Lake) -> None:
        if self.staging is not None:
            lake.remove(self.staging)


def check_input(spark: SparkSession, cfg: Config, spec: InputSpec, lake: Lake, run_id: str) -> Checked:
    """Check every file of ``spec``; raise :class:`BadInputFile` under ``fail`` (before anything is
    written) or when no file is usable; under ``skip``, log one line per bad file."""
    from clustermix import storage
    from clustermix.lake import open_fs

    mode, icfg = cfg.ingest.on_bad_file, cfg.input
    s3 = storage.settings(cfg.storage)  # the input's object store, as the config's storage section says
    staging = lake.staging("ingest", run_id) if mode == "skip" and spec.format == "jsonl" else None
    if spec.format == "delta":  # one schema, in the log: checked once; the data files by their footers
        items, casts = _delta_files(spec, icfg, s3)
        verdicts = [v if v.reason else replace(v, casts=casts)
                    for v in _check_all(spark, items, "parquet", None, spec.path, s3, None, None)]
        hidden = 0
    else:
        listed = sorted((p, int(v[0])) for p, v in spec.listing["files"].items())
        base = open_fs(spec.path, s3)[1].rstrip("/")
        items = [it for it in listed if not _in_hidden_folder(base, it[0])]
        hidden = len(listed) - len(items)
        verdicts = _check_all(spark, items, spec.format, icfg, spec.path, s3, staging, lake.s3)
    checked = Checked(spec, verdicts, staging, hidden)
    bad = checked.bad
    for v in bad:
        log.debug("ingest: input file %s: %s: %s%s", v.path, v.reason, v.detail, "\n" + v.trace if v.trace else "")
    if bad and mode == "fail":
        first = bad[0]
        more = f" (and {len(bad) - 1} more bad input files)" if len(bad) > 1 else ""
        raise BadInputFile(f"bad input file {_shown(spec, first.path)}: {first.reason}: {first.detail}{more}; "
                           "nothing was written: repair or remove it, or set ingest.on_bad_file=skip to ingest "
                           "the other files and record it in the bad_files table")
    _some_usable(checked)
    if bad and spec.format == "delta":
        _delta_readable_without(spec, bad, s3)
    for v in bad[:SHOWN]:
        then = "; its complete records are ingested" if v.status == "partial" else ""
        log.warning("ingest: %s input file %s: %s: %s%s", v.status, _shown(spec, v.path), v.reason, v.detail, then)
    if len(bad) > SHOWN:
        log.warning("ingest: and %d more bad input files (see the %s table)", len(bad) - SHOWN, TABLE)
    return checked


def _some_usable(checked: Checked) -> None:
    """A full run needs at least one usable file, whatever ``on_bad_file`` (a refresh may take none)."""
    bad = checked.bad
    if bad and all(v.status == "skipped" for v in checked.verdicts) and checked.spec.files is None:
        raise BadInputFile(f"no input file can be read: all {len(checked.verdicts)} are bad, the first "
                           f"{_shown(checked.spec, bad[0].path)}: {bad[0].reason}: {bad[0].detail}")


def _in_hidden_folder(base: str, path: str) -> bool:
    """Whether ``path`` lies in a folder under the input folder ``base`` that Spark does not read (its
    name starts with ``_`` or ``.``: ``_temporary``, ``_delta_log``, an uploader's ``.tmp``)."""
    inner = path[len(base) + 1:].split("/")[:-1] if path.startswith(base + "/") else []
    return any(part.startswith(("_", ".")) for part in inner)


def _shown(spec: InputSpec, path: str) -> str:
    """A listed path as the user spelled the input (``s3://bucket/key`` rather than ``bucket/key``)."""
    return _scheme(spec) + path


def _scheme(spec: InputSpec) -> str:
    p = spec.path
    return p.split("://", 1)[0] + "://" if "://" in p and not p.startswith("file://") else ""


def _spark_path(spec: InputSpec, path: str) -> str:
    from clustermix.lake import spark_path

    return spark_path(_scheme(spec) + path)


# --- the checks, as Spark tasks --------------------------------------------------------------------


def _check_all(spark: SparkSession, items: list[tuple[str, int]], fmt: str, icfg: InputConfig | None, root: str,
               s3: S3Settings, staging: str | None, staging_s3: S3Settings | None) -> list[Verdict]:
    """One verdict per file, checked by Spark tasks; the files are spread over the tasks by size. ``s3``
    and ``staging_s3``: the driver's object-store settings of the input and of the staging folder,
    handed to the executors (which have none of their own)."""
    if not items:
        return []
    sc = spark.sparkContext
    bins = balance(items, min(len(items), max(1, sc.defaultParallelism) * 4))
    task = functools.partial(_check_bin, fmt=fmt, icfg=icfg, root=root, s3=s3, staging=staging,
                             staging_s3=staging_s3)
    sc.setJobDescription(f"ingest: check {len(items)} input files")
    try:
        verdicts = sc.parallelize(bins, len(bins)).flatMap(task).collect()
    finally:
        sc.setJobDescription(None)  # type: ignore[arg-type]
    return sorted(verdicts, key=lambda v: v.path)


def balance(items: list[tuple[str, int]], n: int) -> list[list[tuple[str, int]]]:
    """``items`` (path, size) in ``n`` bins of nearly equal total size (largest first, into the lightest)."""
    import heapq

    heap = [(0, i) for i in range(n)]
    bins: list[list[tuple[str, int]]] = [[] for _ in range(n)]
    for item in sorted(items, key=lambda it: -it[1]):
        load, i = heapq.heappop(heap)
        bins[i].append(item)
        heapq.heappush(heap, (load + item[1], i))
    return [b for b in bins if b]


def _check_bin(items: list[tuple[str, int]], fmt: str, icfg: InputConfig | None, root: str,
               s3: S3Settings, staging: str | None, staging_s3: S3Settings | None) -> list[Verdict]:
    """A Spark task: check a few files (on the executor, with the driver's object-store settings)."""
    import hashlib

    from clustermix.filecheck import check_file
    from clustermix.lake import open_fs

    filesystem, _ = open_fs(root, s3)

    def stage_to(path: str) -> str:
        return f"{staging}/{hashlib.sha256(path.encode()).hexdigest()[:24]}.jsonl"

    return [check_file(filesystem, p, size, fmt, icfg, stage_to if staging else None, s3=staging_s3)
            for p, size in items]


# --- a Delta table as input ----------------------------------------------------------------------


def _delta_files(spec: InputSpec, icfg: InputConfig, s3: S3Settings) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
    """The data files (path, size) of the input table's version and the casts its columns need: a table
    has one schema, so a table that does not fit the contract is bad as a whole, whatever
    ``on_bad_file``."""
    from urllib.parse import unquote

    import pyarrow as pa
    from deltalake import DeltaTable

    from clustermix.deltalog import storage_options
    from clustermix.filecheck import _Bad, check_columns
    from clustermix.lake import open_fs

    dt = DeltaTable(spec.path, version=spec.listing["delta_version"], storage_options=storage_options(spec.path, s3))
    try:
        casts = check_columns(pa.schema(dt.schema().to_arrow()), icfg)
    except _Bad as bad:
        raise BadInputFile(f"bad input table {spec.path}: {bad.reason}: {bad.detail}") from None
    acts = pa.table(dt.get_add_actions(flatten=True))
    base = open_fs(spec.path, s3)[1]
    return sorted((f"{base}/{unquote(p)}", int(s)) for p, s in zip(
        acts.column("path").to_pylist(), acts.column("size_bytes").to_pylist(), strict=True)), casts


def _delta_readable_without(spec: InputSpec, bad: list[Verdict], s3: S3Settings) -> None:
    """A table's good data files can be read alone, as Parquet, only when those files are the whole
    truth: no partition values (kept in the log), column mapping or deletion vectors."""
    from deltalake import DeltaTable

    from clustermix.deltalog import storage_options

    dt = DeltaTable(spec.path, version=spec.listing["delta_version"], storage_options=storage_options(spec.path, s3))
    if dt.protocol().min_reader_version > 1 or dt.metadata().partition_columns:
        raise BadInputFile(f"bad data file {bad[0].path} in input table {spec.path}: {bad[0].reason}: "
                           f"{bad[0].detail}; the table has partition columns, column mapping or deletion "
                           "vectors, so it cannot be read without it: restore the table to a good version")


# --- reading what is good --------------------------------------------------------------------------


def read_candidates(spark: SparkSession, checked: Checked, icfg: InputConfig) -> DataFrame:
    """The input's candidate records (:func:`clustermix.readers.candidates`) from its usable files only:
    good files, and the staged complete records of truncated ones under their own file's name. Columnar
    files are read in groups of one schema each (Spark reads a group with one schema), so an integer
    ``id`` in one file and a string ``id`` in another are both read, each cast as its file needs."""
    from functools import reduce

    from clustermix.readers import candidates, columnar, from_json, lines

    spec = checked.spec
    if checked.plain:
        return candidates(spark, spec, icfg)
    usable = [v for v in checked.verdicts if v.status != "skipped"]
    if spec.format == "jsonl":
        from clustermix.lake import spark_path

        paths = [_spark_path(spec, v.path) for v in usable if v.reason is None]
        staged = {spark_path(v.staged): _spark_path(spec, v.path) for v in usable if v.staged}
        if not paths and not staged:
            return _empty(spark, icfg)
        df = from_json(lines(spark, replace(spec, files=tuple(paths + sorted(staged)))), icfg)
        return _as_source(spark, df, staged)
    groups: dict[str | None, list[str]] = {}
    for v in usable:
        groups.setdefault(v.schema, []).append(_spark_path(spec, v.path))
    from clustermix.inputs import InputSpec

    frames = [columnar(spark, InputSpec(spec.path, "parquet", {}, files=tuple(files)), icfg)
              for files in groups.values()]
    if not frames:
        return _empty(spark, icfg)
    return reduce(lambda a, b: a.unionByName(b), frames)


def _empty(spark: SparkSession, icfg: InputConfig) -> DataFrame:
    """No usable file (a refresh whose only new file is bad): no candidate records, the usual columns."""
    from clustermix.readers import from_json

    lines = "_utf8 boolean, _line string, raw string, source_file string, _block bigint, _row bigint"
    return from_json(spark.createDataFrame([], lines), icfg)


def _as_source(spark: SparkSession, df: DataFrame, staged: dict[str, str]) -> DataFrame:
    """Records read from a staging copy carry the original file's name, as Spark spells it, so that a
    refresh that takes the file again replaces them."""
    from pyspark.sql import functions as F

    from clustermix.readers import SOURCE_KEY, spark_source_uris

    if not staged:
        return df
    keys = spark_source_uris(spark, list(staged))
    names = [_spark_spelling(u) for u in spark_source_uris(spark, list(staged.values()))]
    lookup = F.create_map(*[F.lit(x) for pair in zip(keys, names, strict=True) for x in pair])
    return df.withColumn("source_file", F.coalesce(lookup[F.expr(SOURCE_KEY)], F.col("source_file")))


def _spark_spelling(uri: str) -> str:
    """The normal form of :data:`clustermix.readers.SOURCE_KEY` (``file:///x``) as Spark's
    ``_metadata.file_path`` spells it (``file:/x``)."""
    return re.sub(r"^file:///", "file:/", uri)


RETRIES = 10  # files found unreadable while reading, after their checks passed, before a run gives up
_FAILED_FILE = re.compile(r"Encountered error while reading file (\S+?)\.?\s+SQLSTATE")


def read_counted(spark: SparkSession, checked: Checked, cfg: Config, classified: Callable[[DataFrame], DataFrame]
                 ) -> tuple[DataFrame, dict[tuple[str, str | None], int], dict[str, dict[str, int]], Checked]:
    """Classify the usable files' records (``classified(candidates)``), persist them and count them by
    outcome and reason and by file, before anything is written.

    The safety net of the checks: a file whose checks passed but that Spark cannot read (a corrupt data
    page past the footer, a file that changed during the run) stops the run with one line naming it
    under ``fail``; under ``skip`` it becomes a bad file and the read is redone without it."""
    from clustermix.tableio import persist_corpus

    for _ in range(RETRIES + 1):
        df = None
        try:
            # inside the try: classifying may already read the input (near-duplicates run Spark jobs)
            df = persist_corpus(classified(read_candidates(spark, checked, cfg.input)))
            counts = {(r["outcome"], r["reason"]): r["count"]
                      for r in df.groupBy("outcome", "reason").count().collect()}
            return df, counts, per_file_counts(df), checked
        except Exception as exc:
            if df is not None:
                df.unpersist()
            failed = _failed_file(exc, checked)
            if failed is None:
                raise
            log.debug("ingest: Spark cannot read input file %s", failed.path, exc_info=exc)
            checked = _drop(checked, failed, cfg.ingest.on_bad_file)
    raise BadInputFile(f"more than {RETRIES} input files could not be read by Spark although their checks "
                       f"passed, the last {_shown(checked.spec, checked.bad[-1].path)}; see the log")


def _failed_file(exc: Exception, checked: Checked) -> Verdict | None:
    """The good file a Spark read failure names, as a bad verdict (None: not a file's failure)."""
    msg = str(exc)
    m = _FAILED_FILE.search(msg)
    path = listed_path(m.group(1)) if m else None
    v = next((v for v in checked.verdicts if v.path == path and v.reason is None), None)
    if v is None:
        return None
    cause = re.findall(r"Caused by: ([^\n]+)", msg)
    why = cause[-1].strip()[:300] if cause else "see the log"
    reason = "unreadable" if "FileNotFound" in why else "corrupt"
    return replace(v, reason=reason, detail=f"Spark cannot read it although its footer or header is sound: {why}")


def _drop(checked: Checked, failed: Verdict, mode: str) -> Checked:
    """``checked`` with ``failed`` as a bad file; raises under ``fail`` or when nothing usable is left."""
    spec = checked.spec
    if mode == "fail":
        raise BadInputFile(f"bad input file {_shown(spec, failed.path)}: {failed.reason}: {failed.detail}; nothing "
                           "was written: repair or remove it, or set ingest.on_bad_file=skip to ingest the other "
                           "files and record it in the bad_files table")
    checked = replace(checked, verdicts=[failed if v.path == failed.path else v for v in checked.verdicts])
    _some_usable(checked)
    log.warning("ingest: skipped input file %s: %s: %s", _shown(spec, failed.path), failed.reason, failed.detail)
    return checked


# --- accounting ----------------------------------------------------------------------------------


def per_file_counts(df: DataFrame) -> dict[str, dict[str, int]]:
    """Records read per input file, by outcome, from classified records (one row per file comes back)."""
    from pyspark.sql import functions as F

    def n(outcome: str) -> Any:
        return F.sum((F.col("outcome") == outcome).cast("long")).alias(outcome)

    rows = df.groupBy("source_file").agg(F.count("*").alias("read"), n("accepted"), n("duplicate"),
                                         n("near_duplicate"), n("quarantined")).collect()
    return {listed_path(r["source_file"]): {"read": r["read"], "accepted": r["accepted"],
                                            "duplicates": r["duplicate"], "near_duplicates": r["near_duplicate"],
                                            "quarantined": r["quarantined"]}
            for r in rows}


def listed_path(source_file: str) -> str:
    """A ``source_file`` as Spark spells it (``file:/x%20y``, ``s3a://b/k``) as the listing spells it."""
    from urllib.parse import unquote

    if source_file.startswith("file:"):
        return unquote(re.sub(r"^file:/+", "/", source_file))
    return unquote(source_file.split("://", 1)[1] if "://" in source_file else source_file)


def file_counts(checked: Checked, per_file: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The manifest's file accounting: files seen = ingested (whole or, cut short, in part) + skipped,
    the reasons and casts, and every file's record counts."""
    zero = {"read": 0, "accepted": 0, "duplicates": 0, "near_duplicates": 0, "quarantined": 0}
    files: dict[str, dict[str, Any]] = {}
    for v in checked.verdicts:
        files[v.path] = {**zero, **per_file.get(v.path, {}), "status": v.status}
        if v.reason:
            files[v.path]["reason"] = v.reason
        if v.casts:
            files[v.path]["casts"] = list(v.casts)
    unlisted = sorted(set(per_file) - set(files))
    if unlisted:  # a name Spark spells in a way listed_path does not undo: counted, not lost
        log.warning("ingest: %d files read are not in the listing as spelled (first: %s)", len(unlisted), unlisted[0])
        files.update({p: {**zero, **per_file[p], "status": "ingested"} for p in unlisted})
    status = [f["status"] for f in files.values()]
    reasons: dict[str, int] = {}
    casts: dict[str, int] = {}
    for v in checked.verdicts:
        if v.reason:
            reasons[v.reason] = reasons.get(v.reason, 0) + 1
        for c in v.casts:
            casts[c] = casts.get(c, 0) + 1
    return {"files_seen": len(files), "files_ingested": status.count("ingested") + status.count("partial"),
            "files_skipped": status.count("skipped"), "files_partial": status.count("partial"),
            "files_by_reason": dict(sorted(reasons.items())), "casts": dict(sorted(casts.items())),
            "per_file": files}


def frame(spark: SparkSession, checked: Checked, result: dict[str, Any], run_id: str) -> DataFrame:
    """The ``bad_files`` rows of this run: one per bad file (skipped, or kept in part), with its reason."""
    from clustermix.contracts import CONTRACTS
    from clustermix.readers import spark_source_uris

    spec, bad = checked.spec, checked.bad
    names = [_spark_spelling(u) for u in spark_source_uris(spark, [_spark_path(spec, v.path) for v in bad])]
    per_file = result["per_file"]
    rows = [(_shown(spec, v.path), name, v.size, v.reason, v.detail, v.status, per_file[v.path]["read"], run_id)
            for v, name in zip(bad, names, strict=True)]
    schema = ", ".join(f"{c} {t}" for c, t in CONTRACTS[TABLE].items())
    return spark.createDataFrame(rows, schema)


def verify(result: dict[str, Any], lake: Lake | None = None) -> None:
    """Files seen = ingested + skipped, every record read belongs to a file, a skipped file gave none;
    with ``lake``, the committed ``bad_files`` table holds exactly this run's bad files."""
    from clustermix.deltalog import num_records

    files = result["per_file"]
    if result["files_seen"] != result["files_ingested"] + result["files_skipped"]:
        raise AccountingError(f"ingest lost files: seen {result['files_seen']} but ingested "
                              f"{result['files_ingested']} + skipped {result['files_skipped']}")
    if sum(f["read"] for f in files.values()) != result["read"]:
        raise AccountingError(f"ingest read {result['read']} records but counted "
                              f"{sum(f['read'] for f in files.values())} in its files")
    leaked = [p for p, f in files.items() if f["status"] == "skipped" and f["read"]]
    if leaked:
        raise AccountingError(f"ingest read records from skipped file {leaked[0]}")
    if lake is not None:
        n_bad = result["files_skipped"] + result["files_partial"]
        if num_records(lake.table(TABLE), s3=lake.s3) != n_bad:
            raise AccountingError(f"the {TABLE} table does not hold this run's {n_bad} bad input files")


def bad_in(lake: Lake, paths: list[str]) -> dict[str, tuple[str, str]]:
    """The status and reason the ``bad_files`` table records for each of ``paths`` (as listed) that it
    holds (the refresh's ledger keeps them next to the files it took)."""
    from deltalake import DeltaTable

    from clustermix.deltalog import storage_options, version

    uri = lake.table(TABLE)
    if version(uri, s3=lake.s3) is None or not paths:
        return {}
    rows = DeltaTable(uri, storage_options=storage_options(uri, lake.s3)).to_pyarrow_table(
        columns=["source_file", "status", "reason"]).to_pylist()
    wanted = set(paths)
    return {listed_path(r["source_file"]): (r["status"], r["reason"]) for r in rows
            if listed_path(r["source_file"]) in wanted}
