"""The loss with the head inside it, and the scorer's NLL (model/loss.py), against the same written out with
whole logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmforge.model.data import IGNORE_INDEX
from llmforge.model.gpt import GPT, GPTConfig
from llmforge.model.lora import LoRALinear
from llmforge.model.loss import Sampler, head_loss, token_nll
from llmforge.model.teacher import NgramTeacher
from test_teacher import corpus


@pytest.mark.parametrize("rows", [5, 10, 64])  # a chunk of one sequence, of two, and the whole batch
@pytest.mark.parametrize("share,z_coef,ignored", [(0.3, 0.0, False), (1.0, 1e-2, False), (0.0, 0.0, True),
                                                  (0.5, 1e-2, True)])
def test_the_head_loss_is_the_cross_entropy_against_the_mixed_target_with_its_gradient(rows, share, z_coef,
                                                                                       ignored) -> None:
    torch.manual_seed(0)
    vocab, (B, T, D) = 9, (3, 5, 4)
    teacher = NgramTeacher.from_tokens(corpus(vocab), vocab, 3)
    seq = torch.from_numpy(corpus(vocab, B * T + 1, seed=1).astype(np.int64))
    x, targets = seq[:-1].view(B, T), seq[1:].view(B, T).clone()
    if ignored:  # a prompt's targets, as fine-tuning has them, and one whole sequence without any
        targets[0, :3] = targets[2] = IGNORE_INDEX
    hidden = torch.randn(B, T, D, requires_grad=True)
    head = torch.randn(vocab, D, requires_grad=True)
    objective, plain = head_loss(hidden, head, targets, teacher=teacher, idx=x, share=share, z_loss=z_coef, rows=rows)
    objective.backward()

    # the same written out: the whole batch's logits, the mixed target over the scored rows, autograd
    h_ref, w_ref = hidden.detach().clone().requires_grad_(), head.detach().clone().requires_grad_()
    keep = targets.reshape(-1) != IGNORE_INDEX
    logits = (h_ref @ w_ref.t()).reshape(B * T, vocab)[keep]
    mixed = share * teacher.probs(x).reshape(B * T, vocab)[keep] \
        + (1 - share) * torch.nn.functional.one_hot(targets.reshape(-1)[keep], vocab).float()
    want = torch.nn.functional.cross_entropy(logits, mixed) + z_coef * logits.logsumexp(1).square().mean()
    want.backward()
    torch.testing.assert_close(objective, want)
    torch.testing.assert_close(hidden.grad, h_ref.grad)
    torch.testing.assert_close(head.grad, w_ref.grad)
    torch.testing.assert_close(plain, torch.nn.functional.cross_entropy(logits.detach(), targets.reshape(-1)[keep]))
    assert not plain.requires_grad


@pytest.mark.parametrize("rows", [5, 15])
@pytest.mark.parametrize("share", [0.0, 0.4])
@pytest.mark.parametrize("dense", [True, False])  # the teacher's bigram as one table, or counted per row
def test_the_sampled_softmax_is_the_cross_entropy_over_the_sampled_columns_less_log_q(rows, share, dense) -> None:
    torch.manual_seed(0)
    vocab, (B, T, D) = 40, (3, 5, 4)
    tokens = corpus(vocab, 5000)
    teacher = NgramTeacher.from_tokens(tokens, vocab, 3, dense_limit=10**9 if dense else 0)
    seq = torch.from_numpy(corpus(vocab, B * T + 1, seed=1).astype(np.int64))
    x, targets = seq[:-1].view(B, T), seq[1:].view(B, T).clone()
    targets[0, :2] = IGNORE_INDEX
    counts = torch.from_numpy(np.bincount(tokens, minlength=vocab))
    sample = Sampler(counts, 3, B * T, min_q=0.3)(targets)
    keep = targets.reshape(-1) != IGNORE_INDEX
    ids = sample.ids
    # the batch's targets and the three most frequent tokens, and no other
    assert set(ids.tolist()) == set(targets.reshape(-1)[keep].tolist()) | set(counts.topk(3).indices.tolist())
    assert len(ids) < vocab and (sample.log_q[torch.isin(ids, counts.topk(3).indices)] == 0).all()
    assert (sample.log_q <= 0).all() and (sample.log_q >= np.log(0.3) - 1e-6).all() and (sample.log_q < 0).any()
    # the teacher's sampled columns are its whole rows' columns
    torch.testing.assert_close(teacher.probs(x, ids, sample.slot), teacher.probs(x)[..., ids])

    hidden = torch.randn(B, T, D, requires_grad=True)
    head = torch.randn(vocab, D, requires_grad=True)
    objective, plain = head_loss(hidden, head, targets, teacher=teacher, idx=x, share=share, rows=rows,
                                 sample=sample)
    objective.backward()
    h_ref, w_ref = hidden.detach().clone().requires_grad_(), head.detach().clone().requires_grad_()
    z = (h_ref @ w_ref[ids].t()).reshape(B * T, -1)[keep]
    lse = (z - sample.log_q).logsumexp(1)
    t = teacher.probs(x).reshape(B * T, vocab)[keep][:, ids]
    t = t / t.sum(1, keepdim=True)  # the teacher over the sampled columns
    y = sample.slot[targets.reshape(-1)[keep]]
    want = (lse - share * (t * z).sum(1) - (1 - share) * z.gather(1, y.unsqueeze(1)).squeeze(1)).mean()
    want.backward()
    torch.testing.assert_close(objective, want)
    torch.testing.assert_close(plain, (lse - z.gather(1, y.unsqueeze(1)).squeeze(1)).mean().detach())
    torch.testing.assert_close(hidden.grad, h_ref.grad)
    torch.testing.assert_close(head.grad, w_ref.grad)  # zero on the rows not sampled
    assert (head.grad[~torch.isin(torch.arange(vocab), ids)] == 0).all()

    # a sample of the whole vocabulary is the whole softmax
    whole = Sampler(counts, vocab, B * T)(targets)
    a = head_loss(hidden, head, targets, teacher=teacher, idx=x, share=share, rows=rows, sample=whole)
    b = head_loss(hidden, head, targets, teacher=teacher, idx=x, share=share, rows=rows)
    torch.testing.assert_close(a, b)


def test_the_model_trains_the_same_through_the_head_loss_as_through_its_logits() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, tie_embeddings=True)
    model = GPT(cfg)
    x, y = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    y[1, :5] = IGNORE_INDEX
    _, want = model(x, y)
    want.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden, _ = model(x, hidden=True)
    objective, plain = head_loss(hidden, model.lm_head.weight, y, rows=16)
    objective.backward()
    torch.testing.assert_close(objective, want)
    torch.testing.assert_close(plain, want.detach())
    for name, p in model.named_parameters():  # the tied head's gradient arrives through both its uses
        torch.testing.assert_close(p.grad, grads[name], msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_lora_head_through_its_product_is_the_wrapped_heads_loss_with_its_gradients(dropout) -> None:
    torch.manual_seed(0)
    vocab, (B, T, D) = 9, (2, 5, 4)
    teacher = NgramTeacher.from_tokens(corpus(vocab), vocab, 3)
    seq = torch.from_numpy(corpus(vocab, B * T + 1, seed=2).astype(np.int64))
    x, targets = seq[:-1].view(B, T), seq[1:].view(B, T).clone()
    targets[1, :2] = IGNORE_INDEX
    head = LoRALinear(torch.nn.Linear(D, vocab, bias=False), r=3, alpha=6.0, dropout=dropout)
    torch.nn.init.normal_(head.lora_B)  # a nonzero update: the adapter's own output counts
    hidden = torch.randn(B, T, D, requires_grad=True)
    torch.manual_seed(1)  # the same dropout draw on both sides
    h, w = head.product(hidden)
    objective, plain = head_loss(h, w, targets, teacher=teacher, idx=x, share=0.4, z_loss=1e-2, rows=5)
    objective.backward()
    got = {"hidden": hidden.grad, "A": head.lora_A.grad, "B": head.lora_B.grad}
    assert head.base.weight.grad is None  # the base stays frozen

    hidden.grad = head.lora_A.grad = head.lora_B.grad = None
    torch.manual_seed(1)
    keep = targets.reshape(-1) != IGNORE_INDEX
    logits = head(hidden).reshape(B * T, vocab)[keep]  # the wrapper's own forward, whole logits
    mixed = 0.4 * teacher.probs(x).reshape(B * T, vocab)[keep] \
        + 0.6 * torch.nn.functional.one_hot(targets.reshape(-1)[keep], vocab).float()
    want = torch.nn.functional.cross_entropy(logits, mixed) + 1e-2 * logits.logsumexp(1).square().mean()
    want.backward()
    torch.testing.assert_close(objective, want)
    torch.testing.assert_close(plain, torch.nn.functional.cross_entropy(logits.detach(), targets.reshape(-1)[keep]))
    for name, grad in {"hidden": hidden.grad, "A": head.lora_A.grad, "B": head.lora_B.grad}.items():
        torch.testing.assert_close(got[name], grad, msg=name)


def test_a_frozen_head_gets_no_gradient_and_a_share_needs_a_teacher() -> None:
    hidden = torch.randn(2, 4, 3, requires_grad=True)
    head = torch.randn(7, 3)
    objective, _ = head_loss(hidden, head, torch.randint(0, 7, (2, 4)), rows=4)
    objective.backward()
    assert hidden.grad is not None and head.grad is None
    with pytest.raises(ValueError, match="teacher share needs the teacher"):
        head_loss(hidden, head, torch.randint(0, 7, (2, 4)), share=0.5)


@pytest.mark.parametrize("rows", [1, 7, 15, 64])  # chunks that do not divide the batch, and the whole batch
@pytest.mark.parametrize("lora", [False, True])
def test_the_scorers_nll_is_each_targets_cross_entropy(rows, lora) -> None:
    torch.manual_seed(0)
    vocab, (B, T, D) = 11, (3, 5, 4)
    head = torch.nn.Linear(D, vocab, bias=False)
    if lora:  # a fine-tuned head: the module is called, not its weight
        head = LoRALinear(head, r=2)
        torch.nn.init.normal_(head.lora_B)  # a nonzero update, so the wrapper's own output counts
    hidden, targets = torch.randn(B, T, D), torch.randint(0, vocab, (B, T))
    targets[0, :3] = targets[2, 4] = IGNORE_INDEX
    with torch.inference_mode():
        got = token_nll(hidden, head, targets, rows=rows)
        want = torch.nn.functional.cross_entropy(head(hidden).reshape(B * T, vocab), targets.reshape(-1),
                                                 reduction="none").view(B, T)
    assert got.shape == (B, T) and got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    assert (got[targets == IGNORE_INDEX] == 0).all() and (got[targets != IGNORE_INDEX] > 0).all()
