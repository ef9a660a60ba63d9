"""The documents the mix is made of: assignments less the semantic duplicates and, when evaluation is
on, less the evaluation's hold-out (:mod:`clustermix.holdout`).

One reader for every stage after ``dedup`` (stats, sample, blend, search), so that they all see the
same kept set, and each declares ``semantic_duplicates`` among its reads: a change of the duplicates
reruns them. The MinHash near-duplicates never reach ``docs``, so they need no filter here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from clustermix.holdout import Holdout
    from clustermix.lake import Lake


def assignments(spark: SparkSession, lake: Lake, inputs: dict[str, Any], holdout: Holdout | None = None) -> DataFrame:
    """``assignments`` at its pinned version without the ids of ``semantic_duplicates`` at its pinned
    version (no join at all when there are none) and without the held-out ids of ``holdout`` (a
    filter on a hash of the id: no join either)."""
    from clustermix.deltalog import num_records, version
    from clustermix.tableio import read

    a = read(spark, lake, "assignments", inputs.get("assignments"))
    if holdout is not None:
        a = a.where(~held_out(holdout))
    uri, pinned = lake.table("semantic_duplicates"), inputs.get("semantic_duplicates")
    if (pinned is None and version(uri, s3=lake.s3) is None) or not num_records(uri, pinned, s3=lake.s3):
        return a
    dups = read(spark, lake, "semantic_duplicates", pinned).select("id")
    return a.join(dups, "id", "left_anti")


def held_out(holdout: Holdout, id_col: str = "id") -> Column:
    """:meth:`Holdout.is_held` as a Spark column, with built-in functions only (no Python per row)."""
    from pyspark.sql import functions as F

    from clustermix.holdout import DIGITS

    digest = F.sha2(F.concat(F.lit(holdout.prefix), F.col(id_col)), 256)
    return F.substring(digest, 1, DIGITS) < F.lit(holdout.threshold)
