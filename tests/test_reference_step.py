"""The reference GPT step of bench/train_throughput.py computes what llmforge's step computes, so
the speed ratio it reports compares like with like."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from llmforge.model.gpt import GPT, GPTConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from reference_gpt import from_config, load_llmforge_state, reference_step  # noqa: E402


def test_reference_and_llmforge_agree_on_loss_and_update_of_the_same_batch():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=64)
    ours = GPT(cfg)
    ref = load_llmforge_state(from_config(cfg), ours.state_dict())
    x = torch.randint(0, 300, (4, 32))
    y = torch.randint(0, 300, (4, 32))
    _, loss = ours(x, y)
    assert torch.allclose(ref(x, y), loss, rtol=1e-5, atol=1e-6)

    # one optimizer step each, configured identically: the next loss still agrees
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
    opt_ours.step()
    reference_step(ref, opt_ref, x, y, torch.float32)
    x2, y2 = torch.randint(0, 300, (4, 32)), torch.randint(0, 300, (4, 32))
    assert torch.allclose(ref(x2, y2), ours(x2, y2)[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ref(x2, y2), ref(x, y))  # the batches differ: the check can fail
