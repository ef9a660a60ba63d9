"""Embed (Ray Data): ``docs`` -> ``embeddings`` with an actor pool of SentenceTransformer models.

Ray Data streams the documents that still lack an embedding for the configured model through a
pool of :class:`Embedder` actors (model loaded once per actor, in ``__init__``) and writes Parquet
to a staging folder; Spark then commits it into ``embeddings`` with one Delta MERGE that inserts
what is new (never a duplicate) and drops embeddings of documents no longer in ``docs``.

The first run (no ``embeddings`` table yet) reads the ``docs`` files directly, with the row counts
from the Delta log, and commits with a plain write: no Spark job before the actors start. The
result records the wall seconds of each phase (``phases_s``: to-do list, Ray Data, commit).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import contracts, deltalog, faults, tableio
from clustermix import lake as lk
from clustermix.config import EmbedConfig
from clustermix.models import model_id, resolve_model

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import SparkSession

    from clustermix.lake import Lake
    from clustermix.stage import Context
    from clustermix.tableio import TableWriter

log = logging.getLogger(__name__)


def pick_device(requested: str) -> str:
    """``auto`` means CUDA when torch sees a GPU, else CPU."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    """Ray Data callable class: ``__init__`` loads the model once; ``__call__`` embeds one batch.

    Each batch is sorted by length and cut into sub-batches of ``batch_size``; while the model
    runs one sub-batch, a background thread tokenises the next (the fast tokenizer releases the
    GIL), so tokenisation costs no model time. The sub-batches, the tokenizer call, the forward
    pass and the normalisation are those of ``SentenceTransformer.encode``, so the embeddings are
    the ones it gives (written as L2-normalised float32)."""

    def __init__(self, model_path: str, model_name: str, cfg: dict[str, Any]) -> None:
        import os
        from concurrent.futures import ThreadPoolExecutor

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        if cfg.get("torch_threads"):
            torch.set_num_threads(int(cfg["torch_threads"]))
        self.device = pick_device(cfg.get("device", "auto"))
        self.model = SentenceTransformer(model_path, device=self.device, local_files_only=True)
        if cfg.get("max_seq_length"):
            self.model.max_seq_length = int(cfg["max_seq_length"])
        precision = cfg.get("precision", "auto")
        if self.device == "cuda" and precision in ("auto", "float16"):
            self.model.half()
        elif self.device == "cuda" and precision == "bfloat16":
            self.model.to(torch.bfloat16)
        self.model.eval()
        self.batch_size = EmbedConfig(batch_size=cfg.get("batch_size")).batch_size_for(self.device)
        self.chunk = cfg.get("long_docs") == "chunk"
        self.model_name = model_name
        # what encode() does with a model that declares a default prompt: prepend it, and tell
        # the pooling how many tokens it took
        prompts = getattr(self.model, "prompts", None) or {}
        self.prompt = prompts.get(self.model.default_prompt_name or "", "") or ""
        self.extra_features: dict[str, Any] = {}
        if self.prompt:
            length = self.model._get_prompt_length(self.prompt)
            if length is not None:
                self.extra_features["prompt_length"] = length
        self._tokeniser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenise")
        self.calls = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text, in the order given."""
        if self.chunk:
            return self._encode_chunked(texts)
        return self._encode(texts)

    def _encode(self, texts: list[str]) -> np.ndarray:
        """Length-sorted sub-batches (little padding), the next one tokenised during this one's forward."""
        if not texts:
            return np.zeros((0, self.model.get_sentence_embedding_dimension() or 0), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        bs = self.batch_size
        batches = [[self.prompt + texts[i] for i in order[s : s + bs]] for s in range(0, len(texts), bs)]
        pending = self._tokeniser.submit(self._tokenize, batches[0])
        parts = []
        for k in range(len(batches)):
            features = pending.result()
            if k + 1 < len(batches):
                pending = self._tokeniser.submit(self._tokenize, batches[k + 1])
            parts.append(self._forward(features))
        emb = np.concatenate(parts)
        out = np.empty_like(emb)
        out[order] = emb
        return out

    def _tokenize(self, texts: list[str]) -> dict[str, Any]:
        """Runs on the tokeniser thread. For CUDA the tensors are pinned so the copy is asynchronous."""
        features = self.model.tokenize(texts)
        if self.device == "cuda":
            features = {k: v.pin_memory() if hasattr(v, "pin_memory") else v for k, v in features.items()}
        return features

    def _forward(self, features: dict[str, Any]) -> np.ndarray:
        import torch

        dev = self.model.device
        features = {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v
                    for k, v in features.items()}
        features.update(self.extra_features)
        with torch.inference_mode():
            emb = self.model.forward(features)["sentence_embedding"]
            if self.model.truncate_dim:
                emb = emb[..., : self.model.truncate_dim]
            # normalised in float32 (a half-precision model's output is cast first), as stored
            emb = torch.nn.functional.normalize(emb.float(), p=2, dim=1)
        return emb.cpu().numpy()

    def _encode_chunked(self, texts: list[str]) -> np.ndarray:
        """Documents longer than the model's window: embed windows, mean-pool, renormalise."""
        tok = self.model.tokenizer
        window = max(8, self.model.max_seq_length - 2)
        pieces: list[str] = []
        owner: list[int] = []
        for i, ids in enumerate(tok(texts, add_special_tokens=False)["input_ids"]):
            spans = [ids[s : s + window] for s in range(0, max(len(ids), 1), window)] or [[]]
            for span in spans:
                pieces.append(tok.decode(span) if len(spans) > 1 else texts[i])
                owner.append(i)
            # a short document keeps its own text, so its embedding equals the plain one
        emb = self._encode(pieces)
        sums = np.zeros((len(texts), emb.shape[1]), dtype=np.float64)
        np.add.at(sums, np.asarray(owner, dtype=np.int64), emb)
        sums /= np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        return sums.astype(np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        self.calls += 1
        faults.hold("embed.batch", self.calls)
        texts = batch.column("text").to_pylist()
        emb = self.encode(texts)
        flat = pa.array(emb.reshape(-1), type=pa.float32())
        offsets = pa.array(np.arange(len(texts) + 1, dtype=np.int32) * emb.shape[1])
        return pa.table({
            "id": batch.column("id"),
            "embedding": pa.ListArray.from_arrays(offsets, flat),
            "model": pa.array([self.model_name] * len(texts), type=pa.string()),
        })


def _read_text_file(uri: str, block_rows: int) -> Iterator[pa.Table]:
    """One read task: the (id, text) columns of one Parquet file, in blocks of ``block_rows``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    filesystem, path = lk.open_fs(uri)
    with filesystem.open_input_file(path) as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=block_rows, columns=["id", "text"]):
            yield pa.Table.from_batches([batch])


def _text_files(files: list[str], rows: list[int | None], block_rows: int) -> Any:
    """A Ray Data source of (id, text) Parquet files with their row counts known up front.

    ``read_parquet`` would first run sampling tasks (to estimate the in-memory size) and block
    the driver until they finish, so the actor pool, and its model load, would start only after
    a worker process was spawned for them. Here nothing runs before execution: the read tasks and
    the actors start together, and the row counts give the progress bar its total."""
    from functools import partial

    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class TextFiles(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int) -> list[ReadTask]:
            return [ReadTask(partial(_read_text_file, f, block_rows),
                             BlockMetadata(num_rows=n, size_bytes=None, exec_stats=None, input_files=[f]))
                    for f, n in zip(files, rows, strict=True) if n != 0]

    return TextFiles()


class _Progress:
    """Logs rows done/total and the rate every ``every`` seconds while the actors embed.

    Rows done come from the footers of the Parquet files already in the staging folder (a file
    still being written has no footer yet and is counted on a later poll), so the driver learns
    progress without touching the data or the actors."""

    def __init__(self, out_dir: str, total: int, every: float | None) -> None:
        import threading

        self.out_dir, self.total, self.every = out_dir, total, every
        self.rows: dict[str, int] = {}
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="embed-progress")

    def __enter__(self) -> _Progress:
        if self.every:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        assert self.every
        while not self._stop.wait(self.every):
            self.report()

    def done(self) -> int:
        new = [f for f in lk.list_parquet(self.out_dir) if f not in self.rows]
        # a file still being written has no footer yet: counted on a later poll
        for f, n in zip(new, lk.parquet_rows(new, skip_unfinished=True), strict=True):
            if n is not None:
                self.rows[f] = n
        return sum(self.rows.values())

    def report(self) -> None:
        n, dt = self.done(), time.time() - self.t0
        log.info("embed: %d/%d docs (%.0f%%), %.1f docs/s", n, self.total, 100 * n / max(self.total, 1),
                 n / dt if dt > 0 else 0.0)


def _embed_files(files: list[str], rows: list[int | None], out_dir: str, ecfg: EmbedConfig, total: int) -> None:
    """Run the Ray Data pipeline: read (id, text) files, embed with the actor pool, write Parquet."""
    import ray
    from ray.data import DataContext

    # rows per actor call: a few sub-batches, so the tokeniser thread always has a next one
    call_rows = ecfg.batch_size_for(ecfg.planned_device()) * 4
    ds = ray.data.read_datasource(_text_files(files, rows, call_rows))
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"model_path": resolve_model(ecfg.model), "model_name": model_id(ecfg.model),
                               "cfg": ecfg.model_dump()},
        batch_size=call_rows,
        batch_format="pyarrow",
        concurrency=ecfg.num_actors,
        num_cpus=ecfg.cpus_per_actor,
        num_gpus=ecfg.gpus_per_actor or None,
        max_task_retries=3,
    )
    # on a terminal Ray Data's bars show rows done/total and the rate; in logs we report them
    every = None if DataContext.get_current().enable_progress_bars else PROGRESS_EVERY_S
    with _Progress(out_dir, total, every) as progress:
        ds.write_parquet(out_dir)
    progress.report()


PROGRESS_EVERY_S = 10.0
EMBEDDINGS_SCHEMA = "id string, embedding array<float>, model string"


class _Phases:
    """Wall seconds per phase of the stage, for the manifest (where the time goes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 2)


def run_embed(spark: SparkSession, lake: Lake, ecfg: EmbedConfig, docs_version: int, run_id: str,
              write: TableWriter) -> dict[str, Any]:
    """Embed every document of ``docs@docs_version`` that has no embedding for this model yet."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    name = model_id(ecfg.model)
    phase = _Phases()
    exists = deltalog.version(lake.table("embeddings")) is not None
    staging_in = None
    with phase("todo"):
        if exists:
            docs = tableio.read(spark, lake, "docs", docs_version).select("id", "text")
            have = tableio.read(spark, lake, "embeddings").where(F.col("model") == name).select("id")
            staging_in = lake.staging("embed_todo", run_id)
            docs.join(have, "id", "left_anti").write.mode("overwrite").parquet(lk.spark_path(staging_in))
            todo_files = lk.list_parquet(staging_in)
            rows = lk.parquet_rows(todo_files)  # no count() pass over the to-do list
        else:
            # nothing embedded yet: the to-do list is docs itself, read from its own files (no
            # Spark job, no staging copy)
            todo_files, rows = deltalog.file_counts(lake.table("docs"), docs_version)
    n_todo = sum(n for n in rows if n) if None not in rows else deltalog.num_records(lake.table("docs"))
    staging_out = lake.staging("embeddings", run_id)
    t0 = time.time()
    if n_todo:
        log.info("embedding %d documents with %s", n_todo, name)
        with phase("ray_data"):
            _embed_files(todo_files, rows, staging_out, ecfg, n_todo)
    seconds = time.time() - t0
    with phase("commit"):
        if n_todo:
            # the schema is given, so Spark reads no footer to infer it; a retried task may have
            # written a block twice, hence the dropDuplicates
            new = contracts.check(
                spark.read.schema(EMBEDDINGS_SCHEMA).parquet(lk.spark_path(staging_out)).dropDuplicates(["id"]),
                "embeddings")
        else:
            new = spark.createDataFrame([], EMBEDDINGS_SCHEMA)
        if not exists:
            write("embeddings", new)
        else:
            ids = tableio.read(spark, lake, "docs", docs_version).select("id")
            source = ids.join(new.select("id", "embedding"), "id", "left")
            target = DeltaTable.forPath(spark, lake.spark_uri("embeddings"))

            def merge() -> None:
                (target.alias("t").merge(source.alias("s"), f"t.id = s.id AND t.model = '{_sql_str(name)}'")
                 .whenNotMatchedInsert(condition="s.embedding IS NOT NULL",
                                       values={"id": "s.id", "embedding": "s.embedding", "model": F.lit(name)})
                 .whenNotMatchedBySourceDelete(condition=f"t.model = '{_sql_str(name)}'")
                 .execute())

            write.merge_commit(spark, "embeddings", merge)
    for d in (staging_in, staging_out):
        if d:
            lake.remove(d)
    return {"model": name, "embedded": n_todo, "seconds": round(seconds, 2),
            "docs_per_s": round(n_todo / seconds, 1) if seconds > 0 and n_todo else None,
            "batch_size": ecfg.batch_size_for(ecfg.planned_device()), "phases_s": phase.seconds}


def _sql_str(s: str) -> str:
    return s.replace("'", "''")


def run(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    """The embed stage: documents of ``docs`` without an embedding for the model -> ``embeddings``."""
    ctx.ray()
    return run_embed(ctx.spark, ctx.lake, ctx.cfg.embed, inputs["docs"], ctx.run_id, ctx.write)
