"""``clustermix evaluate``: the hold-out no plan may draw, proxies on the mix and its baselines, the
``evaluations`` table, the verdicts and the report's "Does this mix help?" section.

The stage runs for real (Spark stats, sample and blend, Ray Data and Ray tasks, delta-rs) on a copy of
the shared pipeline's lake, with tiny proxies and two seeds.
"""

from __future__ import annotations

import shutil
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustermix.config import EvaluateConfig, SearchConfig
from clustermix.holdout import Holdout
from clustermix.spread import compare, summary, verdict

EVALUATE = {"enabled": True, "holdout_fraction": 0.2, "max_per_source": 5, "max_doc_bytes": 600, "seeds": 2,
            "proxy_tokens": 3000, "baselines": ["random", "natural", "climb"]}
PROXY = {"proxy_d_model": 16, "proxy_layers": 1, "proxy_heads": 2, "proxy_context": 32, "proxy_batch_size": 8}


# --- pure parts -------------------------------------------------------------------------------

def test_holdout_is_deterministic_seeded_and_near_its_fraction():
    ids = [f"doc-{i}" for i in range(20_000)]
    h = Holdout(0.1, 27)
    mask = h.mask(ids)
    assert (mask == Holdout(0.1, 27).mask(ids)).all()  # a pure function of (id, seed, fraction)
    assert abs(mask.mean() - 0.1) < 0.01
    assert (Holdout(0.1, 28).mask(ids) != mask).any()  # another seed, another set
    assert (mask <= Holdout(0.2, 27).mask(ids)).all()  # a larger fraction holds out a superset
    assert [h.is_held(i) for i in ids[:50]] == mask[:50].tolist()
    assert not Holdout(0.5, 1).mask([None]).any()


def test_spark_and_python_agree_on_the_holdout(spark):
    from clustermix import contracts, evaldata
    from clustermix.kept import held_out

    assert evaldata.NO_DOMAIN == contracts.NO_DOMAIN
    ids = [f"id-{i}" for i in range(1000)] + ["ünïcödé", "", "a'b"]
    h = Holdout(0.15, 5)
    df = spark.createDataFrame([(i,) for i in ids], "id string")
    held = {r["id"] for r in df.where(held_out(h)).collect()}
    assert held == {i for i, m in zip(ids, h.mask(ids), strict=True) if m}


def test_verdict_examples_and_config():
    assert verdict([1.0, 1.1], [1.2, 1.3]) == "better"
    assert verdict([1.4, 1.5], [1.2, 1.3]) == "worse"
    assert verdict([1.0, 1.25], [1.2, 1.3]) == "no difference"
    assert summary([1.0, 3.0]) == {"mean": 2.0, "min": 1.0, "max": 3.0, "spread": 2.0, "std": pytest.approx(2 ** 0.5),
                                   "seeds": 2}
    with pytest.raises(ValueError):
        EvaluateConfig(seeds=1)  # no spread from one seed
    with pytest.raises(ValueError):
        EvaluateConfig(holdout_fraction=0.9)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.5, 5.0), min_size=2, max_size=5), st.floats(-1.0, 1.0), st.floats(0.0, 1.0))
def test_a_difference_inside_the_seed_spread_is_no_difference(base, shift, where):
    mix = [v + shift for v in base]
    lo, hi = min(base), max(base)
    inside = lo + where * (hi - lo)  # a value inside the baseline's range across seeds
    assert verdict([*mix, inside], base) == "no difference"
    assert verdict(base, base) == "no difference"
    v = verdict(mix, base)
    assert {v, verdict(base, mix)} in ({"no difference"}, {"better", "worse"})  # antisymmetric
    if v == "better":
        assert sum(mix) / len(mix) < sum(base) / len(base)


