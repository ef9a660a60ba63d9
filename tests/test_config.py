"""Config: unknown keys, wrong types and impossible values fail up front, naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clustermix.config import build_config, load_config, parse_override
from clustermix.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "conf" / "local.yaml"


def test_local_config_loads_with_defaults():
    cfg = load_config(LOCAL)
    assert cfg.cluster.k == 20
    assert cfg.stats.min_share == pytest.approx(0.007)
    assert cfg.embed.model == "all-MiniLM-L6-v2"


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("cluster.kk=3", "cluster.kk", "unknown key"),
        ("nonsense.a=1", "nonsense", "unknown key"),
        ("cluster.k=0", "cluster.k", "greater than or equal to 1"),
        ("cluster.k=ten", "cluster.k", "integer"),
        ("sample.clip=0", "sample.clip", "greater than or equal to 1"),
        ("sample.budget=0", "sample.budget", "greater than 0"),
        ("sample.budget=-5", "sample.budget", "greater than 0"),
        ("sample.order=sideways", "sample.order", "random"),
        ("blend.mode=magic", "blend.mode", "clusterclip"),
        ("input.path=/no/such/corpus", "input.path", "does not exist"),
        ("input.format=csv", "input.format", "jsonl"),
        ("embed.model=/no/such/model", "embed.model", "neither a packaged model"),
        ("blend.mode=proportional", "blend", "domain_weights"),
        ("blend.mode=mixture", "blend.mixture_path", "mixture file"),
        ("stats.min_share=2", "stats.min_share", "less than or equal to 1"),
    ],
)
def test_bad_values_name_the_key(override, key, fragment):
    from clustermix.pipeline import check_paths

    with pytest.raises(ConfigError) as err:
        check_paths(load_config(LOCAL, [override]))  # types and values; then paths, as the CLI does
    assert err.value.key == key
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_override_values_are_parsed_as_yaml_scalars():
    assert parse_override("cluster.k=7") == ("cluster.k", 7)
    assert parse_override("input.path=a=b") == ("input.path", "a=b")
    assert parse_override("blend.domain_weights={tech: 2}") == ("blend.domain_weights", {"tech": 2})
    with pytest.raises(ConfigError):
        parse_override("cluster.k")


def test_yaml_is_parsed_safely(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("sample: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "not valid YAML" in str(err.value)


def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path):
    lake = tmp_path / "lake"
    proc = subprocess.run(
        [sys.executable, "-m", "clustermix.cli", "run", "--set", f"lake.root={lake}", "--set", "cluster.k=0"],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln]
    assert lines == ["clustermix: config error: cluster.k=0: Input should be greater than or equal to 1"]
    assert not lake.exists()


def test_help_is_fast_and_lists_every_stage():
    proc = subprocess.run([sys.executable, "-m", "clustermix.cli", "--help"], check=False, capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0
    for stage in ("run", "ingest", "embed", "cluster", "stats", "sample", "blend"):
        assert stage in proc.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, clustermix.cli as c; c.build_parser(); "
         "print(sorted(m for m in ('pyspark','ray','torch','faiss') if m in sys.modules))"],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert probe.stdout.strip() == "[]"


def test_blend_fingerprint_ignores_the_join_strategy_but_not_the_mix() -> None:
    from clustermix.registry import config_hash

    def cfg(**blend: object):
        return build_config({"input": {"path": "builtin://bbc"}, "sample": {"budget": 10}, "blend": blend})

    base = config_hash(cfg(), "blend")
    assert config_hash(cfg(broadcast_max_rows=0), "blend") == base
    assert config_hash(cfg(mode="quality"), "blend") != base
    assert config_hash(cfg(target_rows_per_file=10), "blend") != base


def test_local_cores_reads_the_local_master() -> None:
    import os

    from clustermix.runtime import local_cores

    assert local_cores("local") == 1
    assert local_cores("local[2]") == 2
    assert local_cores("local[4, 3]") == 4  # local[N, maxFailures]
    assert local_cores("local[*]") == (os.cpu_count() or 1)
    for master in (None, "yarn", "spark://host:7077", "k8s://https://api:6443", "local-cluster[2,1,1024]"):
        assert local_cores(master) is None
