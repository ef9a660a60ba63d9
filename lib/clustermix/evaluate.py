"""The evaluate stage (Ray and delta-rs, no JVM): does the blended mix help?

Proxies (the search's small language models, :mod:`clustermix.search.proxy`, byte-level here) are
trained on the run's ``blended`` mix and on baselines of the same size, the same number of bytes
each: ``blended`` at the proxy's size (a seeded uniform subsample of its rows), ``random`` (a uniform
random sample of the trainable documents), ``natural`` (every source gets its share of the corpus)
and, when the search wrote a best mixture, ``climb`` (its weights per cluster). Each mix is trained
with ``evaluate.seeds`` seeds, and seed ``i`` (:func:`seed_of`, the same for every mix) decides the
data drawn (:mod:`clustermix.evaldata`), the initialisation and the window order, so the spread
across seeds includes the data draw. The proxies are scored on the held-out documents
(:mod:`clustermix.holdout`),
which no plan could draw: stats, sample, blend and search leave them out while evaluation is on,
and this stage refuses a ``blended`` that holds one.

It writes ``evaluations`` (one row per mix, seed and group: bits per byte per source, per cluster,
overall, and each proxy's macro and worst) and returns the figures across seeds, with a verdict per
baseline (:mod:`clustermix.spread`: a difference inside the seed spread is ``no difference``).
Proxies are independent Ray tasks (a GPU each with ``evaluate.gpus_per_proxy``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import deltalog, deltars, evaldata, holdout, spread
from clustermix.errors import ConfigError, DataError

if TYPE_CHECKING:
    import pyarrow as pa

    from clustermix.config import Config
    from clustermix.holdout import Holdout
    from clustermix.lake import Lake
    from clustermix.search.proxy import ProxySpec
    from clustermix.stage import Context
    from clustermix.storage import S3Settings
    from clustermix.tableio import TableWriter

log = logging.getLogger(__name__)

# one segment of a mix's training stream: the documents (id, text) in order and the tokens taken from
# them (cycled when the quota is more than they hold)
Segment = tuple[list[tuple[str, str]], int]


def proxy_spec(cfg: Config, seed: int) -> ProxySpec:
    """The search's proxy shape, byte-level, trained for ``evaluate.proxy_tokens`` tokens from ``seed``."""
    from clustermix.search.proxy import ProxySpec

    s, e = cfg.search, cfg.evaluate
    return ProxySpec("bytes", s.vocab_size, s.proxy_d_model, s.proxy_layers, s.proxy_heads, s.proxy_context,
                     s.proxy_batch_size, e.proxy_tokens, s.proxy_lr, s.target_max_tokens, s.device, s.torch_threads,
                     seed)


def seed_of(seed: int, index: int) -> int:
    """Seed ``index`` of the evaluation: a stable 32-bit seed, shared by every mix (its data draw, its
    initialisation and its window order)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def mixture_weights(lake: Lake) -> dict[str, float] | None:
    """The search's best mixture (weights per cluster), or None when no search wrote one."""
    from clustermix.manifest import read_json

    try:
        doc = read_json(lake.best_mixture_uri(), s3=lake.s3)
    except (OSError, ValueError):
        return None
    w = doc.get("weights") if isinstance(doc, dict) else None
    return {str(k): float(v) for k, v in w.items()} if isinstance(w, dict) and w else None


def training_sets(draw: evaldata.Draw, blended: pa.Table, budget: int, baselines: list[str],
                  climb: dict[str, float] | None, index: int = 0) -> dict[str, list[Segment]]:
    """Seed ``index``'s training stream of every mix, as segments of documents and token quotas summing
    to ``budget``: ``blended`` is that seed's subsample of blended, the baselines its draw."""
    out: dict[str, list[Segment]] = {"blended": [(evaldata.texts_of(blended), budget)]}
    if "random" in baselines:
        out["random"] = [(evaldata.texts_of(draw.role("random", index=index)), budget)]
    for name, role, weights in (("natural", "source", {g: float(n) for g, n in draw.source_tokens.items()}),
                                ("climb", "cluster", climb)):
        if name not in baselines or not weights:
            continue
        table = draw.role(role, index=index)
        groups = table.column("group").to_pylist()
        parts: dict[str, list[tuple[str, str]]] = {}
        for g, pair in zip(groups, evaldata.texts_of(table), strict=True):
            parts.setdefault(g, []).append(pair)
        live = {g: w for g, w in weights.items() if parts.get(g)}  # a cluster with nothing trainable
        if not live:
            continue
        split = evaldata.apportioned(parts, live, budget)
        out[name] = [(split["docs"][g], split["quota"][g]) for g in sorted(split["quota"])]
    return out


