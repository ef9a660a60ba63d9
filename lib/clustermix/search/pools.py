"""The search's pre-draw, on Ray Data and delta-rs (no JVM): the target texts and the per-cluster pools
that the proxies read (see :mod:`.climb`).

- **Target**: the texts of the held-out domain (from ``docs``) or of a JSONL file, at most
  ``search.target_max_docs`` of them, the first in a seeded-hash order. Each block keeps its own
  first ``n``; the driver merges blocks of at most ``n`` rows, so it holds O(``n``) texts.
- **Pools**: the trainable documents (not in the held-out domain, not a target text) joined to
  their cluster by id (one hash shuffle of narrow rows: id, cluster, key, tokens), then per cluster
  the documents in seeded-hash order while the tokens before them are under the pool size. Each
  block first keeps only its own prefix (a superset of its part of the global one), then one
  group per cluster cuts the global prefix and sums the cluster's trainable tokens. Only the pool's
  rows (bounded by K × pool size, never by the corpus) reach the driver, without their texts; the
  texts are read by id and grouped (a shuffle of the pool alone) into one file per cluster.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import deltalog, rayread
from clustermix import lake as lk
from clustermix.errors import ConfigError
from clustermix.search.proxy import WORD_PATTERN

if TYPE_CHECKING:
    import pyarrow as pa

    from clustermix.config import SearchConfig
    from clustermix.holdout import Holdout
    from clustermix.storage import S3Settings

BLOCK_ROWS = 8192
POOL_SCHEMA_COLUMNS = ["rank", "before", "ptokens", "text"]


def seeded_keys(seed: int, values: list[str]) -> np.ndarray:
    """A stable 63-bit key per value under ``seed``: the seeded order of the target and the pools."""
    prefix = f"{seed}\x00".encode()
    return np.array([int.from_bytes(hashlib.blake2b(prefix + v.encode(), digest_size=8).digest(), "big") >> 1
                     for v in values], dtype=np.int64)


def token_counts(texts: list[str | None], tokenizer: str) -> np.ndarray:
    """Estimated proxy tokens of each text (exact for bytes; the word tokenizer's pattern)."""
    import re

    if tokenizer == "bytes":
        return np.array([len(t.encode()) if t else 0 for t in texts], dtype=np.int64)
    pattern = re.compile(WORD_PATTERN)
    return np.array([len(pattern.findall(t.lower())) if t else 0 for t in texts], dtype=np.int64)


def _first_n(table: pa.Table, n: int) -> pa.Table:
    import pyarrow.compute as pc

    order = pc.sort_indices(table, [("rank", "ascending"), ("text_hash", "ascending")])
    return table.take(order[:n])


def _target_block(batch: pa.Table, *, domain: str | None, field: str | None, seed: int, n: int) -> pa.Table:
    """One block's first ``n`` target texts: (rank, text, text_hash)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if domain is not None:
        batch = batch.filter(pc.equal(batch.column("domain"), domain))
        texts, hashes = batch.column("text").to_pylist(), batch.column("text_hash").to_pylist()
    else:
        raw = batch.column(field)
        texts = [t if isinstance(t, str) else (None if t is None else str(t)) for t in raw.to_pylist()]
        texts = [t for t in texts if t]
        hashes = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    table = pa.table({"rank": pa.array(seeded_keys(seed, hashes), pa.int64()), "text": pa.array(texts, pa.string()),
                      "text_hash": pa.array(hashes, pa.string())})
    return _first_n(table, n)


def draw_target(scfg: SearchConfig, docs: tuple[list[str], list[int | None]], s3: S3Settings | None) -> pa.Table:
    """The target texts, at most ``target_max_docs``, in the seeded order: (rank, text, text_hash)."""
    import pyarrow as pa
    import ray.data

    n = scfg.target_max_docs
    if scfg.target_domain is not None:
        files, rows = docs
        ds = ray.data.read_datasource(rayread.files_source(files, rows, ["text", "text_hash", "domain"], BLOCK_ROWS,
                                                           s3=s3))
        kwargs: dict[str, Any] = {"domain": scfg.target_domain, "field": None}
    else:
        path = scfg.target_path or ""
        filesystem, fs_path = lk.open_fs(path, s3)
        ds = ray.data.read_json(fs_path, filesystem=filesystem)  # JSON lines: pyarrow's reader
        field = scfg.target_text_field
        names = ds.schema().names
        if field not in names:
            raise ConfigError("search.target_text_field", field, f"no such field in {path} (fields: {sorted(names)})")
        ds = ds.select_columns([field])
        kwargs = {"domain": None, "field": field}
    out = pa.table({"rank": pa.array([], pa.int64()), "text": pa.array([], pa.string()),
                    "text_hash": pa.array([], pa.string())})
    blocks = ds.map_batches(_target_block, fn_kwargs={**kwargs, "seed": scfg.seed, "n": n}, batch_format="pyarrow",
                            batch_size=None, zero_copy_batch=True)
    for batch in blocks.iter_batches(batch_format="pyarrow", batch_size=None):
        out = _first_n(pa.concat_tables([out, batch.select(out.column_names).cast(out.schema)]), n)
    return out


def _trainable_block(batch: pa.Table, *, held_out: Any, domain: str | None, tokenizer: str, seed: int,
                     holdout: Holdout | None = None) -> pa.Table:
    """A block of docs -> (id, key, ptokens) of those a proxy may train on (not a target text, not in
    the target domain, not in the evaluation's ``holdout``)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    target_hashes = ray.get(held_out)
    keep = pc.invert(pc.is_in(batch.column("text_hash"), value_set=target_hashes))
    if domain is not None:
        keep = pc.and_(keep, pc.or_kleene(pc.is_null(batch.column("domain")),
                                          pc.not_equal(batch.column("domain"), domain)))
    batch = batch.filter(pc.fill_null(keep, True))
    if holdout is not None:
        batch = batch.filter(pa.array(~holdout.mask(batch.column("id").to_pylist())))
    ids = batch.column("id").to_pylist()
    return pa.table({"id": pa.array(ids, pa.string()), "key": pa.array(seeded_keys(seed, ids), pa.int64()),
                     "ptokens": pa.array(token_counts(batch.column("text").to_pylist(), tokenizer), pa.int64())})


def _prefix(table: pa.Table, pool_tokens: int) -> tuple[pa.Table, np.ndarray]:
    """Per cluster, the rows in (key, id) order while the tokens before them are under ``pool_tokens``;
    with their rank and the tokens before them, and each row's cluster's total (for the caller)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = table.take(pc.sort_indices(table, [("cluster_id", "ascending"), ("key", "ascending"), ("id", "ascending")]))
    cluster = table.column("cluster_id").to_numpy()
    tokens = table.column("ptokens").to_numpy()
    starts = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1]]) if len(cluster) else np.array([], np.int64)
    first = np.repeat(starts, np.diff(np.r_[starts, len(cluster)]))
    cum = np.cumsum(tokens)
    before = cum - tokens - np.r_[0, cum][first]
    rank = np.arange(len(cluster)) - first
    totals = np.add.reduceat(tokens, starts) if len(starts) else np.array([], np.int64)
    keep = before < pool_tokens
    out = table.append_column("rank", pa.array(rank, pa.int64())).append_column("before", pa.array(before, pa.int64()))
    return out.filter(pa.array(keep)), totals[np.searchsorted(starts, np.flatnonzero(keep), side="right") - 1]


def _block_prefix(batch: pa.Table, *, pool_tokens: int) -> pa.Table:
    """A block's own prefix per cluster (a superset of its rows in the global prefix); the first row
    of each cluster carries the block's trainable tokens of that cluster."""
    import pyarrow as pa

    kept, totals = _prefix(batch, pool_tokens)
    first = (kept.column("rank").to_numpy() == 0)
    return kept.select(["cluster_id", "id", "key", "ptokens"]).append_column(
        "block_tokens", pa.array(np.where(first, totals, 0), pa.int64()))


def _cluster_prefix(group: pa.Table, *, pool_tokens: int) -> pa.Table:
    """One cluster's candidates -> its pool rows (cluster_id, id, rank, before, ptokens) and, on each,
    the cluster's trainable tokens."""
    import pyarrow as pa

    total = int(np.sum(group.column("block_tokens").to_numpy()))
    kept, _ = _prefix(group.drop_columns(["block_tokens"]), pool_tokens)
    return kept.select(["cluster_id", "id", "rank", "before", "ptokens"]).append_column(
        "cluster_tokens", pa.array(np.full(kept.num_rows, total), pa.int64()))


def _attach(batch: pa.Table, *, meta: Any) -> pa.Table:
    """Pool rows' texts (read by id) -> the pool rows with their text."""
    import ray

    return batch.select(["id", "text"]).join(ray.get(meta), "id")


def _write_cluster(group: pa.Table, *, pool_uri: str, s3: S3Settings | None) -> pa.Table:
    """One cluster's pool -> one Parquet file under ``pool_uri/cluster_id=<k>/`` in rank order."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    k = int(group.column("cluster_id")[0].as_py())
    part = group.take(pc.sort_indices(group, [("rank", "ascending")]))
    filesystem, base = lk.open_fs(pool_uri, s3)
    filesystem.create_dir(f"{base}/cluster_id={k}", recursive=True)
    pq.write_table(part.select(POOL_SCHEMA_COLUMNS), f"{base}/cluster_id={k}/part-0.parquet", filesystem=filesystem)
    return pa.table({"rows": pa.array([part.num_rows], pa.int64())})


def draw_pools(scfg: SearchConfig, docs_uri: str, docs_version: int | None, assignments_uri: str,
               assignments_version: int | None, target: pa.Table, pool_tokens: int, pool_uri: str, partitions: int,
               s3: S3Settings | None, duplicates: tuple[str, int | None] | None = None,
               holdout: Holdout | None = None) -> dict[int, int]:
    """Write the pools (hive-partitioned by ``cluster_id``: rank, before, ptokens, text) under
    ``pool_uri``; return the trainable tokens per cluster (K numbers). ``duplicates``: the
    ``semantic_duplicates`` table and its pinned version, whose ids no pool draws; ``holdout``: the
    evaluation's hold-out, whose documents no pool draws either."""
    import pyarrow as pa
    import ray
    import ray.data

    docs_files, docs_rows = deltalog.file_counts(docs_uri, docs_version, s3=s3)
    held_out = ray.put(pa.array(sorted(set(target.column("text_hash").to_pylist())), pa.string()))
    trainable = ray.data.read_datasource(rayread.files_source(
        docs_files, docs_rows, ["id", "text", "domain", "text_hash"], BLOCK_ROWS, s3=s3)).map_batches(
        _trainable_block, fn_kwargs={"held_out": held_out, "domain": scfg.target_domain, "tokenizer": scfg.tokenizer,
                                     "seed": scfg.seed, "holdout": holdout}, batch_format="pyarrow", batch_size=None)
    members = rayread.kept_members((assignments_uri, assignments_version), duplicates, BLOCK_ROWS, partitions, s3)
    joined = members.join(trainable, join_type="inner", num_partitions=partitions, on=("id",))
    pools = joined.map_batches(_block_prefix, fn_kwargs={"pool_tokens": pool_tokens}, batch_format="pyarrow",
                               batch_size=None).groupby("cluster_id").map_groups(
        _cluster_prefix, fn_kwargs={"pool_tokens": pool_tokens}, batch_format="pyarrow")
    parts = [b for b in pools.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    if not parts:
        return {}
    meta = pa.concat_tables(parts)
    tokens = {int(k): int(t) for k, t in zip(meta.column("cluster_id").to_pylist(),
                                             meta.column("cluster_tokens").to_pylist(), strict=True)}
    meta_ref = ray.put(meta.select(["id", "cluster_id", "rank", "before", "ptokens"]))
    keep = rayread.Filter(ids=ray.put(meta.column("id").combine_chunks()))
    texts = ray.data.read_datasource(rayread.files_source(docs_files, [None] * len(docs_files), ["id", "text"],
                                                          BLOCK_ROWS, keep=keep, s3=s3))
    written = texts.map_batches(_attach, fn_kwargs={"meta": meta_ref}, batch_format="pyarrow", batch_size=None) \
        .groupby("cluster_id").map_groups(_write_cluster, fn_kwargs={"pool_uri": pool_uri, "s3": s3},
                                          batch_format="pyarrow")
    n = sum(int(b.column("rows").to_numpy().sum()) for b in written.iter_batches(batch_format="pyarrow",
                                                                                  batch_size=None))
    if n != meta.num_rows:
        raise RuntimeError(f"search: wrote {n} pool rows of {meta.num_rows}: documents changed under the search")
    return tokens
