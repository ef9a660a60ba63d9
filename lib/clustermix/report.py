"""The curation report: ``runs/<run_id>/report.json`` (the figures, for machines) and ``report.html``
(the same figures for people: one self-contained file, plots as base64 PNG, no scripts, no network).

Everything comes from the run's manifest and from K-row tables read with delta-rs at the versions
the run recorded. Bigger tables are only ever streamed one narrow column at a time into counters of
size O(K) or O(clip); the clusters' exemplar snippets are stored in ``cluster_stats`` (only the
duplicate pairs' texts are looked up in ``docs`` by id, with a filter), so the report's memory is O(K)
whatever the corpus size. Local paths and object-store URIs both work (pyarrow.fs, delta-rs).

When a stage was skipped (its outputs were current), its counts come from the manifest of the run
that wrote those outputs; when no manifest has them, from the committed tables, and ``notes`` says so.
A ``mixtures`` table, when the search stage wrote one, holds one row per trained proxy with its
``iteration`` and ``proxy_score`` (the proxy's loss on the target set: lower is better).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from clustermix import __version__
from clustermix.contracts import NO_DOMAIN
from clustermix.deltalog import rows_of
from clustermix.errors import DataError
from clustermix.lake import Lake, is_hidden, write_atomic

if TYPE_CHECKING:
    from deltalake import DeltaTable
    from pyarrow.fs import FileSystem

    from clustermix.storage import S3Settings

SCHEMA = "clustermix.report/1"
SNIPPET_CHARS = 320
NO_SEARCH = "The mixture search did not run: the lake has no mixtures table."
NO_EVALUATION = ("Evaluation was not run: the lake has no evaluations table. To measure whether the mix helps, run "
                 "`clustermix run --set evaluate.enabled=true` (it keeps a seeded hold-out out of every plan, then "
                 "trains proxies on the mix and on baselines of the same size and scores them on the hold-out).")


def _fs(uri: str, lake: Lake) -> tuple[FileSystem, str]:
    from clustermix.lake import open_fs

    return open_fs(uri, lake.s3)


def _run_ids(lake: Lake) -> list[str]:
    from pyarrow import fs as pafs

    filesystem, base = _fs(f"{lake.root}/runs", lake)
    infos = filesystem.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    # run ids start with a UTC timestamp, so their order is the order the runs started; the runs table
    # shares the folder (its _delta_log is no run)
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and not is_hidden(i.base_name))


def _manifest(lake: Lake, run_id: str) -> dict[str, Any] | None:
    from clustermix.manifest import read_json

    try:
        return read_json(f"{lake.run_dir(run_id)}/manifest.json", s3=lake.s3)
    except (OSError, ValueError):
        return None


def list_runs(lake_root: str, *, s3: S3Settings | None = None) -> list[dict[str, Any]]:
    """Every run recorded in the lake's ``runs`` table, oldest first: id, mode, start, outcome, drift
    decision, the blended version it left, and whether its report exists. ``s3``: the object-store
    settings of a lake on ``s3://``."""
    from clustermix.runs import read_runs

    lake = Lake(lake_root, s3)
    out = []
    for r in read_runs(lake):
        filesystem, path = _fs(f"{lake.run_dir(r['run_id'])}/report.html", lake)
        out.append({"run_id": r["run_id"], "mode": r["mode"], "outcome": r["outcome"],
                    "started_at": r["started_at"].isoformat() if r["started_at"] else None,
                    "finished_at": r["finished_at"].isoformat() if r["finished_at"] else None,
                    "decision": r["decision"], "blended_version": json.loads(r["tables"] or "{}").get("blended"),
                    "has_report": filesystem.get_file_info(path).is_file})
    return out


