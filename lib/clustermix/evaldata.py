"""What ``evaluate``'s proxies read, drawn with Ray Data and pyarrow (no JVM), bounded by config.

Every seed of the evaluation draws its own data, so the spread across seeds holds the data draw as
well as the initialisation. One pass over ``docs`` joined to the kept ``assignments`` (less
``semantic_duplicates``, as the search's pools) gives:

- ``heldout``: the held-out documents (:mod:`clustermix.holdout`) scored, in the seeded-hash order of
  the id under ``evaluate.seed``, the first ``evaluate.max_per_source`` of each source, each cut to its
  first ``max_doc_bytes`` bytes (the same for every seed);
- per draw seed ``i`` (its own hash order of the id, :func:`clustermix.search.pools.seeded_keys`):
  ``random``, a uniform random sample of the trainable documents (the prefix of the order that covers
  the proxies' budget), and ``source`` and ``cluster``, the same prefix within each source and each
  cluster, from which the natural mix (every source's share of the budget is its share of the corpus)
  and the CLIMB mixture (weights per cluster) are cut;
- each source's and cluster's trainable size.

Each block computes the seeds' keys in the pass and keeps only its own prefixes (a superset of its
part of the global ones); the driver merges blocks into the global prefixes as they arrive, so it
holds O(seeds × (1 + sources + clusters) × budget) bytes of text, never the corpus.
:func:`blended_draws` is the ``blended`` mix at the proxy's size: per draw seed, a uniform subsample
of its rows (each row a draw, keyed by a hash of the seed and the row's ``position``) covering the
budget, in ``position`` (training) order, from a Ray Data pass that keeps each block's own prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import deltalog, rayread
from clustermix.search.pools import seeded_keys

if TYPE_CHECKING:
    import pyarrow as pa

    from clustermix.holdout import Holdout
    from clustermix.storage import S3Settings

BLOCK_ROWS = 8192
NO_DOMAIN = "(none)"  # contracts.NO_DOMAIN, whose module imports pyspark (a Ray image has none)
TRAIN_ROLES = ("random", "source", "cluster")


@dataclass(frozen=True)
class Draw:
    """The pass's result: ``rows`` (role, group, seed_index, id, cluster_id, domain, key, ptokens, text),
    each role's rows in hash order per group and draw seed (``seed_index`` -1 for ``heldout``, which is
    the same for every seed), and the trainable bytes per source and per cluster."""

    rows: pa.Table
    source_tokens: dict[str, int]
    cluster_tokens: dict[str, int]

    def role(self, role: str, group: str | None = None, index: int | None = None) -> pa.Table:
        """The rows of ``role`` (of one ``group``, of draw seed ``index``), by group then hash order."""
        import pyarrow.compute as pc

        t = self.rows.filter(pc.equal(self.rows.column("role"), role))
        if group is not None:
            t = t.filter(pc.equal(t.column("group"), group))
        if index is not None:
            t = t.filter(pc.equal(t.column("seed_index"), index))
        return t.take(pc.sort_indices(t, [("group", "ascending"), ("seed_index", "ascending"), ("key", "ascending"),
                                          ("id", "ascending")]))


def doc_tokens(texts: list[str | None]) -> np.ndarray:
    """Proxy tokens of each document: its UTF-8 bytes and the separator after it."""
    return np.array([len(t.encode("utf-8")) + 1 if t else 1 for t in texts], dtype=np.int64)


def cut(table: pa.Table, budget: int, cap: int) -> pa.Table:
    """Per (role, group, seed_index) in (key, id) order: the ``heldout`` role's first ``cap`` rows, any
    other role's rows while the tokens before them are under ``budget``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return table
    table = table.take(pc.sort_indices(table, [("role", "ascending"), ("group", "ascending"),
                                               ("seed_index", "ascending"), ("key", "ascending"),
                                               ("id", "ascending")]))
    label = pc.binary_join_element_wise(table.column("role"), table.column("group"),
                                        pc.cast(table.column("seed_index"), pa.string()), "\x00").to_numpy(
        zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, label[1:] != label[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(label)]))
    tokens = table.column("ptokens").to_numpy()
    cum = np.cumsum(tokens)
    before = cum - tokens - np.r_[0, cum][first]
    rank = np.arange(len(label)) - first
    held = table.column("role").to_numpy(zero_copy_only=False) == "heldout"
    return table.filter(pa.array(np.where(held, rank < cap, before < budget)))


