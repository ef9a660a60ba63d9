"""The dedup stage (Ray + FAISS, no JVM): semantic near-duplicates inside each k-means cluster ->
``semantic_duplicates``; stats, sample, blend and search then see only the kept documents
(:mod:`clustermix.kept`).

Three rounds of Ray work, hand-offs through Parquet files in a staging folder, so no process holds
more than a bucket of rows or one cluster's members:

1. *route*: one task per file of ``embeddings`` (this model's), ``assignments`` and ``docs`` (id,
   quality, ingested_at) writes its rows into buckets by a stable hash of the id;
2. *join*: one task per bucket joins the three sides on id and writes each member into the group
   of its cluster (``cluster_id mod groups``);
3. *dedup*: a pool of actors (``dedup.semantic.num_actors``; a GPU each when asked) takes the
   groups, reads one cluster at a time and walks it with :func:`clustermix.semdedup.dedup_sorted`;
   each group's duplicates become one Parquet file of the table, committed together by delta-rs.

The walk's order (:func:`clustermix.semdedup.member_order`) and the per-pair decisions do not depend
on buckets, groups, actors or block size, so neither does the table.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import deltalog, deltars
from clustermix import lake as lk

if TYPE_CHECKING:
    import pyarrow as pa

    from clustermix.config import Config, SemanticDedupConfig
    from clustermix.lake import Lake
    from clustermix.stage import Context
    from clustermix.storage import S3Settings
    from clustermix.tableio import TableWriter

log = logging.getLogger(__name__)

TABLE = "semantic_duplicates"
ROWS_PER_BUCKET = 200_000  # a join task holds a bucket's embeddings: ~300 MB at 384 dimensions
GROUPS_PER_ACTOR = 4  # groups of clusters per actor: an actor that finishes early takes the next group
SIDES = {"emb": ["id", "embedding"], "asg": ["id", "cluster_id", "score"], "doc": ["id", "quality", "ingested_at", "domain"]}


def bucket_of(ids: pa.Array, n: int) -> np.ndarray:
    """A stable bucket in ``0..n-1`` per id, the same in every process (Python's ``hash`` is salted)."""
    import pandas as pd

    h = pd.util.hash_array(np.asarray(ids.to_pylist(), dtype=object))
    return (h % np.uint64(n)).astype(np.int64)


def _write(table: pa.Table, uri: str, s3: S3Settings | None) -> None:
    import pyarrow.parquet as pq

    filesystem, path = lk.open_fs(uri, s3)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=filesystem)


def _read(files: list[str], s3: S3Settings | None, columns: list[str] | None = None, cluster: int | None = None
          ) -> pa.Table | None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    tables = []
    for f in files:
        filesystem, path = lk.open_fs(f, s3)
        with filesystem.open_input_file(path) as fh:  # one file: no dataset discovery of "b=0" folders
            t = pq.ParquetFile(fh).read(columns=columns)
        if cluster is not None:
            t = t.filter(pc.equal(t.column("cluster_id"), cluster))
        tables.append(t)
    import pyarrow as pa

    return pa.concat_tables(tables) if tables else None


def route(uri: str, side: str, n_buckets: int, staging: str, model: str, s3: S3Settings | None) -> int:
    """Round 1: the rows of one table file into ``staging/<side>/b=<bucket>/``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = SIDES[side] + (["model"] if side == "emb" else [])
    t = _read([uri], s3, cols)
    assert t is not None
    if side == "emb":
        t = t.filter(pc.equal(t.column("model"), model)).select(SIDES[side])
    if side == "doc":  # an int64 for the order (docs written by Spark carry a timezone, others may not)
        t = t.set_column(2, "ingested_at", pc.cast(t.column("ingested_at"), pa.timestamp("us")).cast(pa.int64()))
    if not t.num_rows:
        return 0
    b = bucket_of(t.column("id"), n_buckets)
    name = uuid.uuid5(uuid.NAMESPACE_URL, uri).hex
    for p in np.unique(b).tolist():
        _write(t.filter(pa.array(b == p)), f"{staging}/{side}/b={p}/{name}.parquet", s3)
    return int(t.num_rows)


def join_bucket(p: int, staging: str, n_groups: int, s3: S3Settings | None) -> int:
    """Round 2: one bucket's members (assigned, embedded) with their order keys, into their groups."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = {side: _read(lk.list_parquet(f"{staging}/{side}/b={p}", s3=s3), s3) for side in SIDES}
    asg, emb = parts["asg"], parts["emb"]
    if asg is None or emb is None:
        return 0
    doc = parts["doc"]
    if doc is None:
        doc = pa.table({"id": pa.array([], pa.string()), "quality": pa.array([], pa.float64()),
                        "ingested_at": pa.array([], pa.int64()), "domain": pa.array([], pa.string())})
    members = asg.join(doc, "id", join_type="left outer")
    at = pc.index_in(members.column("id"), value_set=emb.column("id"))
    has = pc.is_valid(at)
    members, at = members.filter(has), at.filter(has)
    members = members.append_column("embedding", emb.column("embedding").take(at))
    g = members.column("cluster_id").to_numpy() % n_groups
    for q in np.unique(g).tolist():
        _write(members.filter(pa.array(g == q)), f"{staging}/grp/g={q}/b-{p}.parquet", s3)
    return int(members.num_rows)