class _Run:
    """One run's manifest, plus (read on demand) those of the runs that wrote what it reused."""

    def __init__(self, lake: Lake, manifest: dict[str, Any]) -> None:
        self.lake, self.m = lake, manifest
        self.notes: list[str] = []
        self._others: dict[str, dict[str, Any] | None] = {}
        self._tables: dict[str, DeltaTable | None] = {}

    def stage(self, name: str) -> dict[str, Any]:
        rec = dict(self.m.get("stages", {}).get(name) or {"status": "not run"})
        rec["counts_from"] = self.m["run_id"] if rec.get("status") == "ran" else None
        producer = rec.get("written_by_run")
        if rec.get("status") == "skipped" and producer:
            if producer not in self._others:
                self._others[producer] = _manifest(self.lake, producer)
            prev = ((self._others[producer] or {}).get("stages") or {}).get(name) or {}
            if prev.get("status") == "ran":
                rec["counts"], rec["counts_from"] = prev.get("counts"), producer
        return rec

    def version(self, table: str) -> int | None:
        tables = self.m.get("tables") or {}
        if table in tables:
            return tables[table]
        for rec in (self.m.get("stages") or {}).values():
            if table in (rec.get("versions") or {}):
                return rec["versions"][table]
        return None

    def table(self, name: str) -> DeltaTable | None:
        """Table ``name`` at the version this run recorded (the latest, noted, if that is gone).

        A table the manifest records as absent stays absent even if a later run created it; one the
        manifest does not name at all (``mixtures``, written outside the pipeline) is read as it is now."""
        if name not in self._tables:
            self._tables[name] = self._open(name)
        return self._tables[name]

    def _open(self, name: str) -> DeltaTable | None:
        from deltalake import DeltaTable
        from deltalake.exceptions import DeltaError

        from clustermix.deltalog import storage_options

        uri = self.lake.table(name)
        opts = storage_options(uri, self.lake.s3)  # the object store's endpoint, region and retries
        recorded = name in (self.m.get("tables") or {})
        v = self.version(name)
        if (recorded and v is None) or not DeltaTable.is_deltatable(uri, storage_options=opts):
            return None
        if v is None:
            return DeltaTable(uri, storage_options=opts)
        try:
            return DeltaTable(uri, version=v, storage_options=opts)
        except DeltaError:
            self.notes.append(f"{name}: version {v} is no longer readable (vacuumed?); read the latest instead")
            return DeltaTable(uri, storage_options=opts)


def _value_counts(dt: DeltaTable, column: str) -> dict[Any, int]:
    """Counts of each value of one column, streamed batch by batch (memory: one entry per value)."""
    import pyarrow.compute as pc

    counts: dict[Any, int] = {}
    for batch in dt.to_pyarrow_dataset().to_batches(columns=[column]):
        vc = pc.value_counts(batch.column(0))
        for v, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True):
            counts[v] = counts.get(v, 0) + n
    return counts