def _keyed(role: str, idx: np.ndarray, groups: list[str], index: int, ids: pa.Array, keys: np.ndarray,
           ptokens: np.ndarray) -> pa.Table:
    """The light rows of one role (no text yet; ``row``: the index in the block)."""
    import pyarrow as pa

    n = len(idx)
    return pa.table({"role": pa.array([role] * n, pa.string()), "group": pa.array(groups, pa.string()),
                     "seed_index": pa.array(np.full(n, index, dtype=np.int32), pa.int32()),
                     "id": ids.take(pa.array(idx, pa.int64())).cast(pa.string()), "key": pa.array(keys, pa.int64()),
                     "ptokens": pa.array(ptokens, pa.int64()), "row": pa.array(idx, pa.int64())})


def _with_columns(kept: pa.Table, batch: pa.Table, columns: list[str]) -> pa.Table:
    """``kept``'s light rows with ``columns`` of the block rows they name, ``row`` dropped."""
    rows = kept.column("row")
    for c in columns:
        kept = kept.append_column(c, batch.column(c).take(rows))
    return kept.drop_columns(["row"])


def _block(batch: pa.Table, *, holdout: Holdout, seed: int, seeds: list[int], budget: int, cap: int,
           max_doc_bytes: int) -> pa.Table:
    """A block of (id, text, domain, cluster_id) -> its own prefixes per role and draw seed, and its totals."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = batch.column("id").to_pylist()
    texts = batch.column("text").to_pylist()
    domains = [d if d is not None else NO_DOMAIN for d in batch.column("domain").to_pylist()]
    clusters = batch.column("cluster_id").to_pylist()
    batch = pa.table({"id": batch.column("id").cast(pa.string()), "text": batch.column("text").cast(pa.string()),
                      "domain": pa.array(domains, pa.string()),
                      "cluster_id": batch.column("cluster_id").cast(pa.int32())})
    held = holdout.mask(ids)
    tokens = doc_tokens(texts)
    id_arr = batch.column("id").combine_chunks()
    h = np.flatnonzero(held)
    t = np.flatnonzero(~held)
    t_ids = [ids[i] for i in t]
    t_sources = [domains[i] for i in t]
    t_clusters = [str(clusters[i]) for i in t]
    parts = [_keyed("heldout", h, [domains[i] for i in h], -1, id_arr, seeded_keys(seed, [ids[i] for i in h]),
                    np.zeros(len(h), dtype=np.int64))]
    for index, s in enumerate(seeds):  # each draw seed's own hash order, in the same pass
        keys = seeded_keys(s, t_ids)
        parts.append(_keyed("random", t, [""] * len(t), index, id_arr, keys, tokens[t]))
        parts.append(_keyed("source", t, t_sources, index, id_arr, keys, tokens[t]))
        parts.append(_keyed("cluster", t, t_clusters, index, id_arr, keys, tokens[t]))
    kept = _with_columns(cut(pa.concat_tables(parts), budget, cap), batch, ["cluster_id", "domain", "text"])
    is_held = pc.equal(kept.column("role"), "heldout")
    held_rows = kept.filter(is_held)
    short = [(x or "").encode("utf-8")[:max_doc_bytes].decode("utf-8", errors="ignore")
             for x in held_rows.column("text").to_pylist()]  # a scored document's first bytes
    held_rows = (held_rows.set_column(held_rows.schema.get_field_index("text"), "text", pa.array(short, pa.string()))
                 .set_column(held_rows.schema.get_field_index("ptokens"), "ptokens",
                             pa.array(doc_tokens(list(short)), pa.int64())))
    schema = _row_schema()
    kept = pa.concat_tables([kept.filter(pc.invert(is_held)), held_rows]).select(schema.names).cast(schema)
    totals = []
    for role, groups in (("total_source", t_sources), ("total_cluster", t_clusters)):
        sums: dict[str, int] = {}
        for g, n in zip(groups, tokens[t].tolist(), strict=True):
            sums[g] = sums.get(g, 0) + n
        totals.append(pa.table({
            "role": pa.array([role] * len(sums), pa.string()), "group": pa.array(list(sums), pa.string()),
            "seed_index": pa.array([-1] * len(sums), pa.int32()),
            "id": pa.array([None] * len(sums), pa.string()), "cluster_id": pa.array([None] * len(sums), pa.int32()),
            "domain": pa.array([None] * len(sums), pa.string()),
            "key": pa.array([0] * len(sums), pa.int64()), "ptokens": pa.array(list(sums.values()), pa.int64()),
            "text": pa.array([None] * len(sums), pa.string())}, schema=schema))
    return pa.concat_tables([kept, *totals])


def _row_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([("role", pa.string()), ("group", pa.string()), ("seed_index", pa.int32()), ("id", pa.string()),
                      ("key", pa.int64()), ("ptokens", pa.int64()), ("cluster_id", pa.int32()),
                      ("domain", pa.string()), ("text", pa.string())])


def _merge(blocks: Any, budget: int, cap: int, schema: pa.Schema | None = None
           ) -> tuple[pa.Table, dict[str, dict[str, int]]]:
    """The driver's side of a pass: each block's prefixes merged into the global ones as they arrive
    (never more than the prefixes held), and the ``total_*`` rows summed per group. ``schema``: the
    rows' (default :func:`_row_schema`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    schema = schema or _row_schema()
    kept = schema.empty_table()
    totals: dict[str, dict[str, int]] = {"total_source": {}, "total_cluster": {}}
    for batch in blocks.iter_batches(batch_format="pyarrow", batch_size=None):
        is_total = pc.starts_with(batch.column("role"), "total_")
        for r in batch.filter(is_total).select(["role", "group", "ptokens"]).to_pylist():
            totals[r["role"]][r["group"]] = totals[r["role"]].get(r["group"], 0) + int(r["ptokens"])
        rows = batch.filter(pc.invert(is_total)).select(schema.names).cast(schema)
        kept = cut(pa.concat_tables([kept, rows]), budget, cap)
    return kept, totals


