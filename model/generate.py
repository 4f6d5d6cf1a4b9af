"""Sampling text from a GPT: temperature / top-k / top-p, with a KV cache.

With ``use_cache`` the prompt is run through the model once (prefill), filling a
:class:`model.gpt.KVCache`, and each later step feeds only the one new token. Without it every
step re-runs the whole (last ``block_size`` tokens of the) sequence, as nanoGPT does; both give
the same tokens while the sequence fits in ``block_size``.

Past ``block_size`` the cache is full. Rotary keys cannot simply slide (each cached key was
computed with the earlier context still visible), so we re-prefill: the cache is emptied and
refilled from the last ``REFILL_FRACTION * block_size`` tokens, after which single-token steps
resume until it fills again. The model then sees between 3/4 and all of a block of context,
where the uncached path always sees a full block; the two may diverge from that point on.

Also here: :func:`load_model`, the one way commands and the server get a model (a checkpoint, a
run directory or ``models:/NAME/VERSION``); :class:`IncrementalDecoder` and :class:`StopText` for
streaming text; :func:`forward_rows`, a decoding step for several sequences in one pass.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from llmforge.config import Config
from llmforge.errors import CheckpointError
from llmforge.model.checkpoint import checkpoint_tokenizer, find_checkpoint, load_checkpoint
from llmforge.model.gpt import GPT, GPTConfig, KVCache, apply_rotary
from llmforge.model.runtime import resolve_device

REFILL_FRACTION = 0.75  # share of block_size kept when a full KV cache is re-prefilled
DEFAULT_PROMPTS = ["The", "Once upon a time", "It was a dark and stormy night", "In the beginning",
                   "The meaning of life is"]


class SamplingConfig(Config):
    """How the next token is picked; validated, so a bad value is a one-line error, never ignored."""

    temperature: float = Field(0.8, ge=0, description="softmax temperature; 0 = greedy")
    top_k: int | None = Field(None, ge=1, description="sample only among the k most likely tokens")
    top_p: float | None = Field(None, gt=0, le=1, description="sample from the smallest set whose probability reaches p")
    seed: int | None = Field(None, description="make sampling reproducible (the global RNG is not touched)")


class GenerateOptions(Config):
    """``llmforge generate``'s settings tree (``--set sampling.top_k=40``)."""

    sampling: SamplingConfig = Field(default_factory=SamplingConfig)


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token ``[B, 1]`` from last-position logits ``[B, V]``."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             use_cache: bool = True, eos_id: int | None = None,
             stream: Callable[[int], None] | None = None, vocab_limit: int | None = None) -> torch.Tensor:
    """Extend ``idx`` (``[B, T]`` token ids) by up to ``max_new_tokens``; return ``[B, T + n]``.

    ``temperature=0`` is greedy. ``seed`` makes sampling reproducible without touching the
    global RNG. With ``eos_id`` generation stops once every row has produced it (rows that
    finished early are padded with ``eos_id``); the EOS is kept in the result but not streamed.
    ``stream`` (batch size 1 only) is called with each new token id as it is chosen.
    ``vocab_limit`` never samples ids at or above it: a model's vocabulary may be padded past
    its tokenizer's (e.g. to a multiple of 64), and those ids decode to nothing.
    """
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must be a non-empty [B, T] tensor of token ids, got shape {tuple(idx.shape)}")
    if stream is not None and idx.size(0) != 1:
        raise ValueError("stream= needs a batch of one sequence")
    block = model.config.block_size
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device)
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    cache: KVCache | None = model.make_kv_cache(idx.size(0)) if use_cache else None
    try:
        logits = None
        for _ in range(max_new_tokens):
            if cache is None:
                logits, _ = model(idx[:, -block:])
            elif logits is None or cache.pos >= block:  # (re-)prefill
                cache.reset()
                keep = block if logits is None else max(1, int(block * REFILL_FRACTION))
                logits, _ = model(idx[:, -keep:], kv_cache=cache)
            else:
                logits, _ = model(idx[:, -1:], kv_cache=cache)
            last = logits[:, -1, :]
            if vocab_limit is not None and vocab_limit < last.size(-1):
                last = last.clone()
                last[:, vocab_limit:] = float("-inf")
            nxt = sample_next(last, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator)
            if eos_id is not None:
                nxt = nxt.masked_fill(done.unsqueeze(1), eos_id)
                done |= nxt.squeeze(1) == eos_id
            idx = torch.cat([idx, nxt], dim=1)
            if eos_id is not None and bool(done.all()):
                break
            if stream is not None:
                stream(int(nxt[0, 0]))
    finally:
        model.train(was_training)
    return idx