def test_compare_reports_macro_worst_and_verdicts():
    rows = []
    for mix, offset in (("blended", 0.0), ("random", 0.5), ("natural", 0.01)):
        for seed in (0, 1):
            for g, loss in (("a", 1.0), ("b", 2.0)):
                rows.append({"mix": mix, "seed": seed, "group_kind": "source", "group": g,
                             "loss_bits_per_byte": loss + offset + 0.02 * seed})
            rows.append({"mix": mix, "seed": seed, "group_kind": "all", "group": "all",
                         "loss_bits_per_byte": 1.5 + offset + 0.02 * seed})
    out = compare(rows)
    s = out["summaries"]["blended"]
    assert s["macro_source"]["mean"] == pytest.approx(1.51) and s["worst_source"]["mean"] == pytest.approx(2.01)
    assert s["macro_source"]["spread"] == pytest.approx(0.02)
    assert out["verdicts"]["random"]["macro_source"] == "better"
    assert out["verdicts"]["natural"]["macro_source"] == "no difference"  # 0.01 apart, inside a 0.02 spread


def test_the_holdout_is_in_the_fingerprints_of_the_stages_it_changes():
    from clustermix.config import load_config
    from clustermix.registry import config_hash, default_stages

    base = load_config(None, ["evaluate.enabled=true"])
    assert "evaluate" in default_stages(base) and "evaluate" not in default_stages(load_config())
    for key in ("evaluate.enabled=false", "evaluate.holdout_fraction=0.1", "evaluate.holdout_seed=1"):
        other = load_config(None, ["evaluate.enabled=true", key])
        for stage in ("stats", "sample", "search", "blend"):
            assert config_hash(other, stage) != config_hash(base, stage), (key, stage)
        assert config_hash(other, "cluster") == config_hash(base, "cluster")
    more = load_config(None, ["evaluate.enabled=true", "evaluate.seeds=5"])
    assert config_hash(more, "evaluate") != config_hash(base, "evaluate")
    assert config_hash(more, "blend") == config_hash(base, "blend")  # how it is scored leaves the mix alone
    gpu = load_config(None, ["evaluate.enabled=true", "evaluate.gpus_per_proxy=1"])
    assert config_hash(gpu, "evaluate") == config_hash(base, "evaluate")


def _docs_block(n: int = 600):
    import pyarrow as pa

    return pa.table({"id": [f"doc-{i}" for i in range(n)], "text": ["x" * (30 + i % 70) for i in range(n)],
                     "domain": [f"s{i % 4}" if i % 9 else None for i in range(n)],
                     "cluster_id": pa.array([i % 5 for i in range(n)], pa.int32())})


def _drawn(seeds, hold, budget=3000):
    from clustermix import evaldata

    rows = evaldata._block(_docs_block(), holdout=hold, seed=7, seeds=seeds, budget=budget, cap=5, max_doc_bytes=40)
    return evaldata.Draw(rows.filter([not r.startswith("total_") for r in rows.column("role").to_pylist()]), {}, {})


def test_each_seed_draws_its_own_documents_deterministically_and_none_held_out():
    """Seed i's random, per-source and per-cluster prefixes come from seed i's own hash order: two seeds
    draw different sets, the same seed draws the same set, no set holds a held-out id, and the
    scored documents are the same for every seed."""
    from clustermix.evaluate import seed_of

    hold = Holdout(0.2, 27)
    seeds = [seed_of(7, i) for i in range(3)]
    draw, again = _drawn(seeds, hold), _drawn(seeds, hold)
    assert draw.rows.equals(again.rows)  # the same seeds, the same sets
    for role in ("random", "source", "cluster"):
        sets = [draw.role(role, index=i).column("id").to_pylist() for i in range(3)]
        assert all(sets) and len({tuple(sorted(x)) for x in sets}) == 3, role  # each seed its own draw
        for ids in sets:
            assert not hold.mask(ids).any(), role
    for i in range(3):
        assert sum(draw.role("random", index=i).column("ptokens").to_pylist()) >= 3000  # covers the budget
    held = draw.role("heldout").column("id").to_pylist()
    assert held and hold.mask(held).all() and set(draw.rows.column("seed_index").to_pylist()) == {-1, 0, 1, 2}
    # seed i's draw does not depend on which other seeds are drawn with it
    alone = _drawn([seeds[1]], hold)
    assert alone.role("random", index=0).column("id").to_pylist() == draw.role("random", index=1).column("id").to_pylist()


