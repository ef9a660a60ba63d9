"""The ``clustermix`` command: ``run`` every stage, or one stage by name.

Heavy libraries (pyspark, ray, torch, faiss) are imported only when a stage runs, so ``--help``
is instant. Errors the user can fix print as one line with a fixed exit code (2: config/input).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config (default: conf/local.yaml)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key by its dotted path, e.g. --set cluster.k=50 (repeatable)")
    p.add_argument("--run-id", default=None, help="run id to record (default: a new time-based id)")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and the final summary")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="everything on the console as it comes (Spark, Py4J and Ray output included); by "
                        "default that goes to the run's log file, runs/<run_id>/run.log under the lake")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clustermix",
        description="Turn a raw, unbalanced text corpus into a balanced training mix written as Delta tables.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run every stage (skipping those whose outputs are current)",
                       description="Run ingest, embed, cluster, stats, sample, search (when search.target_path "
                                   "or search.target_domain is set) and blend in order.")
    _common(p)
    p.add_argument("--stages", default=None, metavar="STAGE,...", type=_stage_list,
                   help="only these stages, in pipeline order (comma- or space-separated; the cluster scripts "
                        "submit one job for several stages this way)")
    p = sub.add_parser(
        "refresh", help="nightly: ingest only new input files, assign them to the existing clusters, remix",
        description="Take only the input files that are new or changed since the last refresh, embed the new "
                    "documents, assign them to the existing centroids (refitting k-means when drift passes the "
                    "refresh.* thresholds, or with --recluster), then rerun stats, sample and blend. The first "
                    "refresh of a lake runs every stage over all input. A refresh with nothing new writes no data "
                    "table; every refresh appends one row to the lake's `runs` table.")
    _common(p)
    p.add_argument("--recluster", action="store_true", help="refit k-means on everything whatever the drift")
    from clustermix.registry import STAGES

    for stage in STAGES:
        p = sub.add_parser(stage.name, help=stage.help, description=f"Run one stage: {stage.help}.")
        _common(p)
    p = sub.add_parser("report", help="(re)write a run's report.html and report.json",
                       description="Regenerate the curation report of a run (default: the newest).")
    _common(p)
    p.add_argument("--run", dest="report_run", default=None, metavar="RUN_ID", help="the run (default: newest)")
    p = sub.add_parser("runs", help="list the runs recorded under the lake root")
    _common(p)
    p = sub.add_parser(
        "maintain", help="compact small files and vacuum old ones in every table of the lake (delta-rs)",
        description="Table upkeep, under the lake's run lock (never while a run writes): in every Delta table "
                    "of the lake, merge files smaller than maintain.target_file_bytes into files of about that "
                    "size (a commit that changes no row: every stage stays current; `blended` keeps its files, "
                    "which are its training order), then delete the files that versions older than "
                    "maintain.retention_hours stopped using, and files no commit names older than that. The "
                    "latest version of every table stays readable; older versions that needed deleted files do "
                    "not. Prints per table the files and bytes before and after.")
    _common(p)
    p.add_argument("--dry-run", action="store_true",
                   help="write nothing: show which small files would be merged and which files deleted")
    p = sub.add_parser("show-config", help="print the validated config as YAML")
    _common(p)
    p = sub.add_parser("spark-packages", help="print the Maven packages a spark-submit of this config needs",
                       description="The Delta jar, and hadoop-aws (s3a) when the lake or the input is on s3://, "
                                   "comma-separated for spark-submit --packages (deploy/spark-submit.sh uses it).")
    _common(p)
    return parser


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    """The short summary printed at the end of a run."""
    st = manifest.get("stages", {})
    lines = [f"{manifest.get('mode', 'run')} {manifest['run_id']}: {manifest.get('outcome')}",
             f"lake: {manifest['lake_root']}"]
    if "inputs_taken" in manifest:
        lines.append(f"input files taken: {len(manifest['inputs_taken'])}")
    drift = manifest.get("drift")
    if drift:
        lines.append(f"drift: {drift.get('new_docs')} new docs, score drop {drift.get('score_drop')}, share shift "
                     f"{drift.get('share_shift')}, far {drift.get('far_fraction')} -> {drift.get('decision')}"
                     + (f" ({'; '.join(drift['reasons'])})" if drift.get("reasons") else ""))
    ing = st.get("ingest", {}).get("counts")
    if ing:
        reasons = ", ".join(f"{k}={v}" for k, v in ing["quarantined_by_reason"].items()) or "none"
        lines.append(f"docs: read {ing['read']}, accepted {ing['accepted']}, duplicates {ing['duplicates']}, "
                     f"quarantined {ing['quarantined']} ({reasons})")
    cl = st.get("cluster", {}).get("counts")
    if cl:
        lines.append(f"clusters: k={cl['k']} over {cl['n_points']} docs, {cl['niter_run']} iterations, "
                     f"mean cosine {cl['objective']:.4f}")
    sa = st.get("sample", {}).get("counts")
    if sa:
        lines.append(f"sample: {sa['draws']} draws (budget {sa['budget']} {sa['unit']}, clip {sa['clip']}, "
                     f"shortfall {sa['shortfall']}); share gini {sa['shares_before'].get('gini')} -> "
                     f"{sa['shares_after'].get('gini')}")
        if sa.get("group_shares_before"):
            gb, ga = sa["group_shares_before"], sa["group_shares_after"]
            lines.append(f"groups ({sa.get('group_column')}): {gb.get('clusters')} groups, share gini {gb.get('gini')} -> "
                         f"{ga.get('gini')}, smallest share {gb.get('smallest_share')} -> {ga.get('smallest_share')}")
    se = st.get("search", {}).get("counts")
    if se:
        lines.append(f"search: {se.get('proxies_trained')} proxies over {se.get('iterations')} iterations, best "
                     f"target loss {se.get('best_score')} (uniform {se.get('uniform_score')}); "
                     f"best mixture: {se.get('best_mixture_path')}")
    ev = st.get("evaluate", {}).get("counts")
    if ev:
        figs = ", ".join(f"{m} {s['mean']:.4f} ({s['min']:.4f}-{s['max']:.4f})" for m, s in
                         ((m, ev["summaries"][m]["macro_source"]) for m in ev["mixes"]))
        said = "; ".join(f"{b}: {v.get('macro_source')}" for b, v in ev["verdicts"].items())
        lines.append(f"evaluate: {ev['held_out_scored']} held-out docs, {ev['seeds']} seeds; held-out bits/byte, "
                     f"macro over sources (range across seeds): {figs}; blended against {said}")
    for name, rec in st.items():
        lines.append(f"  {name:<8} {rec.get('status'):<8} {rec.get('seconds', 0):>8}s  versions {rec.get('versions')}")
    if "blended" in manifest.get("tables", {}):
        lines.append(f"result: {manifest['lake_root']}/blended (Delta version {manifest['tables']['blended']})")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from clustermix.config import load_config
    from clustermix.errors import USER_ERRORS

    try:
        cfg = load_config(args.config, args.overrides)
        from clustermix.pipeline import check_paths

        check_paths(cfg)
        if args.command == "show-config":
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        if args.command == "spark-packages":
            from clustermix.runtime import spark_packages

            print(",".join(spark_packages(cfg)))
            return 0
        if args.command in ("report", "runs"):
            return _report_commands(args, cfg)
        if args.command == "maintain":
            return _maintain(args, cfg)
        from clustermix.registry import engines_of
        from clustermix.runtime import check_engines

        check_engines(cfg, engines_of(_stages(args.command, cfg, getattr(args, "stages", None))))  # before the run's log is opened
    except USER_ERRORS as exc:
        print(f"clustermix: {exc}", file=sys.stderr)
        return exc.exit_code
    return _run_command(args, cfg)


def _run_command(args: argparse.Namespace, cfg: Any) -> int:
    """A command that runs stages: its engines' output goes to the run's log, the console gets progress,
    the summary, and for a failure one line (the full trace is in the log)."""
    from clustermix.console import RunLog
    from clustermix.errors import USER_ERRORS
    from clustermix.lake import Lake
    from clustermix.pipeline import new_run_id

    run_id = args.run_id or new_run_id()
    log = logging.getLogger("clustermix.cli")
    lake = Lake.from_config(cfg)
    with RunLog(f"{lake.run_dir(run_id)}/run.log", verbose=args.verbose, quiet=args.quiet, s3=lake.s3) as out:
        try:
            try:
                run = _run(args, cfg, run_id)
            finally:
                _shutdown()
        except USER_ERRORS as exc:
            log.debug("the run stopped", exc_info=True)
            print(f"clustermix: {exc}", file=sys.stderr)
            return int(exc.exit_code)
        except Exception as exc:
            log.error("the run failed", exc_info=True)
            if args.verbose:
                raise
            where = f" (the full trace is in {out.where})" if out.where else ""
            print(f"clustermix: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                  f"{where}", file=sys.stderr)
            return 1
        print("\n".join(summary_lines(run.manifest)))
        print(f"manifest: {run.manifest_uri}")
        from clustermix.report import write_report

        _, html = write_report(run.lake.root, run.run_id, s3=run.lake.s3)
        print(f"report: {html}")
    if out.where:
        print(f"log: {out.where}")
    return 0


def _stage_list(value: str) -> tuple[str, ...]:
    """``run --stages``: names of the registry's stages, returned in pipeline order."""
    from clustermix.registry import ORDER

    names = value.replace(",", " ").split()
    unknown = [n for n in names if n not in ORDER]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) + ': not a stage' if unknown else 'no stage named'} "
                                         f"(the stages: {', '.join(ORDER)})")
    return tuple(n for n in ORDER if n in names)


