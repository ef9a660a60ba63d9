"""The report's figures: matplotlib (Agg, no pyplot state) drawn from the report dict alone, as PNG.

Every figure is drawn from numbers that ``report.json`` also holds, so what a person sees is what a
machine can check. A figure whose data the run lacks is left out (the HTML says why).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

# Fixed colours: "before" and "after" look the same in every figure, and the browser test looks
# for them in a screenshot to tell that the plots rendered.
BEFORE = "#1f77b4"
AFTER = "#ff7f0e"
THRESHOLD = "#d62728"
MUTED = "#7f7f7f"

def _new(width: float = 10.0, height: float = 3.6, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    for ax in axes if ncols > 1 else [axes]:
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="y", alpha=0.3)
    return fig, axes


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _cluster_ticks(ax: Any, labels: list[str]) -> None:
    # past ~40 clusters the labels overlap; the table below the figure names every cluster
    if len(labels) <= 40:
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("cluster", fontsize=9)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(labels)} clusters, largest first")


def _grouped(ax: Any, labels: list[str], before: list[float], after: list[float], names: tuple[str, str]) -> None:
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], before, width=0.4, color=BEFORE, label=names[0])
    ax.bar([x + 0.2 for x in xs], after, width=0.4, color=AFTER, label=names[1])
    ax.legend(frameon=False, fontsize=9)


def cluster_sizes(rep: dict[str, Any]) -> str | None:
    """Share of each cluster in the corpus vs in the sample, largest cluster first."""
    rows = sorted(rep["clusters"]["rows"], key=lambda r: -r["n_docs"])
    if not rows or rows[0].get("sample_share") is None:
        return None
    fig, ax = _new()
    labels = [str(r["cluster_id"]) for r in rows]
    _grouped(ax, labels, [100 * r["share"] for r in rows], [100 * r["sample_share"] for r in rows],
             ("corpus (documents)", "sample (draws)"))
    min_share = rep["clusters"]["min_share"]
    ax.axhline(100 * min_share, color=THRESHOLD, ls="--", lw=1, label=f"threshold {min_share:.1%}")
    ax.axhline(100 / len(rows), color=MUTED, ls=":", lw=1, label="uniform 1/K")
    ax.legend(frameon=False, fontsize=9)
    _cluster_ticks(ax, labels)
    ax.set_ylabel("share, %")
    ax.set_title("Cluster shares before and after ClusterClip sampling")
    return _png(fig)


def domain_shares(rep: dict[str, Any]) -> str | None:
    """Share of each domain in the corpus vs in the blended mix."""
    dom = rep["domains"]
    if not dom["before"] or not dom["after"]:
        return None
    names = sorted(set(dom["share_before"]) | set(dom["share_after"]), key=lambda d: -dom["before"].get(d, 0))
    fig, ax = _new(height=3.2)
    _grouped(ax, names, [100 * dom["share_before"].get(d, 0) for d in names],
             [100 * dom["share_after"].get(d, 0) for d in names], ("corpus (documents)", "blended mix (draws)"))
    ax.set_xticks(range(len(names)), [n[:24] for n in names], fontsize=9, rotation=20 if len(names) > 8 else 0)
    ax.set_ylabel("share, %")
    ax.set_title("Domain shares before and after")
    return _png(fig)


def draws_per_doc(rep: dict[str, Any]) -> str | None:
    """How many documents are drawn 0, 1, ... times, with the clip marked."""
    hist = rep["sample"].get("draws_per_doc_histogram")
    if not hist:
        return None
    xs = sorted(int(k) for k in hist)
    fig, ax = _new(width=7, height=3.2)
    ax.bar(xs, [hist[str(x)] for x in xs], color=AFTER, width=0.7)
    clip = rep["sample"].get("clip")
    if clip is not None:
        ax.axvline(clip + 0.45, color=THRESHOLD, ls="--", lw=1, label=f"clip = {clip}")
        ax.legend(frameon=False, fontsize=9)
    ax.set_xticks(xs)
    ax.set_xlabel("times a document is drawn")
    ax.set_ylabel("documents")
    ax.set_title("Draws per document")
    return _png(fig)


def blend_weights(rep: dict[str, Any]) -> str | None:
    """The final mix: weight per cluster and per domain."""
    bl = rep["blend"]
    if not bl.get("weights_per_cluster"):
        return None
    fig, (a1, a2) = _new(height=3.4, ncols=2)
    per_c = sorted(bl["weights_per_cluster"].items(), key=lambda kv: -kv[1])
    a1.bar(range(len(per_c)), [100 * w for _, w in per_c], color=AFTER)
    _cluster_ticks(a1, [k for k, _ in per_c])
    a1.set_ylabel("weight, %")
    a1.set_title(f"Final weight per cluster ({bl.get('mode')})")
    per_d = sorted(bl.get("weights_per_domain", {}).items(), key=lambda kv: -kv[1])
    a2.bar(range(len(per_d)), [100 * w for _, w in per_d], color=BEFORE)
    a2.set_xticks(range(len(per_d)), [k[:16] for k, _ in per_d], fontsize=8, rotation=30)
    a2.set_title("Final weight per domain")
    return _png(fig)


def quality(rep: dict[str, Any]) -> str | None:
    """Per cluster: quality q10-q90 with the median (when documents carry quality) and cohesion."""
    rows = rep["clusters"]["rows"]
    if not rows:
        return None
    with_q = [r for r in rows if r.get("quality_q10_50_90")]
    fig, axes = _new(height=3.4, ncols=2 if with_q else 1)
    ax_c = axes[1] if with_q else axes
    if with_q:
        ax_q = axes[0]
        for i, r in enumerate(with_q):
            lo, mid, hi = r["quality_q10_50_90"]
            ax_q.vlines(i, lo, hi, color=BEFORE, lw=3)
            ax_q.plot(i, mid, "o", color=AFTER, ms=4)
        _cluster_ticks(ax_q, [str(r["cluster_id"]) for r in with_q])
        ax_q.set_title("Quality per cluster (q10-q90, median)")
    coh = [(str(r["cluster_id"]), r["score_mean"]) for r in rows if r.get("score_mean") is not None]
    ax_c.bar(range(len(coh)), [v for _, v in coh], color=BEFORE)
    _cluster_ticks(ax_c, [k for k, _ in coh])
    ax_c.set_ylabel("mean cosine to centroid")
    ax_c.set_title("Cluster cohesion")
    return _png(fig)


def stage_times(rep: dict[str, Any]) -> str | None:
    """Seconds per stage in this run (skipped stages show as 0, in grey)."""
    st = [s for s in rep["stages"] if s.get("status") in ("ran", "skipped")]
    if not st:
        return None
    fig, ax = _new(width=7, height=0.5 + 0.35 * len(st))
    ax.grid(axis="x", alpha=0.3)
    ax.barh([s["stage"] for s in st], [s.get("seconds") or 0 for s in st],
            color=[AFTER if s["status"] == "ran" else MUTED for s in st])
    for i, s in enumerate(st):
        if s["status"] != "ran":
            ax.text(0, i, " skipped", va="center", color=MUTED, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (grey: skipped, outputs were current)")
    ax.set_title("Time per stage")
    return _png(fig)


def search(rep: dict[str, Any]) -> str | None:
    """Mixture search progress: every proxy's score by iteration, and the best so far."""
    se = rep["search"]
    if not se.get("ran") or not se.get("iterations"):
        return None
    fig, ax = _new(width=7, height=3.2)
    its = se["iterations"]
    ax.plot([i["iteration"] for i in its], [i["best"] for i in its], "o-", color=AFTER, label="best")
    ax.plot([i["iteration"] for i in its], [i["mean"] for i in its], "s--", color=BEFORE, label="mean")
    ax.set_xticks([i["iteration"] for i in its])
    ax.set_xlabel("iteration")
    ax.set_ylabel("proxy loss on the target (lower is better)")
    ax.legend(frameon=False, fontsize=9)
    ax.set_title("Mixture search progress")
    return _png(fig)


FIGURES: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "cluster_sizes": cluster_sizes, "domain_shares": domain_shares, "draws_per_doc": draws_per_doc,
    "blend_weights": blend_weights, "quality": quality, "stage_times": stage_times, "search": search,
}


def render_all(rep: dict[str, Any]) -> dict[str, str]:
    """Every figure the report's data allows, as base64 PNG, by name."""
    out = {}
    for name, draw in FIGURES.items():
        png = draw(rep)
        if png is not None:
            out[name] = png
    return out
