"""The curation report: its figures against the run's manifest and tables, a self-contained page,
and a real headless Chromium that renders it from disk.

The fast tests build a tiny lake with delta-rs (no Spark); the slow ones report on the shared
end-to-end pipeline run.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clustermix.errors import DataError
from clustermix.report import NO_SEARCH, build_report, list_runs, write_report
from clustermix.report_plots import AFTER, BEFORE

INSTALL_CHROMIUM = "apt-get update && apt-get install -y chromium"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- a tiny lake written with delta-rs --------------------------------------------------------

XSS_TEXT = '</td><script>alert("pwned")</script> a rare topic'
XSS_DOMAIN = "<img src=x onerror=alert(1)>"


def _write_tables(root: Path, **tables: Any) -> None:
    from deltalake import write_deltalake

    for name, table in tables.items():
        write_deltalake(str(root / name), table, mode="overwrite")


def _stats_table() -> Any:
    import pyarrow as pa

    return pa.table({
        "cluster_id": pa.array([0, 1], pa.int32()),
        "n_docs": pa.array([9, 1], pa.int64()),
        "n_tokens": pa.array([900, 100], pa.int64()),
        "quality_mean": pa.array([0.5, 0.9]),
        "quality_q10_50_90": pa.array([[0.2, 0.5, 0.8], [0.9, 0.9, 0.9]], pa.list_(pa.float64())),
        "n_with_quality": pa.array([9, 1], pa.int64()),
        "score_mean": pa.array([0.6, 1.0]),
        "domains": pa.array([[("news", 9)], [(XSS_DOMAIN, 1)]], pa.map_(pa.string(), pa.int64())),
        "exemplar_ids": pa.array([["d0", "d1"], ["rare"]], pa.list_(pa.string())),
        "share": pa.array([0.9, 0.1]),
        "token_share": pa.array([0.9, 0.1]),
        "below_threshold": pa.array([False, True]),
    })


def _manifest(run_id: str, outcome: str = "succeeded") -> dict[str, Any]:
    hist = {"0": 0, "1": 8, "2": 1, "3": 1}  # 8 + 2 + 3 = 13 draws over 10 docs
    return {
        "run_id": run_id, "clustermix_version": "0.1.0", "started_at": run_id, "finished_at": run_id,
        "lake_root": "", "outcome": outcome,
        "config": {"stats": {"min_share": 0.2}, "sample": {"clip": 3}, "blend": {"mode": "clusterclip"},
                   "note": "<b>not bold</b>"},
        "stages": {
            "stats": {"status": "ran", "seconds": 1.5, "counts": {}, "versions": {"cluster_stats": 0},
                      "inputs": {"docs": 0}},
            "sample": {"status": "ran", "seconds": 2.0, "versions": {"sample_plan": 0}, "inputs": {"cluster_stats": 0},
                       "counts": {"unit": "docs", "budget": 13, "clip": 3, "draws": 13, "shortfall": 0,
                                  "draws_per_cluster": {"0": 10, "1": 3}, "draws_per_doc_histogram": hist}},
            "blend": {"status": "ran", "seconds": 0.5, "versions": {"blended": 0}, "inputs": {"sample_plan": 0},
                      "counts": {"from": "sample_plan", "mode": "clusterclip",
                                 "draws_by_domain": {"news": {"draws": 10, "tokens": 1000},
                                                     XSS_DOMAIN: {"draws": 3, "tokens": 300}}}},
        },
        "tables": {"docs": 0, "cluster_stats": 0},
    }


@pytest.fixture
def tiny_lake(tmp_path) -> Path:
    import pyarrow as pa

    root = tmp_path / "lake"
    docs = pa.table({"id": [f"d{i}" for i in range(9)] + ["rare"],
                     "text": [f"ordinary news story {i}" for i in range(9)] + [XSS_TEXT]})
    _write_tables(root, docs=docs, cluster_stats=_stats_table())
    for rid, outcome in (("20260101T000000Z-aaaaaa", "succeeded"), ("20260102T000000Z-bbbbbb", "failed")):
        (root / "runs" / rid).mkdir(parents=True)
        (root / "runs" / rid / "manifest.json").write_text(json.dumps(_manifest(rid, outcome)))
    return root


def test_text_from_data_is_escaped(tiny_lake):
    _, html_uri = write_report(str(tiny_lake), "20260101T000000Z-aaaaaa")
    page = Path(html_uri).read_text()
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in page  # the exemplar, shown as text
    assert "&lt;img src=x onerror=alert(1)&gt;" in page  # a domain name
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page  # a config value
    assert "<script" not in page.lower() and "<img src=x" not in page and "<b>not bold" not in page


def test_below_threshold_cluster_gets_exemplars_and_advice(tiny_lake):
    rep = build_report(str(tiny_lake), "20260101T000000Z-aaaaaa")
    assert rep["under_represented"]["below_threshold"] == [1]
    rare = rep["clusters"]["rows"][1]
    assert rare["exemplars"] == [{"id": "rare", "snippet": XSS_TEXT}]
    # every cluster's first exemplar is looked up, and only those: d1 is cluster 0's second
    assert [x["id"] for x in rep["clusters"]["rows"][0]["exemplars"]] == ["d0"]
    assert rare["at_clip"] and rep["under_represented"]["at_clip"] == [1]  # 3 draws = clip 3 x 1 doc
    _, html_uri = write_report(str(tiny_lake), "20260101T000000Z-aaaaaa")
    assert "Source more data for these 1 cluster(s)" in Path(html_uri).read_text()


def test_newest_run_is_the_default_and_unknown_runs_fail(tiny_lake):
    rep = build_report(str(tiny_lake))
    assert rep["run"]["run_id"] == "20260102T000000Z-bbbbbb"
    assert any("'failed'" in n for n in rep["notes"])
    with pytest.raises(DataError, match="no readable manifest for run 'nope'"):
        build_report(str(tiny_lake), "nope")
    with pytest.raises(DataError, match="no runs under"):
        build_report(str(tiny_lake / "empty"))


def test_list_runs(tiny_lake):
    before = list_runs(str(tiny_lake))
    assert [(r["run_id"], r["outcome"], r["has_report"]) for r in before] == [
        ("20260101T000000Z-aaaaaa", "succeeded", False), ("20260102T000000Z-bbbbbb", "failed", False)]
    assert before[0]["started_at"] == "20260101T000000Z-aaaaaa" and before[0]["blended_version"] is None
    write_report(str(tiny_lake), "20260101T000000Z-aaaaaa")
    assert [r["has_report"] for r in list_runs(str(tiny_lake))] == [True, False]


def test_search_progress_from_a_mixtures_table(tiny_lake):
    import pyarrow as pa

    rep = build_report(str(tiny_lake), "20260101T000000Z-aaaaaa")
    assert rep["search"] == {"ran": False, "note": NO_SEARCH}
    _write_tables(tiny_lake, mixtures=pa.table({"iteration": [1, 1, 1, 2, 2, 3],
                                                "score": [0.1, 0.3, 0.2, 0.4, 0.2, 0.5]}))
    json_uri, _ = write_report(str(tiny_lake), "20260101T000000Z-aaaaaa")
    rep = json.loads(Path(json_uri).read_text())
    assert rep["search"]["ran"] and rep["search"]["mixtures"] == 6 and rep["search"]["best_score"] == 0.5
    assert [(i["iteration"], i["mixtures"], i["best"]) for i in rep["search"]["iterations"]] == [
        (1, 3, 0.3), (2, 2, 0.4), (3, 1, 0.5)]
    assert rep["search"]["iterations"][0]["mean"] == pytest.approx(0.2)
    assert "search" in rep["figures"]


def test_draws_histogram_from_the_plan_when_the_manifest_lacks_it(tiny_lake):
    import pyarrow as pa

    # d0 drawn 3 times, d1..d8 once, rare twice, d9 never: the plan's draw column alone says so
    ids = ["d0"] * 3 + [f"d{i}" for i in range(1, 9)] + ["rare"] * 2
    draws = [0, 1, 2] + [0] * 8 + [0, 1]
    _write_tables(tiny_lake, sample_plan=pa.table({"id": ids, "draw": pa.array(draws, pa.int32())}))
    rid = "20260101T000000Z-aaaaaa"
    m = _manifest(rid)
    del m["stages"]["sample"]["counts"]["draws_per_doc_histogram"]
    (tiny_lake / "runs" / rid / "manifest.json").write_text(json.dumps(m))
    sample = build_report(str(tiny_lake), rid)["sample"]
    assert sample["draws_per_doc_histogram"] == {"0": -3, "1": 9, "2": 1, "3": 1} or sample["histogram_from"]
    # n_docs in cluster_stats is 10: 10 - 13 docs drawn? no: 10 docs, 10 drawn at least once
    assert sample["draws_per_doc_histogram"] == {"0": 0, "1": 8, "2": 1, "3": 1}
    assert sample["histogram_from"].startswith("sample_plan") and sample["max_draws_per_doc"] == 3