def sample_texts(model: GPT, tok: Any, prompts: Sequence[str], *, max_new_tokens: int,
                 sampling: SamplingConfig, device: torch.device | None = None) -> list[dict[str, str]]:
    """One completion per prompt: the one sampling routine of training, evaluation and the
    pipeline. Each prompt follows an EOS (the start of a document, as in training); prompt ``i``
    is sampled with seed ``sampling.seed + i`` (default seed 1337), so results are reproducible
    and the training RNG stream is untouched. Generation stops at EOS."""
    device = device or next(model.parameters()).device
    seed = 1337 if sampling.seed is None else sampling.seed
    out = []
    for i, prompt in enumerate(prompts):
        ids = [tok.eos_id] + list(tok.encode(prompt))
        idx = torch.tensor([ids[-model.config.block_size:]], dtype=torch.long, device=device)
        res = generate(model, idx, max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                       top_p=sampling.top_p, seed=seed + i, eos_id=tok.eos_id, vocab_limit=tok.vocab_size)
        new = [t for t in res[0, idx.size(1):].tolist() if t != tok.eos_id]
        out.append({"prompt": prompt, "completion": tok.decode(new)})
    return out


def format_samples(samples: Sequence[dict[str, str]]) -> str:
    return "\n\n".join(f"=== {s['prompt']!r}\n{s['prompt']}{s['completion']}" for s in samples) + "\n"


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that are safe to print: text that
    ends in an incomplete UTF-8 sequence (byte-fallback pieces, U+FFFD) is held back until the
    remaining bytes arrive.

    Each step decodes a bounded window, not the whole text (which made streaming quadratic: 16k
    tokens took 57x as long as 2k): the ids not yet printed plus the ones printed at the step
    before, as context, so whatever the tokenizer does at the start of a decode cancels out
    (decode(context + new) minus decode(context)). An incomplete UTF-8 sequence is at most 3
    bytes, so after 3 held tokens a U+FFFD is real (the model produced invalid bytes) and is
    printed rather than held forever."""

    MAX_HELD = 3

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # window start: context decoded again each step, never printed again
        self.read = 0  # ids before this are printed

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        context = self.decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        text = self.decode(self.ids[self.prefix:])
        if not final and text.endswith("\ufffd") and len(self.ids) - self.read <= self.MAX_HELD:
            return ""  # wait for the rest of the character
        if text.startswith(context):
            delta = text[len(context):]
        else:  # never with our lossless tokenizer; print what follows the common prefix
            common = 0
            while common < min(len(text), len(context)) and text[common] == context[common]:
                common += 1
            delta = text[common:]
        self.prefix, self.read = self.read, len(self.ids)
        return delta


class StopText:
    """The text of a reply as it streams, cut at the first stop string: :meth:`push` returns what
    is safe to send (text that could still turn out to begin a stop string is held back) and
    whether a stop string has appeared; the stop string itself is never sent."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self.decoder = IncrementalDecoder(decode)
        self.stops = [s for s in stops if s]
        self.text = ""  # everything decoded so far
        self.sent = 0  # how much of it went out
        self.stopped = False

    def push(self, token: int) -> str:
        return self._advance(self.decoder.push(token), final=False)

    def flush(self) -> str:
        return self._advance(self.decoder.flush(), final=True)

    def _advance(self, delta: str, final: bool) -> str:
        if self.stopped:
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        elif final:
            end = len(self.text)
        else:  # hold back the longest tail that is the beginning of a stop string
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = len(self.text) - hold
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out


