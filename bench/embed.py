"""Benchmark: the embed stage vs bare SentenceTransformer.encode on the same corpus and cores.

  (a) bare ``SentenceTransformer.encode`` over the corpus's texts (this process, all cores);
  (b) clustermix's embed stage over the same corpus: Ray Data reads the ``docs`` Delta table,
      an actor pool embeds, Spark commits ``embeddings`` (one Delta MERGE).
It prints docs/s for both and the ratio (b)/(a) (goal >= 0.9), where the stage's time goes (its
phases from the manifest; "ray start" is the rest of the stage's wall time, mostly ``ray.init``),
the machine's load average (other work on the same cores makes a run *contended*), and, in
separate processes, the driver's peak RSS for N and 4N documents (it must not grow with N). Both
sides use the device's default batch size (``EmbedConfig.batch_size_for``).

    .venv/bin/python bench/embed.py            # N = every BBC article shipped with the package (2,225)
    .venv/bin/python bench/embed.py --n 300    # a quicker run on part of it
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import peak_rss_mb, save


def corpus(n: int, path: Path) -> list[str]:
    """``n`` BBC articles (repeated with a suffix when n exceeds the corpus), as JSONL at ``path``."""
    from clustermix.corpus import iter_records

    recs = iter_records("bbc")
    out = []
    with path.open("w") as fh:
        for i in range(n):
            r = dict(recs[i % len(recs)])
            if i >= len(recs):
                r["id"], r["text"] = f"{r['id']}-{i}", f"{r['text']} ({i})"
            out.append(r["text"])
            fh.write(json.dumps(r) + "\n")
    return out


def stage_run(n: int, threads: int, tmp: Path) -> dict[str, float]:
    """Ingest (not timed), then the embed stage (timed); returns docs/s and peak driver RSS."""
    from clustermix.config import build_config
    from clustermix.pipeline import run_stages

    src = tmp / f"corpus-{n}.jsonl"
    corpus(n, src)
    cfg = build_config({
        "lake": {"root": str(tmp / f"lake-{n}")}, "input": {"path": str(src)},
        "ray": {"num_cpus": 2}, "sample": {"budget": 10},
        "embed": {"device": "cpu", "torch_threads": threads, "cpus_per_actor": 1}})
    run_stages(cfg, ("ingest",))
    t0 = time.perf_counter()
    run = run_stages(cfg, ("embed",), spark=None)
    wall = time.perf_counter() - t0
    counts = run.manifest["stages"]["embed"]["counts"]
    phases = dict(counts["phases_s"])
    phases["ray start"] = round(wall - sum(phases.values()), 2)
    return {"n": n, "stage_wall_s": wall, "stage_docs_per_s": n / wall, "ray_part_s": counts["seconds"],
            "phases_s": phases, "batch_size": counts["batch_size"], "peak_driver_rss_mb": peak_rss_mb()}


def bare(n: int, threads: int, tmp: Path) -> float:
    import torch
    from sentence_transformers import SentenceTransformer

    from clustermix.config import EmbedConfig
    from clustermix.models import resolve_model

    torch.set_num_threads(threads)
    texts = corpus(n, tmp / "bare.jsonl")
    model = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
    model.encode(texts[:8])  # warm up
    t0 = time.perf_counter()
    model.encode(texts, batch_size=EmbedConfig().batch_size_for("cpu"), normalize_embeddings=True)
    return n / (time.perf_counter() - t0)


def load() -> float:
    """1-minute load average per core: above ~1 the run shared its cores with other work."""
    return os.getloadavg()[0] / (os.cpu_count() or 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="documents (default: all 2,225 BBC articles)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stage-only", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.n is None:
        from clustermix.corpus import iter_records

        args.n = len(iter_records("bbc"))
    if args.stage_only:  # child process: one stage run, result as JSON on the last line
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(stage_run(args.stage_only, args.threads, Path(tmp))))
        return
    loads = [load()]
    with tempfile.TemporaryDirectory() as tmp:
        a = bare(args.n, args.threads, Path(tmp))
    loads.append(load())
    print(f"(a) bare encode: {a:.1f} docs/s (load/core {loads[-1]:.2f})", flush=True)
    runs = {}
    for n in (args.n, 4 * args.n):
        proc = subprocess.run([sys.executable, __file__, "--stage-only", str(n), "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True)
        runs[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        loads.append(load())
        phases = ", ".join(f"{k} {v:.1f}" for k, v in runs[n]["phases_s"].items())
        print(f"(b) embed stage, N={n}: {runs[n]['stage_docs_per_s']:.1f} docs/s "
              f"(Ray part {n / runs[n]['ray_part_s']:.1f} docs/s), driver peak RSS "
              f"{runs[n]['peak_driver_rss_mb']:.0f} MB, load/core {loads[-1]:.2f}\n"
              f"    stage {runs[n]['stage_wall_s']:.1f} s = {phases}", flush=True)
    ratio = runs[args.n]["stage_docs_per_s"] / a
    big = runs[4 * args.n]["stage_docs_per_s"] / a
    print(f"ratio (b)/(a): {ratio:.2f} at N={args.n}, {big:.2f} at N={4 * args.n} (goal >= 0.9)")
    rss = runs[4 * args.n]["peak_driver_rss_mb"] / runs[args.n]["peak_driver_rss_mb"]
    print(f"driver peak RSS 4N/N: {rss:.2f} (must not grow with N)")
    n1, n4 = runs[args.n], runs[4 * args.n]
    marginal = (4 * args.n - args.n) / (n4["stage_wall_s"] - n1["stage_wall_s"])
    print(f"marginal rate N -> 4N: {marginal:.1f} docs/s = {marginal / a:.2f} of bare; "
          f"fixed cost {n1['stage_wall_s'] - args.n / marginal:.1f} s")
    contended = max(loads) > 1.0
    print(f"max load/core during the run: {max(loads):.2f}" + (" (contended)" if contended else ""))
    save("embed", {"bare_docs_per_s": a, "stage": {str(k): v for k, v in runs.items()}, "ratio_n": ratio,
                   "ratio_4n": big, "rss_growth_4n": rss, "marginal_docs_per_s": marginal,
                   "load_per_core": loads, "contended": contended})


if __name__ == "__main__":
    main()