def _snippets(docs: DeltaTable | None, ids: set[str]) -> dict[str, str]:
    """The first ``SNIPPET_CHARS`` characters of the documents ``ids`` (a filtered scan, not a load)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    if docs is None or not ids:
        return {}
    scan = docs.to_pyarrow_dataset().scanner(
        columns={"id": ds.field("id"), "snippet": pc.utf8_slice_codeunits(ds.field("text"), 0, SNIPPET_CHARS)},
        filter=ds.field("id").isin(sorted(ids)))
    return {r["id"]: r["snippet"] or "" for r in scan.to_table().to_pylist()}


def _accounting(run: _Run) -> dict[str, Any]:
    counts = run.stage("ingest").get("counts") or {}
    dts = {t: run.table(t) for t in ("docs", "duplicates", "near_duplicates", "quarantine")}
    tables = {t: rows_of(dt) for t, dt in dts.items() if dt is not None}
    if "read" in counts:
        acc = {k: counts[k] for k in ("read", "accepted", "duplicates", "quarantined")}
        acc["near_duplicates"] = counts.get("near_duplicates", 0)  # absent from runs before MinHash
        acc["quarantined_by_reason"] = dict(counts.get("quarantined_by_reason") or {})
        acc["source"] = f"manifest of run {run.stage('ingest')['counts_from']}"
    elif {"docs", "duplicates", "quarantine"} <= set(tables):
        quarantine = dts["quarantine"]
        assert quarantine is not None
        reasons = {str(k): v for k, v in sorted(_value_counts(quarantine, "reason").items(), key=lambda kv: str(kv[0]))}
        acc = {"accepted": tables["docs"], "duplicates": tables["duplicates"], "quarantined": tables["quarantine"],
               "near_duplicates": tables.get("near_duplicates", 0),
               "quarantined_by_reason": reasons, "source": "committed tables (no manifest recorded ingest's counts)"}
        acc["read"] = acc["accepted"] + acc["duplicates"] + acc["near_duplicates"] + acc["quarantined"]
        run.notes.append("input accounting: ingest's counts are in no manifest; counted from the committed tables")
    else:
        return {"available": False}
    acc["available"] = True
    acc["balanced"] = acc["read"] == acc["accepted"] + acc["duplicates"] + acc["near_duplicates"] + acc["quarantined"]
    acc["files"] = _files(run, counts)
    acc["tables"] = tables
    want = {"docs": acc["accepted"], "duplicates": acc["duplicates"], "quarantine": acc["quarantined"],
            "near_duplicates": acc["near_duplicates"]}
    acc["matches_tables"] = all(tables.get(t, 0) == n for t, n in want.items())
    return acc


BAD_FILES_SHOWN = 500
DEDUP_EXAMPLES = 3  # pairs shown per dedup: the least similar of the first rows, those nearest the threshold
DEDUP_SCANNED = 20_000  # rows of a duplicates table the examples are picked from (never the whole table)


def _dedup(run: _Run, cfg: dict[str, Any]) -> dict[str, Any]:
    """What each dedup removed: in all, per source (domain) and, for the semantic one, per cluster; the
    thresholds; a few pairs side by side. Counts stream one column; examples read a bounded prefix."""
    import pyarrow as pa

    dcfg = cfg.get("dedup") or {}
    out: dict[str, Any] = {}
    for kind, table, sim, threshold_of in (("near", "near_duplicates", "jaccard", "Jaccard of word shingles"),
                                           ("semantic", "semantic_duplicates", "similarity", "cosine of embeddings")):
        sec = dict(dcfg.get(kind) or {})
        dt = run.table(table)
        entry: dict[str, Any] = {"enabled": sec.get("enabled"), "threshold": sec.get("threshold"),
                                 "measure": threshold_of, "available": dt is not None}
        if kind == "semantic":
            entry["keep"] = sec.get("keep")
        if dt is not None:
            entry["removed"] = rows_of(dt)
            entry["per_source"] = {str(k if k is not None else NO_DOMAIN): v for k, v in
                                   sorted(_value_counts(dt, "domain").items(), key=lambda kv: -kv[1])}
            if kind == "semantic":
                entry["per_cluster"] = {str(k): v for k, v in sorted(_value_counts(dt, "cluster_id").items())}
            cols = ["id", "duplicate_of", sim] + (["snippet"] if kind == "near" else [])
            head: list[dict[str, Any]] = []
            for batch in dt.to_pyarrow_dataset().to_batches(columns=cols):
                head += pa.Table.from_batches([batch]).to_pylist()
                if len(head) >= DEDUP_SCANNED:
                    break
            shown = sorted(head, key=lambda r: (r[sim], r["id"]))[:DEDUP_EXAMPLES]
            texts = _snippets(run.table("docs"), {r["duplicate_of"] for r in shown}
                              | ({r["id"] for r in shown} if kind == "semantic" else set()))
            entry["examples"] = [{"id": r["id"], "kept": r["duplicate_of"], "similarity": r[sim],
                                  "text": r.get("snippet") or texts.get(r["id"], ""),
                                  "kept_text": texts.get(r["duplicate_of"], "")} for r in shown]
        out[kind] = entry
    return out


def _files(run: _Run, counts: dict[str, Any]) -> dict[str, Any]:
    """File accounting (seen = ingested + skipped, from the manifest) and the bad files the ``bad_files``
    table holds at this run's version (in a refresh: every night's), the first ``BAD_FILES_SHOWN``."""
    out: dict[str, Any] = {"available": "files_seen" in counts}
    for k in ("files_seen", "files_ingested", "files_skipped", "files_partial", "files_by_reason", "casts"):
        out[k] = counts.get(k)
    if out["available"]:
        out["balanced"] = counts["files_seen"] == counts["files_ingested"] + counts["files_skipped"]
    dt = run.table("bad_files")
    cols = ["path", "size", "reason", "detail", "status", "records", "run_id"]
    out["bad_files"] = [] if dt is None else dt.to_pyarrow_dataset().head(BAD_FILES_SHOWN, columns=cols).to_pylist()
    out["bad_files_total"] = 0 if dt is None else rows_of(dt)
    return out


def _histogram(run: _Run, sample: dict[str, Any], n_docs: int) -> tuple[dict[str, int] | None, str | None]:
    """Documents drawn 0..clip times: from the manifest, else from the plan's ``draw`` column.

    A document drawn j times has plan rows with draw = 0..j-1, so the rows with draw = d count the
    documents drawn more than d times: O(clip) counters, no per-document state."""
    if sample.get("draws_per_doc_histogram"):
        return {str(k): int(v) for k, v in sample["draws_per_doc_histogram"].items()}, "manifest"
    plan = run.table("sample_plan")
    if plan is None:
        return None, None
    more_than = _value_counts(plan, "draw")
    top = max(more_than, default=-1)
    hist = {0: n_docs - more_than.get(0, 0)}
    for j in range(1, top + 2):
        hist[j] = more_than.get(j - 1, 0) - more_than.get(j, 0)
    return {str(k): v for k, v in hist.items()}, "sample_plan table (draw column)"


def _shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: (v / total if total else 0.0) for k, v in counts.items()}


def _clusters(run: _Run, cfg: dict[str, Any], sample: dict[str, Any]) -> dict[str, Any]:
    stats = run.table("cluster_stats")
    min_share = float((cfg.get("stats") or {}).get("min_share", 0.007))
    clip = sample.get("clip", (cfg.get("sample") or {}).get("clip"))
    if stats is None:
        return {"available": False, "min_share": min_share, "rows": []}
    rows = sorted(stats.to_pyarrow_table().to_pylist(), key=lambda r: r["cluster_id"])  # K rows
    draws = {int(k): int(v) for k, v in (sample.get("draws_per_cluster") or {}).items()}
    n_draws = sum(draws.values())
    snippets = _exemplar_snippets(run, rows)
    out = []
    for r in rows:
        cid, n = int(r["cluster_id"]), int(r["n_docs"])
        d = draws.get(cid)
        out.append({
            "cluster_id": cid, "n_docs": n, "n_tokens": int(r["n_tokens"]), "share": float(r["share"]),
            "below_threshold": bool(r["below_threshold"]), "domains": dict(r.get("domains") or []),
            "quality_mean": r.get("quality_mean"), "quality_q10_50_90": r.get("quality_q10_50_90"),
            "n_with_quality": r.get("n_with_quality"), "score_mean": r.get("score_mean"),
            "sample_draws": d, "sample_share": (d / n_draws if n_draws and d is not None else None),
            "at_clip": bool(d is not None and clip is not None and n > 0 and d >= clip * n),
            "blend_weight": None,
            "exemplars": [{"id": i, "snippet": snippets.get(i)} for i in (r.get("exemplar_ids") or [])
                          if i in snippets],
        })
    return {"available": True, "k": len(out), "min_share": min_share, "rows": out}


def _exemplar_snippets(run: _Run, rows: list[dict[str, Any]]) -> dict[str, str]:
    """The snippets of the exemplars the report shows (all of a cluster below the threshold, the first of
    the others): from ``cluster_stats.exemplar_snippets``, stored by the stats stage; a table written
    before that column existed has them looked up in ``docs`` by id."""
    shown: dict[str, str | None] = {}
    for r in rows:
        ex = list(r.get("exemplar_ids") or [])
        stored = list(r.get("exemplar_snippets") or [None] * len(ex))
        for i, snip in list(zip(ex, stored, strict=False))[: None if r.get("below_threshold") else 1]:
            shown[i] = snip
    missing = {i for i, snip in shown.items() if snip is None}
    found = _snippets(run.table("docs"), missing) if missing else {}
    return {i: (snip if snip is not None else found[i]) for i, snip in shown.items()
            if snip is not None or i in found}


def _blend(run: _Run, cfg: dict[str, Any], sample: dict[str, Any]) -> dict[str, Any]:
    counts = run.stage("blend").get("counts") or {}
    mode = counts.get("mode") or (cfg.get("blend") or {}).get("mode")
    per_domain = {d: int(v["draws"]) for d, v in (counts.get("draws_by_domain") or {}).items()}
    per_cluster: dict[str, int] = {}
    if counts.get("from") == "sample_plan" and sample.get("draws_per_cluster"):
        per_cluster = {str(k): int(v) for k, v in sample["draws_per_cluster"].items()}
    elif (blended := run.table("blended")) is not None:
        per_cluster = {str(k): v for k, v in sorted(_value_counts(blended, "cluster_id").items())}
    return {"mode": mode, "mixture_path": (cfg.get("blend") or {}).get("mixture_path"),
            "draws": sum(per_cluster.values()) or None, "draws_per_cluster": per_cluster,
            "weights_per_cluster": _shares(per_cluster), "draws_by_domain": counts.get("draws_by_domain") or {},
            "weights_per_domain": _shares(per_domain), "mixture": _mixture(counts.get("mixture"))}


MIXTURE_ROWS = 12  # clusters shown in the searched-vs-realised table (the heaviest searched weights)


def _mixture(m: dict[str, Any] | None) -> dict[str, Any] | None:
    """A mixture blend's searched weights against its realised token shares: the summary and the
    ``MIXTURE_ROWS`` clusters with the heaviest searched weights, plus every cluster off by more than
    a percentage point."""
    if not m or not m.get("searched"):
        return None
    searched, realised = m["searched"], m.get("realised") or {}
    off = {c for c in searched if abs(searched[c] - realised.get(c, 0.0)) > 0.01 + 1e-9}
    heavy = sorted(searched, key=lambda c: (-searched[c], int(c)))[:MIXTURE_ROWS]
    rows = [{"cluster_id": int(c), "searched": searched[c], "realised": realised.get(c)}
            for c in sorted(set(heavy) | off, key=lambda c: (-searched[c], int(c)))]
    keys = ("fit", "unit", "budget", "clip", "draws", "scale", "limited_by_cluster", "unrealisable_clusters",
            "planned_total_variation", "total_variation")
    return {**{k: m.get(k) for k in keys}, "clusters": len(searched), "rows": rows, "off_by_1pt": len(off)}


def _level_rows(before: dict[str, int], after: dict[str, float], targets: dict[str, float] | None = None,
                ) -> list[dict[str, Any]]:
    """One row per name: documents and draws, their shares, the change in share, and whether it lost share."""
    share_b, total = _shares(before), sum(after.values())
    rows = []
    for name in sorted(before, key=lambda n: (-before[n], n)):
        b, a = share_b.get(name, 0.0), (after.get(name, 0) / total if total else 0.0)
        rows.append({"name": name, "docs": before[name], "share_before": b, "draws": after.get(name, 0),
                     "share_after": a, "change": a - b, "lost_share": a < b - 1e-12,
                     "target": None if targets is None else targets.get(name)})
    return rows


def _levels(run: _Run, cfg: dict[str, Any], sample: dict[str, Any], blend: dict[str, Any]) -> dict[str, Any]:
    """Shares before and after at each level of the balancing: the groups (values of
    ``sample.group_column``, from ``cell_stats``: C rows), then the clusters; and every group that lost share.

    The group level's draws are exact from the allocation in ``groups_then_clusters`` mode, and from
    the blend's draws per domain when the groups are the domains; otherwise (cluster mode, another
    column) they are expected values: cluster k's draws spread over its groups in proportion to their
    documents, which is how the plan draws inside a cluster, up to the seeded choice."""
    scfg = cfg.get("sample") or {}
    balance = sample.get("balance") or scfg.get("balance") or "clusters"
    cells = run.table("cell_stats")
    if cells is None:
        return {"available": False, "balance": balance}
    rows = cells.to_pyarrow_table(columns=["cluster_id", "group_column", "group", "n_docs"]).to_pylist()  # C rows
    column = next((r["group_column"] for r in rows), scfg.get("group_column"))
    group_docs: dict[str, int] = {}
    cluster_docs: dict[int, int] = {}
    for r in rows:
        group_docs[r["group"]] = group_docs.get(r["group"], 0) + int(r["n_docs"])
        cluster_docs[int(r["cluster_id"])] = cluster_docs.get(int(r["cluster_id"]), 0) + int(r["n_docs"])
    cluster_draws = {int(k): int(v) for k, v in (sample.get("draws_per_cluster") or {}).items()}
    group_draws: dict[str, float]
    if sample.get("draws_per_group"):
        group_draws, draws_from = {g: int(v) for g, v in sample["draws_per_group"].items()}, "the allocation (exact)"
    elif column == "domain" and blend.get("draws_by_domain") and blend["mode"] == "clusterclip":
        group_draws = {d: int(v["draws"]) for d, v in blend["draws_by_domain"].items()}
        draws_from = "the blended table (exact)"
    else:
        group_draws = {}
        for r in rows:
            k, n = int(r["cluster_id"]), int(r["n_docs"])
            if cluster_docs.get(k):
                group_draws[r["group"]] = group_draws.get(r["group"], 0.0) + cluster_draws.get(k, 0) * n / cluster_docs[k]
        draws_from = "expected from the draws per cluster (cluster mode fixes draws per cluster, not per group)"
    groups = _level_rows(group_docs, group_draws, sample.get("group_targets"))
    clusters = _level_rows({str(k): v for k, v in sorted(cluster_docs.items())},
                           {str(k): v for k, v in cluster_draws.items()})
    return {
        "available": True, "balance": balance, "group_column": column,
        "groups": {"rows": groups, "draws_from": draws_from,
                   "lost_share": [r["name"] for r in sorted(groups, key=lambda r: r["change"]) if r["lost_share"]],
                   "shares_before": sample.get("group_shares_before"), "shares_after": sample.get("group_shares_after")},
        "clusters": {"count": len(clusters), "shares_before": sample.get("shares_before"),
                     "shares_after": sample.get("shares_after"),
                     "lost_share": [int(r["name"]) for r in sorted(clusters, key=lambda r: r["change"])
                                    if r["lost_share"]]},
    }


def _kmeans_fit(run: _Run) -> dict[str, Any]:
    """How much of the corpus the k-means fit saw (the rest was assigned, not fitted): from the counts of
    the cluster stage, or of a refresh that refitted."""
    counts = run.stage("cluster").get("counts") or {}
    if "n_fitted" not in counts:
        counts = (run.stage("assign").get("counts") or {}).get("refit") or {}
    keys = ("n_points", "n_fitted", "sample_fraction", "max_points_per_centroid")
    return {"available": "n_fitted" in counts, **{k: counts.get(k) for k in keys}}


def _search(run: _Run) -> dict[str, Any]:
    dt = run.table("mixtures")
    if dt is None:
        return {"ran": False, "note": NO_SEARCH}
    names = {f.name for f in dt.schema().fields}
    if not {"iteration", "proxy_score"} <= names:
        return {"ran": True, "iterations": [], "note": "the mixtures table has no iteration/proxy_score columns"}
    # one row per proxy trained; the score is the proxy's loss on the target set: lower is better
    rows = dt.to_pyarrow_table(columns=["iteration", "proxy_score",
                                        *(["predicted_score"] if "predicted_score" in names else [])]).to_pylist()
    by_it: dict[int, list[float]] = {}
    for r in rows:
        if r["proxy_score"] is not None:
            by_it.setdefault(int(r["iteration"]), []).append(float(r["proxy_score"]))
    its = [{"iteration": i, "mixtures": len(s), "best": min(s), "mean": sum(s) / len(s)} for i, s in sorted(by_it.items())]
    return {"ran": True, "mixtures": len(rows), "iterations": its,
            "best_score": min((i["best"] for i in its), default=None), "predictor": _predictor(rows)}


def _predictor(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How well the predictor ranked mixtures it had not been fitted on: every proxy after the first
    iteration was chosen by a predictor fitted on the iterations before it, so its predicted score is
    a held-out prediction. Spearman's rank correlation of predicted against trained score, over all
    of them and per iteration (None with fewer than 3 or constant scores). ``rows``: the mixtures
    table's (iteration, proxy_score and, when it has one, predicted_score)."""
    import numpy as np

    from clustermix.search.predictor import spearman

    rows = [r for r in rows if r.get("predicted_score") is not None and r["proxy_score"] is not None]
    if not rows:
        return {"available": False}

    def rho(rs: list[dict[str, Any]]) -> float | None:
        return spearman(np.array([r["predicted_score"] for r in rs]), np.array([r["proxy_score"] for r in rs]))

    per = sorted({int(r["iteration"]) for r in rows})
    return {"available": True, "mixtures": len(rows), "spearman": rho(rows),
            "per_iteration": [{"iteration": i, "mixtures": sum(int(r["iteration"]) == i for r in rows),
                               "spearman": rho([r for r in rows if int(r["iteration"]) == i])} for i in per]}


