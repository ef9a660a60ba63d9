"""The proxy language model: a tokenizer, a small causal transformer, training for a token budget.

Plain torch and NumPy: nothing here knows Ray, Spark or the lake. :func:`train_and_score` trains a
fresh model on one mixture's token stream for exactly ``spec.tokens`` tokens (one pass over
shuffled windows) and returns its mean cross-entropy on the target windows (nats per token; lower
is better). The same code trains a bigger proxy on a GPU: only :class:`ProxySpec` changes.

Tokenizers are written here (no hub downloads): ``bytes`` (UTF-8 bytes, 256 ids + a separator) and
``words`` (lowercased ASCII words and single punctuation marks, hashed with CRC-32 into
``vocab_size - 1`` buckets + a separator). :data:`WORD_PATTERN` is also what Spark counts to size
the per-cluster samples, so the estimate and the tokenizer agree on ASCII text.

torch is imported inside the functions that need it, so importing this module is cheap.
"""

from __future__ import annotations

import math
import re
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

SEP = 0  # separator id, appended after every document
WORD_PATTERN = r"[a-z0-9]+|[^a-z0-9\s]"
_WORD_RE = re.compile(WORD_PATTERN, re.ASCII)


@dataclass(frozen=True)
class ProxySpec:
    """Everything that shapes one proxy training (the search's config, flattened for a task)."""

    tokenizer: Literal["bytes", "words"] = "words"
    vocab_size: int = 2048  # hashed-word buckets; the byte tokenizer always has 257
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    context: int = 64
    batch_size: int = 16
    tokens: int = 40_000  # training budget in proxy tokens
    lr: float = 3e-3
    target_max_tokens: int = 50_000
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = 1
    init_seed: int = 0  # the model's initialisation, shared by every proxy of a search

    @property
    def vocab(self) -> int:
        return 257 if self.tokenizer == "bytes" else self.vocab_size


def encode(text: str, spec: ProxySpec) -> np.ndarray:
    """Token ids of one document (without the separator)."""
    if spec.tokenizer == "bytes":
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + 1
    words = _WORD_RE.findall(text.lower())
    buckets = spec.vocab_size - 1
    return np.fromiter((zlib.crc32(w.encode()) % buckets + 1 for w in words), dtype=np.int64, count=len(words))


def stream(docs: list[str], spec: ProxySpec, limit: int, cycle: bool = False) -> tuple[np.ndarray, float]:
    """Documents in order, each followed by :data:`SEP`, cut at ``limit`` tokens.

    With ``cycle`` the documents are repeated until ``limit`` is reached (the search's caps keep
    that within the repetition bound). Returns the tokens and how many passes over ``docs`` they
    took (1.0 = each document at most once).
    """
    if limit <= 0 or not docs:
        return np.empty(0, dtype=np.int64), 0.0
    parts, total, passes = [], 0, 0
    encoded = [np.append(encode(t, spec), SEP) for t in docs]
    one_pass = sum(len(e) for e in encoded)
    while total < limit:
        for e in encoded:
            parts.append(e)
            total += len(e)
            if total >= limit:
                break
        passes += 1
        if not cycle or one_pass == 0:
            break
    out = np.concatenate(parts)[:limit]
    return out, (len(out) / one_pass if one_pass else 0.0)


def windows(tokens: np.ndarray, context: int) -> np.ndarray:
    """Non-overlapping windows of ``context + 1`` tokens (input and shifted target); a short
    stream gives one shorter window, an empty one none."""
    n = (len(tokens) - 1) // context
    if n <= 0:
        return tokens[None, :] if len(tokens) > 1 else np.empty((0, context + 1), dtype=np.int64)
    idx = np.arange(n)[:, None] * context + np.arange(context + 1)[None, :]
    return tokens[idx]


def _device(spec: ProxySpec) -> str:
    import torch

    if spec.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec.device


def build_model(spec: ProxySpec) -> torch.nn.ModuleDict:
    """A pre-LayerNorm causal transformer with tied input/output embeddings, as a ModuleDict
    (see :func:`logits`)."""
    from torch import nn

    d = spec.d_model
    blocks = nn.ModuleList(
        nn.ModuleDict({
            "ln1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d),
            "ln2": nn.LayerNorm(d), "mlp": nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)),
        })
        for _ in range(spec.n_layers)
    )
    model = nn.ModuleDict({"tok": nn.Embedding(spec.vocab, d), "pos": nn.Embedding(spec.context, d),
                           "blocks": blocks, "ln_f": nn.LayerNorm(d)})
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, std=0.02 if "proj" not in name else 0.02 / math.sqrt(2 * spec.n_layers))
        elif name.endswith("bias"):
            nn.init.zeros_(p)
    return model