class Deduper:
    """Round 3, a Ray actor: the clusters of a group, one at a time (FAISS on a GPU when it has one)."""

    def __init__(self, cfg: SemanticDedupConfig, use_gpu: bool, threads: int) -> None:
        import faiss

        faiss.omp_set_num_threads(max(1, threads))
        self.cfg = cfg
        self.make_index = None
        if use_gpu:
            from clustermix.semdedup import gpu_index_factory

            self.make_index = gpu_index_factory()

    def run_group(self, g: int, staging: str, table_uri: str, folder: str, run_id: str, s3: S3Settings | None
                  ) -> tuple[deltars.Part | None, dict[int, list[int]]]:
        """Dedup every cluster of group ``g``; write its duplicates as one file of the table."""
        import pyarrow as pa

        from clustermix.semdedup import dedup_sorted, member_order

        files = lk.list_parquet(f"{staging}/grp/g={g}", s3=s3)
        ids_t = _read(files, s3, ["cluster_id"])
        if ids_t is None:
            return None, {}
        counts: dict[int, list[int]] = {}
        out: list[pa.Table] = []
        for c in sorted(set(ids_t.column("cluster_id").to_pylist())):
            t = _read(files, s3, cluster=c)
            assert t is not None
            ids = t.column("id").to_pylist()
            quality = t.column("quality").to_numpy(zero_copy_only=False).astype(np.float64) \
                if self.cfg.keep == "quality" else None
            ingested = t.column("ingested_at").fill_null(0).to_numpy()
            order = member_order(t.column("score").to_numpy(zero_copy_only=False), ids, ingested, quality)
            emb = t.column("embedding").combine_chunks()
            x = np.asarray(emb.flatten(), dtype=np.float32).reshape(len(ids), -1)[order]
            res = dedup_sorted(x, self.cfg.threshold, self.cfg.block_rows, self.make_index)
            dup = np.nonzero(~res.kept)[0]
            counts[c] = [len(ids), len(dup)]
            if len(dup):
                sorted_ids = np.asarray(ids, dtype=object)[order]
                out.append(pa.table({
                    "id": pa.array(sorted_ids[dup].tolist(), pa.string()),
                    "duplicate_of": pa.array(sorted_ids[res.dup_of[dup]].tolist(), pa.string()),
                    "cluster_id": pa.array([c] * len(dup), pa.int32()),
                    "similarity": pa.array(res.similarity[dup], pa.float32()),
                    "domain": t.column("domain").take(pa.array(order[dup])),
                    "run_id": pa.array([run_id] * len(dup), pa.string())}))
        if not out:
            return None, counts
        table = pa.concat_tables(out).cast(deltars.arrow_schema(TABLE))
        return deltars.write_part(table, table_uri, folder, s3), counts


def run_semantic(lake: Lake, cfg: Config, inputs: dict[str, Any], run_id: str, write: TableWriter) -> dict[str, Any]:
    """The three rounds over the pinned inputs, then one commit that replaces ``semantic_duplicates``."""
    import ray

    from clustermix.models import model_id

    scfg = cfg.dedup.semantic
    uri = lake.table(TABLE)
    s3 = lake.s3  # handed to the Ray workers explicitly
    staging = lake.staging(TABLE, run_id)
    n = deltalog.num_records(lake.table("embeddings"), inputs["embeddings"], s3=lake.s3)
    n_buckets = max(1, math.ceil(n / ROWS_PER_BUCKET))
    n_groups = scfg.num_actors * GROUPS_PER_ACTOR
    files = {"emb": deltalog.file_uris(lake.table("embeddings"), inputs["embeddings"], s3=lake.s3),
             "asg": deltalog.file_uris(lake.table("assignments"), inputs["assignments"], s3=lake.s3),
             "doc": deltalog.file_uris(lake.table("docs"), inputs["docs"], s3=lake.s3)}
    model = model_id(cfg.embed.model)
    try:
        route_task = ray.remote(num_cpus=1)(route)
        ray.get([route_task.remote(f, side, n_buckets, staging, model, s3) for side, fs in files.items() for f in fs])
        join_task = ray.remote(num_cpus=1)(join_bucket)
        members = sum(ray.get([join_task.remote(p, staging, n_groups, s3) for p in range(n_buckets)]))
        actor = ray.remote(Deduper).options(num_cpus=scfg.cpus_per_actor, num_gpus=scfg.gpus_per_actor)
        use_gpu = scfg.gpus_per_actor > 0
        pool: list[Any] = [actor.remote(scfg, use_gpu, max(1, int(scfg.cpus_per_actor))) for _ in range(scfg.num_actors)]
        folder = f"{run_id}-{uuid.uuid4().hex[:8]}"
        done = ray.get([pool[g % len(pool)].run_group.remote(g, staging, uri, folder, run_id, s3)
                        for g in range(n_groups)])
        for a in pool:
            ray.kill(a)
    finally:
        lake.remove(staging)
    parts = [p for p, _ in done if p is not None]
    per_cluster = {c: v for _, counts in done for c, v in counts.items()}
    write.record(TABLE, deltars.commit_parts(uri, deltars.arrow_schema(TABLE), parts, write.meta, "overwrite", s3=s3))
    n_dups = sum(d for _, d in per_cluster.values())
    return {"enabled": True, "threshold": scfg.threshold, "keep": scfg.keep, "members": members,
            "duplicates": n_dups, "kept": members - n_dups, "buckets": n_buckets, "groups": n_groups,
            "gpu": use_gpu,
            "duplicates_per_cluster": {int(c): int(d) for c, (_, d) in sorted(per_cluster.items()) if d}}


def run(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    """The dedup stage; when ``dedup.semantic.enabled`` is off it commits an empty table (what the
    stages after it read) and starts no Ray."""
    if not ctx.cfg.dedup.semantic.enabled:
        schema = deltars.arrow_schema(TABLE)
        ctx.write.record(TABLE, deltars.overwrite(ctx.lake.table(TABLE), schema.empty_table(), ctx.write.meta, s3=ctx.lake.s3))
        return {"enabled": False, "duplicates": 0}
    ctx.ray()
    return run_semantic(ctx.lake, ctx.cfg, inputs, ctx.run_id, ctx.write)
