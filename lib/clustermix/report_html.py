"""The report as one self-contained HTML page: inline CSS, figures as data: URIs, no scripts.

Every string that comes from data (domain names, document text, ids, config values, errors) goes
through :func:`html.escape`; only numbers formatted here and fixed wording are written raw.
"""

from __future__ import annotations

from html import escape
from typing import Any

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:1.5em auto;
  padding:0 1em;color:#222;background:#fff}
h1{font-size:1.7em;margin:.2em 0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1.05em;margin-bottom:.3em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:left;vertical-align:top}
th{background:#f4f6f8}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
img{max-width:100%;height:auto;display:block;margin:.8em 0}
.ok{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}.muted{color:#666}
.advice{background:#fff8e1;border-left:4px solid #f9a825;padding:.5em 1em;margin:.8em 0}
.snip{font-size:.85em;color:#444;white-space:pre-wrap}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:.82em}
nav a{margin-right:.9em}summary{cursor:pointer;color:#1a5fb4}ul.glance li{margin:.15em 0}
"""

MODES = {
    "clusterclip": "ClusterClip: every cluster gets an equal share of the budget, capped at clip × its size.",
    "proportional": "proportional: configured domain weights spread over the clusters that hold each domain.",
    "quality": "quality-weighted: equal cluster shares scaled by mean cluster quality^alpha.",
    "mixture": "mixture: weights per cluster from a mixture file (the search stage's best mixture).",
}


def _e(v: Any) -> str:
    return "—" if v is None else escape(str(v))


def _n(v: Any, digits: int = 0) -> str:
    if v is None:
        return "—"
    return f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else _e(v)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def _table(header: list[str], rows: list[list[str]], numeric: tuple[int, ...] = ()) -> str:
    """A table of cells already escaped or formatted; columns in ``numeric`` align right."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(figs: dict[str, str], name: str, alt: str) -> str:
    if name not in figs:
        return ""
    return f'<img src="data:image/png;base64,{figs[name]}" alt="{escape(alt)}">'


def _ok(flag: bool) -> str:
    return '<span class="ok">✓ holds</span>' if flag else '<span class="bad">✗ does not hold</span>'


def _glance(rep: dict[str, Any]) -> str:
    acc, sa, cl, se = rep["accounting"], rep["sample"], rep["clusters"], rep["search"]
    items = []
    if acc.get("available"):
        items.append(f"Input: {_n(acc['read'])} records read, {_n(acc['accepted'])} accepted, "
                     f"{_n(acc['duplicates'])} duplicates, {_n(acc.get('near_duplicates'))} near duplicates, "
                     f"{_n(acc['quarantined'])} quarantined; "
                     f"read = accepted + duplicates + near duplicates + quarantined {_ok(acc['balanced'])}")
        files = acc.get("files") or {}
        if files.get("available"):
            items.append(f"Input files: {_n(files['files_seen'])} seen, {_n(files['files_ingested'])} ingested "
                         f"({_n(files['files_partial'])} cut short), {_n(files['files_skipped'])} skipped as bad")
    if cl.get("available"):
        under = rep["under_represented"]
        items.append(f"Clusters: k = {cl['k']}; {len(under['below_threshold'])} below the "
                     f"{_pct(cl['min_share'])} threshold; {len(under['at_clip'])} at the clip")
    before, after = sa.get("shares_before") or {}, sa.get("shares_after") or {}
    if sa.get("draws") is not None:
        spread = (f"; cluster-share Gini {_n(before.get('gini'), 3)} → {_n(after.get('gini'), 3)}, normalised "
                  f"entropy {_n(before.get('entropy_normalised'), 3)} → {_n(after.get('entropy_normalised'), 3)}"
                  if before.get("gini") is not None and after.get("gini") is not None else "")
        items.append(f"Sample: {_n(sa['draws'])} draws for a budget of {_n(sa['budget'])} {_e(sa['unit'])} "
                     f"(shortfall {_n(sa['shortfall'])}), clip {_n(sa['clip'])}, most draws of one document "
                     f"{_n(sa['max_draws_per_doc'])}{spread}")
    lv = rep.get("levels") or {}
    if lv.get("available"):
        lost = lv["groups"]["lost_share"]
        items.append(f"Balance: {_e(lv['balance'])}; {len(lv['groups']['rows'])} groups of "
                     f"<code>{_e(lv['group_column'])}</code>, "
                     + (f"lost share: {escape(', '.join(lost))}" if lost else "none lost share"))
    items.append(f"Blend: {_e(rep['blend'].get('mode'))}; mixture search: {'ran' if se['ran'] else 'did not run'}")
    return '<ul class="glance">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _accounting(acc: dict[str, Any]) -> str:
    if not acc.get("available"):
        return "<p>Ingest did not finish in this run or any run it reused: no input accounting.</p>"
    rows = [["read", _n(acc["read"])], ["accepted", _n(acc["accepted"])], ["duplicates", _n(acc["duplicates"])],
            ["near duplicates (MinHash)", _n(acc.get("near_duplicates"))], ["quarantined", _n(acc["quarantined"])]]
    rows += [[f"&nbsp;&nbsp;quarantined: {_e(r)}", _n(c)] for r, c in acc["quarantined_by_reason"].items()]
    return (_table(["records", "count"], rows, (1,))
            + f"<p>read = accepted + duplicates + near duplicates + quarantined {_ok(acc['balanced'])}; the "
            f"committed tables hold {_n(acc['tables'].get('docs'))} docs, {_n(acc['tables'].get('duplicates'))} "
            f"duplicates, {_n(acc['tables'].get('near_duplicates'))} near duplicates and "
            f"{_n(acc['tables'].get('quarantine'))} quarantined records {_ok(acc['matches_tables'])}. "
            f'<span class="muted">Source: {_e(acc["source"])}.</span></p>' + _files(acc.get("files") or {}))


def _dedup(rep: dict[str, Any]) -> str:
    """What each dedup removed, per source and per cluster, its threshold, and example pairs side by side."""
    out = []
    titles = {"near": "Near duplicates (MinHash, at ingest: never in docs)",
              "semantic": "Semantic duplicates (inside each cluster: in docs, left out of stats, sample and blend)"}
    for kind, d in (rep.get("dedup") or {}).items():
        head = (f"<h3>{escape(titles[kind])}</h3><p>{'on' if d.get('enabled') else 'off'}; threshold "
                f"{_n(d.get('threshold'), 3)} ({_e(d.get('measure'))})"
                + (f"; kept first: {_e(d.get('keep'))}" if d.get("keep") else "") + "; removed "
                f"<b>{_n(d.get('removed'))}</b> documents.</p>")
        if not d.get("available"):
            out.append(head + "<p>No table: the stage has not run on this lake.</p>")
            continue
        per_source = [[_e(k), _n(v)] for k, v in (d.get("per_source") or {}).items()]
        body = _table(["source (domain)", "removed"], per_source, (1,)) if per_source else ""
        per_cluster = [[_e(k), _n(v)] for k, v in (d.get("per_cluster") or {}).items()]
        if per_cluster:
            body += _table(["cluster", "removed"], per_cluster, (0, 1))
        ex = [[_e(e["id"]), _e(e["text"]), _e(e["kept"]), _e(e["kept_text"]), _n(e["similarity"], 3)]
              for e in d.get("examples") or []]
        if ex:
            body += ("<p>Examples nearest the threshold, removed beside kept:</p>"
                     + _table(["removed", "its text", "kept", "kept text", "similarity"], ex, (4,)))
        out.append(head + body)
    return "".join(out) or "<p>No dedup figures in this report.</p>"


def _files(f: dict[str, Any]) -> str:
    """Input files: seen = ingested + skipped, the casts read, and every bad file with its reason."""
    text = ""
    if f.get("available"):
        reasons = ", ".join(f"{_e(r)} {_n(c)}" for r, c in (f["files_by_reason"] or {}).items()) or "none"
        text += (f"<h3>Input files</h3><p>{_n(f['files_seen'])} seen = {_n(f['files_ingested'])} ingested "
                 f"({_n(f['files_partial'])} of them cut short: their complete records only) + "
                 f"{_n(f['files_skipped'])} skipped {_ok(f['balanced'])}. Bad files by reason: {reasons}.</p>")
        if f.get("casts"):
            text += ("<p>Columns read through a safe cast: " + "; ".join(
                f"<code>{_e(c)}</code> in {_n(n)} file(s)" for c, n in f["casts"].items()) + ".</p>")
    rows = [[f'<code>{_e(b["path"])}</code>', _n(b["size"]), _e(b["reason"]), _e(b["detail"]), _e(b["status"]),
             _n(b["records"]), _e(b["run_id"])] for b in f.get("bad_files") or []]
    if rows:
        more = f" (the first {len(rows)} of {_n(f['bad_files_total'])})" if f["bad_files_total"] > len(rows) else ""
        text += (f'<div class="advice"><b>Bad input files{more}</b>: left out (skipped) or read only up to where '
                 "they are cut short (partial). Repair or replace a file to have it taken again: a refresh "
                 "takes a file again when it changes.</div>"
                 + _table(["file", "bytes", "reason", "detail", "status", "records read", "run"], rows, (1, 5)))
    return text


def _top_domains(domains: dict[str, int], n: int = 3) -> str:
    top = sorted(domains.items(), key=lambda kv: -kv[1])[:n]
    return escape(", ".join(f"{d} {c}" for d, c in top))


def _clusters(rep: dict[str, Any], figs: dict[str, str]) -> str:
    cl = rep["clusters"]
    if not cl.get("available"):
        return "<p>The stats stage has not written cluster_stats for this run: no cluster figures.</p>"
    rows = []
    for r in cl["rows"]:
        flags = ", ".join(f for f, on in (("below threshold", r["below_threshold"]), ("at clip", r["at_clip"])) if on)
        snip = " ".join(r["exemplars"][0]["snippet"].split())[:160] + "…" if r["exemplars"] else ""
        rows.append([str(r["cluster_id"]), _n(r["n_docs"]), _pct(r["share"]), _n(r["sample_draws"]),
                     _pct(r["sample_share"]), _pct(r["blend_weight"]), _top_domains(r["domains"]),
                     _n(r["score_mean"], 3), _n(r["quality_mean"], 3), escape(flags),
                     f'<span class="snip">{escape(snip)}</span>'])
    fit = rep.get("kmeans_fit") or {}
    fitted = (f"<p>k-means was fitted on {_n(fit['n_fitted'])} of {_n(fit['n_points'])} documents "
              f"({_pct(fit['sample_fraction'])}; at most {_n(fit['max_points_per_centroid'])} per centroid); "
              "every document was then assigned to its nearest centroid.</p>") if fit.get("available") else ""
    # K rows can run to hundreds on a cluster: folded, so the figures below stay in view
    return (_img(figs, "cluster_sizes", "cluster shares before and after sampling")
            + f"<details><summary>Every cluster: size, draws, weight, domains, exemplar ({len(rows)} rows)</summary>"
            + _table(["cluster", "docs", "share", "draws", "sample share", "blend weight", "top domains",
                      "cohesion", "quality", "flags", "exemplar"], rows, (1, 2, 3, 4, 5, 7, 8)) + "</details>" + fitted)


def _under(rep: dict[str, Any]) -> str:
    cl, under, clip = rep["clusters"], rep["under_represented"], rep["sample"].get("clip")
    if not cl.get("available"):
        return "<p>No cluster statistics.</p>"
    by_id = {r["cluster_id"]: r for r in cl["rows"]}
    parts = []
    if under["below_threshold"]:
        parts.append(f'<div class="advice"><b>Source more data for these {len(under["below_threshold"])} '
                     f"cluster(s).</b> Each holds less than {_pct(cl['min_share'])} of the documents. Sampling "
                     f"raises their share by repeating their documents (up to {_n(clip)} times), which risks "
                     "memorising them; more documents like the exemplars below would represent these topics "
                     "without repetition.</div>")
        for cid in under["below_threshold"]:
            r = by_id[cid]
            parts.append(f"<h3>Cluster {cid}: {_n(r['n_docs'])} documents ({_pct(r['share'])}), "
                         f"{_top_domains(r['domains'])}</h3><ul>"
                         + "".join(f'<li><code>{_e(x["id"])}</code> <span class="snip">{_e(x["snippet"])}</span></li>'
                                   for x in r["exemplars"]) + "</ul>")
    else:
        parts.append(f"<p>No cluster is below the representation threshold of {_pct(cl['min_share'])}.</p>")
    if under["at_clip"]:
        parts.append(f'<div class="advice">{len(under["at_clip"])} cluster(s) reached the clip: every document '
                     f"is drawn {_n(clip)} times and they still get less than an equal share of the mix "
                     f"(clusters {escape(', '.join(str(c) for c in under['at_clip']))}). More data for them would "
                     "close the gap.</div>")
    return "".join(parts)


def _domains(rep: dict[str, Any], figs: dict[str, str]) -> str:
    dom = rep["domains"]
    names = sorted(set(dom["before"]) | set(dom["after"]), key=lambda d: -dom["before"].get(d, 0))
    if not names:
        return "<p>No domain figures for this run.</p>"
    rows = [[_e(d), _n(dom["before"].get(d, 0)), _pct(dom["share_before"].get(d)), _n(dom["after"].get(d, 0)),
             _pct(dom["share_after"].get(d))] for d in names]
    return (_img(figs, "domain_shares", "domain shares before and after")
            + _table(["domain", "docs", "share before", "draws in the mix", "share after"], rows, (1, 2, 3, 4)))


BALANCE = {
    "clusters": "ClusterClip across clusters: every cluster gets an equal share of the budget, capped at clip × "
                "its size. A source that spans many clusters can gain share this way.",
    "groups_then_clusters": "groups, then clusters: the budget is water-filled across the groups first (each capped "
                            "at clip × its size), then each group's allotment across its clusters.",
}


def _pp(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:+.2f} pp"


def _levels(rep: dict[str, Any]) -> str:
    lv = rep.get("levels") or {}
    if not lv.get("available"):
        return "<p>No <code>cell_stats</code> for this run (the stats stage writes it): no per-level figures.</p>"
    g, c = lv["groups"], lv["clusters"]
    targeted = any(r["target"] is not None for r in g["rows"])
    rows = [[_e(r["name"]), _n(r["docs"]), _pct(r["share_before"]), *([_pct(r["target"])] if targeted else []),
             _n(round(r["draws"]) if isinstance(r["draws"], float) else r["draws"]), _pct(r["share_after"]),
             (f'<span class="bad">{_pp(r["change"])}</span>' if r["lost_share"] else _pp(r["change"]))]
            for r in g["rows"]]
    header = ["group", "docs", "share before", *(["target"] if targeted else []), "draws", "share after", "change"]
    lost = g["lost_share"]
    advice = (f'<div class="advice"><b>{len(lost)} of {len(g["rows"])} group(s) lost share:</b> '
              f"{escape(', '.join(lost))}.</div>" if lost else "<p>No group lost share.</p>")
    cb, ca = c.get("shares_before") or {}, c.get("shares_after") or {}
    spread = (f"cluster-share Gini {_n(cb.get('gini'), 3)} → {_n(ca.get('gini'), 3)}; "
              if cb.get("gini") is not None and ca.get("gini") is not None else "")
    lost_k = c["lost_share"]
    return (f"<p>Balance: <b>{_e(lv['balance'])}</b> — {escape(BALANCE.get(str(lv['balance']), ''))}</p>"
            f"<h3>Level 1: groups (values of <code>{_e(lv['group_column'])}</code>)</h3>"
            + _table(header, rows, tuple(range(1, len(header))))
            + f'<p class="muted">Draws per group from {_e(g["draws_from"])}.</p>' + advice
            + f"<h3>Level 2: clusters</h3><p>{c['count']} clusters; {spread}{len(lost_k)} lost share"
            + (f" (clusters {escape(', '.join(str(k) for k in lost_k))})" if lost_k else "") + ".</p>")


def _draws(rep: dict[str, Any], figs: dict[str, str]) -> str:
    sa = rep["sample"]
    hist = sa.get("draws_per_doc_histogram")
    if not hist:
        return "<p>No draws-per-document figures: the sample stage has not run.</p>"
    rows = [[escape(k), _n(v)] for k, v in sorted(hist.items(), key=lambda kv: int(kv[0]))]
    return (_img(figs, "draws_per_doc", "histogram of draws per document")
            + f"<p>Clip: {_n(sa['clip'])}; the most draws of any document: {_n(sa['max_draws_per_doc'])} "
            f'<span class="muted">(source: {_e(sa["histogram_from"])})</span>.</p>'
            + _table(["draws", "documents"], rows, (0, 1)))


def _blend(rep: dict[str, Any], figs: dict[str, str]) -> str:
    bl = rep["blend"]
    if not bl.get("draws") and not bl["draws_by_domain"]:
        return "<p>The blend stage has not written <code>blended</code> for this run.</p>"
    rows = [[_e(d), _n(int(v["draws"])), _n(int(v.get("tokens") or 0)), _pct(bl["weights_per_domain"].get(d))]
            for d, v in bl["draws_by_domain"].items()]
    path = f" File: <code>{_e(bl['mixture_path'])}</code>." if bl.get("mixture_path") else ""
    return (f"<p>Mode: <b>{_e(bl.get('mode'))}</b> — {escape(MODES.get(str(bl.get('mode')), ''))}{path} "
            f"{_n(bl.get('draws'))} rows in <code>blended</code>; weight per cluster in the cluster table.</p>"
            + _img(figs, "blend_weights", "final weights per cluster and domain")
            + _table(["domain", "draws", "tokens", "weight"], rows, (1, 2, 3)) + _mixture(bl.get("mixture")))


def _mixture(m: dict[str, Any] | None) -> str:
    """The searched mixture against what the blend realised (token shares per cluster)."""
    if not m:
        return ""
    if m.get("fit") == "exact":
        how = ("The weights were realised as token shares: each cluster's draws are its weight of the blend's "
               "tokens at its mean document length.")
        if m.get("limited_by_cluster") is not None:
            how += (f" The clip ({_n(m['clip'])} draws per document) binds at cluster {_n(m['limited_by_cluster'])}, "
                    f"so the whole mixture was scaled to {_pct(m.get('scale'))} of the budget "
                    f"({_n(m['draws'])} draws) rather than moving weight to other clusters.")
    else:
        how = ("<code>blend.mixture_fit: fill</code>: the budget was water-filled under the clip, so clusters at "
               "their clip hand weight to the others and the blend departs from the searched mixture.")
    if m.get("unrealisable_clusters"):
        how += f" Clusters with weight but no documents: {_e(m['unrealisable_clusters'])}."
    tv = m.get("total_variation")
    rows = [[_n(r["cluster_id"]), _pct(r["searched"]), _pct(r["realised"]),
             _pct(None if r["realised"] is None else r["realised"] - r["searched"])] for r in m["rows"]]
    return (f"<h3>Searched mixture against the blend</h3><p>{how} Total variation between the searched weights and "
            f"the realised token shares: <b>{_n(tv, 4)}</b> (0: identical; {_n(m['off_by_1pt'])} of "
            f"{_n(m['clusters'])} clusters off by more than a percentage point).</p>"
            + _table(["cluster", "searched weight", "realised token share", "difference"], rows, (0, 1, 2, 3)))


def _quality(rep: dict[str, Any], figs: dict[str, str]) -> str:
    q = rep["quality"]
    if not rep["clusters"].get("available"):
        return "<p>No cluster statistics: no quality or cohesion figures.</p>"
    text = (f"<p>{_n(q['docs_with_quality'])} documents in {q['clusters_with_quality']} clusters carry a quality "
            "value: per cluster, the 10th to 90th percentile and the median.</p>" if q["available"] else
            "<p>No document carries a quality value (<code>input.quality_field</code>), so there is no quality "
            "distribution to show and a quality-weighted blend would have nothing to weigh.</p>")
    return text + ("<p>Cohesion: the mean cosine similarity of a cluster's documents to its centroid; a low "
                   "value marks a loose, mixed cluster.</p>") + _img(figs, "quality", "quality and cohesion per cluster")


def _search(rep: dict[str, Any], figs: dict[str, str]) -> str:
    se = rep["search"]
    if not se["ran"]:
        return f"<p>{escape(se['note'])}</p>"
    rows = [[str(i["iteration"]), _n(i["mixtures"]), _n(i["best"], 4), _n(i["mean"], 4)] for i in se["iterations"]]
    note = f"<p>{escape(se['note'])}</p>" if se.get("note") else ""
    return (note + _img(figs, "search", "mixture search progress")
            + _table(["iteration", "proxies trained", "best target loss", "mean target loss"], rows, (0, 1, 2, 3))
            + _predictor(se.get("predictor") or {}))


def _predictor(pr: dict[str, Any]) -> str:
    if not pr.get("available"):
        return ""
    rows = [[str(i["iteration"]), _n(i["mixtures"]), _n(i["spearman"], 3) if i["spearman"] is not None else "—"]
            for i in pr["per_iteration"]]
    overall = _n(pr["spearman"], 3) if pr["spearman"] is not None else "undefined (fewer than 3 or constant scores)"
    return ("<p>The predictor on mixtures it was not fitted on (each later iteration's proxies, predicted before "
            f"they were trained): Spearman rank correlation of predicted and trained target loss <b>{overall}</b> "
            f"over {_n(pr['mixtures'])} mixtures (1: it ranks them as training does).</p>"
            + _table(["iteration", "mixtures", "Spearman"], rows, (0, 1, 2)))


METRIC_NAMES = {"macro_source": "macro over sources", "worst_source": "worst source",
                "macro_cluster": "macro over clusters", "worst_cluster": "worst cluster", "all": "all held-out bytes"}


def _mean_spread(s: dict[str, Any] | None) -> str:
    if not s:
        return "—"
    return f"{s['mean']:.4f} <span class=\"muted\">({s['min']:.4f}–{s['max']:.4f})</span>"


def _evaluation(rep: dict[str, Any]) -> str:
    ev = rep.get("evaluation") or {"ran": False, "note": "Evaluation was not run."}
    if not ev["ran"]:
        return f"<p>{escape(ev['note'])}</p>"
    mixes = [ev["mix"], *[m for m in ev["mixes"] if m != ev["mix"]]]
    summaries = ev["summaries"]
    rows = [[escape(METRIC_NAMES.get(k, k)), *[_mean_spread(summaries.get(m, {}).get(k)) for m in mixes]]
            for k in METRIC_NAMES]
    verdicts = [[escape(b), *[_e(v.get(k)) for k in METRIC_NAMES]] for b, v in ev["verdicts"].items()]
    sources = [[_e(g), _n(d.get("n_docs")), *[_mean_spread(d.get(m)) for m in mixes]] for g, d in ev["per_source"].items()]
    return (f"<p>Small byte-level proxy models, {_n(ev['seeds'])} seeds per mix, each trained on "
            f"{_n(ev['train_tokens'])} bytes of its mix, scored on held-out documents that no plan could draw. "
            "Each seed draws its own documents of every mix (for blended, a random subsample of its rows), "
            "so the range across seeds includes the data draw as well as the initialisation. "
            "Loss in bits per byte (lower is better): mean over seeds, with the range across seeds. "
            "<b>macro</b>: the mean over groups; <b>worst</b>: the group with the highest loss.</p>"
            + _table(["held-out loss", *[escape(m) for m in mixes]], rows)
            + f"<h3>Verdict: {escape(ev['mix'])} against each baseline</h3>"
            "<p>A difference inside the seed spread (the two ranges across seeds overlap) is reported as "
            "no difference.</p>"
            + _table(["baseline", *[escape(METRIC_NAMES[k]) for k in METRIC_NAMES]], verdicts)
            + "<h3>Per source</h3>" + _table(["source", "held-out docs", *[escape(m) for m in mixes]], sources, (1,)))


def _versions(d: dict[str, Any]) -> str:
    """``table@version`` for tables; other inputs (the raw corpus, a mixture file's hash) as ``key: value``."""
    return escape(", ".join(f"{k}@{v}" if isinstance(v, int) and not k.startswith("input") else f"{k}: {v}"
                            for k, v in d.items()))


def _refresh(r: dict[str, Any]) -> str:
    """What a nightly refresh took and decided (nothing for a plain run)."""
    if r.get("mode", "run") == "run":
        return ""
    text = f"<p>A {_e(r['mode'])} run: {_n(r.get('files_taken'))} input files taken.</p>"
    d = r.get("drift")
    if d:
        rows = [[_e(k), _e(d.get(k))] for k in ("new_docs", "old_docs", "old_mean_score", "new_mean_score",
                                                  "score_drop", "share_shift", "new_vs_old_shares", "far_fraction")]
        reasons = "; ".join(d.get("reasons") or []) or "no threshold passed"
        text += (f"<p>Drift of the new documents from the existing clusters: decision <b>{_e(d.get('decision'))}"
                 f"</b> ({escape(reasons)}).</p>" + _table(["figure", "value"], rows, (1,)))
    return text


def _run(rep: dict[str, Any], figs: dict[str, str]) -> str:
    import yaml

    rows = [[_e(s["stage"]), _e(s["status"]), _n(s.get("seconds"), 2), _versions(s["inputs"]),
             _versions(s["outputs"]), _e(s.get("written_by_run") or (rep["run"]["run_id"] if s["status"] == "ran"
                                                                       else None))] for s in rep["stages"]]
    tables = [[_e(t), _n(v)] for t, v in rep["tables"].items()]
    notes = "".join(f"<li>{escape(n)}</li>" for n in rep["notes"])
    code = rep["code_version"]
    return (_refresh(rep.get("refresh") or {}) + _table(["stage", "status", "seconds", "read (table@version)", "wrote (table@version)", "written by run"],
                   rows, (2,))
            + _img(figs, "stage_times", "time per stage")
            + f"<p>Code: clustermix {_e(code['run'])} ran the pipeline; clustermix {_e(code['report'])} wrote this "
            f"report at {_e(rep['generated_at'])}.</p>"
            + "<h3>Delta table versions at the end of the run</h3>" + _table(["table", "version"], tables, (1,))
            + (f"<h3>Notes</h3><ul>{notes}</ul>" if notes else "")
            + "<h3>Config</h3><pre>" + escape(yaml.safe_dump(rep["config"], sort_keys=False)) + "</pre>")


SECTIONS = (
    # the duplicates' tables come after the balance plots: the first screen shows what the mix did
    ("accounting", "Input accounting"),
    ("clusters", "Clusters before and after sampling"),
    ("under", "Under-represented clusters"), ("domains", "Domains before and after"),
    ("draws", "Draws per document"), ("blend", "Blend: the final mix"),
    ("levels", "Balance per level: groups, then clusters"), ("dedup", "Duplicates removed"), ("quality", "Quality"),
    ("search", "Mixture search"), ("evaluation", "Does this mix help?"), ("run", "Run: stages, versions, config"),
)


def render(rep: dict[str, Any], figs: dict[str, str]) -> str:
    """The whole page for report dict ``rep`` and base64 PNG figures ``figs``."""
    run = rep["run"]
    body = {
        "accounting": _accounting(rep["accounting"]), "dedup": _dedup(rep), "clusters": _clusters(rep, figs),
        "under": _under(rep),
        "domains": _domains(rep, figs), "levels": _levels(rep), "draws": _draws(rep, figs), "blend": _blend(rep, figs),
        "quality": _quality(rep, figs), "search": _search(rep, figs), "evaluation": _evaluation(rep),
        "run": _run(rep, figs),
    }
    outcome_cls = "ok" if run.get("outcome") == "succeeded" else "bad"
    error = f'<p class="bad">Error: {_e(run["error"])}</p>' if run.get("error") else ""
    nav = "".join(f'<a href="#{k}">{escape(t)}</a>' for k, t in SECTIONS)
    sections = "".join(f'<section id="{k}"><h2>{escape(t)}</h2>{body[k]}</section>' for k, t in SECTIONS)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>clustermix report {_e(run["run_id"])}</title>'
        f"<style>{CSS}</style></head><body>"
        f"<h1>clustermix curation report</h1>"
        f'<p class="muted">run <code>{_e(run["run_id"])}</code> · <span class="{outcome_cls}">{_e(run.get("outcome"))}'
        f'</span> · started {_e(run.get("started_at"))} · finished {_e(run.get("finished_at"))} · lake '
        f'<code>{_e(run.get("lake_root"))}</code></p>{error}'
        f"<h2>At a glance</h2>{_glance(rep)}<nav>{nav}</nav>{sections}</body></html>\n"
    )
