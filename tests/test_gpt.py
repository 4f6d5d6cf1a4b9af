"""The GPT model: shapes, loss masking, weight tying, presets, KV-cache forward, optimizers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmforge.model.gpt import GPT, GPTConfig, MuonWithAdamW, load_preset

torch.set_num_threads(1)


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32)
    base.update(kw)
    return GPTConfig(**base)


def test_forward_returns_last_position_logits_without_targets_and_all_with_targets():
    torch.manual_seed(0)
    m = GPT(tiny())
    x = torch.randint(0, 97, (3, 10))
    logits, loss = m(x)
    assert logits.shape == (3, 1, 97) and loss is None
    y = torch.randint(0, 97, (3, 10))
    logits_all, loss = m(x, y)
    assert logits_all.shape == (3, 10, 97)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    # the last-position logits are the same numbers either way
    torch.testing.assert_close(logits[:, 0], logits_all[:, -1])
    # a random-init model is near uniform: loss ~ ln(V)
    assert abs(loss.item() - math.log(97)) < 0.5


def test_loss_ignores_targets_marked_minus_100():
    torch.manual_seed(0)
    m = GPT(tiny())
    x = torch.randint(0, 97, (2, 12))
    y = torch.randint(0, 97, (2, 12))
    y_masked = y.clone()
    y_masked[:, :7] = -100
    logits, loss = m(x, y_masked)
    expected = F.cross_entropy(logits[:, 7:].reshape(-1, 97).float(), y[:, 7:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    _, full = m(x, y)
    assert not torch.isclose(loss, full)


def test_lm_head_is_tied_to_token_embedding_unless_disabled():
    m = GPT(tiny())
    assert m.lm_head.weight is m.transformer.wte.weight
    assert "lm_head.weight" in m.state_dict()  # both names present, one tensor
    untied = GPT(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params(non_embedding=False) - m.num_params(non_embedding=False) == 97 * 32
    # non-embedding count leaves out only the lookup table of an untied model
    assert untied.num_params() == m.num_params()


def test_rotary_tables_are_not_saved_in_state_dict():
    m = GPT(tiny())
    assert not any("rope" in k for k in m.state_dict())


def test_residual_projections_are_scaled_at_init():
    torch.manual_seed(0)
    m = GPT(tiny(n_layer=8, n_embd=128, n_head=4))
    std_proj = m.transformer.h[0].mlp.c_proj.weight.std().item()
    std_fc = m.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / math.sqrt(16)) < 0.001


@pytest.mark.parametrize(
    "name, lo, hi",
    [("tiny", 2e6, 20e6), ("small", 10e6, 40e6), ("gpt2-124m", 123e6, 125e6),
     ("gpt2-350m", 340e6, 370e6), ("gpt-1b", 0.9e9, 1.15e9)],
)
def test_preset_parameter_counts(name, lo, hi):
    cfg = load_preset(name, vocab_size=50257)
    with torch.device("meta"):  # no memory allocated, even for 1B
        m = GPT(cfg)
    assert lo <= m.num_params() <= hi
    assert m.flops_per_token() > 6 * m.num_params()


def test_tiny_preset_fits_a_cpu_and_takes_vocab_from_caller():
    cfg = load_preset("tiny", vocab_size=4000)
    assert cfg.vocab_size == 4000 and cfg.block_size <= 512
    with torch.device("meta"):
        assert GPT(cfg).num_params() < 10e6


def test_preset_with_unknown_key_is_an_error_naming_the_file(tmp_path: Path):
    p = tmp_path / "typo.yaml"
    p.write_text("n_layer: 2\nn_heads: 4\n")
    with pytest.raises(ValueError, match=r"typo\.yaml: unknown key n_heads; did you mean n_head\?"):
        load_preset(str(p))


def test_missing_preset_lists_the_available_ones():
    with pytest.raises(FileNotFoundError, match="gpt2-124m"):
        load_preset("no-such-model")
    with pytest.raises(FileNotFoundError, match="no such model preset 'tny'; did you mean tiny"):
        load_preset("tny")


def test_invalid_shape_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)


def test_config_round_trips_through_dict():
    cfg = tiny(dropout=0.1, rope_theta=500.0)
    assert GPTConfig.load(cfg.to_dict()) == cfg


def test_sequence_longer_than_block_is_an_error():
    m = GPT(tiny())
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_cached_forward_in_chunks_matches_full_forward():
    torch.manual_seed(0)
    m = GPT(tiny()).eval()
    x = torch.randint(0, 97, (2, 30))
    full, _ = m(x, x)
    cache = m.make_kv_cache(2)
    parts = [m(x[:, :11], kv_cache=cache)[0], m(x[:, 11:19], kv_cache=cache)[0]]
    parts += [m(x[:, t:t + 1], kv_cache=cache)[0] for t in range(19, 30)]
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)


def test_adamw_decays_matrices_but_not_norms():
    m = GPT(tiny(bias=True))
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.num_params(non_embedding=False)


def _train(m: GPT, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 97, (1, 16), generator=g).repeat(4, 2)  # a repeating pattern to learn
    losses = []
    for _ in range(steps):
        _, loss = m(seq[:, :-1], seq[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_model_learns_a_repeating_sequence_with_adamw():
    torch.manual_seed(0)
    m = GPT(tiny())
    losses = _train(m, m.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu"), 40)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_takes_block_matrices_and_adamw_the_rest_and_both_train():
    torch.manual_seed(0)
    m = GPT(tiny())
    opt = m.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu", muon=True)
    assert isinstance(opt, MuonWithAdamW)
    muon_params = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    assert id(m.transformer.wte.weight) not in muon_params
    assert id(m.transformer.h[0].attn.c_attn.weight) in muon_params
    # a scheduler sees one optimizer and reaches both
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 2.0)
    assert {g["lr"] for g in opt.muon.param_groups + opt.adamw.param_groups} == {6e-3}
    losses = _train(m, opt, 40)
    sched.step()
    assert losses[-1] < 0.5 * losses[0]
    sd = opt.state_dict()
    opt2 = GPT(tiny()).configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu", muon=True)
    opt2.load_state_dict(sd)
    assert len(opt2.param_groups) == len(opt.param_groups)
