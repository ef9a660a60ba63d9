"""Column contracts of the tables that stages hand to each other, checked at every hand-off."""

from __future__ import annotations

from typing import TYPE_CHECKING

from clustermix.errors import ClustermixError

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

# how a document without a domain is named in cluster_stats' domain histograms and the blend's mix
NO_DOMAIN = "(none)"

# table -> {column: Spark simple type string}
CONTRACTS: dict[str, dict[str, str]] = {
    "docs": {
        "id": "string", "text": "string", "domain": "string", "quality": "double", "lang": "string",
        "n_chars": "bigint", "n_tokens": "bigint", "text_hash": "string", "source_file": "string",
        "ingested_at": "timestamp", "run_id": "string",
    },
    "quarantine": {"raw": "string", "reason": "string", "source_file": "string", "run_id": "string"},
    "duplicates": {"id": "string", "duplicate_of": "string", "source_file": "string", "run_id": "string"},
    # a MinHash near-copy of an accepted document: duplicate_of is the kept document of its group
    "near_duplicates": {"id": "string", "duplicate_of": "string", "jaccard": "double", "domain": "string",
                        "snippet": "string", "source_file": "string", "run_id": "string"},
    "minhash_signatures": {"id": "string", "signature": "array<int>", "scheme": "string", "source_file": "string",
                           "run_id": "string"},
    # a document whose embedding is within dedup.semantic.threshold of a kept one of its cluster
    "semantic_duplicates": {"id": "string", "duplicate_of": "string", "cluster_id": "int", "similarity": "float",
                            "domain": "string", "run_id": "string"},
    "bad_files": {
        "path": "string", "source_file": "string", "size": "bigint", "reason": "string", "detail": "string",
        "status": "string", "records": "bigint", "run_id": "string",
    },
    "embeddings": {"id": "string", "embedding": "array<float>", "model": "string"},
    "centroids": {
        "cluster_id": "int", "centroid": "array<float>", "k": "int", "niter": "int", "seed": "bigint",
        "objective": "double", "model": "string",
    },
    "assignments": {"id": "string", "cluster_id": "int", "score": "float"},
    "cluster_stats": {
        "cluster_id": "int", "n_docs": "bigint", "n_tokens": "bigint", "share": "double",
        "token_share": "double", "below_threshold": "boolean", "exemplar_ids": "array<string>",
        "exemplar_snippets": "array<string>",
    },
    # one row per (cluster, group) cell with documents; group: the value of sample.group_column
    "cell_stats": {"cluster_id": "int", "group_column": "string", "group": "string", "n_docs": "bigint",
                   "n_tokens": "bigint"},
    "sample_plan": {"id": "string", "cluster_id": "int", "draw": "int", "position": "bigint", "phase": "string"},
    "blended": {
        "id": "string", "text": "string", "cluster_id": "int", "domain": "string", "quality": "double",
        "draw": "int", "position": "bigint", "phase": "string",
    },
}


def group_value(column: str) -> Column:
    """The group of a document: ``column`` of docs as a string, or :data:`NO_DOMAIN` where it is null.
    One expression for the stats (cell sizes) and the sample (cell members), so the two always agree."""
    from pyspark.sql import functions as F

    return F.coalesce(F.col(f"`{column}`").cast("string"), F.lit(NO_DOMAIN))


class ContractError(ClustermixError):
    """A table handed between stages lacks a declared column or has the wrong type."""


def check(df: DataFrame, table: str) -> DataFrame:
    """Return ``df`` if it has every contracted column with the contracted type, else raise."""
    have = {f.name: f.dataType.simpleString() for f in df.schema.fields}
    for col, typ in CONTRACTS[table].items():
        if col not in have:
            raise ContractError(f"table {table!r} lacks column {col!r} (has {sorted(have)})")
        if have[col] != typ:
            raise ContractError(f"table {table!r} column {col!r} is {have[col]}, expected {typ}")
    return df
