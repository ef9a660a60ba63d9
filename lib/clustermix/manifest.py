"""The run manifest: ``<lake.root>/runs/<run_id>/manifest.json``, rewritten atomically after every stage."""

from __future__ import annotations

import json
from typing import Any


def write_json(uri: str, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``uri`` (local path or object-store URI), atomically."""
    from clustermix.lake import write_atomic

    write_atomic(uri, json.dumps(doc, indent=2, sort_keys=False, default=str).encode())


def read_json(uri: str) -> dict[str, Any]:
    from clustermix.lake import open_fs

    filesystem, path = open_fs(uri)
    with filesystem.open_input_stream(path) as fh:
        return json.loads(fh.read().decode())
