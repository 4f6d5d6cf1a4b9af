"""An n-gram teacher: soft next-token targets counted from the training split.

On a budget of minutes a model sees a few million tokens, while the corpus usually holds far more.
Counting n-grams over tens of millions of tokens takes seconds, and the resulting smoothed model
knows the corpus' word statistics better than the network will for a long while (on the
benchmark's split by author, a trigram counted over the 59M training tokens in ~10 s scores
1.69 held-out bits per byte; ten minutes of training on two cores reach 1.97). With a teacher the
training loss becomes a mix of the usual cross-entropy against the next token and a cross-entropy
against the teacher's whole distribution, whose weight w moves linearly from ``train.teacher_weight``
to ``train.teacher_final`` (by default 0) over the budget:

    loss = (1 - w) * CE(model, next token) + w * CE(model, teacher(context))

so by default the model learns from the teacher early and from the data alone at the end
(``model/loss.py`` computes that loss with the head, a chunk of sequences at a time). The model
stays a plain GPT (the teacher is not part of it: it exports, chats and serves like any other).

The teacher is interpolated absolute discounting with a Kneser-Ney continuation unigram at the
bottom: ``P_n(w | ctx) = max(c(ctx w) - D_n, 0) / c(ctx) + D_n * types(ctx) / c(ctx) * P_{n-1}(w | ctx')``
with Ney's discount ``D_n = n1 / (n1 + 2 n2)`` (n1, n2: the n-grams seen once and twice). The
counts are exact and a pure function of the first ``max_tokens`` tokens of the split, so every
rank and every restart builds the same teacher.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from llmforge.errors import ConfigError
from llmforge.pipeline.shards import Dataset

__all__ = ["NgramTeacher"]

DENSE_LIMIT = 1 << 26  # a bigram level with vocab_size**2 entries up to this is kept as one dense table


@dataclass
class _Level:
    """The counts of one order n >= 2: contexts (the n-1 previous tokens, base-V) sorted, and
    for each its run of continuations (next token, count) in the flat arrays."""

    ctx: torch.Tensor  # (C,) int64, sorted
    start: torch.Tensor  # (C,) int64: first entry of each context
    types: torch.Tensor  # (C,) int64: distinct continuations
    total: torch.Tensor  # (C,) float32: count of the context
    nxt: torch.Tensor  # (E,) int64
    count: torch.Tensor  # (E,) float32
    discount: float

    def to(self, device: torch.device) -> "_Level":
        return _Level(*(t.to(device) for t in (self.ctx, self.start, self.types, self.total, self.nxt, self.count)),
                      self.discount)


def _count(tokens: np.ndarray, n: int, vocab: int) -> _Level:
    key = tokens[n - 1:].astype(np.int64)
    for k in range(1, n):  # key = ((t0 * V + t1) * V + ...) * V + next
        key = key + tokens[n - 1 - k: len(tokens) - k].astype(np.int64) * vocab ** k
    grams, counts = np.unique(key, return_counts=True)
    ctx, start, types = np.unique(grams // vocab, return_index=True, return_counts=True)
    total = np.add.reduceat(counts, start)
    n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
    discount = n1 / (n1 + 2 * n2) if n1 + n2 else 0.75
    return _Level(torch.from_numpy(ctx), torch.from_numpy(start), torch.from_numpy(types),
                  torch.from_numpy(total.astype(np.float32)), torch.from_numpy(grams % vocab),
                  torch.from_numpy(counts.astype(np.float32)), min(max(discount, 0.05), 0.95))


def _apply(probs: torch.Tensor, level: _Level, ctx: torch.Tensor, slot: torch.Tensor | None = None) -> None:
    """Raise ``probs`` (N, V), the lower order's distributions, to this order for the contexts
    ``ctx`` (N,), in place: a seen context scales its row by its back-off weight and adds its
    discounted counts; an unseen one (or -1: no context) leaves the row as it is. With ``slot``
    (V,: each token's column in ``probs``), a subset of the vocabulary's columns (and a last one
    that the tokens outside it are added to)."""
    j = torch.searchsorted(level.ctx, ctx).clamp_(max=len(level.ctx) - 1)
    seen = level.ctx[j] == ctx
    total, types = level.total[j], torch.where(seen, level.types[j], 0)
    probs.mul_(torch.where(seen, level.discount * types / total, 1.0).unsqueeze(1))
    # every continuation of every seen context: entries start[j] + 0 .. types[j] - 1
    owner = torch.repeat_interleave(types)
    first = torch.cumsum(types, 0) - types
    entry = level.start[j][owner] + torch.arange(len(owner), device=ctx.device) - first[owner]
    add = (level.count[entry] - level.discount).clamp_(min=0) / total[owner]
    col = level.nxt[entry] if slot is None else slot[level.nxt[entry]]
    probs.view(-1).index_add_(0, owner * probs.size(1) + col, add)


class NgramTeacher:
    """An interpolated n-gram model of order 2..4 over a ``vocab_size`` vocabulary."""

    def __init__(self, vocab_size: int, unigram: torch.Tensor, levels: list[_Level], tokens: int, seconds: float,
                 dense_limit: int = DENSE_LIMIT):
        self.vocab_size, self.unigram, self.levels = vocab_size, unigram, levels
        self.order = len(levels) + 1
        self.tokens, self.seconds = tokens, seconds
        self.dense: torch.Tensor | None = None  # the bigram distributions of every token, when small
        if vocab_size * vocab_size <= dense_limit:
            self.dense = self._bigram(torch.arange(vocab_size))

    @classmethod
    def count(cls, dataset: Dataset, split: str, order: int, max_tokens: int) -> "NgramTeacher":
        """Count the first ``max_tokens`` tokens of ``split`` (shard by shard, in order)."""
        t0 = time.perf_counter()
        tokens = dataset.first_tokens(split, max_tokens)
        if len(tokens) <= order:
            raise ConfigError(f"{dataset.root}: split {split!r} has {len(tokens)} tokens, "
                              f"too few to count {order}-grams")
        teacher = cls.from_tokens(tokens, dataset.vocab_size, order)
        teacher.seconds = time.perf_counter() - t0
        return teacher

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, vocab_size: int, order: int,
                    dense_limit: int = DENSE_LIMIT) -> "NgramTeacher":
        if not 2 <= order <= 4:
            raise ConfigError(f"train.teacher_order={order}: an n-gram teacher has order 2, 3 or 4 (0 = off)")
        t0 = time.perf_counter()
        levels = [_count(tokens, n, vocab_size) for n in range(2, order + 1)]
        # Kneser-Ney's unigram: how many distinct tokens precede each token (+0.5 for the unseen)
        before = torch.bincount(levels[0].nxt, minlength=vocab_size).float() + 0.5
        return cls(vocab_size, before / before.sum(), levels, len(tokens), time.perf_counter() - t0, dense_limit)

    def to(self, device: torch.device) -> "NgramTeacher":
        self.unigram = self.unigram.to(device)
        self.levels = [lv.to(device) for lv in self.levels]
        if self.dense is not None:
            self.dense = self.dense.to(device)
        return self

    def _bigram(self, last: torch.Tensor) -> torch.Tensor:
        """The bigram level's distributions after the tokens ``last`` (N,): (N, V)."""
        probs = self.unigram.expand(len(last), -1).clone()
        _apply(probs, self.levels[0], last)
        return probs

    @torch.no_grad()
    def probs(self, idx: torch.Tensor, ids: torch.Tensor | None = None,
              slot: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's next-token distribution at every position of ``idx`` (B, T): (B, T, V).
        A position sees the tokens of its own window only (the first sees one token). With ``ids``
        (C,) and ``slot`` (V,: each id's column, C for the other tokens), only those columns:
        (B, T, C)."""
        B, T = idx.shape
        flat = idx.reshape(-1)
        if ids is None:
            probs = self.dense[flat] if self.dense is not None else self._bigram(flat)
        else:  # C columns and a last one that takes the other tokens' mass
            probs = torch.zeros(len(flat), len(ids) + 1, device=idx.device)
            if self.dense is not None:
                probs[:, :-1] = self.dense.index_select(0, flat).index_select(1, ids)
            else:
                probs[:, :-1] = self.unigram[ids]
                _apply(probs, self.levels[0], flat, slot)
        pos = torch.arange(B * T, device=idx.device)
        for n, level in enumerate(self.levels[1:], start=3):  # contexts of the n - 1 last tokens
            ctx = torch.zeros_like(flat)
            for k in range(n - 1):
                ctx = ctx * self.vocab_size + flat[(pos - (n - 2) + k).clamp(min=0)]
            _apply(probs, level, torch.where(pos % T >= n - 2, ctx, -1), slot)  # -1: fewer tokens in the window
        return (probs if ids is None else probs[:, :-1]).view(B, T, -1)