def _stages(command: str, cfg: Any, chosen: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The stages a command may run (``chosen``: ``run --stages``)."""
    from clustermix.registry import default_stages

    if command == "refresh":
        return (*default_stages(cfg), "assign")
    if command != "run":
        return (command,)
    return default_stages(cfg) if chosen is None else chosen


def _run(args: argparse.Namespace, cfg: Any, run_id: str) -> Any:
    from clustermix.pipeline import run_stages

    if args.command == "refresh":
        from clustermix.refresh import run_refresh

        return run_refresh(cfg, recluster=args.recluster, run_id=run_id)
    return run_stages(cfg, _stages(args.command, cfg, getattr(args, "stages", None)), run_id=run_id)


def _report_commands(args: argparse.Namespace, cfg: Any) -> int:
    from clustermix.lake import Lake
    from clustermix.report import list_runs, write_report

    lake = Lake.from_config(cfg)
    if args.command == "report":
        json_uri, html_uri = write_report(lake.root, args.report_run, s3=lake.s3)
        print(f"report: {html_uri}\nfigures: {json_uri}")
        return 0
    runs = list_runs(lake.root, s3=lake.s3)
    if not runs:
        print(f"no runs under {cfg.lake.root}")
    for r in runs:
        drift = f"  drift: {r['decision']}" if r.get("decision") else ""
        print(f"{r['run_id']}  {r.get('mode', 'run'):<9} {r.get('outcome') or '?':<10} started {r.get('started_at')}  "
              f"blended v{r.get('blended_version')}  report {'yes' if r.get('has_report') else 'no'}{drift}")
    return 0


def _maintain(args: argparse.Namespace, cfg: Any) -> int:
    from clustermix.maintain import run_maintain, summary_lines
    from clustermix.pipeline import new_run_id

    recs = run_maintain(cfg, args.run_id or new_run_id(), dry_run=args.dry_run)
    if not recs:
        print(f"no Delta tables under {cfg.lake.root}")
    else:
        print("\n".join(summary_lines(recs, args.dry_run)))
    return 0


def _shutdown() -> None:
    """Stop the engines this process started (Spark's JVM, a local Ray instance)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if "pyspark" in sys.modules:
        from pyspark.sql import SparkSession

        active = SparkSession.getActiveSession()
        if active is not None:
            active.stop()


if __name__ == "__main__":
    sys.exit(main())
