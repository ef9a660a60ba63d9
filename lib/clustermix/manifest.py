"""The run manifest: ``<lake.root>/runs/<run_id>/manifest.json``, rewritten atomically after every stage."""

from __future__ import annotations

import json
from typing import Any


def write_json(uri: str, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``uri`` (local path or object-store URI) via a temporary file and a move."""
    from clustermix.lake import open_fs

    body = json.dumps(doc, indent=2, sort_keys=False, default=str).encode()
    filesystem, path = open_fs(uri)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = path + ".tmp"
    with filesystem.open_output_stream(tmp) as fh:
        fh.write(body)
    filesystem.move(tmp, path)


def read_json(uri: str) -> dict[str, Any]:
    from clustermix.lake import open_fs

    filesystem, path = open_fs(uri)
    with filesystem.open_input_stream(path) as fh:
        return json.loads(fh.read().decode())