def _evaluation(run: _Run) -> dict[str, Any]:
    """The ``evaluations`` table (held-out loss per mix, seed and group) as figures across seeds and
    verdicts of the blended mix against each baseline (:mod:`clustermix.spread`)."""
    from clustermix import spread

    dt = run.table("evaluations")
    if dt is None:
        return {"ran": False, "note": NO_EVALUATION}
    rows = dt.to_pyarrow_table().to_pylist()
    cmp = spread.compare(rows)
    per_source: dict[str, dict[str, list[float]]] = {}
    n_docs: dict[str, int] = {}
    for r in rows:
        if r["group_kind"] == "source":
            per_source.setdefault(r["group"], {}).setdefault(r["mix"], []).append(float(r["loss_bits_per_byte"]))
            n_docs[r["group"]] = int(r["n_docs"])
    seeds = sorted({int(r["seed_index"]) for r in rows})
    return {"ran": True, "mix": cmp["mix"], "mixes": sorted(cmp["summaries"]), "seeds": len(seeds),
            "summaries": cmp["summaries"], "verdicts": cmp["verdicts"],
            "train_tokens": max((int(r["train_tokens"]) for r in rows), default=None),
            "per_source": {g: {"n_docs": n_docs[g], **{m: spread.summary(v) for m, v in by.items()}}
                           for g, by in sorted(per_source.items())},
            "run_id": rows[0]["run_id"] if rows else None}