def draw(docs: tuple[str, int | None], assignments: tuple[str, int | None],
         duplicates: tuple[str, int | None] | None, holdout: Holdout, seed: int, seeds: list[int], budget: int,
         cap: int, max_doc_bytes: int, partitions: int, s3: S3Settings | None) -> Draw:
    """The held-out documents to score (ordered by ``seed``) and each draw seed's trainable prefixes
    (``seeds[i]``: seed ``i``'s hash order), from one Ray Data pass."""
    import ray.data

    docs_files, docs_rows = deltalog.file_counts(*docs, s3=s3)
    members = rayread.kept_members(assignments, duplicates, BLOCK_ROWS, partitions, s3)
    texts = ray.data.read_datasource(rayread.files_source(docs_files, docs_rows, ["id", "text", "domain"], BLOCK_ROWS,
                                                          s3=s3))
    joined = members.join(texts, join_type="inner", num_partitions=partitions, on=("id",))
    blocks = joined.map_batches(_block, fn_kwargs={"holdout": holdout, "seed": seed, "seeds": list(seeds),
                                                   "budget": budget, "cap": cap, "max_doc_bytes": max_doc_bytes},
                                batch_format="pyarrow", batch_size=None)
    kept, totals = _merge(blocks, budget, cap)
    return Draw(kept, totals["total_source"], totals["total_cluster"])


