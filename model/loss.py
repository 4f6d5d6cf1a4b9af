"""The training loss with the LM head inside it: logits, softmax and gradient chunk by chunk.

A training step's logits are (positions, vocab): 1,024 x 8,192 floats (32 MB) for the CPU recipe,
16 x 1,024 x 50,257 (3.3 GB in fp32) for GPT-2 on a GPU. Computed whole, they are written by the
head's matmul, read by the log-softmax, written again as the gradient and read twice more by the
head's backward; on a CPU those passes over memory cost as much as the head's matmuls. Here the
head runs on a chunk of whole sequences at a time (256 positions on a CPU: 8 MB, in cache), and the
chunk's gradient is formed while its logits are at hand, in the forward pass:

    d loss / d logits = softmax * (1 + 2 z_loss * lse) - share * teacher - (1 - share) * one-hot(target)

for the mean cross-entropy against ``share * teacher + (1 - share) * one-hot`` (an n-gram
teacher's distribution, ``model/teacher.py``; share 0 is the plain cross-entropy) plus PaLM's
z-loss (with a :class:`Sampler`, over a sample of the vocabulary's columns only). The backward
only scales the saved gradients of the hidden states and the head. On the CPU recipe's step (two
cores) this takes the step from 137 to 106 ms with the teacher, and from 152 to 111 ms without
it (``bench/train_throughput.py`` measures the step).

:func:`token_nll` is the forward-only twin the held-out scorer uses: each chunk's logits give its
log-sum-exp and its targets' logits, and are dropped.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from llmforge.model.data import IGNORE_INDEX

__all__ = ["Sample", "Sampler", "head_loss", "token_nll"]


def _default_rows(device: torch.device) -> int:
    """Positions per chunk: 256 on a CPU (one chunk's logits, 8 MB for an 8k vocabulary, stay in
    cache: measured fastest), 4,096 elsewhere."""
    return 256 if device.type == "cpu" else 4096


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, head: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor,
                teacher: Any, share: float, z_coef: float, rows: int,
                sample: "Sample | None") -> tuple[torch.Tensor, torch.Tensor]:
        B, T = targets.shape
        h, y = hidden.reshape(B * T, -1), targets.reshape(-1)
        f32 = dict(dtype=torch.float32, device=h.device)
        full = head
        if sample is not None:  # the softmax over the sampled columns, their logits shifted by -log q
            head, y = head[sample.ids], sample.slot[y.clamp(min=0)].masked_fill(y == IGNORE_INDEX, IGNORE_INDEX)
        grad_h = torch.empty_like(h)
        grad_head = torch.zeros(head.shape, **f32) if full.requires_grad else None
        lse, z_data, z_teacher = (torch.zeros(B * T, **f32) for _ in range(3))
        keep = (y != IGNORE_INDEX).float()
        autocast = torch.is_autocast_enabled(h.device.type)
        per = max(1, rows // T)  # whole sequences per chunk: the teacher reads each sequence's own context
        for b in range(0, B, per):
            s, e = b * T, min(B, b + per) * T
            hc, yc, kc = h[s:e], y[s:e].clamp(min=0), keep[s:e].unsqueeze(1)
            z = (hc @ head.t()).float()  # the chunk's logits (under autocast in its precision, then fp32)
            z_data[s:e] = z.gather(1, yc.unsqueeze(1)).squeeze(1)
            if share:
                if sample is None:
                    tc = teacher.probs(idx[b:b + per]).view(e - s, -1)
                else:  # the sampled columns, renormalised
                    tc = teacher.probs(idx[b:b + per], sample.ids, sample.slot).view(e - s, -1)
                    tc.div_(tc.sum(1, keepdim=True))
                z_teacher[s:e] = torch.linalg.vecdot(tc, z)
            if sample is not None:
                z.sub_(sample.log_q)
            top = z.amax(1, keepdim=True)
            z.sub_(top).exp_()
            total = z.sum(1, keepdim=True)
            lse[s:e] = (top + total.log()).squeeze(1)
            scale = kc / total  # the softmax, zero on rows without a target, times the z-loss' factor
            if z_coef:
                scale = scale * (1.0 + 2.0 * z_coef * lse[s:e].unsqueeze(1))
            z.mul_(scale)
            if share:
                z.addcmul_(tc, kc, value=-share)
            z[torch.arange(e - s, device=z.device), yc] -= (1.0 - share) * kc.squeeze(1)
            grad_h[s:e] = z @ head
            if grad_head is None:
                continue
            if autocast:  # an in-place addmm_ would not autocast
                grad_head += z.t() @ hc
            else:
                grad_head.addmm_(z.t(), hc.float())
        if sample is not None and grad_head is not None:  # the sampled rows' gradients into the whole head's
            grad_head = torch.zeros(full.shape, **f32).index_copy_(0, sample.ids, grad_head)
        count = keep.sum()  # 0 when nothing is scored: NaN, as F.cross_entropy gives, and the step is skipped
        ctx.save_for_backward(grad_h, grad_head, count)
        ctx.shape, ctx.head_dtype = hidden.shape, head.dtype
        plain = ((lse - z_data) * keep).sum() / count
        ctx.mark_non_differentiable(plain)
        objective = ((lse - share * z_teacher - (1.0 - share) * z_data) * keep).sum()
        if z_coef:
            objective = objective + z_coef * (lse.square() * keep).sum()
        return objective / count, plain

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _: torch.Tensor) -> tuple[Any, ...]:
        grad_h, grad_head, count = ctx.saved_tensors
        scale = grad / count
        return ((grad_h * scale.to(grad_h.dtype)).view(ctx.shape),
                None if grad_head is None else (grad_head * scale).to(ctx.head_dtype),
                None, None, None, None, None, None, None)


def head_loss(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, *, teacher: Any = None,
              idx: torch.Tensor | None = None, share: float = 0.0, z_loss: float = 0.0,
              rows: int | None = None, sample: "Sample | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of ``hidden`` (B, T, D) through the head matrix ``head`` (V, D), chunk by chunk,
    and from them (the training objective: the mean cross-entropy against ``share * teacher +
    (1 - share) * one-hot(targets)`` plus ``z_loss * mean(logsumexp^2)``; the plain mean
    cross-entropy against ``targets``, not differentiable), both over the targets that are not
    ``IGNORE_INDEX``. ``teacher.probs(idx)`` gives the teacher's (B, T, V) distributions for the
    input tokens ``idx``. ``rows``: positions per chunk, rounded to whole sequences (default 256 on
    a CPU, where it measured fastest, 4,096 elsewhere). ``sample`` (a :class:`Sampler`'s): the
    softmax runs over those columns of the head only, their logits lowered by ``log q``, and the
    teacher's distribution is renormalised over them; both values are then estimates."""
    if share and (teacher is None or idx is None):
        raise ValueError("head_loss: a teacher share needs the teacher and the input tokens")
    rows = rows or _default_rows(hidden.device)
    return _HeadLoss.apply(hidden, head, idx, targets, teacher, float(share), float(z_loss), rows, sample)


