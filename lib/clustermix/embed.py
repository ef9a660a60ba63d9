"""Embed (Ray Data): ``docs`` -> ``embeddings`` with an actor pool of SentenceTransformer models.

Ray Data streams the documents that still lack an embedding for the configured model through a
pool of :class:`Embedder` actors (model loaded once per actor, in ``__init__``) and writes Parquet
to a staging folder; Spark then commits it into ``embeddings`` with one Delta MERGE that inserts
what is new (never a duplicate) and drops embeddings of documents no longer in ``docs``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import contracts
from clustermix import lake as lk
from clustermix.config import EmbedConfig
from clustermix.models import model_id, resolve_model

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import SparkSession

    from clustermix.lake import Lake, TableWriter

log = logging.getLogger(__name__)


def pick_device(requested: str) -> str:
    """``auto`` means CUDA when torch sees a GPU, else CPU."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    """Ray Data callable class: ``__init__`` loads the model once; ``__call__`` embeds one batch."""

    def __init__(self, model_path: str, model_name: str, cfg: dict[str, Any]) -> None:
        import os

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
        self.batch_size = int(cfg.get("batch_size", 64))
        self.chunk = cfg.get("long_docs") == "chunk"
        self.model_name = model_name

    def encode(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 embeddings, computed in length order so batches pad little."""
        if self.chunk:
            return self._encode_chunked(texts)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        emb = self.model.encode(
            [texts[i] for i in order], batch_size=self.batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False)
        out = np.empty_like(emb, dtype=np.float32)
        out[order] = emb
        return out

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
        self.chunk = False
        try:
            emb = self.encode(pieces)
        finally:
            self.chunk = True
        sums = np.zeros((len(texts), emb.shape[1]), dtype=np.float64)
        np.add.at(sums, np.asarray(owner), emb)
        sums /= np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        return sums.astype(np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        texts = batch.column("text").to_pylist()
        emb = self.encode(texts)
        flat = pa.array(emb.reshape(-1), type=pa.float32())
        offsets = pa.array(np.arange(0, emb.size + 1, emb.shape[1], dtype=np.int32))
        return pa.table({
            "id": batch.column("id"),
            "embedding": pa.ListArray.from_arrays(offsets, flat),
            "model": pa.array([self.model_name] * len(texts), type=pa.string()),
        })


def _embed_files(files: list[str], out_dir: str, ecfg: EmbedConfig) -> None:
    """Run the Ray Data pipeline: read (id, text) files, embed with the actor pool, write Parquet."""
    import ray

    ds = ray.data.read_parquet(files, columns=["id", "text"])
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"model_path": resolve_model(ecfg.model), "model_name": model_id(ecfg.model),
                               "cfg": ecfg.model_dump()},
        batch_size=ecfg.batch_size * 4,
        batch_format="pyarrow",
        concurrency=ecfg.num_actors,
        num_cpus=ecfg.cpus_per_actor,
        num_gpus=ecfg.gpus_per_actor or None,
        max_task_retries=3,
    )
    ds.write_parquet(out_dir)


def run_embed(spark: SparkSession, lake: Lake, ecfg: EmbedConfig, docs_version: int, run_id: str,
              write: TableWriter) -> dict[str, Any]:
    """Embed every document of ``docs@docs_version`` that has no embedding for this model yet."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    name = model_id(ecfg.model)
    docs = lk.read(spark, lake, "docs", docs_version).select("id", "text")
    emb_uri = lake.table("embeddings")
    exists = lk.version(emb_uri) is not None
    staging_in = None
    if exists:
        have = lk.read(spark, lake, "embeddings").where(F.col("model") == name).select("id")
        todo = docs.join(have, "id", "left_anti")
        staging_in = lake.staging("embed_todo", run_id)
        todo.write.mode("overwrite").parquet(lk.spark_path(staging_in))
        todo_files = lk.list_parquet(staging_in)
        n_todo = spark.read.parquet(lk.spark_path(staging_in)).count() if todo_files else 0
    else:
        todo_files = lk.file_uris(lake.table("docs"), docs_version)
        n_todo = lk.num_records(lake.table("docs"))
    staging_out = lake.staging("embeddings", run_id)
    t0 = time.time()
    if n_todo:
        log.info("embedding %d documents with %s", n_todo, name)
        _embed_files(todo_files, staging_out, ecfg)
    seconds = time.time() - t0
    if n_todo:
        new = contracts.check(spark.read.parquet(lk.spark_path(staging_out)).dropDuplicates(["id"]), "embeddings")
    else:
        new = spark.createDataFrame([], "id string, embedding array<float>, model string")
    if not exists:
        write("embeddings", new)
    else:
        ids = docs.select("id")
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
            "docs_per_s": round(n_todo / seconds, 1) if seconds > 0 and n_todo else None}


def _sql_str(s: str) -> str:
    return s.replace("'", "''")
