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


def _iso(run_id: str) -> str:
    """The start time a run id begins with, as the manifest writes it."""
    from datetime import datetime, timezone

    return datetime.strptime(run_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).isoformat()


def _manifest(run_id: str, outcome: str = "succeeded") -> dict[str, Any]:
    hist = {"0": 0, "1": 8, "2": 1, "3": 1}  # 8 + 2 + 3 = 13 draws over 10 docs
    return {
        "run_id": run_id, "clustermix_version": "0.1.0", "started_at": _iso(run_id), "finished_at": _iso(run_id),
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
    from clustermix.lake import Lake
    from clustermix.runs import record_run

    for rid, outcome in (("20260101T000000Z-aaaaaa", "succeeded"), ("20260102T000000Z-bbbbbb", "failed")):
        (root / "runs" / rid).mkdir(parents=True)
        (root / "runs" / rid / "manifest.json").write_text(json.dumps(_manifest(rid, outcome)))
        record_run(Lake(str(root)), _manifest(rid, outcome))  # as the runner does when a run ends
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
    json_uri, html_uri = write_report(str(tiny_lake), "20260101T000000Z-aaaaaa")
    assert "Source more data for these 1 cluster(s)" in Path(html_uri).read_text()
    written = json.loads(Path(json_uri).read_text())
    assert written["quality"] == {"available": True, "clusters_with_quality": 2, "docs_with_quality": 10}
    assert {"quality", "cluster_sizes", "draws_per_doc"} <= set(written["figures"])


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
    assert before[0]["started_at"] == "2026-01-01T00:00:00+00:00" and before[0]["blended_version"] is None
    assert before[0]["mode"] == "run"
    write_report(str(tiny_lake), "20260101T000000Z-aaaaaa")
    assert [r["has_report"] for r in list_runs(str(tiny_lake))] == [True, False]


def test_search_progress_from_a_mixtures_table(tiny_lake):
    import pyarrow as pa

    rep = build_report(str(tiny_lake), "20260101T000000Z-aaaaaa")
    assert rep["search"] == {"ran": False, "note": NO_SEARCH}
    _write_tables(tiny_lake, mixtures=pa.table({"iteration": [1, 1, 1, 2, 2, 3],
                                                "proxy_score": [0.1, 0.3, 0.2, 0.4, 0.2, 0.5]}))
    json_uri, _ = write_report(str(tiny_lake), "20260101T000000Z-aaaaaa")
    rep = json.loads(Path(json_uri).read_text())
    assert rep["search"]["ran"] and rep["search"]["mixtures"] == 6 and rep["search"]["best_score"] == 0.1
    assert [(i["iteration"], i["mixtures"], i["best"]) for i in rep["search"]["iterations"]] == [
        (1, 3, 0.1), (2, 2, 0.2), (3, 1, 0.5)]
    assert rep["search"]["iterations"][0]["mean"] == pytest.approx(0.2)
    assert "search" in rep["figures"]


def test_draws_histogram_from_the_plan_when_the_manifest_lacks_it(tiny_lake):
    import pyarrow as pa

    # d0 drawn 3 times, d1..d7 once, rare twice, d8 never: the plan's draw column alone says so
    ids = ["d0"] * 3 + [f"d{i}" for i in range(1, 8)] + ["rare"] * 2
    draws = [0, 1, 2] + [0] * 7 + [0, 1]
    _write_tables(tiny_lake, sample_plan=pa.table({"id": ids, "draw": pa.array(draws, pa.int32())}))
    rid = "20260101T000000Z-aaaaaa"
    m = _manifest(rid)
    del m["stages"]["sample"]["counts"]["draws_per_doc_histogram"]
    (tiny_lake / "runs" / rid / "manifest.json").write_text(json.dumps(m))
    rep = build_report(str(tiny_lake), rid)
    assert rep["sample"]["draws_per_doc_histogram"] == {"0": 1, "1": 7, "2": 1, "3": 1}
    assert rep["sample"]["histogram_from"].startswith("sample_plan") and rep["sample"]["max_draws_per_doc"] == 3
    assert any("draws per document" in n for n in rep["notes"])


def _cells(column: str, rows: list[tuple[int, str, int]]) -> Any:
    import pyarrow as pa

    return pa.table({"cluster_id": pa.array([r[0] for r in rows], pa.int32()),
                     "group_column": [column] * len(rows), "group": [r[1] for r in rows],
                     "n_docs": pa.array([r[2] for r in rows], pa.int64()),
                     "n_tokens": pa.array([100 * r[2] for r in rows], pa.int64())})


def test_levels_name_every_group_that_lost_share(tiny_lake):
    # cluster mode, groups = domains: the group level's draws are the blend's, exact
    rid = "20260101T000000Z-aaaaaa"
    _write_tables(tiny_lake, cell_stats=_cells("domain", [(0, "news", 9), (1, XSS_DOMAIN, 1)]))
    rep = build_report(str(tiny_lake), rid)
    lv = rep["levels"]
    assert lv["available"] and lv["balance"] == "clusters" and lv["group_column"] == "domain"
    assert lv["groups"]["draws_from"] == "the blended table (exact)"
    news = lv["groups"]["rows"][0]
    assert (news["name"], news["docs"], news["draws"]) == ("news", 9, 10)
    assert news["share_before"] == pytest.approx(0.9) and news["share_after"] == pytest.approx(10 / 13)
    assert lv["groups"]["lost_share"] == ["news"] and lv["clusters"]["lost_share"] == [0]
    _, html_uri = write_report(str(tiny_lake), rid)
    page = Path(html_uri).read_text()
    assert "1 of 2 group(s) lost share:</b> news." in page and "Level 2: clusters" in page


def test_levels_in_two_level_mode_come_from_the_allocation(tiny_lake):
    rid = "20260101T000000Z-aaaaaa"
    _write_tables(tiny_lake, cell_stats=_cells("lang", [(0, "en", 5), (0, "de", 4), (1, "en", 1)]))
    m = _manifest(rid)
    m["stages"]["sample"]["counts"].update({"balance": "groups_then_clusters", "group_column": "lang",
                                            "draws_per_group": {"de": 6, "en": 7},
                                            "group_targets": {"de": 0.5, "en": 0.5}})
    (tiny_lake / "runs" / rid / "manifest.json").write_text(json.dumps(m))
    lv = build_report(str(tiny_lake), rid)["levels"]
    assert lv["balance"] == "groups_then_clusters" and lv["groups"]["draws_from"] == "the allocation (exact)"
    assert [(r["name"], r["docs"], r["draws"], r["target"]) for r in lv["groups"]["rows"]] == [
        ("en", 6, 7, 0.5), ("de", 4, 6, 0.5)]
    assert lv["groups"]["lost_share"] == ["en"]
    # cluster mode over another column: expected draws, cluster 0's 10 draws spread 5:4 over en and de
    m["stages"]["sample"]["counts"] = _manifest(rid)["stages"]["sample"]["counts"]
    (tiny_lake / "runs" / rid / "manifest.json").write_text(json.dumps(m))
    lv = build_report(str(tiny_lake), rid)["levels"]
    assert lv["groups"]["draws_from"].startswith("expected")
    got = {r["name"]: r["draws"] for r in lv["groups"]["rows"]}
    assert got == pytest.approx({"en": 10 * 5 / 9 + 3, "de": 10 * 4 / 9})


def test_levels_without_cell_stats(tiny_lake):
    rep = build_report(str(tiny_lake), "20260101T000000Z-aaaaaa")
    assert rep["levels"] == {"available": False, "balance": "clusters"}
    _, html_uri = write_report(str(tiny_lake), "20260101T000000Z-aaaaaa")
    assert "no per-level figures" in Path(html_uri).read_text()


# --- headless Chromium ------------------------------------------------------------------------


def page_errors(log: str) -> list[str]:
    """The lines of a Chromium log (``--enable-logging=stderr --v=0``) that report a problem with the page.

    Whatever the page causes (a script error, "Uncaught ...", a console.error call, a resource it
    may not load) Chromium logs as a console message, ``[pid:tid:time:LEVEL:CONSOLE:n] "msg", source:
    URL (n)``; Chromium 156 logs them all at INFO, so the level is not what tells them apart. All other
    lines are Chromium's own noise on a headless server (no D-Bus, no GPU or VA-API, sandbox warnings,
    the Debian launcher's /dev/shm check) and never pass through the page's console. So the filter
    keeps console lines at any level and any "Uncaught" line, and nothing else;
    test_page_error_filter_catches_a_broken_page proves it keeps what it must.
    """
    return [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def chromium_screenshot(html: Path, workdir: Path) -> tuple[np.ndarray, str]:
    """Load ``html`` from disk in headless Chromium; return the screenshot (RGB array) and the log."""
    from PIL import Image

    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("headless Chromium is needed to test the report in a real browser and is not installed; "
                    f"install Debian's package as root: {INSTALL_CHROMIUM}", pytrace=False)
    png = workdir / "screenshot.png"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={workdir / 'profile'}", f"--screenshot={png}", "--window-size=1200,4000",
           "--enable-logging=stderr", "--v=0", html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert png.is_file(), f"chromium wrote no screenshot:\n{proc.stderr[-3000:]}"
    return np.asarray(Image.open(png).convert("RGB")).astype(np.int16), proc.stdout + proc.stderr


def colour_mask(rgb: np.ndarray, hex_colour: str, tol: int = 6) -> np.ndarray:
    want = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    return np.abs(rgb - want).max(axis=2) <= tol


def figure_bands(mask: np.ndarray, min_px: int = 10, gap: int = 60) -> int:
    """Vertical stretches of the screenshot holding a plot colour: roughly, figures on screen."""
    rows = np.flatnonzero(mask.sum(axis=1) >= min_px)
    if len(rows) == 0:
        return 0
    return 1 + int((np.diff(rows) > gap).sum())


def test_page_error_filter_catches_a_broken_page(tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html><body><p>x</p><script>console.error("boom"); '
                      "notAFunction();</script></body></html>")
    rgb, log = chromium_screenshot(broken, tmp_path)
    errors = page_errors(log)
    assert any("boom" in e for e in errors) and any("Uncaught ReferenceError" in e for e in errors), log[-3000:]
    # and the noise a headless server produces on every start is not taken for a page error
    noise = [line for line in log.splitlines() if "boom" not in line and "Uncaught" not in line]
    assert noise and page_errors("\n".join(noise)) == []
    assert rgb.shape[1] == 1200


def test_exemplar_snippets_come_from_cluster_stats(tiny_lake):
    """With ``exemplar_snippets`` stored (as the stats stage writes them), the report shows those and
    does not look in docs: here they differ from docs' text, and one exemplar is not in docs at all."""
    import pyarrow as pa

    stats = _stats_table().append_column(
        "exemplar_snippets", pa.array([["stored d0", "stored d1"], ["stored rare"]], pa.list_(pa.string())))
    stats = stats.set_column(stats.schema.get_field_index("exemplar_ids"), "exemplar_ids",
                             pa.array([["gone", "d1"], ["rare"]], pa.list_(pa.string())))
    from deltalake import write_deltalake

    # version 1 (the manifest is made to pin it), with the new column
    write_deltalake(str(tiny_lake / "cluster_stats"), stats, mode="overwrite", schema_mode="overwrite")
    manifest = _manifest("20260101T000000Z-aaaaaa")
    manifest["tables"]["cluster_stats"] = 1
    (tiny_lake / "runs" / "20260101T000000Z-aaaaaa" / "manifest.json").write_text(json.dumps(manifest))
    rows = build_report(str(tiny_lake), "20260101T000000Z-aaaaaa")["clusters"]["rows"]
    assert rows[0]["exemplars"] == [{"id": "gone", "snippet": "stored d0"}]  # the first only, as before
    assert rows[1]["exemplars"] == [{"id": "rare", "snippet": "stored rare"}]  # all of a cluster below


# --- the report of the shared end-to-end run ----------------------------------------------------


@pytest.fixture(scope="module")
def written(pipeline):
    from deltalake import DeltaTable

    cfg, run = pipeline
    json_uri, html_uri = write_report(run.lake.root, run.run_id)
    stats = DeltaTable(run.lake.table("cluster_stats")).to_pyarrow_table().to_pylist()
    return cfg, run, json.loads(Path(json_uri).read_text()), Path(html_uri), stats


@pytest.mark.slow
def test_report_figures_agree_with_the_manifest_and_tables(written):
    from clustermix.manifest import read_json

    cfg, run, rep, _, stats = written
    m = read_json(run.manifest_uri)  # as the report read it: JSON keys are strings
    assert Path(run.lake.run_dir(run.run_id), "report.json").is_file()
    assert rep["run"]["run_id"] == run.run_id and rep["run"]["outcome"] == "succeeded"
    acc, ing = rep["accounting"], m["stages"]["ingest"]["counts"]
    assert acc["read"] == acc["accepted"] + acc["duplicates"] + acc["near_duplicates"] + acc["quarantined"]
    keys = ("read", "accepted", "duplicates", "near_duplicates", "quarantined", "quarantined_by_reason")
    assert {k: acc[k] for k in keys} == {k: ing[k] for k in keys}
    near, sem = rep["dedup"]["near"], rep["dedup"]["semantic"]
    assert (near["enabled"], near["threshold"], near["removed"]) == (True, cfg.dedup.near.threshold, ing["near_duplicates"])
    assert sum(near["per_source"].values()) == near["removed"]
    assert (sem["enabled"], sem["removed"]) == (False, 0)
    assert acc["balanced"] and acc["matches_tables"] and run.run_id in acc["source"]

    rows = rep["clusters"]["rows"]
    assert rep["clusters"]["k"] == cfg.cluster.k
    assert {r["cluster_id"]: r["n_docs"] for r in rows} == {s["cluster_id"]: s["n_docs"] for s in stats}
    assert sum(r["n_docs"] for r in rows) == acc["accepted"]
    sample = m["stages"]["sample"]["counts"]
    assert {str(r["cluster_id"]): r["sample_draws"] for r in rows} == sample["draws_per_cluster"]
    assert sum(r["sample_draws"] for r in rows) == cfg.sample.budget == rep["blend"]["draws"]
    assert sum(rep["blend"]["weights_per_cluster"].values()) == pytest.approx(1.0)
    assert sum(rep["blend"]["weights_per_domain"].values()) == pytest.approx(1.0)

    dom = rep["domains"]
    assert sum(dom["before"].values()) == acc["accepted"] and sum(dom["after"].values()) == cfg.sample.budget
    assert dom["after"] == {d: v["draws"] for d, v in m["stages"]["blend"]["counts"]["draws_by_domain"].items()}

    hist = rep["sample"]["draws_per_doc_histogram"]
    assert hist == sample["draws_per_doc_histogram"] and rep["sample"]["histogram_from"] == "manifest"
    assert sum(hist.values()) == acc["accepted"]
    assert sum(int(d) * n for d, n in hist.items()) == cfg.sample.budget
    assert rep["sample"]["max_draws_per_doc"] <= cfg.sample.clip == rep["sample"]["clip"]

    assert rep["search"] == {"ran": False, "note": NO_SEARCH}
    assert [s["stage"] for s in rep["stages"]] == list(m["stages"])
    assert {s["stage"]: s["seconds"] for s in rep["stages"]} == {k: v["seconds"] for k, v in m["stages"].items()}
    assert rep["tables"] == m["tables"] and rep["code_version"]["run"] == m["clustermix_version"]
    assert {"cluster_sizes", "domain_shares", "draws_per_doc", "blend_weights", "quality",
            "stage_times"} <= set(rep["figures"])


@pytest.mark.slow
def test_the_stats_stage_stores_the_snippets_the_report_shows(written):
    from deltalake import DeltaTable

    from clustermix.stats import EXEMPLAR_CHARS

    _, run, rep, _, stats = written
    stored = {i: snip for s in stats for i, snip in zip(s["exemplar_ids"] or [], s["exemplar_snippets"] or [],
                                                        strict=True)}
    assert stored and all(stored.values())
    shown = [x for r in rep["clusters"]["rows"] for x in r["exemplars"]]
    assert shown and all(x["snippet"] == stored[x["id"]] for x in shown)
    # what stats stored is the documents' first characters
    docs = DeltaTable(run.lake.table("docs")).to_pyarrow_table(columns=["id", "text"]).to_pylist()
    text = {d["id"]: d["text"] for d in docs if d["id"] in stored}
    assert {i: t[:EXEMPLAR_CHARS] for i, t in text.items()} == stored


@pytest.mark.slow
def test_plan_derived_histogram_matches_the_manifest(written):
    from clustermix.lake import Lake
    from clustermix.report import _histogram, _Run

    _, run, rep, _, _ = written
    derived, source = _histogram(_Run(Lake(run.lake.root), run.manifest), {}, rep["accounting"]["accepted"])
    assert source.startswith("sample_plan")
    assert derived == run.manifest["stages"]["sample"]["counts"]["draws_per_doc_histogram"]


class _Refs(HTMLParser):
    """Collects every tag and the attributes that load or link something."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "srcset", "action", "data", "poster"):
                self.refs.append((tag, k, v or ""))


@pytest.mark.slow
def test_report_html_is_self_contained(written):
    _, run, rep, html, _ = written
    page = html.read_text()
    parser = _Refs()
    parser.feed(page)
    assert "script" not in parser.tags and "iframe" not in parser.tags
    assert not [r for r in parser.refs if r[2].lower().startswith(("http://", "https://", "//"))]
    assert "url(" not in page and "@import" not in page  # the inline CSS loads nothing either
    imgs = [v for tag, k, v in parser.refs if tag == "img" and k == "src"]
    assert len(imgs) >= 4 and len(imgs) == len(rep["figures"])
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert {v for tag, k, v in parser.refs if tag == "a"} <= {f"#{s}" for s in (
        "accounting", "clusters", "under", "domains", "levels", "dedup", "draws", "blend", "quality", "search", "evaluation", "run")}
    assert run.run_id in page and NO_SEARCH in page and "Evaluation was not run" in page


@pytest.mark.slow
def test_report_renders_in_headless_chromium(written, tmp_path):
    _, _, _, html, _ = written
    rgb, log = chromium_screenshot(html, tmp_path)
    assert page_errors(log) == [], "\n".join(page_errors(log))
    # tall enough for the four plots above the blend's, whatever the sections above them hold (the
    # accounting, duplicates and k-means fit lines grew the page past 3000 px)
    assert rgb.shape[:2] == (4000, 1200)
    # not a blank page: plenty of ink and the many colours of antialiased text and plots
    assert (rgb.min(axis=2) < 235).mean() > 0.04
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 500
    # the plots rendered: their fixed colours fill several separate stretches of the page
    before, after = colour_mask(rgb, BEFORE), colour_mask(rgb, AFTER)
    assert before.sum() > 5000 and after.sum() > 5000, (before.sum(), after.sum())
    assert figure_bands(before | after) >= 4


def test_missing_chromium_fails_and_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match=r"apt-get update && apt-get install -y chromium"):
        chromium_screenshot(tmp_path / "report.html", tmp_path)


def test_predictor_rank_correlation_on_mixtures_it_was_not_fitted_on(tiny_lake):
    import pyarrow as pa

    # iteration 1 has no prediction (the prior's draws); 2 and 3 were predicted before training
    _write_tables(tiny_lake, mixtures=pa.table({
        "iteration": [1, 1, 1, 2, 2, 2, 3, 3, 3],
        "proxy_score": [0.5, 0.6, 0.7, 0.30, 0.20, 0.40, 0.1, 0.3, 0.2],
        "predicted_score": pa.array([None, None, None, 0.3, 0.2, 0.4, 0.1, 0.2, 0.3], pa.float64())}))
    json_uri, html_uri = write_report(str(tiny_lake), "20260101T000000Z-aaaaaa")
    pr = json.loads(Path(json_uri).read_text())["search"]["predictor"]
    assert pr["available"] and pr["mixtures"] == 6
    assert [(i["iteration"], i["mixtures"]) for i in pr["per_iteration"]] == [(2, 3), (3, 3)]
    assert pr["per_iteration"][0]["spearman"] == pytest.approx(1.0)  # ranked exactly as training did
    assert pr["per_iteration"][1]["spearman"] == pytest.approx(0.5)  # 0.1 < 0.3 > 0.2 against 0.1 < 0.2 < 0.3
    assert 0 < pr["spearman"] < 1
    assert "Spearman rank correlation" in Path(html_uri).read_text()


def test_mixture_blend_shows_searched_against_realised_weights(tiny_lake):
    rid = "20260101T000000Z-aaaaaa"
    m = _manifest(rid)
    searched = {str(k): w for k, w in enumerate([0.5, 0.3, 0.15, 0.05])}
    realised = {"0": 0.46, "1": 0.31, "2": 0.17, "3": 0.06}
    m["config"]["blend"] = {"mode": "mixture", "mixture_path": "/lake/search/best_mixture.json"}
    m["stages"]["blend"]["counts"] = {"mode": "mixture", "draws_by_domain": {"news": {"draws": 10, "tokens": 100}},
                                      "mixture": {"fit": "exact", "clip": 3, "draws": 80, "scale": 0.8,
                                                  "limited_by_cluster": 3, "unrealisable_clusters": [],
                                                  "searched": searched, "realised": realised,
                                                  "total_variation": 0.04}}
    (tiny_lake / "runs" / rid / "manifest.json").write_text(json.dumps(m))
    json_uri, html_uri = write_report(str(tiny_lake), rid)
    mix = json.loads(Path(json_uri).read_text())["blend"]["mixture"]
    assert [(r["cluster_id"], r["searched"], r["realised"]) for r in mix["rows"]] == [
        (0, 0.5, 0.46), (1, 0.3, 0.31), (2, 0.15, 0.17), (3, 0.05, 0.06)]
    assert mix["off_by_1pt"] == 2 and mix["total_variation"] == 0.04 and mix["limited_by_cluster"] == 3
    page = Path(html_uri).read_text()
    assert "Searched mixture against the blend" in page and "scaled to 80.00% of the budget" in page
