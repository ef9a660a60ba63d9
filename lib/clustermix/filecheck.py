"""One input file, checked on its own terms before Spark reads it: pure pyarrow and the standard library.

A file is *bad* when it is not the format it claims, cannot be read at all, is a compressed stream cut
short (an interrupted upload) or a broken one, or has columns that do not fit the input contract. Each
kind has its own reason (:data:`REASONS`). The checks cost what they must and no more: a Parquet file
is judged by its magic bytes and footer (a few KiB, whatever its size), a plain JSON lines file by its
first bytes, and a gzip or bzip2 file by one streaming decompression in bounded memory (its
integrity cannot be known otherwise). A compressed file cut short keeps its complete records: they are
decompressed once more, up to the last newline before the cut, into a staging file that is read in
its place. :mod:`clustermix.badfiles` runs these checks as Spark tasks and decides what a bad file does
to the run.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import pyarrow as pa

    from clustermix.config import InputConfig
    from clustermix.storage import S3Settings

# file-level reasons, each with its own remedy
REASONS = (
    "unreadable",  # cannot be opened or read (permission denied, gone, an I/O error)
    "wrong_format",  # not the format it claims (a .parquet that is not Parquet, gzip data in a .jsonl)
    "truncated",  # a compressed stream or a Parquet file cut short
    "corrupt",  # the format it claims, but broken inside (bad compressed data, an unreadable footer)
    "missing_text_column",  # a columnar file without the text column
    "unsafe_type",  # a contract column of a type that cannot be read as the contract's type without guessing
)
CODECS = {".gz": "gzip", ".bz2": "bzip2"}  # what Hadoop decompresses by suffix and Python can check
MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"PAR1": "Parquet", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}
CHUNK = 1 << 20  # compressed bytes read at a time
OUT = 4 << 20  # decompressed bytes produced at a time: the memory bound, whatever the compression ratio
TRACE_CHARS = 8000


@dataclass(frozen=True)
class Verdict:
    """What checking one file found. ``reason`` None: good. ``staged``: the staging file that holds the
    complete records of a truncated file; ``kept_lines``: how many lines that is."""

    path: str
    size: int
    reason: str | None = None
    detail: str = ""
    trace: str | None = None
    casts: tuple[str, ...] = ()
    schema: str | None = None  # a columnar file's columns and types: files alike are read together
    kept_lines: int = 0
    staged: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """``ingested`` (whole), ``partial`` (the complete records before a cut) or ``skipped``."""
        if self.reason is None:
            return "ingested"
        return "partial" if self.reason == "truncated" and self.extra.get("keeps_prefix") else "skipped"


class _Bad(Exception):
    def __init__(self, reason: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.extra = reason, detail, extra


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def codec_of(path: str) -> str | None:
    """The compression Hadoop applies to ``path`` by its suffix, when this module can check it."""
    return next((c for suffix, c in CODECS.items() if path.lower().endswith(suffix)), None)


def check_file(filesystem: Any, path: str, size: int, fmt: str, icfg: InputConfig | None,
               stage_to: Callable[[str], str] | None = None, *, s3: S3Settings | None = None) -> Verdict:
    """Check one file of an input in format ``fmt`` (``jsonl``, or ``parquet`` also for a Delta table's
    data files, with ``icfg`` None: no contract check). ``stage_to(path)``, when given, names the staging
    file into which a truncated compressed file's complete records are written (``s3``: the settings of
    that staging folder when it is on ``s3://``). Never raises: whatever goes wrong is the verdict, with
    the trace kept for the run's log."""
    try:
        if fmt == "jsonl":
            codec = codec_of(path)
            if codec is None:
                return _check_text(filesystem, path, size)
            return _check_compressed(filesystem, path, size, codec, stage_to, s3)
        return _check_parquet(filesystem, path, size, icfg)
    except _Bad as bad:
        return Verdict(path, size, bad.reason, bad.detail, extra=bad.extra)
    except PermissionError as exc:
        return Verdict(path, size, "unreadable", f"permission denied: {_first_line(exc)}", _trace())
    except FileNotFoundError as exc:
        return Verdict(path, size, "unreadable", f"gone since it was listed: {_first_line(exc)}", _trace())
    except Exception as exc:  # an I/O error, or a reader's own failure: the file cannot be read
        return Verdict(path, size, "unreadable", f"{type(exc).__name__}: {_first_line(exc)}", _trace())


def _trace() -> str:
    return traceback.format_exc()[-TRACE_CHARS:]