def _stage_rows(run: _Run) -> list[dict[str, Any]]:
    from clustermix.registry import ORDER

    names = [s for s in ORDER if s in run.m.get("stages", {})]
    names += [s for s in run.m.get("stages", {}) if s not in names]
    out = []
    for s in names:
        rec = run.stage(s)
        inputs = dict(rec.get("inputs") or {})
        if isinstance(inputs.get("input"), dict):  # the raw file listing can be huge: keep its size
            inputs["input_files"] = len(inputs.pop("input").get("files") or {})
        out.append({"stage": s, "status": rec.get("status"), "seconds": rec.get("seconds", 0.0),
                    "inputs": inputs, "outputs": rec.get("versions") or {},
                    "written_by_run": rec.get("written_by_run"), "counts_from": rec.get("counts_from")})
    return out


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN and infinities (Spark's avg over no values) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def build_report(lake_root: str, run_id: str | None = None, *, s3: S3Settings | None = None) -> dict[str, Any]:
    """Gather the report's figures for run ``run_id`` (None: the newest run) as a JSON-able dict.
    ``s3``: the object-store settings of a lake on ``s3://``."""
    lake = Lake(lake_root, s3)
    if run_id is None:
        ids = _run_ids(lake)
        if not ids:
            raise DataError(f"no runs under {lake.root}/runs: run `clustermix run` first")
        run_id = ids[-1]
    manifest = _manifest(lake, run_id)
    if manifest is None:
        raise DataError(f"no readable manifest for run {run_id!r} under {lake.root}/runs")
    run = _Run(lake, manifest)
    if manifest.get("outcome") != "succeeded":
        run.notes.append(f"this run's outcome is {manifest.get('outcome')!r}: the figures show the tables as "
                         "they stood when it ended, some possibly from earlier runs")
    cfg = manifest.get("config") or {}
    sample = dict(run.stage("sample").get("counts") or {})
    clusters = _clusters(run, cfg, sample)
    blend = _blend(run, cfg, sample)
    for r in clusters["rows"]:
        r["blend_weight"] = blend["weights_per_cluster"].get(str(r["cluster_id"]))
    before: dict[str, int] = {}
    for r in clusters["rows"]:
        for d, n in r["domains"].items():
            before[d] = before.get(d, 0) + int(n)
    after = {d: int(v["draws"]) for d, v in blend["draws_by_domain"].items()}
    n_assigned = sum(r["n_docs"] for r in clusters["rows"])
    hist, hist_from = _histogram(run, sample, n_assigned) if clusters["rows"] else (None, None)
    if hist_from and hist_from != "manifest":
        run.notes.append(f"draws per document: not in the manifest; counted from the {hist_from}")
    with_q = [r for r in clusters["rows"] if r.get("n_with_quality")]
    rep = {
        "schema": SCHEMA,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": {k: manifest.get(k) for k in ("run_id", "outcome", "error", "started_at", "finished_at", "lake_root")},
        "refresh": {"mode": manifest.get("mode", "run"), "files_taken": len(manifest["inputs_taken"])
                    if "inputs_taken" in manifest else None, "drift": manifest.get("drift")},
        "code_version": {"run": manifest.get("clustermix_version"), "report": __version__},
        "accounting": _accounting(run),
        "dedup": _dedup(run, cfg),
        "clusters": clusters,
        "kmeans_fit": _kmeans_fit(run),
        "under_represented": {
            "below_threshold": [r["cluster_id"] for r in clusters["rows"] if r["below_threshold"]],
            "at_clip": [r["cluster_id"] for r in clusters["rows"] if r["at_clip"]],
        },
        "domains": {"before": before, "after": after, "share_before": _shares(before), "share_after": _shares(after)},
        "levels": _levels(run, cfg, sample, blend),
        "sample": {**{k: sample.get(k) for k in ("unit", "budget", "clip", "cap", "draws", "shortfall",
                                                 "clusters_at_clip", "order", "lambda", "shares_before",
                                                 "shares_after", "balance", "group_column", "groups_at_clip")},
                   "draws_per_doc_histogram": hist, "histogram_from": hist_from,
                   "max_draws_per_doc": max((int(k) for k, v in (hist or {}).items() if v), default=None)},
        "blend": blend,
        "quality": {"available": bool(with_q), "clusters_with_quality": len(with_q),
                    "docs_with_quality": sum(int(r["n_with_quality"]) for r in with_q)},
        "search": _search(run),
        "evaluation": _evaluation(run),
        "stages": _stage_rows(run),
        "tables": {t: run.version(t) for t in (manifest.get("tables") or {})},
        "config": cfg,
        "notes": run.notes,
    }
    return _clean(rep)


def write_report(lake_root: str, run_id: str | None = None, *, s3: S3Settings | None = None) -> tuple[str, str]:
    """Write ``report.json`` and ``report.html`` into the run's folder; return their URIs (json, html)."""
    from clustermix.report_html import render
    from clustermix.report_plots import render_all

    rep = build_report(lake_root, run_id, s3=s3)
    figures = render_all(rep)
    rep["figures"] = sorted(figures)
    run_dir = Lake(lake_root, s3).run_dir(rep["run"]["run_id"])
    json_uri, html_uri = f"{run_dir}/report.json", f"{run_dir}/report.html"
    write_atomic(json_uri, json.dumps(rep, indent=2, allow_nan=False).encode(), s3=s3)
    write_atomic(html_uri, render(rep, figures).encode(), s3=s3)
    return json_uri, html_uri
