"""Embedding: exactly what bare sentence-transformers gives, only for what is missing, one row per doc."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clustermix import deltalog, tableio
from clustermix.pipeline import run_stages

from .conftest import make_config


def _bare_model():
    from sentence_transformers import SentenceTransformer

    from clustermix.models import resolve_model

    return SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")


@pytest.fixture(scope="module")
def texts(bbc_slice):
    return [json.loads(line) for line in bbc_slice.read_text().splitlines()]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_embeddings_match_bare_sentence_transformers_and_only_missing_ones_are_embedded(
        tmp_path, spark, ray_local, texts):
    src = tmp_path / "in.jsonl"
    _write(src, texts[:12])
    # 2 texts per forward pass: the actors' output comes in blocks of 8 rows (4 passes per call)
    cfg = make_config(tmp_path / "lake", str(src), embed={"batch_size": 2})
    run = run_stages(cfg, ("ingest", "embed"), spark=spark)
    first = run.manifest["stages"]["embed"]["counts"]
    assert first["embedded"] == 12 and first["docs_per_s"] > 0
    # gathered into one file (embed.rows_per_file), not one small file per block
    assert len(deltalog.file_uris(run.lake.table("embeddings"))) == 1
    assert set(first["phases_s"]) == {"todo", "ray_data", "commit"}

    emb = {r["id"]: np.array(r["embedding"], dtype=np.float32)
           for r in tableio.read(spark, run.lake, "embeddings").collect()}
    assert len(emb) == 12
    bare = _bare_model().encode([t["text"] for t in texts[:12]], normalize_embeddings=True)
    for rec, ref in zip(texts[:12], bare, strict=False):
        v = emb[rec["id"]]
        assert v.dtype == np.float32 and v.shape == (384,)
        assert abs(np.linalg.norm(v) - 1) < 1e-4
        assert float(v @ ref) >= 0.999

    # a new night: 4 docs gone, 5 new. Only the 5 are embedded; the 4 leave the table.
    _write(src, texts[4:17])
    again = run_stages(cfg, ("ingest", "embed"), spark=spark)
    counts = again.manifest["stages"]["embed"]["counts"]
    assert counts["embedded"] == 5
    ids = [r["id"] for r in tableio.read(spark, run.lake, "embeddings").select("id").collect()]
    assert sorted(ids) == sorted(t["id"] for t in texts[4:17])
    assert deltalog.last_commit_meta(run.lake.table("embeddings"))["run_id"] == again.run_id


def test_long_documents_can_be_chunked_and_mean_pooled(texts):
    from clustermix.embed import Embedder
    from clustermix.models import resolve_model

    cfg = {"device": "cpu", "batch_size": 8, "long_docs": "chunk", "max_seq_length": 32}
    chunked = Embedder(resolve_model("all-MiniLM-L6-v2"), "m", cfg)
    plain = Embedder(resolve_model("all-MiniLM-L6-v2"), "m", {**cfg, "long_docs": "truncate"})
    long_text, short_text = texts[0]["text"], "a short sentence"
    a = chunked.encode([long_text, short_text])
    b = plain.encode([long_text, short_text])
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert float(a[1] @ b[1]) > 0.9999  # fits the window: identical
    assert float(a[0] @ b[0]) < 0.99  # the whole article is not its first 32 tokens


def test_overlapped_tokenisation_gives_what_encode_gives_over_many_sub_batches(texts):
    """Sub-batches of 4 over 13 texts: the tokeniser thread runs ahead of the model 3 times."""
    from clustermix.embed import Embedder
    from clustermix.models import resolve_model

    emb = Embedder(resolve_model("all-MiniLM-L6-v2"), "m", {"device": "cpu", "batch_size": 4})
    batch = [t["text"] for t in texts[:12]] + ["a short sentence"]
    got = emb.encode(batch)
    ref = emb.model.encode(batch, batch_size=4, normalize_embeddings=True)
    assert got.dtype == np.float32 and got.shape == (13, 384)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert float(np.min(np.sum(got * ref, axis=1))) >= 0.999


def test_batch_size_comes_from_the_device_unless_set():
    from clustermix.config import EmbedConfig

    assert EmbedConfig().batch_size_for("cpu") == 32
    assert EmbedConfig().batch_size_for("cuda") == 256
    assert EmbedConfig(batch_size=7).batch_size_for("cuda") == 7
    assert EmbedConfig(gpus_per_actor=1).planned_device() == "cuda"
    assert EmbedConfig(device="cpu", gpus_per_actor=1).planned_device() == "cpu"
