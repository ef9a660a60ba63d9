"""Embed (Ray Data): ``docs`` -> ``embeddings`` with an actor pool of SentenceTransformer models.

Ray Data streams the documents that still lack an embedding for the configured model through a
pool of :class:`Embedder` actors (model loaded once per actor, in ``__init__``); a task writes each
block of embeddings as a Parquet file of the ``embeddings`` table, and the driver commits the files
in one delta-rs transaction (:mod:`clustermix.deltars`). No JVM: this stage runs on a Ray image.

The documents to embed are read straight from the files of ``docs`` (row counts from the Delta log).
When ``embeddings`` exists, the ids lacking an embedding, and the embeddings whose document is gone,
come from the two tables' id columns (:mod:`clustermix.iddiff`); the read tasks keep only those
ids. The result records the wall seconds of each phase (``phases_s``: to-do list, Ray Data, commit).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import deltalog, deltars, faults, iddiff, rayread
from clustermix import lake as lk
from clustermix.config import EmbedConfig
from clustermix.models import model_id, resolve_model

if TYPE_CHECKING:
    import pyarrow as pa

    from clustermix.lake import Lake
    from clustermix.stage import Context
    from clustermix.storage import S3Settings
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


class _Progress:
    """Logs rows done/total and the rate every ``every`` seconds while the actors embed.

    Rows done come from the footers of the Parquet files already in the staging folder (a file
    still being written has no footer yet and is counted on a later poll), so the driver learns
    progress without touching the data or the actors."""

    def __init__(self, out_dir: str, total: int, every: float | None, s3: S3Settings | None = None) -> None:
        import threading

        self.out_dir, self.total, self.every, self.s3 = out_dir, total, every, s3
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
        new = [f for f in lk.list_parquet(self.out_dir, s3=self.s3) if f not in self.rows]
        # a file still being written has no footer yet: counted on a later poll
        for f, n in zip(new, lk.parquet_rows(new, skip_unfinished=True, s3=self.s3), strict=True):
            if n is not None:
                self.rows[f] = n
        return sum(self.rows.values())

    def report(self) -> None:
        n, dt = self.done(), time.time() - self.t0
        log.info("embed: %d/%d docs (%.0f%%), %.1f docs/s", n, self.total, 100 * n / max(self.total, 1),
                 n / dt if dt > 0 else 0.0)


def write_block(batch: pa.Table, table_uri: str, folder: str, s3: S3Settings | None) -> pa.Table:
    """Ray Data task: write one block of embeddings as a Parquet file of the ``embeddings`` table (not
    yet committed) and return what the driver's commit needs: (path, size, rows)."""
    import pyarrow as pa

    schema = deltars.arrow_schema("embeddings")
    part = deltars.write_part(batch.select(schema.names).cast(schema), table_uri, folder, s3)
    parts = [part] if part else []
    return pa.table({"path": pa.array([p.path for p in parts], pa.string()),
                     "size": pa.array([p.size for p in parts], pa.int64()),
                     "rows": pa.array([p.rows for p in parts], pa.int64())})


def _embed_files(todo: rayread.Filter | None, files: list[str], rows: list[int | None], table_uri: str, folder: str,
                 ecfg: EmbedConfig, total: int, s3: S3Settings | None) -> list[deltars.Part]:
    """Run the Ray Data pipeline: read (id, text) files, embed with the actor pool, write each block as
    a file of the table. Returns the files written (the driver learns no more than that)."""
    import ray
    from ray.data import DataContext

    # rows per actor call: a few sub-batches, so the tokeniser thread always has a next one
    call_rows = ecfg.batch_size_for(ecfg.planned_device()) * 4
    ds = ray.data.read_datasource(rayread.files_source(files, rows, ["id", "text"], call_rows, todo, s3))
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
    # one file per embed.rows_per_file rows (Ray Data gathers the actors' blocks up to that many; the
    # last file of a run holds the rest), named by its ids, so a retried task rewrites its own file
    # (the Spark commit's dropDuplicates is not needed)
    ds = ds.map_batches(write_block, fn_kwargs={"table_uri": table_uri, "folder": folder, "s3": s3},
                        batch_size=ecfg.rows_per_file, batch_format="pyarrow", max_retries=3)
    # on a terminal Ray Data's bars show rows done/total and the rate; in logs we report them
    every = None if DataContext.get_current().enable_progress_bars else PROGRESS_EVERY_S
    with _Progress(f"{table_uri}/{folder}", total, every, s3) as progress:
        parts = [deltars.Part(str(r["path"]), int(r["size"]), int(r["rows"])) for r in ds.iter_rows()]
    progress.report()
    return parts


PROGRESS_EVERY_S = 10.0


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


def run_embed(lake: Lake, ecfg: EmbedConfig, docs_version: int, run_id: str, write: TableWriter) -> dict[str, Any]:
    """Embed every document of ``docs@docs_version`` that has no embedding for this model yet; drop the
    embeddings of documents no longer in ``docs``. Ray and delta-rs only: no JVM."""
    import ray

    name = model_id(ecfg.model)
    uri = lake.table("embeddings")
    s3 = lake.s3  # handed to the workers explicitly
    phase = _Phases()
    exists = deltalog.version(uri, s3=s3) is not None
    todo, stale = None, None
    with phase("todo"):
        files, rows = deltalog.file_counts(lake.table("docs"), docs_version, s3=lake.s3)
        if exists:
            # the ids of docs without an embedding of this model, and of embeddings whose document is
            # gone, from the two tables' id columns (no shuffle, no embedding read)
            emb_files, emb_rows = deltalog.file_counts(uri, s3=s3)
            d = iddiff.diff(iddiff.IdSide(files, rows), iddiff.IdSide(emb_files, emb_rows, name), s3)
            rows, stale = list(d.missing_per_file), d.stale
            todo = rayread.Filter(ids=ray.put(d.missing))
    n_todo = sum(n for n in rows if n) if None not in rows else deltalog.num_records(lake.table("docs"), s3=lake.s3)
    folder = f"{run_id}-{uuid.uuid4().hex[:8]}"  # this run's files in the table's folder
    parts: list[deltars.Part] = []
    t0 = time.time()
    if n_todo:
        log.info("embedding %d documents with %s", n_todo, name)
        with phase("ray_data"):
            parts = _embed_files(todo, files, rows, uri, folder, ecfg, n_todo, s3)
    seconds = time.time() - t0
    with phase("commit"):
        schema = deltars.arrow_schema("embeddings")
        if stale is not None and len(stale):
            # a commit of its own, before the append, without the fingerprint: a crash between the
            # two leaves the stage not current, and its rerun finds nothing stale and appends
            partial = {k: v for k, v in write.meta.items() if k != "fingerprint"} | {"step": "delete stale"}
            deltars.delete_ids(uri, stale, partial, model=name, s3=s3)
        v = deltars.commit_parts(uri, schema, parts, write.meta, "append" if exists else "overwrite", s3=s3)
        write.record("embeddings", v)
    return {"model": name, "embedded": n_todo, "removed": len(stale) if stale is not None else 0,
            "seconds": round(seconds, 2),
            "docs_per_s": round(n_todo / seconds, 1) if seconds > 0 and n_todo else None,
            "batch_size": ecfg.batch_size_for(ecfg.planned_device()), "phases_s": phase.seconds}


def run(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    """The embed stage: documents of ``docs`` without an embedding for the model -> ``embeddings``."""
    ctx.ray()
    return run_embed(ctx.lake, ctx.cfg.embed, inputs["docs"], ctx.run_id, ctx.write)
