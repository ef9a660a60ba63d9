"""What ``evaluate``'s proxies read, drawn with Ray Data and pyarrow (no JVM), bounded by config.

One pass over ``docs`` joined to the kept ``assignments`` (less ``semantic_duplicates``, as the
search's pools) gives, in a seeded-hash order of the id:

- ``heldout``: the held-out documents (:mod:`clustermix.holdout`) scored, the first
  ``evaluate.max_per_source`` of each source, each cut to its first ``max_doc_bytes`` bytes;
- ``random``: a uniform random sample of the trainable documents (the prefix of the hash order that
  covers the proxies' budget);
- ``source`` and ``cluster``: the same prefix within each source and each cluster, from which the
  natural mix (every source's share of the budget is its share of the corpus) and the CLIMB mixture
  (weights per cluster) are cut, with each source's and cluster's trainable size.

Each block keeps only its own prefixes (a superset of its part of the global ones); the driver
merges blocks into the global prefixes as they arrive, so it holds O((1 + sources + clusters) ×
budget) bytes of text, never the corpus. :func:`blended_prefix` reads the first positions of
``blended`` (the training order) that cover the budget, pruning row groups by their statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import deltalog, rayread
from clustermix import lake as lk
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
    """The pass's result: ``rows`` (role, group, id, cluster_id, domain, key, ptokens, text), each role's
    rows in hash order per group, and the trainable bytes per source and per cluster."""

    rows: pa.Table
    source_tokens: dict[str, int]
    cluster_tokens: dict[str, int]

    def role(self, role: str, group: str | None = None) -> pa.Table:
        import pyarrow.compute as pc

        t = self.rows.filter(pc.equal(self.rows.column("role"), role))
        if group is not None:
            t = t.filter(pc.equal(t.column("group"), group))
        return t.take(pc.sort_indices(t, [("group", "ascending"), ("key", "ascending"), ("id", "ascending")]))


def doc_tokens(texts: list[str | None]) -> np.ndarray:
    """Proxy tokens of each document: its UTF-8 bytes and the separator after it."""
    return np.array([len(t.encode("utf-8")) + 1 if t else 1 for t in texts], dtype=np.int64)


def cut(table: pa.Table, budget: int, cap: int) -> pa.Table:
    """Per (role, group) in (key, id) order: the ``heldout`` role's first ``cap`` rows, any other role's
    rows while the tokens before them are under ``budget``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return table
    table = table.take(pc.sort_indices(table, [("role", "ascending"), ("group", "ascending"), ("key", "ascending"),
                                               ("id", "ascending")]))
    label = pc.binary_join_element_wise(table.column("role"), table.column("group"), "\x00").to_numpy(
        zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, label[1:] != label[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(label)]))
    tokens = table.column("ptokens").to_numpy()
    cum = np.cumsum(tokens)
    before = cum - tokens - np.r_[0, cum][first]
    rank = np.arange(len(label)) - first
    held = table.column("role").to_numpy(zero_copy_only=False) == "heldout"
    return table.filter(pa.array(np.where(held, rank < cap, before < budget)))


def _block(batch: pa.Table, *, holdout: Holdout, seed: int, budget: int, cap: int, max_doc_bytes: int) -> pa.Table:
    """A block of (id, text, domain, cluster_id) -> its own prefixes per role, and its totals."""
    import pyarrow as pa

    ids = batch.column("id").to_pylist()
    texts = batch.column("text").to_pylist()
    domains = [d if d is not None else NO_DOMAIN for d in batch.column("domain").to_pylist()]
    clusters = batch.column("cluster_id").to_pylist()
    held = holdout.mask(ids)
    keys = seeded_keys(seed, ids)
    tokens = doc_tokens(texts)
    parts = []

    def part(role: str, idx: np.ndarray, groups: list[str], text: list[str | None], ptokens: np.ndarray) -> None:
        parts.append(pa.table({
            "role": pa.array([role] * len(idx), pa.string()), "group": pa.array(groups, pa.string()),
            "id": pa.array([ids[i] for i in idx], pa.string()),
            "cluster_id": pa.array([clusters[i] for i in idx], pa.int32()),
            "domain": pa.array([domains[i] for i in idx], pa.string()),
            "key": pa.array(keys[idx], pa.int64()), "ptokens": pa.array(ptokens, pa.int64()),
            "text": pa.array(text, pa.string())}))

    h = np.flatnonzero(held)
    short = [(texts[i] or "").encode("utf-8")[:max_doc_bytes].decode("utf-8", errors="ignore") for i in h]
    part("heldout", h, [domains[i] for i in h], short, doc_tokens(short))
    t = np.flatnonzero(~held)
    t_text = [texts[i] for i in t]
    part("random", t, [""] * len(t), t_text, tokens[t])
    part("source", t, [domains[i] for i in t], t_text, tokens[t])
    part("cluster", t, [str(clusters[i]) for i in t], t_text, tokens[t])
    kept = cut(pa.concat_tables(parts), budget, cap)
    totals = []
    for role, groups in (("total_source", [domains[i] for i in t]), ("total_cluster", [str(clusters[i]) for i in t])):
        sums: dict[str, int] = {}
        for g, n in zip(groups, tokens[t].tolist(), strict=True):
            sums[g] = sums.get(g, 0) + n
        totals.append(pa.table({
            "role": pa.array([role] * len(sums), pa.string()), "group": pa.array(list(sums), pa.string()),
            "id": pa.array([None] * len(sums), pa.string()), "cluster_id": pa.array([None] * len(sums), pa.int32()),
            "domain": pa.array([None] * len(sums), pa.string()),
            "key": pa.array([0] * len(sums), pa.int64()), "ptokens": pa.array(list(sums.values()), pa.int64()),
            "text": pa.array([None] * len(sums), pa.string())}))
    return pa.concat_tables([kept, *totals])