def _blended_block(batch: pa.Table, *, seeds: list[int], budget: int) -> pa.Table:
    """A block of ``blended`` (id, text, domain, cluster_id, position) -> its own prefix per draw seed,
    in the hash order of (seed, position): each row is a draw of its own."""
    import pyarrow as pa

    batch = pa.table({"id": batch.column("id").cast(pa.string()), "text": batch.column("text").cast(pa.string()),
                      "domain": batch.column("domain").cast(pa.string()),
                      "cluster_id": batch.column("cluster_id").cast(pa.int32()),
                      "position": batch.column("position").cast(pa.int64())})
    positions = [str(p) for p in batch.column("position").to_pylist()]
    tokens = doc_tokens(batch.column("text").to_pylist())
    rows = np.arange(batch.num_rows)
    id_arr = batch.column("id").combine_chunks()
    parts = [_keyed("blended", rows, [""] * len(rows), index, id_arr, seeded_keys(s, positions), tokens)
             for index, s in enumerate(seeds)]
    kept = _with_columns(cut(pa.concat_tables(parts), budget, 0), batch, ["cluster_id", "domain", "text", "position"])
    return kept.select([*_row_schema().names, "position"])


def blended_draws(uri: str, version: int | None, seeds: list[int], budget: int,
                  s3: S3Settings | None) -> list[pa.Table]:
    """Per draw seed, ``blended`` at the proxy's size: a uniform subsample of its rows (the prefix of the
    hash order of (seed, position) whose tokens before each row are under ``budget``), as (id, text,
    domain, cluster_id, position) in ``position`` order. One Ray Data pass; each block keeps its own
    prefixes and the driver merges them, so it holds O(seeds × budget) bytes of text."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray.data

    columns = ["id", "text", "domain", "cluster_id", "position"]
    schema = pa.schema([*_row_schema(), pa.field("position", pa.int64())])
    kept = schema.empty_table()
    files, rows = deltalog.file_counts(uri, version, s3=s3)
    if files:
        ds = ray.data.read_datasource(rayread.files_source(files, rows, columns, BLOCK_ROWS, s3=s3))
        blocks = ds.map_batches(_blended_block, fn_kwargs={"seeds": list(seeds), "budget": budget},
                                batch_format="pyarrow", batch_size=None)
        kept, _ = _merge(blocks, budget, 0, schema)
    out = []
    for index in range(len(seeds)):
        t = kept.filter(pc.equal(kept.column("seed_index"), index)).sort_by("position")
        out.append(t.select(columns))
    return out


def texts_of(table: pa.Table) -> list[tuple[str, str]]:
    """(id, text) pairs of a drawn table, in its order."""
    return list(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))


def apportioned(parts: dict[str, list[tuple[str, str]]], weights: dict[str, float], budget: int) -> dict[str, Any]:
    """Per group, ``budget · weight`` tokens' worth: what each group of a mix contributes (its documents
    and its token quota; a quota beyond a group's prefix repeats its documents)."""
    from clustermix.search.climb import apportion

    keys = sorted(weights)
    index = {k: i for i, k in enumerate(keys)}
    quotas = apportion({index[k]: w for k, w in weights.items() if w > 0}, budget)
    return {"docs": {keys[i]: parts.get(keys[i], []) for i in quotas}, "quota": {keys[i]: n for i, n in quotas.items()}}


def _held_count(batch: pa.Table, *, holdout: Holdout) -> pa.Table:
    import pyarrow as pa

    return pa.table({"held": pa.array([int(holdout.mask(batch.column("id").to_pylist()).sum())], pa.int64())})


def held_in(uri: str, version: int | None, holdout: Holdout, s3: S3Settings | None) -> int:
    """How many rows of the table at ``uri`` (``blended``) are held-out documents: a Ray Data pass over
    its ids, one number per block back to the driver."""
    import ray.data

    files, rows = deltalog.file_counts(uri, version, s3=s3)
    if not files:
        return 0
    ids = ray.data.read_datasource(rayread.files_source(files, rows, ["id"], BLOCK_ROWS, s3=s3))
    counts = ids.map_batches(_held_count, fn_kwargs={"holdout": holdout}, batch_format="pyarrow", batch_size=None)
    return sum(int(b.column("held").to_numpy().sum()) for b in counts.iter_batches(batch_format="pyarrow",
                                                                                   batch_size=None))
