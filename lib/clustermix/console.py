"""The console of a command: progress and the summary on the terminal, everything else in the run's log.

Spark's JVM, Py4J, Ray and the libraries below them write warnings, start-up chatter and, while
sessions close, tracebacks that say nothing about the run's outcome. :class:`RunLog` sends all of
it to ``runs/<run_id>/run.log`` under the lake (a local file first when the lake is remote, copied
there at the end): Python logging of every library (clustermix's own at DEBUG), and, at the file-descriptor level, the
output of child processes (the JVM, Ray's daemons) that inherit this process's stdout and stderr.
The console keeps clustermix's own progress lines, progress bars on a terminal, and the summary.
``--verbose`` turns all of this off: everything reaches the console as it comes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clustermix.storage import S3Settings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_active: list[RunLog] = []  # the RunLog routing this process's output, if any


def routed() -> bool:
    """Whether a :class:`RunLog` sends this process's engine output to a log file."""
    return bool(_active) and _active[-1]._file is not None


def engines_started() -> None:
    """Called once an engine is up: its loggers' own console handlers are sent to the log."""
    if _active:
        _active[-1].quiet_engines()


class _OwnRecords(logging.Filter):
    """On the console: clustermix's own records only. The engines' records are in the log; an error
    of theirs that ends the run reaches the user as the command's error line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "clustermix" or record.name.startswith("clustermix.")


class RunLog:
    """Route a command's output for its duration (a context manager)."""

    def __init__(self, log_uri: str | None, *, verbose: bool = False, quiet: bool = False,
                 s3: S3Settings | None = None) -> None:
        """``log_uri``: where the log ends up (a local path, or a URI copied to at the end); None: no
        log file, the console only (commands that run no stage). ``s3``: the object-store settings of
        a ``log_uri`` on ``s3://`` (the lake's)."""
        from clustermix import storage

        if log_uri is not None and storage.is_s3(log_uri):
            storage.require(log_uri, s3)  # now, not when the run is over
        self.log_uri, self.verbose, self.quiet, self.s3 = log_uri, verbose, quiet, s3
        self.local_path: Path | None = None
        self._saved: dict[int, int] = {}
        self._streams: tuple[IO[str], IO[str]] | None = None
        self._file: IO[str] | None = None

    @property
    def is_remote(self) -> bool:
        return self.log_uri is not None and "://" in self.log_uri and not self.log_uri.startswith("file://")

    def __enter__(self) -> RunLog:
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        # other libraries at INFO (their DEBUG, Py4J's above all, is every call they make); ours at DEBUG
        root.setLevel(logging.INFO)
        logging.getLogger("clustermix").setLevel(logging.DEBUG)
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        console.setLevel(logging.WARNING if self.quiet else logging.INFO)
        _active.append(self)
        if self.log_uri is None or self.verbose:
            root.addHandler(console)
            return self
        if self.is_remote:
            self.local_path = Path(tempfile.mkdtemp(prefix="clustermix-log-")) / "run.log"
        else:
            self.local_path = Path(str(self.log_uri).removeprefix("file://"))
        self.local_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.local_path.open("a", buffering=1)
        # native output of this process and of every child it starts from here on goes to the log; the
        # console keeps copies of the original descriptors for Python's own writes
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            self._saved[fd] = os.dup(fd)
            os.dup2(self._file.fileno(), fd)
        out = os.fdopen(os.dup(self._saved[1]), "w", buffering=1)
        err = os.fdopen(os.dup(self._saved[2]), "w", buffering=1)
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = out, err
        console.stream = err
        console.addFilter(_OwnRecords())
        root.addHandler(console)
        to_file = logging.StreamHandler(self._file)
        to_file.setFormatter(logging.Formatter(FORMAT))
        to_file.setLevel(logging.DEBUG)
        root.addHandler(to_file)
        logging.captureWarnings(True)  # library warnings are log records (py.warnings): in the file
        return self

    def quiet_engines(self) -> None:
        """Send the loggers Ray sets up with handlers of their own (console, propagate off) to ours."""
        if self.verbose or self._file is None:
            return
        for name in ("ray", "ray.data", "ray.train", "ray.tune", "py4j"):
            lg = logging.getLogger(name)
            for h in list(lg.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    lg.removeHandler(h)
            lg.propagate = True

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Restore the process's stdout and stderr; copy a remote lake's log to its place."""
        if self in _active:
            _active.remove(self)
        if self._streams is not None:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            sys.stdout, sys.stderr = self._streams
            self._streams = None
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._saved = {}
        root = logging.getLogger()
        for h in list(root.handlers):
            if getattr(h, "stream", None) is self._file:
                root.removeHandler(h)
        if self._file is not None:
            self._file.close()
            self._file = None
            if self.is_remote and self.local_path is not None:
                self._upload()

    def _upload(self) -> None:
        from clustermix.lake import open_fs

        assert self.log_uri is not None and self.local_path is not None
        try:
            filesystem, path = open_fs(self.log_uri, self.s3)
            with filesystem.open_output_stream(path) as fh:
                fh.write(self.local_path.read_bytes())
        except OSError as exc:  # the run's outcome stands; the log stays where it is
            logging.getLogger(__name__).warning("could not copy the log to %s (%s); it is at %s", self.log_uri,
                                                exc, self.local_path)
            self.log_uri = str(self.local_path)

    @property
    def where(self) -> str | None:
        """Where a reader finds the log (None when there is no log file)."""
        return self.log_uri if self.local_path is not None else None
