"""One run at a time per lake: the lock every run takes before it writes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from clustermix.lake import Lake


class LakeLock:
    """One run at a time per lake; a lock older than ``stale_seconds``, or whose process is gone
    (same host), is taken over.

    A local lake's lock is a file created with O_EXCL; an ``s3://`` lake's is the object
    ``<root>/_lock.json`` created with an S3 conditional write (``If-None-Match: *``) and taken over
    with ``If-Match`` on the stale lock's ETag, so two runs racing for it cannot both win. On S3 this
    is what makes Delta commits safe: delta-spark's S3 LogStore is safe within one driver only.
    Taking the lock is also the run's first request to the object store: a wrong bucket or missing
    credentials fail there, at once, as a :class:`~clustermix.errors.StorageError`. Other object
    stores (gs://, abfs://) get no lock."""

    def __init__(self, lake: Lake, run_id: str, stale_seconds: int) -> None:
        from clustermix import storage

        self.uri = f"{lake.root}/_lock.json"
        self.path = Path(lake.root) / "_lock.json" if lake.is_local else None
        self.remote = storage.is_s3(lake.root)
        self.s3 = storage.require(lake.root, lake.s3) if self.remote else None  # the lake's, never a default
        self.run_id, self.stale_seconds = run_id, stale_seconds
        self.enabled = lake.is_local or self.remote

    def _stale(self, info: dict[str, Any]) -> bool:
        import socket
        import time

        if time.time() - float(info.get("time", 0)) > self.stale_seconds:
            return True
        if info.get("host") == socket.gethostname():
            try:
                os.kill(int(info.get("pid", -1)), 0)
            except (OSError, ValueError):
                return True
        return False

    def _body(self) -> dict[str, Any]:
        import socket
        import time

        return {"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}

    def _busy(self, info: dict[str, Any]) -> Exception:
        from clustermix.errors import LakeBusyError

        return LakeBusyError(
            f"lake {self.uri.rsplit('/', 1)[0]} is in use by run {info.get('run_id')} (pid {info.get('pid')} on "
            f"{info.get('host')}); wait for it, or remove {self.uri} if that run is dead"
        )

    def acquire(self) -> None:
        from clustermix.errors import LakeBusyError

        if not self.enabled:
            return
        if self.remote:
            self._acquire_s3()
            return
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps(self._body())
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    info = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    info = {}
                if self._stale(info):
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._busy(info) from None
            with os.fdopen(fd, "w") as fh:
                fh.write(body)
            return
        raise LakeBusyError(f"could not take the lock {self.path}")

    def _acquire_s3(self) -> None:
        from clustermix import storage
        from clustermix.errors import LakeBusyError

        for _ in range(3):
            if storage.put_json_if(self.uri, self._body(), s3=self.s3, absent=True):
                return
            held = storage.read_json_object(self.uri, s3=self.s3)
            if held is None:
                continue  # released between our two requests: try again
            info, etag = held
            if not self._stale(info):
                raise self._busy(info)
            # replace the stale lock only if it is still the one we judged stale
            if storage.put_json_if(self.uri, self._body(), s3=self.s3, etag=etag):
                return
        raise LakeBusyError(f"could not take the lock {self.uri}: other runs keep taking it")

    def release(self) -> None:
        if not self.enabled:
            return
        if self.remote:
            from clustermix import storage
            from clustermix.errors import StorageError

            try:
                held = storage.read_json_object(self.uri, s3=self.s3)
                if held is not None and held[0].get("run_id") == self.run_id:
                    storage.delete_object(self.uri, s3=self.s3)
            except (StorageError, OSError):
                pass  # a lock left behind is taken over once stale
            return
        assert self.path is not None
        try:
            if json.loads(self.path.read_text()).get("run_id") == self.run_id:
                self.path.unlink()
        except (OSError, ValueError):
            pass