def logits(model: torch.nn.ModuleDict, idx: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Next-token logits for a batch of token ids ``(B, T)``."""
    import torch
    import torch.nn.functional as F

    b, t = idx.shape
    x = model["tok"](idx) + model["pos"](torch.arange(t, device=idx.device))[None]
    for blk in model["blocks"]:  # type: ignore[attr-defined]
        q, k, v = blk["qkv"](blk["ln1"](x)).view(b, t, 3, n_heads, -1).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + blk["proj"](att.transpose(1, 2).reshape(b, t, -1))
        x = x + blk["mlp"](blk["ln2"](x))
    return model["ln_f"](x) @ model["tok"].weight.T


def _loss(model: torch.nn.ModuleDict, batch: torch.Tensor, n_heads: int) -> torch.Tensor:
    import torch.nn.functional as F

    out = logits(model, batch[:, :-1], n_heads)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), batch[:, 1:].reshape(-1))


def evaluate(model: torch.nn.ModuleDict, target: np.ndarray, spec: ProxySpec) -> float:
    """Mean cross-entropy (nats per token) over every predicted token of the target windows."""
    import torch

    dev = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(target), 64):
            batch = torch.as_tensor(target[i : i + 64], device=dev)
            n = batch[:, 1:].numel()
            total += float(_loss(model, batch, spec.n_heads)) * n
            count += n
    model.train()
    return total / max(count, 1)


def train_and_score(train_tokens: np.ndarray, target_tokens: np.ndarray, spec: ProxySpec,
                    seed: int) -> dict[str, Any]:
    """Train a fresh proxy on ``train_tokens`` (shuffled windows, ``seed``) for one pass, score it.

    The model's initialisation comes from ``spec.init_seed`` (the same for every proxy of a search,
    so scores differ by their data, not their luck); ``seed`` orders the training windows.
    Deterministic on CPU for a given thread count.
    """
    t0 = time.time()
    target = windows(target_tokens[: spec.target_max_tokens], spec.context)
    if len(target) == 0:
        raise ValueError("nothing to score (0 target windows)")
    model, res = fit(train_tokens, spec, seed)
    score = evaluate(model, target, spec)
    return {"score": score, **res, "target_tokens": int(target[:, 1:].size), "seconds": round(time.time() - t0, 3)}


def fit(train_tokens: np.ndarray, spec: ProxySpec, seed: int) -> tuple[torch.nn.ModuleDict, dict[str, Any]]:
    """A fresh proxy trained for one pass over ``train_tokens``' windows in a ``seed``-shuffled order
    (initialised from ``spec.init_seed``); with its last loss, steps, tokens, device and size."""
    import torch

    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    dev = _device(spec)
    train = windows(train_tokens, spec.context)
    if len(train) == 0:
        raise ValueError("nothing to train on (0 training windows)")
    rng = np.random.default_rng(seed)
    train = train[rng.permutation(len(train))]
    torch.manual_seed(spec.init_seed)
    model = build_model(spec).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.95))
    steps = math.ceil(len(train) / spec.batch_size)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    last = torch.tensor(float("nan"))
    for s in range(steps):
        batch = torch.as_tensor(train[s * spec.batch_size : (s + 1) * spec.batch_size], device=dev)
        loss = _loss(model, batch, spec.n_heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        last = loss.detach()
    return model, {"train_loss": float(last), "steps": steps, "tokens": int(train[:, 1:].size), "device": dev,
                   "params": sum(p.numel() for p in model.parameters())}


def doc_nats(model: torch.nn.ModuleDict, docs: list[np.ndarray], spec: ProxySpec) -> np.ndarray:
    """Summed cross-entropy (nats) of each document's tokens, each predicted from :data:`SEP` and the
    document's own earlier tokens (contexts of at most ``spec.context``, chunked without overlap)."""
    import torch
    import torch.nn.functional as F

    xs, ys, owner = [], [], []
    for i, toks in enumerate(docs):
        seq = np.concatenate([[SEP], toks]).astype(np.int64)
        for start in range(0, len(seq) - 1, spec.context):
            x, y = seq[start : start + spec.context], seq[start + 1 : start + spec.context + 1]
            xs.append(np.pad(x[: len(y)], (0, spec.context - len(y))))
            ys.append(np.pad(y, (0, spec.context - len(y)), constant_values=-100))
            owner.append(i)
    out = np.zeros(len(docs), dtype=np.float64)
    if not xs:
        return out
    dev = next(model.parameters()).device
    sums = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(xs), 64):
            xb = torch.as_tensor(np.stack(xs[i : i + 64]), device=dev)
            yb = torch.as_tensor(np.stack(ys[i : i + 64]), device=dev)
            out_logits = logits(model, xb, spec.n_heads)
            nll = F.cross_entropy(out_logits.reshape(-1, out_logits.shape[-1]), yb.reshape(-1), ignore_index=-100,
                                  reduction="none").reshape(yb.shape)
            sums.append(nll.sum(dim=1).double().cpu().numpy())
    model.train()
    np.add.at(out, np.array(owner), np.concatenate(sums))
    return out