def draw(docs: tuple[str, int | None], assignments: tuple[str, int | None],
         duplicates: tuple[str, int | None] | None, holdout: Holdout, seed: int, budget: int, cap: int,
         max_doc_bytes: int, partitions: int, s3: S3Settings | None) -> Draw:
    """The held-out documents to score and the trainable prefixes, from one Ray Data pass."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray.data

    docs_files, docs_rows = deltalog.file_counts(*docs, s3=s3)
    members = rayread.kept_members(assignments, duplicates, BLOCK_ROWS, partitions, s3)
    texts = ray.data.read_datasource(rayread.files_source(docs_files, docs_rows, ["id", "text", "domain"], BLOCK_ROWS,
                                                          s3=s3))
    joined = members.join(texts, join_type="inner", num_partitions=partitions, on=("id",))
    blocks = joined.map_batches(_block, fn_kwargs={"holdout": holdout, "seed": seed, "budget": budget, "cap": cap,
                                                   "max_doc_bytes": max_doc_bytes},
                                batch_format="pyarrow", batch_size=None)
    kept: pa.Table | None = None
    totals: dict[str, dict[str, int]] = {"total_source": {}, "total_cluster": {}}
    for batch in blocks.iter_batches(batch_format="pyarrow", batch_size=None):
        is_total = pc.starts_with(batch.column("role"), "total_")
        for r in batch.filter(is_total).select(["role", "group", "ptokens"]).to_pylist():
            totals[r["role"]][r["group"]] = totals[r["role"]].get(r["group"], 0) + int(r["ptokens"])
        rows = batch.filter(pc.invert(is_total))
        kept = cut(rows if kept is None else pa.concat_tables([kept, rows.cast(kept.schema)]), budget, cap)
    if kept is None:
        kept = _block(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string()),
                                "domain": pa.array([], pa.string()), "cluster_id": pa.array([], pa.int32())}),
                      holdout=holdout, seed=seed, budget=budget, cap=cap, max_doc_bytes=max_doc_bytes)
    return Draw(kept, totals["total_source"], totals["total_cluster"])


def blended_prefix(uri: str, version: int | None, budget: int, s3: S3Settings | None) -> pa.Table:
    """The first rows of ``blended`` by ``position`` whose tokens before them are under ``budget``:
    (id, text, domain, cluster_id, position), read with a position filter that prunes row groups,
    widened until it covers the budget or the table."""
    import pyarrow as pa
    import pyarrow.dataset as pds

    files, _ = deltalog.file_counts(uri, version, s3=s3)
    n_rows = deltalog.num_records(uri, version, s3=s3)
    if not files:
        return pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
    filesystem, _ = lk.open_fs(files[0], s3)
    dataset = pds.dataset([lk.open_fs(f, s3)[1] for f in files], filesystem=filesystem, format="parquet")
    columns = ["id", "text", "domain", "cluster_id", "position"]
    limit = 256
    while True:
        table = dataset.to_table(columns=columns, filter=pds.field("position") < limit).sort_by("position")
        tokens = doc_tokens(table.column("text").to_pylist())
        if int(tokens.sum()) >= budget or limit >= n_rows:
            before = np.cumsum(tokens) - tokens
            return table.filter(pa.array(before < budget))
        limit *= 4


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