def _check_text(filesystem: Any, path: str, size: int) -> Verdict:
    """A plain JSON lines file: readable, and not a binary format under a text name."""
    with filesystem.open_input_stream(path, compression=None) as fh:
        head = fh.read(8)
    for magic, name in MAGIC.items():
        if head.startswith(magic):
            raise _Bad("wrong_format", f"{name} data in a file read as plain JSON lines (its name has no "
                       f"{'.gz' if name == 'gzip' else '.bz2' if name == 'bzip2' else 'matching'} suffix)")
    return Verdict(path, size)


# --- compressed JSON lines -------------------------------------------------------------------------


class _Cut(Exception):
    """The compressed stream ends before its end-of-stream marker."""


def _decompressor(codec: str) -> Any:
    import bz2
    import zlib

    return zlib.decompressobj(wbits=31) if codec == "gzip" else bz2.BZ2Decompressor()


def inflate(read: Callable[[int], bytes], codec: str) -> Iterator[bytes]:
    """Decompressed bytes of a gzip or bzip2 stream (members one after another, as Hadoop reads them),
    ``OUT`` bytes at most at a time; raises :class:`_Cut` where the stream ends early and ``_Bad``
    (``corrupt``, ``wrong_format``) on data that is not a valid stream. ``read``'s own errors (I/O)
    propagate unchanged."""
    magic = b"\x1f\x8b" if codec == "gzip" else b"BZh"
    pending, members = read(CHUNK), 0
    while True:
        if members:  # between members: zero padding is tolerated, anything else must start a member
            pending = pending.lstrip(b"\x00")
            while not pending:
                more = read(CHUNK)
                if not more:
                    return
                pending = more.lstrip(b"\x00")
            if len(pending) < len(magic):
                pending += read(CHUNK)
            if not pending.startswith(magic):
                raise _Bad("corrupt", f"data that is not {codec} after the end of its compressed stream")
        elif not pending:
            raise _Cut
        elif not pending.startswith(magic[:2]):
            raise _Bad("wrong_format", f"not {codec} data (its first bytes are {pending[:4]!r})")
        d, members = _decompressor(codec), members + 1
        while not d.eof:
            if (codec == "gzip" or d.needs_input) and not pending:
                pending = read(CHUNK)
                if not pending:
                    raise _Cut
            out, pending = _feed(d, codec, pending)
            if out:
                yield out
        pending = d.unused_data + pending


def _feed(d: Any, codec: str, data: bytes) -> tuple[bytes, bytes]:
    """Up to ``OUT`` decompressed bytes from ``data`` (and what ``d`` holds), and the input left over."""
    import zlib

    try:
        if codec == "gzip":
            return d.decompress(data, OUT), d.unconsumed_tail
        # bzip2 keeps unconsumed input inside: feed nothing new until it asks for more
        return d.decompress(data if d.needs_input else b"", OUT), b""
    except (zlib.error, OSError, EOFError, ValueError) as exc:
        raise _Bad("corrupt", f"bad {codec} data: {_first_line(exc)}") from None


def _check_compressed(filesystem: Any, path: str, size: int, codec: str,
                      stage_to: Callable[[str], str] | None, s3: S3Settings | None = None) -> Verdict:
    """Decompress the whole stream once (bounded memory); if it is cut short, find the end of its last
    complete line and, when ``stage_to`` is given, write everything up to it into a staging file."""
    total = last_nl = lines = 0
    with filesystem.open_input_stream(path, compression=None) as fh:
        try:
            for out in inflate(fh.read, codec):
                nl = out.rfind(b"\n")
                if nl >= 0:
                    last_nl, lines = total + nl + 1, lines + out.count(b"\n")
                total += len(out)
            return Verdict(path, size)
        except _Cut:
            pass
    if size == 0:
        detail = f"an empty {codec} file: no records"
    else:
        detail = (f"{codec} stream cut short after {size:,} bytes ({total:,} decompressed): {lines:,} complete "
                  "lines before the cut")
        if total > last_nl:
            detail += f"; the partial line after them ({total - last_nl:,} bytes) is not a record"
    staged = None
    if stage_to is not None and last_nl:
        staged = stage_to(path)
        _stage_prefix(filesystem, path, codec, last_nl, staged, s3)
    extra = {"keeps_prefix": stage_to is not None, "decompressed_bytes": total, "kept_bytes": last_nl}
    return Verdict(path, size, "truncated", detail, kept_lines=lines, staged=staged, extra=extra)


