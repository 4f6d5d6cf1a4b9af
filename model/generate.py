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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from pydantic import Field

from llmforge.config import Config
from llmforge.errors import CheckpointError
from llmforge.model.checkpoint import checkpoint_tokenizer, find_checkpoint, load_checkpoint
from llmforge.model.gpt import GPT, GPTConfig, KVCache
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
