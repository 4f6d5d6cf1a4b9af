"""LoRA: adapters start as a no-op, train only themselves, and merge into plain Linear layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from llmforge.model.gpt import GPT, GPTConfig
from llmforge.model.lora import LoRALinear, apply_lora, count_trainable, lora_state_dict, merge_lora

torch.set_num_threads(1)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32))


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_fresh_adapter_leaves_outputs_unchanged():
    model = tiny_gpt()
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model(idx, idx)[0]
    apply_lora(model, r=4, alpha=8)
    after = model(idx, idx)[0]
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_apply_lora_freezes_everything_but_adapters():
    model = tiny_gpt()
    names = apply_lora(model, r=4, alpha=8, targets=("attn", "mlp"))
    # 2 layers x (c_attn, c_proj in attn; c_fc, c_proj in mlp)
    assert len(names) == 8 and all(".attn." in n or ".mlp." in n for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    n_train, n_all = count_trainable(model)
    assert n_train == sum(p.numel() for n, p in model.named_parameters() if n in trainable) < n_all
    assert set(lora_state_dict(model)) == trainable


def test_apply_lora_rejects_targets_that_match_nothing():
    with pytest.raises(ValueError, match="match no nn.Linear"):
        apply_lora(tiny_gpt(), targets=("atn",))


def test_merged_model_matches_base_plus_adapter_and_loads_into_plain_gpt():
    model = tiny_gpt()
    apply_lora(model, r=4, alpha=16, targets=("c_attn", "c_fc"))
    randomize_adapters(model)
    model.eval()
    idx = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = model(idx, idx)[0]
        base_only = tiny_gpt()(idx, idx)[0]
    assert not torch.allclose(adapted, base_only, atol=1e-3), "adapters must actually change the output"

    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        merged = model(idx, idx)[0]
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)

    plain = tiny_gpt(seed=123)
    plain.load_state_dict(model.state_dict())  # strict: same keys as a plain GPT
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(idx, idx)[0], adapted, rtol=1e-5, atol=1e-5)


def test_lora_training_changes_only_adapters():
    model = tiny_gpt()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=2, alpha=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(5):
        _, loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    sd = model.state_dict()
    for k, v in base.items():
        key = k if k in sd else k.replace(".weight", ".base.weight")
        torch.testing.assert_close(sd[key], v, rtol=0, atol=0)