def _clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the prefixes torch.compile (``_orig_mod.``) and DDP (``module.``) add to keys."""
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def model_config_from_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike = "checkpoint") -> GPTConfig:
    cfg = ckpt.get("config") or {}
    model_cfg = cfg.get("model", cfg)
    if not isinstance(model_cfg, dict) or "vocab_size" not in model_cfg:
        raise CheckpointError(f"{path}: checkpoint has no model config (config['model'] with vocab_size)")
    return GPTConfig.load(model_cfg, source=f"{path} config['model']")


def load_for_inference(checkpoint_path: str | os.PathLike, device: str | torch.device = "auto"):
    """Model (eval mode, on ``device``), its tokenizer and metadata, from one file (or a run
    directory's best checkpoint).

    Returns ``(model, Tokenizer, meta)`` where ``meta`` holds ``path, step, val_loss, config,
    lineage, sha256``.
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    path = find_checkpoint(checkpoint_path)
    ckpt = load_checkpoint(path, map_location="cpu")
    config = model_config_from_checkpoint(ckpt, path)
    model = GPT(config)
    try:
        model.load_state_dict(_clean_state_dict(ckpt["model_state"]))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: model weights do not match its own config: {e}") from e
    model.to(dev).eval()
    tok = checkpoint_tokenizer(ckpt, path)
    if tok.vocab_size > config.vocab_size:
        raise CheckpointError(f"{path}: embedded tokenizer has {tok.vocab_size} pieces but the model "
                              f"only {config.vocab_size}")
    meta = {"path": str(path), "step": ckpt.get("step"), "val_loss": ckpt.get("val_loss"),
            "config": ckpt.get("config"), "lineage": ckpt.get("lineage"), "extra": ckpt.get("extra") or {}}
    return model, tok, meta


# ---------------------------------------------------------------------------------------------
# the one loader of commands and the server


MODEL_URI_PREFIXES = ("models:/", "runs:/")


def is_model_uri(source: str | os.PathLike) -> bool:
    return str(source).startswith(MODEL_URI_PREFIXES)


def model_name(source: str | os.PathLike) -> str:
    """What a model is called in an API (``/v1/models``): a registered model's name, else the
    run directory of a checkpoint named like ours (``runs/finetune-lora-XXXX/model.pt`` ->
    ``finetune-lora-XXXX``), else the file's stem."""
    s = str(source)
    if s.startswith("models:/"):
        return s[len("models:/"):].split("/")[0].split("@")[0]
    if s.startswith("runs:/"):
        return s[len("runs:/"):].split("/")[0]
    p = Path(s).resolve()
    if p.is_dir():
        return p.name
    generic = p.name in ("best.pt", "model.pt") or p.name.startswith("ckpt-")
    return p.parent.name if generic else p.stem


def load_model(source: str | os.PathLike, device: str | torch.device = "auto"):
    """The model behind ``source``, the one way ``generate``, ``chat`` and ``serve`` load one:

    - ``models:/NAME/VERSION`` (or ``models:/NAME@alias``, ``runs:/RUN_ID/model``): a model in the
      MLflow registry, downloaded through :mod:`llmforge.tracking` (cached), then loaded as a file;
    - a Hugging Face export directory (``llmforge export --format hf``, any directory with a
      ``config.json``): :func:`llmforge.model.export.load_hf_export`;
    - a checkpoint file or a run directory: :func:`load_for_inference`.

    Returns ``(model, tokenizer, meta)``; ``meta`` adds ``name``, ``source`` and
    ``chat_template`` (``None`` for a model that only continues text) to :func:`load_for_inference`'s.
    """
    from llmforge.model.export import is_hf_export, load_hf_export

    if is_model_uri(source):
        from llmforge import tracking

        model, tok, meta = load_for_inference(tracking.download_model(str(source)), device)
    elif is_hf_export(source):
        model, tok, meta = load_hf_export(source, device)
    else:
        model, tok, meta = load_for_inference(find_checkpoint(source), device)  # kind checked before unpickling
    meta.update(name=model_name(source), source=str(source), chat_template=meta["extra"].get("chat_template"))
    return model, tok, meta


# ---------------------------------------------------------------------------------------------
# several sequences per forward pass (the server's batched decoding)


def _rows_linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for ``x`` of ``[P, 1, in]`` as P separate one-row products (a batched matmul
    over a broadcast weight). A ``[P, in]`` matmul would round each row differently depending on
    P (matmul kernels block rows by the row count); one row at a time is exactly what
    ``GPT.forward`` computes for a single sequence."""
    wt = layer.weight.t().unsqueeze(0).expand(x.size(0), -1, -1)
    if layer.bias is None:
        return torch.bmm(x, wt)
    return torch.baddbmm(layer.bias.expand(x.size(0), 1, -1), x, wt)


@torch.no_grad()
def forward_rows(model: GPT, tokens: Sequence[int], caches: Sequence[KVCache]) -> torch.Tensor:
    """One decoding step for several sequences in one pass: sequence ``i`` feeds ``tokens[i]``
    into its own one-sequence cache ``caches[i]`` (each at its own position); returns the
    next-token logits ``[P, V]``.

    Row ``i`` is bit for bit what ``GPT.forward(tokens[i], kv_cache=caches[i])`` returns (its
    one-new-token path, step for step: GQA, QK-norm, SwiGLU included): the projections run as
    one-row products batched together, attention runs per sequence over exactly its cached keys.
    So a request's text never depends on which or how many other requests share the step, and
    equals ``generate()``'s. What is shared is the per-operation overhead, which is most of a
    small model's step on a CPU. (tests/test_serve.py holds it to GPT.forward, bit for bit.)"""
    cfg = model.config
    P, C, D = len(tokens), cfg.n_embd, cfg.head_dim
    device = model.lm_head.weight.device
    pos = torch.tensor([c.pos for c in caches], dtype=torch.long, device=device)
    if int(pos.max()) >= cfg.block_size:
        raise ValueError(f"a sequence reached block_size {cfg.block_size}; re-prefill it first")
    cos = model.rope_cos[pos][:, None, None, :]  # [P, 1, 1, D/2]: each row its own angle
    sin = model.rope_sin[pos][:, None, None, :]
    idx = torch.tensor(list(tokens), device=device)[:, None]
    if cfg.ngram_buckets:  # each row's n-grams end in its own cache's tokens
        x = torch.cat([model.embed(idx[i:i + 1], cache) for i, cache in enumerate(caches)])
    else:
        x = model.embed(idx)
    for layer, (block, ve) in enumerate(zip(model.transformer.h, model.value_embeddings(idx))):
        attn = block.attn
        H, Hkv = attn.n_head, attn.n_kv_head
        q, k, v = _rows_linear(attn.c_attn, block.ln_1(x)).split([C, Hkv * D, Hkv * D], dim=2)
        if ve is not None:
            v = v + ve
        q = q.view(P, 1, H, D).transpose(1, 2)  # [P, H, 1, D]
        k = k.view(P, 1, Hkv, D).transpose(1, 2)
        v = v.view(P, 1, Hkv, D).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        ys = []
        for i, cache in enumerate(caches):  # as CausalSelfAttention's one-new-token branch
            keys, values = cache.update(layer, k[i:i + 1], v[i:i + 1])
            ys.append(attn._sdpa(q[i:i + 1], keys.to(q.dtype), values.to(q.dtype)))
        y = torch.cat(ys).transpose(1, 2).contiguous().view(P, 1, C)
        x = x + attn.resid_dropout(_rows_linear(attn.c_proj, y))
        mlp, h = block.mlp, block.ln_2(x)
        if hasattr(mlp, "c_gate"):  # SwiGLU
            h = F.silu(_rows_linear(mlp.c_gate, h)) * _rows_linear(mlp.c_fc, h)
        else:
            h = F.gelu(_rows_linear(mlp.c_fc, h))
        x = x + mlp.dropout(_rows_linear(mlp.c_proj, h))
    for i, cache in enumerate(caches):
        cache.advance(idx[i:i + 1])
    return _rows_linear(model.lm_head, model.transformer.ln_f(x))[:, 0]