def test_blended_subsample_is_the_same_mix_per_seed():
    """Each seed's subsample of blended is a uniform draw of its rows: its cluster shares are close to
    blended's own, seeds differ, a seed repeats itself, and it keeps blended's (position) order."""
    import numpy as np
    import pyarrow as pa

    from clustermix import evaldata
    from clustermix.evaluate import seed_of

    n = 4000
    rng = np.random.default_rng(0)
    clusters = rng.choice(6, size=n, p=[0.4, 0.25, 0.15, 0.1, 0.07, 0.03]).astype(np.int32)
    blended = pa.table({"id": [f"doc-{i % 1500}" for i in range(n)], "text": ["y" * (50 + i % 30) for i in range(n)],
                        "domain": ["a"] * n, "cluster_id": pa.array(clusters),
                        "position": pa.array(np.arange(n), pa.int64())})
    total = int(evaldata.doc_tokens(blended.column("text").to_pylist()).sum())
    seeds = [seed_of(7, i) for i in range(3)]
    budget = total // 4
    drawn = evaldata._blended_block(blended, seeds=seeds, budget=budget)
    assert drawn.equals(evaldata._blended_block(blended, seeds=seeds, budget=budget))
    share = np.bincount(clusters, minlength=6) / n
    positions = []
    for i in range(3):
        t = drawn.filter(pa.array(drawn.column("seed_index").to_numpy() == i))
        tokens = int(t.column("ptokens").to_numpy().sum())
        assert budget <= tokens < budget + 100
        own = np.bincount(t.column("cluster_id").to_numpy(), minlength=6) / t.num_rows
        assert np.abs(own - share).max() < 0.03, (i, own, share)
        positions.append(sorted(t.column("position").to_pylist()))
    assert len({tuple(p) for p in positions}) == 3


# --- the stage, for real ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated(pipeline, spark, tmp_path_factory):
    """A copy of the shared lake, remixed with the hold-out (stats, sample, blend), then evaluated."""
    from clustermix.pipeline import run_stages

    cfg, run = pipeline
    root = tmp_path_factory.mktemp("evaluate") / "lake"
    shutil.copytree(run.lake.root, root, ignore=shutil.ignore_patterns("search", "_staging"))
    cfg = cfg.model_copy(update={"lake": cfg.lake.model_copy(update={"root": str(root)}),
                                 "evaluate": EvaluateConfig(**EVALUATE),
                                 "search": SearchConfig(**PROXY)})
    t0 = time.time()
    ran = run_stages(cfg, stages=("stats", "sample", "blend", "evaluate"), spark=spark)
    print(f"remix and evaluate: {time.time() - t0:.1f}s; evaluate counts:", ran.manifest["stages"]["evaluate"]["counts"])
    return cfg, ran


def _table(lake, name):
    from deltalake import DeltaTable

    return DeltaTable(lake.table(name)).to_pyarrow_table()


def test_no_plan_draws_a_held_out_document(evaluated):
    from clustermix import holdout

    cfg, run = evaluated
    hold = holdout.of(cfg)
    docs = _table(run.lake, "docs").column("id").to_pylist()
    assert 0 < hold.mask(docs).sum() < len(docs)
    for table in ("sample_plan", "blended"):
        ids = _table(run.lake, table).column("id").to_pylist()
        assert ids and not hold.mask(ids).any(), table
    stats = _table(run.lake, "cluster_stats")
    assert sum(stats.column("n_docs").to_pylist()) == len(docs) - hold.mask(docs).sum()  # the same kept set


