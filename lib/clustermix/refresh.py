"""``clustermix refresh``: the nightly run over a corpus that grows.

Takes only the input files that are new (or changed) since the last refresh, ingests them into the
existing tables, embeds only documents without an embedding, assigns them to the existing
centroids, measures drift, and refits k-means on everything only when the drift passes the
configured thresholds (or ``--recluster``). Statistics, sampling and blend then rerun on the
result. Every step is skipped when its inputs did not change, so a refresh with nothing new
writes no data table, and one that died half-way is completed by the next: ingest replaces the
rows of the files it takes (never doubles them) and the ledger of taken files is written only
after those rows are committed. A bad file skipped under ``ingest.on_bad_file: skip`` is taken
too, with its reason: it is tried again when it changes, not every night while it does not.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from clustermix import deltalog, registry, runs
from clustermix.errors import InputError
from clustermix.inputs import InputSpec, resolve_input
from clustermix.pipeline import Run, check_k, session

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from clustermix.config import Config

log = logging.getLogger(__name__)


def run_refresh(cfg: Config, *, recluster: bool = False, run_id: str | None = None,
                spark: SparkSession | None = None) -> Run:
    """One refresh of the lake at ``cfg.lake.root`` from ``cfg.input.path`` (see the module doc)."""
    from clustermix.badfiles import bad_in

    if cfg.input.format == "delta":
        raise InputError("refresh takes new files of a jsonl or parquet input; for a Delta input table use "
                         "`clustermix run`")
    stages = registry.default_stages(cfg)
    with session(cfg, run_id, spark, mode="refresh", stages=(*stages, "assign")) as run:
        spec = resolve_input(cfg, run.lake.root)
        taken = runs.taken_files(run.lake)
        if taken is None or deltalog.version(run.lake.table("centroids"), s3=run.lake.s3) is None:
            # the first night: everything there is, with a fit of its own
            run.manifest["mode"] = "bootstrap"
            log.info("refresh: no earlier refresh on %s: running every stage over all input", run.lake.root)
            run.input_spec = spec
            files = spec.listing["files"]
            run.manifest["inputs_taken"] = sorted(files)

            def after_ingest() -> None:
                runs.record_taken(run.lake, files, run.run_id, bad_in(run.lake, list(files)))
                check_k(run)

            run.run_in_order(stages, after={"ingest": after_ingest})
            return run
        new = runs.new_files(spec.listing["files"], taken)
        run.manifest["inputs_taken"] = sorted(new)
        log.info("refresh: %d new or changed input files of %d", len(new), len(spec.listing["files"]))
        # new documents go to the existing clusters (``assign``) instead of a fit of their own
        order = [s if s != "cluster" else "assign" for s in stages]
        run.options["recluster"] = recluster
        if new:
            inc = InputSpec(spec.path, spec.format, {"files": new})
            run.input_spec = InputSpec(spec.path, spec.format, inc.listing, files=tuple(inc.spark_files()))
            # the ledger is written only once the new files' rows are committed
            run.run_in_order(order, after={
                "ingest": lambda: runs.record_taken(run.lake, new, run.run_id, bad_in(run.lake, list(new)))})
        else:
            run.manifest["stages"]["ingest"] = {"status": "skipped", "reason": "no new input files"}
            run.run_in_order([s for s in order if s != "ingest"])
    return run