class Sample(NamedTuple):
    ids: torch.Tensor  # (C,) the sampled vocabulary ids, sorted
    slot: torch.Tensor  # (V,) each id's column among them (C, one past the last, for the others)
    log_q: torch.Tensor  # (C,) log of the chance that the id is in a step's sample, at least log(min_q)


class Sampler:
    """A sampled softmax for the training head (Jean et al. 2015, with the logQ correction of Yi et
    al. 2019): a step's softmax runs over the ``top`` most frequent tokens and every token that is
    a target in the batch, not the whole vocabulary. On the CPU recipe's step (4,096 targets, an
    8,192-token vocabulary) that is ~1,800 columns, and the head's loss with its gradients takes
    ~40 ms in place of 125-180 (without the teacher; with it, ~110-140 in place of 215-250).

    A token outside the ``top`` is among a batch's ``n`` targets with chance ``q = 1 - (1 - f)^n``
    (``f``: its frequency in ``counts``), so in the softmax its logit is lowered by ``log q``,
    floored at ``log(min_q)``: a sampled token then stands for the rare tokens left out, and the
    normaliser estimates the whole vocabulary's. The floor bounds the weight one rare token can
    take. The teacher's distribution is renormalised over the sampled columns, not weighted by
    ``1 / q``: so weighted (q unfloored, up to 160x), 1% of its rows summed to more than 4 and a
    ten-minute run diverged. The estimate is biased towards the rare tokens; a run that ends on
    the whole softmax (``train.sampled_softmax`` below 1) calibrates them in its last part, but on
    the CPU recipe a run sampled throughout scored lower held-out bits per byte (the whole
    softmax's) than one that spent its last 15% on the whole softmax, in both invocations measured
    (docs/recipes.md). The model is a plain GPT either way: only the training step changes."""

    def __init__(self, counts: torch.Tensor, top: int, n: int, min_q: float = 0.1):
        freq = counts.double().clamp(min=0.5) / counts.sum().clamp(min=1)
        log_q = torch.log(-torch.expm1(n * torch.log1p(-freq))).float().clamp(min=math.log(min_q), max=0.0)
        frequent = torch.topk(counts, min(top, len(counts))).indices if top else counts.new_zeros(0, dtype=torch.long)
        log_q[frequent] = 0.0
        self.log_q, self.frequent = log_q, frequent
        self.vocab, self.seconds = len(counts), 0.0

    @classmethod
    def count(cls, dataset: Any, split: str, max_tokens: int, top: int, n: int, min_q: float = 0.1) -> "Sampler":
        """Count the first ``max_tokens`` tokens of ``split`` (shard by shard, in order)."""
        t0 = time.perf_counter()
        tokens = dataset.first_tokens(split, max_tokens)
        counts = np.bincount(tokens, minlength=dataset.vocab_size)[: dataset.vocab_size]
        sampler = cls(torch.from_numpy(counts.astype(np.int64)), top, n, min_q)
        sampler.seconds = time.perf_counter() - t0
        return sampler

    def to(self, device: torch.device) -> "Sampler":
        self.log_q, self.frequent = self.log_q.to(device), self.frequent.to(device)
        return self

    def __call__(self, targets: torch.Tensor) -> Sample:
        seen = torch.zeros(self.vocab, dtype=torch.bool, device=targets.device)
        seen[targets[targets != IGNORE_INDEX]] = True
        seen[self.frequent] = True
        ids = seen.nonzero().squeeze(1)
        slot = torch.full((self.vocab,), len(ids), dtype=torch.long, device=targets.device)
        slot[ids] = torch.arange(len(ids), device=targets.device)
        return Sample(ids, slot, self.log_q[ids])


def token_nll(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor, *,
              rows: int | None = None) -> torch.Tensor:
    """The negative log-likelihood (float32, ``(B, T)``, 0 where the target is ``IGNORE_INDEX``) of
    ``targets`` under the logits ``head(hidden)``, computed ``rows`` positions at a time (default
    256 on a CPU, 4,096 elsewhere) so that the whole batch's logits never exist. ``head`` is the
    model's head module, plain or wrapped (LoRA). For scoring, under ``torch.inference_mode``."""
    B, T = targets.shape
    h, y = hidden.reshape(B * T, -1), targets.reshape(-1)
    rows = rows or _default_rows(hidden.device)
    nll = torch.empty(B * T, dtype=torch.float32, device=hidden.device)
    for s in range(0, B * T, rows):
        z = head(h[s:s + rows]).float()
        yc = y[s:s + rows]
        nll[s:s + rows] = torch.logsumexp(z, 1) - z.gather(1, yc.clamp(min=0).unsqueeze(1)).squeeze(1)
    return nll.masked_fill_(y == IGNORE_INDEX, 0.0).view(B, T)