def test_evaluate_never_trains_on_a_held_out_document_and_is_deterministic(evaluated):
    """The stage again with the same seeds: the same rows. What every proxy read holds no held-out id;
    the scored documents are held-out ones, at most max_per_source per source."""
    from clustermix import deltalog, holdout, tableio
    from clustermix.evaluate import run_evaluate, training_sets

    cfg, run = evaluated
    hold, e = holdout.of(cfg), cfg.evaluate
    rows = _table(run.lake, "evaluations").to_pylist()
    inputs = run.manifest["stages"]["evaluate"]["inputs"]
    writer = tableio.TableWriter(run.lake, {"run_id": "again", "stage": "evaluate", "inputs": inputs})
    seen: dict = {}
    run_evaluate(run.lake, cfg, inputs, "again", writer, seen)
    again = _table(run.lake, "evaluations").to_pylist()
    key = lambda r: (r["mix"], r["seed_index"], r["group_kind"], r["group"])  # noqa: E731
    strip = lambda rs: sorted(({k: v for k, v in r.items() if k != "run_id"} for r in rs), key=key)  # noqa: E731
    assert strip(again) == strip(rows)
    assert deltalog.last_commit_meta(run.lake.table("evaluations"))["run_id"] == "again"

    budget = e.proxy_tokens + 1
    assert len(seen["sets"]) == e.seeds  # each seed its own draw of every mix
    for index, drawn in enumerate(seen["sets"]):
        assert sorted(drawn) == ["blended", "natural", "random"]  # no search in this lake: no CLIMB baseline
        # with a searched mixture, the CLIMB baseline is cut from the same draw
        climb = {str(c): 1.0 / cfg.cluster.k for c in range(cfg.cluster.k)}
        sets = {**drawn, **training_sets(seen["draw"], seen["blended"][index], budget, ["climb"], climb, index)}
        assert "climb" in sets
        for mix, segments in sets.items():
            ids = [i for docs, _ in segments for i, _ in docs]
            assert ids and not hold.mask(ids).any(), (mix, index)
            assert sum(q for _, q in segments) == budget, mix  # every mix trains on the same number of bytes
    held = seen["draw"].role("heldout")
    assert held.num_rows and hold.mask(held.column("id").to_pylist()).all()
    per_source: dict[str, int] = {}
    for g in held.column("group").to_pylist():
        per_source[g] = per_source.get(g, 0) + 1
    assert max(per_source.values()) <= e.max_per_source
    counts = run.manifest["stages"]["evaluate"]["counts"]
    assert counts["held_out_scored"] == held.num_rows and counts["seeds"] == 2


