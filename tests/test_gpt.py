"""The GPT model: shapes, loss masking, weight tying, presets, KV-cache forward, optimizers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmforge.model.gpt import GPT, GPTConfig, Muon, MuonWithAdamW, causal_attention, load_preset, newton_schulz
from llmforge.model.runtime import cpu_bf16_speedup

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


@pytest.mark.parametrize("muon", [False, True])
def test_embedding_and_untied_head_get_their_own_learning_rates(muon: bool):
    if muon and not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    m = GPT(tiny(tie_embeddings=False))
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", muon=muon, embedding_lr=0.2, head_lr=4e-3)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(m.transformer.wte.weight)] == 0.2
    assert lr_of[id(m.lm_head.weight)] == 4e-3
    assert lr_of[id(m.transformer.h[0].attn.c_attn.weight)] == 1e-3
    assert len(lr_of) == len(list(m.parameters()))  # every parameter in exactly one group
    shrink = {id(p): g["lr"] * g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert shrink[id(m.transformer.wte.weight)] == pytest.approx(1e-3 * 0.1)  # decay per step as the matrices'
    # a tied head takes the embedding's rate; unset rates keep the two-group layout of old checkpoints
    tied = GPT(tiny())
    opt = tied.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", embedding_lr=0.05)
    assert {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}[id(tied.lm_head.weight)] == 0.05
    assert len(tied.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", embedding_lr=1e-3).param_groups) == 2


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


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_runs_torchs_iteration_batched_by_shape():
    from torch.optim._muon import _zeropower_via_newtonschulz  # torch's own iteration (bfloat16)

    torch.manual_seed(0)
    coeffs = (3.4445, -4.7750, 2.0315)
    for shape in [(3, 48, 16), (2, 16, 48), (2, 16, 16)]:
        g = torch.randn(*shape)
        batched = newton_schulz(g, 5, coeffs, 1e-7, torch.float32)
        assert batched.dtype == torch.float32 and batched.shape == g.shape
        for i in range(shape[0]):
            alone = newton_schulz(g[i:i + 1], 5, coeffs, 1e-7, torch.float64)[0]
            torch.testing.assert_close(batched[i].double(), alone, atol=1e-5, rtol=0)  # batching changes nothing
            ref = _zeropower_via_newtonschulz(g[i], coeffs, 5, 1e-7).double()
            assert (alone - ref).abs().max() < 0.05 * alone.abs().max()  # torch's, up to its bfloat16
            sv = torch.linalg.svdvals(alone)
            assert 0.1 < sv.min() and sv.max() < 1.3  # orthogonalised, as Muon's quintic does
    # one step: the same update as torch.optim.Muon's up to bfloat16, and the same state layout
    ours = [torch.nn.Parameter(torch.randn(48, 16)) for _ in range(2)] + [torch.nn.Parameter(torch.randn(16, 16))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    a = Muon(ours, lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    b = torch.optim.Muon(theirs, lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q, p0 in zip(ours, theirs, start):
        assert (p - q).norm() < 0.03 * (p - p0).norm()
    b.load_state_dict(a.state_dict())
    a.load_state_dict(b.state_dict())
    assert set(a.state[ours[0]]) == {"momentum_buffer"}


def test_nanochat_init_starts_every_block_as_the_identity():
    torch.manual_seed(0)
    m = GPT(tiny(n_embd=64, init="nanochat", tie_embeddings=False, mlp="swiglu"))
    for block in m.transformer.h:
        assert block.attn.c_proj.weight.abs().max() == 0 and block.mlp.c_proj.weight.abs().max() == 0
        w = block.mlp.c_fc.weight
        assert w.abs().max() <= math.sqrt(3 / 64) and abs(w.std().item() - 64 ** -0.5) < 0.01
    assert abs(m.transformer.wte.weight.std().item() - 1.0) < 0.05
    assert abs(m.lm_head.weight.std().item() - 0.001) < 1e-4
    x = torch.randint(0, 97, (2, 8))
    h = m.transformer.wte(x)
    for block in m.transformer.h:  # zero output projections: each block passes its input through
        cos, sin = m.rope_cos[:8], m.rope_sin[:8]
        torch.testing.assert_close(block(h, cos, sin, None), h)
    # it trains, and a tied head keeps GPT-2's small embedding (it is the head too)
    losses = _train(m, m.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu"), 40)
    assert losses[-1] < 0.5 * losses[0]
    tied = GPT(tiny(init="nanochat"))
    assert abs(tied.transformer.wte.weight.std().item() - 0.02) < 0.002


# ---------------------------------------------------------------------------------------------
# Llama-shaped options: SwiGLU, grouped-query attention, QK-norm


def test_swiglu_hidden_size_follows_the_llama_rule_and_sets_the_parameter_count():
    # 2/3 * 4 * 768 = 2048 exactly; 2/3 * 4 * 256 = 682.7 -> 704, the next multiple of 64
    assert GPTConfig(n_embd=768, mlp="swiglu").hidden_dim == 2048
    assert GPTConfig(n_embd=256, n_head=4, mlp="swiglu").hidden_dim == 704
    assert GPTConfig(n_embd=256, n_head=4, mlp="swiglu", mlp_hidden=100).hidden_dim == 100
    assert GPTConfig(n_embd=256, n_head=4).hidden_dim == 1024  # gelu: ratio * n_embd, as before
    cfg = tiny(mlp="swiglu")
    m = GPT(cfg)
    mlp = m.transformer.h[0].mlp
    assert mlp.c_gate.weight.shape == mlp.c_fc.weight.shape == (cfg.hidden_dim, 32)
    assert mlp.c_proj.weight.shape == (32, cfg.hidden_dim)
    per_block_gelu = sum(p.numel() for p in GPT(tiny()).transformer.h[0].mlp.parameters())
    per_block_swiglu = sum(p.numel() for p in mlp.parameters())
    assert per_block_gelu == 2 * 32 * 128 and per_block_swiglu == 3 * 32 * cfg.hidden_dim


def test_swiglu_computes_silu_gate_times_up_projection():
    torch.manual_seed(0)
    mlp = GPT(tiny(mlp="swiglu")).transformer.h[0].mlp
    x = torch.randn(2, 5, 32)
    expected = mlp.c_proj(F.silu(x @ mlp.c_gate.weight.T) * (x @ mlp.c_fc.weight.T))
    torch.testing.assert_close(mlp(x), expected)


def test_grouped_query_attention_shrinks_key_value_projections_and_the_cache():
    cfg = tiny(n_head=4, n_kv_head=2, n_embd=64)
    m = GPT(cfg)
    # q: 4 heads of 16, k and v: 2 heads of 16 each
    assert m.transformer.h[0].attn.c_attn.weight.shape == ((4 + 2 * 2) * 16, 64)
    mha = GPT(tiny(n_head=4, n_embd=64))
    assert mha.num_params() - m.num_params() == 2 * 2 * (2 * 16 * 64)  # 2 layers, k and v
    cache = m.make_kv_cache(3)
    assert cache.k.shape == (2, 3, 2, 32, 16)


def test_grouped_query_attention_equals_multi_head_attention_with_shared_key_value_heads():
    # a GQA model is exactly an MHA model whose consecutive query heads share copies of one
    # key/value head (the grouping Hugging Face's repeat_kv and llama.cpp use too)
    torch.manual_seed(0)
    gqa = GPT(tiny(n_head=4, n_kv_head=2, n_embd=64)).eval()
    mha = GPT(tiny(n_head=4, n_embd=64)).eval()
    state = gqa.state_dict()
    for i in range(2):
        w = state[f"transformer.h.{i}.attn.c_attn.weight"]
        q, k, v = w.split([64, 32, 32])
        k, v = (t.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64) for t in (k, v))
        state[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    x = torch.randint(0, 97, (2, 20))
    torch.testing.assert_close(gqa(x, x)[0], mha(x, x)[0], atol=1e-5, rtol=1e-5)


def test_n_head_must_be_a_multiple_of_n_kv_head():
    with pytest.raises(ValueError, match="n_head=4 is not divisible by n_kv_head=3"):
        GPTConfig(n_embd=64, n_head=4, n_kv_head=3)


@pytest.mark.parametrize("kw", [dict(n_kv_head=1), dict(n_kv_head=2, mlp="swiglu"),
                                dict(n_kv_head=2, qk_norm=True, mlp="swiglu", tie_embeddings=False),
                                dict(ngram_buckets=61), dict(ngram_buckets=61, ngram_order=3), dict(value_embeds=1),
                                dict(value_embeds=2, ngram_buckets=61, n_kv_head=2)])
def test_cached_forward_equals_full_forward_with_every_model_option(kw):
    """n-gram embeddings need the tokens fed before each chunk: the cache remembers them."""
    torch.manual_seed(0)
    m = GPT(tiny(n_head=4, n_embd=64, **kw)).eval()
    x = torch.randint(0, 97, (2, 30))
    full, _ = m(x, x)
    cache = m.make_kv_cache(2)
    parts = [m(x[:, :11], kv_cache=cache)[0], m(x[:, 11:19], kv_cache=cache)[0]]
    parts += [m(x[:, t:t + 1], kv_cache=cache)[0] for t in range(19, 30)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)
    cache.reset()  # a fresh start forgets the old tokens: the same logits as without a cache
    torch.testing.assert_close(m(x[:, 5:9], kv_cache=cache)[0], m(x[:, 5:9], x[:, 5:9])[0], atol=1e-5, rtol=1e-4)


def test_ngram_bucket_of_a_position_depends_on_its_last_n_tokens_only():
    m = GPT(tiny(ngram_buckets=1021, ngram_order=3))
    x = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    bigram, trigram = m.ngram_ids(x)
    assert bigram.shape == trigram.shape == x.shape and int(bigram.max()) < 1021
    y = x.clone()
    y[0, 5] = (x[0, 5] + 1) % 97
    b2, t2 = m.ngram_ids(y)
    assert (b2 != bigram)[0].nonzero().flatten().tolist() == [5, 6]  # the pairs (4, 5) and (5, 6)
    assert (t2 != trigram)[0].nonzero().flatten().tolist() == [5, 6, 7]
    # the same pair anywhere in a sequence has the same bucket; the first token pairs with a marker
    z = torch.cat([x[:, 3:5], x[:, :1], x[:, 3:5]], 1)
    bz, _ = m.ngram_ids(z)
    assert bz[0, 1] == bz[0, 4] == bigram[0, 4] and bz[0, 0] != bigram[0, 3]


def test_lookup_tables_learn_at_the_embedding_rate_and_leave_the_default_layout_alone():
    m = GPT(tiny(ngram_buckets=61, value_embeds=2, tie_embeddings=False))
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", embedding_lr=0.05)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    tables = [m.ngram_embeds[0].weight, m.value_embeds[0].weight, m.value_embeds[1].weight]
    assert [lr_of[id(p)] for p in tables] == [0.05] * 3 and len(lr_of) == len(list(m.parameters()))
    assert m.value_embeds[0].weight.shape == (97, 32) and m.ngram_embeds[0].weight.shape == (61, 32)
    assert m.num_params() == GPT(tiny(tie_embeddings=False)).num_params()  # lookups cost no FLOPs per token
    plain = {k for k in GPT(tiny()).state_dict()}
    assert not any(k.startswith(("ngram", "value_embeds")) for k in plain)


def test_qk_norm_makes_attention_independent_of_the_scale_of_queries_and_keys():
    torch.manual_seed(0)
    m = GPT(tiny(qk_norm=True)).eval()
    assert m.transformer.h[0].attn.q_norm.weight.shape == (16,)
    x = torch.randint(0, 97, (2, 12))
    before, _ = m(x, x)
    with torch.no_grad():
        m.transformer.h[0].attn.c_attn.weight[:64].mul_(7.0)  # q and k rows
    after, _ = m(x, x)
    torch.testing.assert_close(after, before, atol=2e-4, rtol=0)  # only the norm's eps differs
    plain = GPT(tiny()).eval()  # without qk_norm the same change moves the logits
    before, _ = plain(x, x)
    with torch.no_grad():
        plain.transformer.h[0].attn.c_attn.weight[:64].mul_(7.0)
    assert (plain(x, x)[0] - before).abs().max() > 1e-2


def test_default_config_keeps_the_original_module_layout_so_old_checkpoints_load():
    # a checkpoint written before these options has no such keys in its config and these
    # weight names and shapes; the defaults must rebuild exactly that model
    old_config = dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32, mlp_ratio=4.0, dropout=0.0,
                      bias=False, tie_embeddings=True, rope_theta=10000.0, norm_eps=1e-5)
    m = GPT(GPTConfig.load(old_config))
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (96, 32)
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (128, 32)
    assert not any("c_gate" in k or "_norm" in k for k in shapes)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_llama_shaped_model_learns_a_repeating_sequence_with_muon():
    torch.manual_seed(0)
    m = GPT(tiny(n_head=4, n_embd=64, n_kv_head=2, mlp="swiglu", qk_norm=True, tie_embeddings=False))
    opt = m.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu", muon=True)
    assert id(m.transformer.h[0].mlp.c_gate.weight) in {id(p) for g in opt.muon.param_groups for p in g["params"]}
    losses = _train(m, opt, 40)
    assert losses[-1] < 0.5 * losses[0]


def test_model_options_are_settable_from_the_command_line_spec():
    from llmforge.model.gpt import ModelSpec, resolve_model

    spec = ModelSpec.load({"preset": "tiny", "mlp": "swiglu", "n_kv_head": 2, "qk_norm": True})
    cfg = resolve_model(spec, vocab_size=300)
    assert (cfg.mlp, cfg.kv_heads, cfg.qk_norm, cfg.hidden_dim) == ("swiglu", 2, True, 704)
    with pytest.raises(ValueError, match="mlp"):
        ModelSpec.load({"mlp": "relu"})


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_causal_attention_by_matmuls_equals_torchs_kernel_in_values_and_gradients(kv_heads: int):
    torch.manual_seed(0)
    q = torch.randn(3, 4, 20, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(3, kv_heads, 20, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ours = causal_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != 4)
    torch.testing.assert_close(ours, ref)
    w = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    # position 0 attends to itself only; changing a later key changes nothing before it
    torch.testing.assert_close(ours[:, :, 0], v.repeat_interleave(4 // kv_heads, 1)[:, :, 0])
    k2 = k.detach().clone()
    k2[:, :, 10:] += 5.0
    torch.testing.assert_close(causal_attention(q, k2, v)[:, :, :10], ours[:, :, :10])


def test_a_bfloat16_forward_on_a_cpu_attends_by_matmuls_and_matches_float32(monkeypatch):
    import llmforge.model.gpt as gpt_module

    torch.manual_seed(0)
    m = GPT(tiny(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64)).train()
    x = torch.randint(0, 97, (4, 64))
    h32, _ = m(x, hidden=True)
    calls = []
    real = gpt_module.causal_attention
    monkeypatch.setattr(gpt_module, "causal_attention", lambda *a: calls.append(a[0].dtype) or real(*a))
    m(x, hidden=True)
    assert calls == []  # float32 keeps torch's kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h16, _ = m(x, hidden=True)
    assert calls == [torch.bfloat16] * 2  # both layers, by matmuls
    torch.testing.assert_close(h16.float(), h32, atol=0.1, rtol=0.05)
    assert (h16.float() - h32).abs().mean() < 0.02
    h16.float().square().mean().backward()  # and it trains
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)


def test_the_cpu_bf16_probe_gives_a_ratio_measured_once_per_process():
    speedup = cpu_bf16_speedup()
    assert speedup > 0 and cpu_bf16_speedup() == speedup