def _stage_prefix(filesystem: Any, path: str, codec: str, n_bytes: int, staged: str,
                  s3: S3Settings | None = None) -> None:
    """Write the first ``n_bytes`` decompressed bytes of ``path`` (its complete lines) to ``staged``."""
    from clustermix.lake import open_fs

    out_fs, out_path = open_fs(staged, s3)
    out_fs.create_dir(out_path.rsplit("/", 1)[0], recursive=True)
    left = n_bytes
    with filesystem.open_input_stream(path, compression=None) as fh, \
            out_fs.open_output_stream(out_path, compression=None) as out:
        for chunk in inflate(fh.read, codec):
            out.write(chunk[:left])
            left -= min(left, len(chunk))
            if not left:
                return


# --- Parquet ---------------------------------------------------------------------------------------


def _check_parquet(filesystem: Any, path: str, size: int, icfg: InputConfig | None) -> Verdict:
    """Magic bytes at both ends and a readable footer; then (with ``icfg``) the contract's columns."""
    import pyarrow.parquet as pq

    with filesystem.open_input_file(path) as fh:
        head = fh.read_at(4, 0) if size >= 4 else b""
        if head != b"PAR1":
            found = next((n for m, n in MAGIC.items() if head.startswith(m)), None)
            raise _Bad("wrong_format", "not Parquet: " + (f"{found} data" if found else
                       "empty" if size == 0 else "it does not start with the Parquet magic bytes (PAR1)"))
        if size < 12 or fh.read_at(4, size - 4) != b"PAR1":
            raise _Bad("truncated", "a Parquet file cut short: its footer (which says where every column is) "
                       f"is missing after {size:,} bytes, so none of its rows can be read")
        try:
            pf = pq.ParquetFile(fh)
            schema, rows = pf.schema_arrow, pf.metadata.num_rows
        except Exception as exc:
            raise _Bad("corrupt", f"its Parquet footer cannot be decoded: {_first_line(exc)}") from None
    casts: tuple[str, ...] = ()
    if icfg is not None:
        casts = check_columns(schema, icfg)
    key = ", ".join(f"{f.name}: {f.type}" for f in sorted(schema, key=lambda f: f.name))
    return Verdict(path, size, casts=casts, schema=key, extra={"rows": rows})


def _roles(icfg: InputConfig) -> list[tuple[str, str | None, str]]:
    """(role, column, the type a record needs) for every column the contract reads."""
    return [("text", icfg.text_field, "string"), ("id", icfg.id_field, "string"),
            ("domain", icfg.domain_field, "string"), ("lang", icfg.lang_field, "string"),
            ("quality", icfg.quality_field, "double")]


def check_columns(schema: pa.Schema, icfg: InputConfig) -> tuple[str, ...]:
    """The safe casts a columnar file needs to fit the contract; raises ``_Bad`` for a missing text
    column or a type that cannot be cast without guessing.

    Safe: any integer to a string id, domain or lang (``7`` is ``"7"``); an integer, decimal or float32
    quality to double; a binary text column read as UTF-8 (each record's bytes still checked). Unsafe:
    text that is not text, a float or nested id (is ``1.0`` the id ``"1"``?), a quality that is not a
    number."""
    import pyarrow as pa

    names = schema.names
    if icfg.text_field not in names:
        raise _Bad("missing_text_column", f"no column {icfg.text_field!r} (input.text_field); its columns: "
                   f"{sorted(names)[:20]}")
    casts = []
    for role, column, target in _roles(icfg):
        if column is None or column not in names:
            continue
        t = schema.field(column).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        cast = _cast(t, role, target)
        if cast is False:
            allowed = ("a string or binary" if role == "text" else "a string or integer" if target == "string"
                       else "a number")
            raise _Bad("unsafe_type", f"column {column!r} ({role}) is {t}, which cannot be read as {target} "
                       f"without guessing; it must be {allowed} column")
        if cast:
            casts.append(f"{column}: {t} -> {target}" + (" (UTF-8 checked per record)" if role == "text" else ""))
    return tuple(casts)


def _cast(t: pa.DataType, role: str, target: str) -> str | bool | None:
    """None: no cast needed; a string: the safe cast's name; False: no safe cast."""
    import pyarrow as pa

    is_str = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    if pa.types.is_null(t) or (target == "string" and is_str) or (target == "double" and pa.types.is_float64(t)):
        return None
    if target == "string":
        if role == "text":
            return "binary" if pa.types.is_binary(t) or pa.types.is_large_binary(t) else False
        integral = pa.types.is_integer(t) or (pa.types.is_decimal(t) and t.scale == 0)
        return "integer" if integral else False
    numeric = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
    return "number" if numeric else False
