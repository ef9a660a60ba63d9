"""The run manifest: ``<lake.root>/runs/<run_id>/manifest.json``, rewritten atomically after every stage."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clustermix.storage import S3Settings


def write_json(uri: str, doc: dict[str, Any], *, s3: S3Settings | None = None) -> None:
    """Write ``doc`` to ``uri`` (local path or object-store URI: ``s3`` its settings), atomically."""
    from clustermix.lake import write_atomic

    write_atomic(uri, json.dumps(doc, indent=2, sort_keys=False, default=str).encode(), s3=s3)


def read_json(uri: str, *, s3: S3Settings | None = None) -> dict[str, Any]:
    from clustermix.lake import open_fs

    filesystem, path = open_fs(uri, s3)
    with filesystem.open_input_stream(path) as fh:
        return json.loads(fh.read().decode())
