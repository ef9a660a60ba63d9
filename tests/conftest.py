"""Shared fixtures: one real local Spark (with Delta) and one real local Ray per test session."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# fault-injection points (clustermix.faults) are armed through files here; set before Ray starts,
# so every Ray worker and every subprocess of the suite inherits it
os.environ.setdefault("CLUSTERMIX_FAULT_DIR", tempfile.mkdtemp(prefix="clustermix-faults-"))

from clustermix.config import build_config

ROOT = Path(__file__).resolve().parents[1]


def make_config(lake_root: Path, input_path: str, **sections: dict[str, Any]) -> Any:
    """A small, fast config for tests: few shuffle partitions, tiny k and budget."""
    tree: dict[str, Any] = {
        "lake": {"root": str(lake_root)},
        "spark": {"master": "local[2]", "shuffle_partitions": 2, "driver_memory": "2g"},
        "ray": {"num_cpus": 2},
        "input": {"path": input_path, "format": "jsonl"},
        "embed": {"device": "cpu", "batch_size": 32, "torch_threads": 1, "cpus_per_actor": 1},
        "cluster": {"k": 4, "niter": 20, "num_shards": 2, "cpus_per_shard": 0.25},
        "sample": {"budget": 150, "clip": 3, "order": "g2s"},
        # on by default in the product; off here, as k and the budget are small here: it adds a few
        # Spark jobs to every ingest. tests/test_neardup.py and the shared pipeline run turn it on.
        "dedup": {"near": {"enabled": False}},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return build_config(tree)


@pytest.fixture(scope="session")
def spark():
    from clustermix.runtime import spark_session

    cfg = make_config(Path("/tmp/unused"), "builtin://bbc")
    session = spark_session(cfg)
    yield session
    session.stop()


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from clustermix.runtime import ray_init

    ray_init(make_config(Path("/tmp/unused"), "builtin://bbc"))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def bbc_slice(tmp_path_factory) -> Path:
    """A small real slice of the default corpus (unbalanced by topic) as JSONL."""
    from clustermix.corpus import iter_records

    take = {"business": 30, "sports": 24, "politics": 8, "tech": 5, "entertainment": 3}
    seen: dict[str, int] = {}
    out = tmp_path_factory.mktemp("corpus") / "bbc_slice.jsonl"
    with out.open("w") as fh:
        for rec in iter_records("bbc"):
            d = str(rec["domain"])
            if seen.get(d, 0) < take[d]:
                seen[d] = seen.get(d, 0) + 1
                fh.write(json.dumps(rec) + "\n")
    return out


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, spark, ray_local, bbc_slice):
    """One whole pipeline run on the BBC slice, shared by the tests that inspect its output."""
    from clustermix.pipeline import run_stages

    root = tmp_path_factory.mktemp("lake")
    cfg = make_config(root, str(bbc_slice), dedup={"near": {"enabled": True}})
    run = run_stages(cfg, spark=spark)
    return cfg, run
