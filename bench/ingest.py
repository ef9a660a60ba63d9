"""Ingest (Spark) on a synthetic JSONL corpus with planted duplicates and bad lines.

Generates ``--lines`` JSON lines over ``--files`` files: documents of ~``--words`` words, a share of
them exact copies of an earlier text under a new id (``duplicate``), a share repeating an earlier
id with the same text (``duplicate``) or another text (``duplicate_id``), a share without an id,
and a share of bad lines (malformed JSON, missing or blank text: quarantined, with a null key).
Runs the ingest stage alone into a fresh lake (near-duplicates off unless ``--near``) and reports
its wall time, the bytes Spark's shuffles wrote (from the event log: every task's shuffle write
metrics) and a digest of the docs, duplicates and quarantine tables, so that two versions of the
code can be compared on the same input.

    .venv/bin/python bench/ingest.py --lines 300000 --files 8 --repeat 2
    # the code of another commit, same input:
    git archive COMMIT lib | tar -x -C /tmp/old && PYTHONPATH=/tmp/old/lib .venv/bin/python bench/ingest.py ...
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from common import save


def write_corpus(folder: Path, n: int, files: int, words: int, seed: int) -> None:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20_000)]
    folder.mkdir(parents=True, exist_ok=True)
    texts: list[str] = []
    ids: list[str] = []
    outs = [(folder / f"part-{f:03d}.jsonl").open("w") for f in range(files)]
    for i in range(n):
        r = rng.random()
        if r < 0.03:
            line = rng.choice(['{"id": "x", "text": ', 'not json', '{"id": "m"}', '{"id": "b", "text": "  "}'])
        elif r < 0.13 and texts:  # the same text under a new id
            line = json.dumps({"id": f"c{i}", "text": rng.choice(texts), "domain": "d"})
        elif r < 0.16 and ids:  # an id again, with its text or another
            j = rng.randrange(len(ids))
            text = texts[j] if rng.random() < 0.5 else " ".join(rng.choices(vocab, k=words))
            line = json.dumps({"id": ids[j], "text": text, "domain": "d"})
        else:
            text = " ".join(rng.choices(vocab, k=words))
            doc: dict[str, Any] = {"text": text, "domain": rng.choice("abc"), "quality": rng.random()}
            if rng.random() > 0.05:
                doc["id"] = f"d{i}"
                ids.append(doc["id"])
                texts.append(text)
            line = json.dumps(doc)
        outs[i % files].write(line + "\n")
    for o in outs:
        o.close()


def shuffle_bytes(log_dir: str) -> tuple[int, int]:
    """Bytes written and records written by all shuffles in the event logs under ``log_dir``."""
    written = records = 0
    for path in glob.glob(f"{log_dir}/**/*", recursive=True):
        if not Path(path).is_file():
            continue
        with open(path) as f:
            for line in f:
                if '"SparkListenerTaskEnd"' not in line:
                    continue
                m = json.loads(line).get("Task Metrics") or {}
                w = m.get("Shuffle Write Metrics") or {}
                written += w.get("Shuffle Bytes Written", 0)
                records += w.get("Shuffle Records Written", 0)
    return written, records


def digest(lake: Path) -> dict[str, str]:
    """An order-free digest of what ingest decided: docs, duplicates and quarantine rows."""
    from deltalake import DeltaTable

    cols = {"docs": ["id", "text_hash", "source_file"], "duplicates": ["id", "duplicate_of", "source_file"],
            "quarantine": ["raw", "reason", "source_file"]}
    out = {}
    for name, c in cols.items():
        rows = DeltaTable(str(lake / name)).to_pyarrow_table(columns=c).to_pylist()
        h = hashlib.sha256()
        for r in sorted(json.dumps([r[k] for k in c]) for r in rows):
            h.update(r.encode())
        out[name] = f"{len(rows)}:{h.hexdigest()[:16]}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=300_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--words", type=int, default=120)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--near", action="store_true", help="MinHash near-duplicates on (the product default)")
    ap.add_argument("--corpus", default=None, help="reuse this corpus folder (written when missing)")
    ap.add_argument("--tag", default="ingest")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    from clustermix.config import build_config
    from clustermix.pipeline import run_stages
    from clustermix.runtime import spark_session

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    corpus = Path(args.corpus) if args.corpus else work / "in"
    if not corpus.exists():
        write_corpus(corpus, args.lines, args.files, args.words, args.seed)
    size = sum(p.stat().st_size for p in corpus.iterdir())
    logs = work / "events"
    logs.mkdir()
    tree: dict[str, Any] = {
        "lake": {"root": str(work / "lake0")}, "input": {"path": str(corpus), "format": "jsonl"},
        "spark": {"master": "local[2]", "driver_memory": "4g",
                  "conf": {"spark.eventLog.enabled": "true", "spark.eventLog.dir": f"file://{logs}",
                           "spark.eventLog.compress": "false", "spark.eventLog.rolling.enabled": "false"}},
        "dedup": {"near": {"enabled": args.near}},
        "sample": {"budget": 1000, "order": "g2s"},
    }
    spark = spark_session(build_config(tree))
    runs = []
    for i in range(args.repeat):
        tree["lake"]["root"] = str(work / f"lake{i}")
        t0 = time.perf_counter()
        run = run_stages(build_config(tree), ("ingest",), spark=spark)
        wall = time.perf_counter() - t0
        counts = run.manifest["stages"]["ingest"]["counts"]
        runs.append(round(wall, 2))
        print(f"run {i}: {wall:.1f} s", flush=True)
    spark.stop()  # the event log is complete once the session stops
    time.sleep(1)
    written, records = shuffle_bytes(str(logs))
    result = {"lines": args.lines, "input_mib": round(size / 2**20, 1), "near": args.near, "wall_s": runs,
              "shuffle_mib_per_run": round(written / args.repeat / 2**20, 1),
              "shuffle_records_per_run": records // args.repeat,
              "counts": {k: counts[k] for k in ("read", "accepted", "duplicates", "quarantined")},
              "tables": digest(work / "lake0")}
    print(json.dumps(result, indent=1))
    save(args.tag, result)


if __name__ == "__main__":
    main()