def train_and_score(segments: list[Segment], held: list[str], spec: ProxySpec) -> dict[str, Any]:
    """One proxy, as a Ray task body: the mix's stream, a fresh model trained on it, the summed loss
    (nats) of each held-out document."""
    from clustermix.search.proxy import doc_nats, encode, fit, stream

    t0 = time.time()
    parts = [stream([t for _, t in docs], spec, quota, cycle=True)[0] for docs, quota in segments]
    model, info = fit(np.concatenate(parts), spec, spec.init_seed)
    nats = doc_nats(model, [encode(t, spec) for t in held], spec)
    return {**info, "nats": nats, "seconds": round(time.time() - t0, 3)}


def _train_all(sets: list[dict[str, list[Segment]]], held: list[str],
               cfg: Config) -> dict[tuple[str, int], dict[str, Any]]:
    """One proxy per mix and seed ``i``, on seed ``i``'s stream of that mix (``sets[i]``)."""
    import ray

    e = cfg.evaluate
    task = ray.remote(num_cpus=e.cpus_per_proxy, num_gpus=e.gpus_per_proxy, max_retries=1)(train_and_score)
    held_ref = ray.put(held)
    keys = [(mix, i) for mix in sorted({m for s in sets for m in s}) for i, s in enumerate(sets) if mix in s]
    refs = [task.remote(ray.put(sets[i][mix]), held_ref, proxy_spec(cfg, seed_of(e.seed, i))) for mix, i in keys]
    pending, done = list(refs), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        done += len(ready)
        log.info("evaluate: %d/%d proxies trained", done, len(refs))
    return dict(zip(keys, ray.get(refs), strict=True))


def evaluation_rows(held: pa.Table, results: dict[tuple[str, int], dict[str, Any]], seed: int,
                    run_id: str) -> list[dict[str, Any]]:
    """Per (mix, seed): bits per byte per source, per cluster, overall, and the macro and worst of each."""
    sizes = np.array([len(t.encode("utf-8")) for t in held.column("text").to_pylist()], dtype=np.float64)
    kinds = {"source": [str(d) for d in held.column("domain").to_pylist()],
             "cluster": [str(c) for c in held.column("cluster_id").to_pylist()], "all": ["all"] * held.num_rows}
    rows: list[dict[str, Any]] = []
    for (mix, i), res in sorted(results.items()):
        nats = np.asarray(res["nats"], dtype=np.float64)
        base = {"run_id": run_id, "mix": mix, "seed_index": i, "seed": seed_of(seed, i),
                "train_tokens": int(res["tokens"])}
        proxy_rows = []
        for kind, labels in kinds.items():
            groups: dict[str, list[int]] = {}
            for j, g in enumerate(labels):
                groups.setdefault(g, []).append(j)
            for g, idx in sorted(groups.items()):
                bpb = float(nats[idx].sum() / math.log(2) / max(sizes[idx].sum(), 1.0))
                proxy_rows.append({**base, "group_kind": kind, "group": g, "n_docs": len(idx),
                                   "bytes": int(sizes[idx].sum()), "loss_bits_per_byte": bpb})
        figures = spread.group_figures(proxy_rows)
        for kind in ("source", "cluster"):
            for agg in ("macro", "worst"):
                proxy_rows.append({**base, "group_kind": agg, "group": kind, "n_docs": held.num_rows,
                                   "bytes": int(sizes.sum()), "loss_bits_per_byte": figures[f"{agg}_{kind}"]})
        rows.extend(proxy_rows)
    return rows


def check_blended(uri: str, version: int | None, hold: Holdout, s3: S3Settings | None) -> None:
    """Stop when ``blended`` holds a held-out document (it was blended without the hold-out)."""
    n = evaldata.held_in(uri, version, hold, s3)
    if n:
        raise DataError(f"evaluate: blended holds {n} held-out documents: it was made with another hold-out "
                        "(or with evaluate.enabled off); rerun `clustermix run` with this config first")