def test_each_seed_draws_its_own_blended_and_baselines(evaluated):
    """On the evaluated lake: seed i's random set and blended subsample differ from seed j's, the same
    seeds draw the same sets again, no seed's set holds a held-out id, and each seed's subsample of
    blended has blended's own cluster shares."""
    import numpy as np
    import ray

    from clustermix import deltalog, evaldata, holdout
    from clustermix.evaluate import seed_of

    cfg, run = evaluated
    hold, e = holdout.of(cfg), cfg.evaluate
    inputs = run.manifest["stages"]["evaluate"]["inputs"]
    lake = run.lake
    seeds = [seed_of(e.seed, i) for i in range(3)]
    budget = e.proxy_tokens + 1
    partitions = max(2, int(ray.cluster_resources().get("CPU", 2)))
    dups = lake.table("semantic_duplicates")

    def draw():
        return evaldata.draw((lake.table("docs"), inputs.get("docs")),
                             (lake.table("assignments"), inputs.get("assignments")),
                             (dups, inputs.get("semantic_duplicates")) if deltalog.version(dups) is not None else None,
                             hold, e.seed, seeds, budget, e.max_per_source, e.max_doc_bytes, partitions, None)

    first, second = draw(), draw()
    for role in ("random", "source", "cluster"):
        sets = [first.role(role, index=i).column("id").to_pylist() for i in range(3)]
        assert sets == [second.role(role, index=i).column("id").to_pylist() for i in range(3)], role
        assert len({tuple(sorted(x)) for x in sets}) == 3, role
        assert all(x and not hold.mask(x).any() for x in sets), role
    blended_rows = _table(lake, "blended")
    tokens = evaldata.doc_tokens(blended_rows.column("text").to_pylist())
    for size in (budget, int(tokens.sum()) // 2):
        subs = evaldata.blended_draws(lake.table("blended"), inputs.get("blended"), seeds, size, None)
        again = evaldata.blended_draws(lake.table("blended"), inputs.get("blended"), seeds, size, None)
        assert [t.to_pylist() for t in subs] == [t.to_pylist() for t in again]
        assert len({tuple(t.column("position").to_pylist()) for t in subs}) == 3
        for t in subs:
            assert t.num_rows and not hold.mask(t.column("id").to_pylist()).any()
            assert t.column("position").to_pylist() == sorted(t.column("position").to_pylist())
            assert int(evaldata.doc_tokens(t.column("text").to_pylist()).sum()) >= size
    k = cfg.cluster.k
    share = np.bincount(blended_rows.column("cluster_id").to_numpy(), minlength=k) / blended_rows.num_rows
    for t in subs:  # half of blended: the same mix, up to the draw (n of N rows without replacement)
        n, total = t.num_rows, blended_rows.num_rows
        own = np.bincount(t.column("cluster_id").to_numpy(), minlength=k) / n
        sd = np.sqrt(share * (1 - share) / n * (total - n) / max(total - 1, 1))
        print("blended cluster shares:", own.round(3), "blended's own:", share.round(3), f"{n} of {total} rows")
        assert (np.abs(own - share) <= 3.5 * sd + 1.0 / n).all()


def test_evaluations_table(evaluated):
    cfg, run = evaluated
    rows = _table(run.lake, "evaluations").to_pylist()
    assert {r["mix"] for r in rows} == {"blended", "random", "natural"}
    assert {r["seed_index"] for r in rows} == {0, 1} and len({r["seed"] for r in rows}) == 2
    assert {r["group_kind"] for r in rows} == {"source", "cluster", "all", "macro", "worst"}
    assert all(0 < r["loss_bits_per_byte"] < 9 for r in rows)
    assert {r["train_tokens"] for r in rows} == {cfg.evaluate.proxy_tokens - cfg.evaluate.proxy_tokens % 32}
    for r in rows:
        if r["group_kind"] == "worst":
            same = [x["loss_bits_per_byte"] for x in rows if (x["mix"], x["seed"], x["group_kind"]) ==
                    (r["mix"], r["seed"], r["group"])]
            assert r["loss_bits_per_byte"] == max(same)
    counts = run.manifest["stages"]["evaluate"]["counts"]
    assert set(counts["verdicts"]) == {"random", "natural"}
    assert all(v in ("better", "worse", "no difference") for b in counts["verdicts"].values() for v in b.values())


def test_report_says_whether_the_mix_helps(evaluated, pipeline):
    from clustermix.cli import summary_lines
    from clustermix.report import build_report
    from clustermix.report_html import render

    _, run = evaluated
    line = next(x for x in summary_lines(run.manifest) if x.startswith("evaluate:"))
    assert "blended" in line and "random:" in line and "natural:" in line
    rep = build_report(run.lake.root, run.run_id)
    ev = rep["evaluation"]
    assert ev["ran"] and ev["seeds"] == 2 and set(ev["verdicts"]) == {"random", "natural"}
    assert ev["summaries"]["blended"]["macro_source"]["seeds"] == 2
    html = render(rep, {})
    assert "Does this mix help?" in html and "<h3>Per source</h3>" in html
    assert any(v in html for v in ("better", "worse", "no difference"))
    _, shared = pipeline
    other = build_report(shared.lake.root)
    assert not other["evaluation"]["ran"] and "evaluate.enabled=true" in other["evaluation"]["note"]
    assert "Evaluation was not run" in render(other, {})


def test_evaluate_without_the_holdout_stops(pipeline):
    from clustermix import deltalog, tableio
    from clustermix.errors import ConfigError, DataError
    from clustermix.evaluate import run_evaluate

    cfg, run = pipeline
    writer = tableio.TableWriter(run.lake, {"run_id": "x", "stage": "evaluate"})
    with pytest.raises(ConfigError, match=r"evaluate\.enabled"):
        run_evaluate(run.lake, cfg, {}, "x", writer)
    # a blend made without the hold-out holds held-out documents: evaluate refuses it before training
    on = cfg.model_copy(update={"evaluate": EvaluateConfig(**EVALUATE)})
    with pytest.raises(DataError, match=r"blended holds [0-9]+ held-out documents"):
        run_evaluate(run.lake, on, {"blended": deltalog.version(run.lake.table("blended"))}, "x", writer)
    assert deltalog.version(run.lake.table("evaluations")) is None  # nothing written
