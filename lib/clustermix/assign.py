"""The assign stage: embeddings without an assignment -> ``assignments`` to the existing centroids.

What a nightly refresh runs instead of ``cluster``: new documents are assigned to the centroids
already fitted (a streaming pass), drift between the old and the new documents is measured, and
k-means is refitted on everything only when the drift passes the ``refresh.*`` thresholds (or the
run asks for it: ``clustermix refresh --recluster``). The decision lands in the manifest. Ray and
delta-rs only (no JVM): the figures stream the tables' (cluster_id, score) columns, and the new
assignments are committed with one delta-rs MERGE.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import deltalog, deltars
from clustermix import lake as lk
from clustermix.drift import Decision, decide, measure

if TYPE_CHECKING:
    from clustermix.stage import Context
    from clustermix.storage import S3Settings

log = logging.getLogger(__name__)


def stage_inputs(ctx: Context) -> dict[str, Any]:
    """A forced refit (``clustermix refresh --recluster``) is an input of its own."""
    return {"recluster": bool(ctx.options.get("recluster"))}


def run(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    """Assign new embeddings to the existing centroids, or refit when drift (or the user) says so."""
    from clustermix.kmeans_dist import assign_missing, read_centroids, run_cluster
    from clustermix.models import model_id

    ctx.ray()
    lake, cfg, write = ctx.lake, ctx.cfg, ctx.write
    model = model_id(cfg.embed.model)
    fitted = deltars.read_small(lake.table("centroids"), inputs["centroids"], ["k", "model"], s3=lake.s3).slice(0, 1).to_pylist()
    config_changed = not fitted or fitted[0]["k"] != cfg.cluster.k or fitted[0]["model"] != model
    found = None
    if not config_changed:
        centroids = read_centroids(lake, inputs["centroids"])  # the version the stage pinned
        found = assign_missing(lake, cfg.cluster, model, inputs["embeddings"], centroids, ctx.run_id)
    staging = found.staging if found else None
    n_new = found.n_new if found else 0
    decision = decide(_figures(ctx, staging, int(fitted[0]["k"]) if fitted else cfg.cluster.k), cfg.refresh,
                      forced=bool(inputs.get("recluster")), config_changed=config_changed)
    ctx.manifest["drift"] = decision.to_dict()
    log.info("refresh: drift %s -> %s %s", {k: v for k, v in decision.figures.items() if k.endswith(
        ("drop", "shift", "fraction"))}, "refit" if decision.refit else "keep the clustering", decision.reasons)
    try:
        if decision.refit:
            res = run_cluster(lake, cfg.cluster, model, inputs["embeddings"], ctx.run_id, write)
            return {**_summary(decision, n_new), "refit": res}
        assert found is not None  # a config change always refits
        _commit_assignments(ctx, staging, found.stale)
        return _summary(decision, n_new)
    finally:
        if staging:
            lake.remove(staging)


def _summary(decision: Decision, n_new: int) -> dict[str, Any]:
    return {"decision": "refit" if decision.refit else "keep", "reasons": decision.reasons, "assigned": n_new,
            "drift": decision.figures}


def _per_cluster(files: list[str], k: int, far_score: float | None,
                 s3: S3Settings | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cluster count, score sum and (with ``far_score``) count of scores below it, streamed from the
    (cluster_id, score) columns of ``files``: O(K) state."""
    import pyarrow.parquet as pq

    n, s, f = np.zeros(k), np.zeros(k), np.zeros(k)
    for uri in files:
        filesystem, path = lk.open_fs(uri, s3)
        with filesystem.open_input_file(path) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=65536, columns=["cluster_id", "score"]):
                c = batch.column("cluster_id").to_numpy(zero_copy_only=False).astype(np.int64)
                score = batch.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
                ok = (c >= 0) & (c < k)
                c, score = c[ok], score[ok]
                n += np.bincount(c, minlength=k)
                s += np.bincount(c, weights=score, minlength=k)
                if far_score is not None:
                    f += np.bincount(c[score < far_score], minlength=k)
    return n, s, f


def _figures(ctx: Context, staging: str | None, k: int) -> dict[str, Any]:
    """Per-cluster counts and score sums of the old assignments and the new ones (K numbers each)."""
    old_n, old_s, _ = _per_cluster(deltalog.file_uris(ctx.lake.table("assignments"), s3=ctx.lake.s3), k, None, ctx.lake.s3)
    new_files = lk.list_parquet(staging, s3=ctx.lake.s3) if staging else []
    new_n, new_s, new_f = _per_cluster(new_files, k, ctx.cfg.refresh.far_score, ctx.lake.s3)
    return measure(old_n, old_s, new_n, new_s, new_f)


def _commit_assignments(ctx: Context, staging: str | None, stale: Any) -> None:
    """One delta-rs MERGE: insert the new assignments, delete those of documents that no longer have an
    embedding. The source streams from the staging files (the new rows) and the stale ids."""
    if staging is None and not len(stale):
        return  # nothing new, nothing gone: no commit, so a repeated refresh changes nothing
    import pyarrow as pa

    uri = ctx.lake.table("assignments")
    schema = deltars.arrow_schema("assignments")
    source_schema = schema.append(pa.field("_delete", pa.bool_()))

    def batches() -> Any:
        import pyarrow.parquet as pq

        for f in lk.list_parquet(staging, s3=ctx.lake.s3) if staging else []:
            filesystem, path = lk.open_fs(f, ctx.lake.s3)
            with filesystem.open_input_file(path) as fh:
                for b in pq.ParquetFile(fh).iter_batches(batch_size=65536, columns=schema.names):
                    t = pa.Table.from_batches([b]).cast(schema)
                    yield from t.append_column("_delete", pa.array([False] * len(t))).to_batches()
        if len(stale):
            yield pa.record_batch([stale, pa.nulls(len(stale), pa.int32()), pa.nulls(len(stale), pa.float32()),
                                   pa.array([True] * len(stale))], schema=source_schema)

    source = pa.RecordBatchReader.from_batches(source_schema, batches())
    ctx.write.record("assignments", deltars.merge_by_id(uri, source, schema.names, ctx.write.meta, s3=ctx.lake.s3))