def run_evaluate(lake: Lake, cfg: Config, inputs: dict[str, Any], run_id: str, write: TableWriter,
                 seen: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and score every mix's proxies; commit ``evaluations``; return the manifest's figures.
    ``seen``: filled with what the proxies read (the draw, blended's subsample per seed, the training
    sets per seed)."""
    import ray

    t0 = time.time()
    e = cfg.evaluate
    hold = holdout.of(cfg)
    if hold is None:
        raise ConfigError("evaluate.enabled", False, "evaluate needs the hold-out: set evaluate.enabled=true and "
                          "run `clustermix run` with it, so that no plan draws the held-out documents")
    s3 = lake.s3  # handed to the Ray workers explicitly
    check_blended(lake.table("blended"), inputs.get("blended"), hold, s3)
    budget = e.proxy_tokens + 1  # +1: the last window's shifted target
    seeds = [seed_of(e.seed, i) for i in range(e.seeds)]  # seed i: its own data draw for every mix
    dups = lake.table("semantic_duplicates")
    partitions = max(2, min(256, int(ray.cluster_resources().get("CPU", 2))))
    draw = evaldata.draw((lake.table("docs"), inputs.get("docs")), (lake.table("assignments"), inputs.get("assignments")),
                         (dups, inputs.get("semantic_duplicates")) if deltalog.version(dups, s3=s3) is not None else None,
                         hold, e.seed, seeds, budget, e.max_per_source, e.max_doc_bytes, partitions, s3)
    held = draw.role("heldout")
    if held.num_rows == 0:
        raise DataError(f"evaluate: no document is held out (evaluate.holdout_fraction={e.holdout_fraction}): "
                        "raise the fraction")
    blended = evaldata.blended_draws(lake.table("blended"), inputs.get("blended"), seeds, budget, s3)
    climb = mixture_weights(lake) if "climb" in e.baselines else None
    sets = [training_sets(draw, blended[i], budget, list(e.baselines), climb, i) for i in range(e.seeds)]
    if seen is not None:
        seen.update(draw=draw, blended=blended, sets=sets)
    trained_ids = [i for by_mix in sets for segs in by_mix.values() for docs, _ in segs for i, _ in docs]
    if hold.mask(trained_ids).any():  # the hold-out's promise, checked on what the proxies read
        raise RuntimeError("evaluate: a training set holds a held-out document")
    mixes = sorted({m for by_mix in sets for m in by_mix})
    log.info("evaluate: %d held-out documents; mixes %s; %d seeds, each its own draw", held.num_rows, mixes, e.seeds)
    results = _train_all(sets, held.column("text").to_pylist(), cfg)
    rows = evaluation_rows(held, results, e.seed, run_id)
    write.record("evaluations", deltars.overwrite(lake.table("evaluations"), evaluations_table(rows), write.meta, s3=lake.s3))
    cmp = spread.compare(rows)
    return {"mixes": mixes, "seeds": e.seeds, "held_out_scored": held.num_rows,
            "held_out_sources": len(set(held.column("group").to_pylist())), "proxy_tokens": e.proxy_tokens,
            "summaries": cmp["summaries"], "verdicts": cmp["verdicts"],
            # per mix, per seed: the documents drawn, and the tokens each proxy trained on
            "training_docs": {m: [sum(len(d) for d, _ in by_mix.get(m, [])) for by_mix in sets] for m in mixes},
            "train_tokens": {m: [int(results[(m, i)]["tokens"]) if (m, i) in results else 0 for i in range(e.seeds)]
                             for m in mixes},
            "seconds": round(time.time() - t0, 2)}


def evaluations_table(rows: list[dict[str, Any]]) -> pa.Table:
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=deltars.arrow_schema("evaluations"))


def stage_inputs(ctx: Context) -> dict[str, Any]:
    """The CLIMB baseline depends on the search's best mixture file's content."""
    import hashlib
    import json

    w = mixture_weights(ctx.lake) if "climb" in ctx.cfg.evaluate.baselines else None
    if not w:
        return {}
    return {"mixture_sha256": hashlib.sha256(json.dumps(w, sort_keys=True).encode()).hexdigest()[:16]}


def run(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    """The evaluate stage, on the pinned inputs (the draw with Ray Data, proxies as Ray tasks)."""
    ctx.ray()
    return run_evaluate(ctx.lake, ctx.cfg, inputs, ctx.run_id, ctx.write)
