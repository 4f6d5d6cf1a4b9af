"""Export to Hugging Face and GGUF: real transformers loads with equal logits, token ids and greedy
generations; the GGUF file's vocabulary, metadata and tensors read back with the gguf package;
refusals, re-runs and sharding. llama.cpp itself runs in bench/llamacpp_check.py (building it
does not fit CI's time)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub: every load is local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from llmforge.flows.cli import main as cli_main
from llmforge.model.checkpoint import capture_rng_state, save_checkpoint
from llmforge.model.export import (ExportConfig, ExportStage, from_llama, load_hf_export, _interleave_halves)
from llmforge.model.generate import generate
from llmforge.model.gpt import GPT, GPTConfig
from llmforge.model.sft import format_prompt
from llmforge.pipeline.tokenizer import Tokenizer, TokenizerConfig, sample_texts, train_sentencepiece

try:
    from support.tinydata import corpus_documents
except ImportError:  # tests/ is a package
    from tests.support.tinydata import corpus_documents

torch.set_num_threads(1)

# a Hugging Face chat template that renders llmforge's SFT format (model/sft.py)
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
                 "### Response:\n{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
HARD_STRINGS = [
    "  two leading spaces", "trailing spaces   ", "\n\n\nthree newlines first", "a\n\n\n\nb", "\ttab\t\tand tabs",
    "digits 0123456789 3.14159 1e-10", "日本語のテキスト、中文字符", "emoji 🦊🐶🚀 and ZWJ 👩\u200d💻",
    "bytes outside the vocabulary: \u0f00\U0001d11e\u2603", "a literal \u2581 meta symbol \u2581\u2581",
    "def f(x):\n    return x  # indented\n", " ", "",
]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return [t for _, t in corpus_documents(600_000)]


@pytest.fixture(scope="module")
def tok(docs) -> Tokenizer:
    cfg = TokenizerConfig(vocab_size=600, threads=1)
    return Tokenizer(train_sentencepiece(sample_texts(docs, sum(len(d) for d in docs), cfg), cfg))


def make_checkpoint(path: Path, tok: Tokenizer, *, vocab_size: int | None = None, seed: int = 0,
                    extra: dict | None = None, **model_kw) -> tuple[Path, GPT]:
    """A random model saved as a real checkpoint (with its tokenizer and lineage)."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab_size or tok.vocab_size, block_size=512, n_layer=2, n_head=4, n_embd=64, mlp="swiglu")
    cfg = GPTConfig(**{**kw, **model_kw})
    m = GPT(cfg).eval()
    with torch.no_grad():
        # random init is near-uniform: sharpen attention (so a wrong rotary mapping moves the logits
        # far) and the output (so greedy choices are not near-ties)
        for block in m.transformer.h:
            block.attn.c_attn.weight.mul_(6)
        m.lm_head.weight.mul_(10)  # the embedding too, when tied
        for name, p in m.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    ckpt = save_checkpoint(path, model_state=m.state_dict(), optimizer_state=None, scheduler_state=None, step=7,
                           data_state={}, rng_state=capture_rng_state(), config={"model": cfg.to_dict(), "train": {}},
                           lineage={"dataset_fingerprint": "data-fp-1234", "mlflow_run_id": "run-5678"},
                           tokenizer=tok.proto, extra=extra, val_loss=3.5)
    return ckpt, m


def export(ckpt: Path, out: Path | None = None, **cfg) -> dict:
    return ExportStage(ckpt, ExportConfig(**cfg), out=out).run()


def logits(model: GPT, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    with torch.no_grad():
        return model(x, x)[0][0]


# ---------------------------------------------------------------------------------------------
# Hugging Face


@pytest.mark.parametrize("n_kv_head, tied", [(None, True), (None, False), (2, True), (2, False)],
                         ids=["mha-tied", "mha-untied", "gqa-tied", "gqa-untied"])
def test_hf_export_loads_in_transformers_with_llmforge_logits_and_greedy_tokens(tmp_path, tok, docs, n_kv_head, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, model = make_checkpoint(tmp_path / "best.pt", tok, n_kv_head=n_kv_head, tie_embeddings=tied)
    out = export(ckpt, tmp_path / "hf")["out"]
    hf = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code: a plain Llama
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.num_key_value_heads == (n_kv_head or 4) and hf.config.tie_word_embeddings == tied

    text = docs[2][:4000]
    ids = [tok.eos_id] + tok.encode(text)[:400]
    assert hf_tok(text).input_ids[:400] == ids[1:]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    ours = logits(model, ids)
    assert ours.std() > 1.0  # sharpened: logits far apart, so 1e-4 is a strict bound
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    for prompt in ("def main(", "class Foo:\n    "):
        x = torch.tensor([[tok.eos_id] + tok.encode(prompt)])
        want = generate(model, x, 32, temperature=0)
        got = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                          min_new_tokens=32)
        assert got.tolist() == want.tolist()

    back, back_tok, meta = load_hf_export(out)  # and back into llmforge, exactly
    assert back_tok.proto == tok.proto and meta["step"] == 7
    torch.testing.assert_close(logits(back, ids), ours, atol=0, rtol=0)


def test_hf_tokenizer_gives_llmforge_ids_on_spaces_newlines_tabs_digits_cjk_emoji_and_unknown_bytes(tmp_path, tok):
    from transformers import AutoTokenizer

    ckpt, _ = make_checkpoint(tmp_path / "best.pt", tok)
    hf_tok = AutoTokenizer.from_pretrained(export(ckpt, tmp_path / "hf")["out"])
    for s in HARD_STRINGS:
        ids = tok.encode(s)
        assert hf_tok(s).input_ids == ids, s  # and no BOS: llmforge adds none
        assert hf_tok.decode(ids) == tok.decode(ids) == s
    assert any(tok.sp.is_byte(i) for s in HARD_STRINGS for i in tok.encode(s))  # the byte path was taken
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == tok.eos_id


def test_hf_export_carries_the_chat_template_and_a_model_card_with_lineage_and_evals(tmp_path, tok):
    from transformers import AutoTokenizer

    from llmforge.pipeline.fsutil import sha256_file

    ckpt, _ = make_checkpoint(tmp_path / "run" / "model.pt", tok, extra={"chat_template": CHAT_TEMPLATE})
    (ckpt.parent / "eval").mkdir()
    (ckpt.parent / "eval" / "model-abc.json").write_text(json.dumps(
        {"checkpoint_sha256": sha256_file(ckpt), "data_dir": "/data/tokens-x", "metrics": {"val/bpb": 1.2345}}))
    out = Path(export(ckpt)["out"])
    assert out.parent == ckpt.parent / "export"  # default: next to the checkpoint
    hf_tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == format_prompt("What is 2+2?")
    assert hf_tok(prompt).input_ids == tok.encode(format_prompt("What is 2+2?"))
    card = (out / "README.md").read_text()
    for fact in ("data-fp-1234", "run-5678", tok.fingerprint, sha256_file(ckpt), "val/bpb", "1.2345", "chat template"):
        assert fact in card
    assert load_hf_export(out)[2]["extra"]["chat_template"] == CHAT_TEMPLATE


def test_large_export_is_sharded_with_an_index_that_transformers_and_llmforge_read(tmp_path, tok, docs):
    from transformers import AutoModelForCausalLM

    ckpt, model = make_checkpoint(tmp_path / "best.pt", tok, tie_embeddings=False, bias=True)
    out = Path(export(ckpt, tmp_path / "hf", dtype="bfloat16", max_shard_size=150_000)["out"])
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    back, _, _ = load_hf_export(out)
    ids = [tok.eos_id] + tok.encode(docs[1][:1500])[:200]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(theirs, logits(back, ids), atol=1e-4, rtol=0)
    # bfloat16 weights: close to the float32 model, not equal to it
    rel = (logits(back, ids) - logits(model, ids)).norm() / logits(model, ids).norm()
    assert 0 < rel < 0.05


# ---------------------------------------------------------------------------------------------
# GGUF (the file as llama.cpp reads it; llama.cpp itself: bench/llamacpp_check.py)


def _gguf_model(path: Path, cfg: GPTConfig) -> tuple[GPT, object]:
    """A GPT rebuilt from a GGUF file's tensors (dequantized, llama.cpp's q/k layout undone)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    hf_names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
                "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        stem, suffix = t.name.rsplit(".", 1)
        parts = stem.split(".")
        name = (f"model.layers.{parts[1]}.{hf_names[parts[2]]}" if parts[0] == "blk" else hf_names[stem]) + "." + suffix
        w = torch.from_numpy(np.array(data, dtype=np.float32))
        if name.endswith("q_proj.weight"):  # interleaved -> halves: the inverse permutation
            w = w.reshape(cfg.n_head, -1, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
        if name.endswith("k_proj.weight"):
            w = w.reshape(cfg.kv_heads, -1, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
        tensors[name] = w
    model = GPT(cfg).eval()
    model.load_state_dict(from_llama(tensors, cfg))
    return model, reader


def test_interleaving_puts_each_rotary_pair_side_by_side():
    # head of 6 dims: halves (0,1,2 | 3,4,5); llama.cpp rotates adjacent pairs (0,3), (1,4), (2,5)
    rows = torch.arange(12.0).unsqueeze(1)  # two heads
    assert _interleave_halves(rows, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]


@pytest.mark.parametrize("typ, tol", [("f32", 1e-5), ("f16", 0.05), ("q8_0", None)])
def test_gguf_holds_llama_metadata_the_sentencepiece_vocabulary_and_the_weights(tmp_path, tok, docs, typ, tol):
    ckpt, model = make_checkpoint(tmp_path / "best.pt", tok, vocab_size=640, n_kv_head=2, tie_embeddings=False,
                                  extra={"chat_template": CHAT_TEMPLATE})
    out = Path(export(ckpt, tmp_path / "m.gguf", format="gguf", type=typ)["out"])
    back, reader = _gguf_model(out, model.config)

    def field(key):
        parts = reader.get_field(key)
        return bytes(parts.parts[-1]).decode() if parts.types[0].name == "STRING" else parts.parts[-1].tolist()[0]

    assert field("general.architecture") == "llama" and field("tokenizer.ggml.model") == "llama"
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert field("llama.context_length") == 512 and field("llama.feed_forward_length") == model.config.hidden_dim
    assert field("tokenizer.ggml.bos_token_id") == field("tokenizer.ggml.eos_token_id") == tok.eos_id
    assert field("tokenizer.ggml.add_bos_token") is False and field("tokenizer.ggml.add_space_prefix") is False
    assert field("tokenizer.chat_template") == CHAT_TEMPLATE
    tokens = reader.get_field("tokenizer.ggml.tokens")
    pieces = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    types = [reader.get_field("tokenizer.ggml.token_type").parts[i].tolist()[0]
             for i in reader.get_field("tokenizer.ggml.token_type").data]
    assert len(pieces) == 640 and pieces[:600] == [tok.sp.id_to_piece(i) for i in range(600)]
    kinds = {pieces[i]: types[i] for i in range(640)}
    assert (kinds["<unk>"], kinds["</s>"], kinds["\n"], kinds["\t"], kinds["<0x41>"], kinds["[PAD600]"]) == (2, 3, 4, 4, 6, 5)
    assert {types[i] for i in range(600) if not pieces[i].startswith("<")} >= {1}

    ids = [tok.eos_id] + tok.encode(docs[3][:1500])[:200]
    ours, theirs = logits(model, ids), logits(back, ids)
    if tol is not None:
        torch.testing.assert_close(theirs, ours, atol=tol * ours.abs().max().item(), rtol=0)
    else:  # 8-bit weights: the same top choice almost everywhere
        assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------
# the stage and the command


@pytest.mark.parametrize("model_kw, says", [({"mlp": "gelu"}, "--set model.mlp=swiglu"),
                                             ({"qk_norm": True}, "QK-norm"),
                                             ({"ngram_buckets": 61}, "ngram_buckets=61")])
def test_a_model_llama_cannot_hold_is_refused_in_one_line_before_anything_is_written(tmp_path, tok, capsys,
                                                                                      model_kw, says):
    ckpt, _ = make_checkpoint(tmp_path / "best.pt", tok, **model_kw)
    assert cli_main(["export", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "best.pt" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_export_skips_a_finished_export_and_redoes_a_damaged_one(tmp_path, tok, capsys):
    ckpt, _ = make_checkpoint(tmp_path / "best.pt", tok)
    args = ["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")]
    assert cli_main(args) == 0 and "exported hf" in capsys.readouterr().out
    weights = tmp_path / "hf" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert cli_main(args) == 0 and "already exported" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == before
    with open(weights, "r+b") as f:  # a damaged export is not "done"
        f.truncate(100)
    assert cli_main(args) == 0 and "exported hf" in capsys.readouterr().out
    assert ExportStage(ckpt, ExportConfig(), out=tmp_path / "hf").completed() is not None
    # another dtype is another export; a gguf re-run is skipped the same way
    assert ExportStage(ckpt, ExportConfig(dtype="bfloat16"), out=tmp_path / "hf").completed() is None
    gguf_args = ["export", str(ckpt), "--format", "gguf", "--type", "q8_0", "--out", str(tmp_path / "m.gguf")]
    assert cli_main(gguf_args) == 0 and cli_main(gguf_args) == 0
    assert "already exported" in capsys.readouterr().out


def test_an_out_path_that_is_not_an_export_is_never_overwritten(tmp_path, tok, capsys):
    ckpt, _ = make_checkpoint(tmp_path / "best.pt", tok)
    mine = tmp_path / "my-project"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    notes = tmp_path / "notes.gguf"
    notes.write_text("keep me too")
    assert cli_main(["export", str(ckpt), "--out", str(mine)]) == 2
    assert "not an llmforge export" in capsys.readouterr().err
    assert cli_main(["export", str(ckpt), "--format", "gguf", "--out", str(notes)]) == 2
    assert "not GGUF" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me" and notes.read_text() == "keep me too"
    assert cli_main(["export", str(ckpt), "--format", "hf", "--type", "q8_0"]) == 2
    assert "--type q8_0: applies to --format gguf" in capsys.readouterr().err


def test_export_register_records_the_export_and_a_model_version_that_generates(tmp_path, tok, capsys, monkeypatch):
    from llmforge import tracking

    monkeypatch.setenv("LLMFORGE_MLRUNS", str(tmp_path / "mlruns"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ckpt, _ = make_checkpoint(tmp_path / "best.pt", tok)
    args = ["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf"), "--register", "tiny-llama"]
    assert cli_main(args) == 0
    assert "registered models:/tiny-llama/1" in capsys.readouterr().out
    c = tracking.client()
    (mv,) = c.search_model_versions("name = 'tiny-llama'")
    assert mv.tags["llmforge.dataset_fingerprint"] == "data-fp-1234" and mv.tags["llmforge.source_run"] == "run-5678"
    run = c.get_run(mv.run_id)
    assert run.data.tags["llmforge.stage"] == "export"
    files = {a.path for a in c.list_artifacts(mv.run_id, "export/hf")}
    assert {"export/hf/model.safetensors", "export/hf/config.json", "export/hf/tokenizer.json"} <= files
    # the registered model generates what the checkpoint generates (greedy)
    assert cli_main(["generate", "models:/tiny-llama/1", "--prompt", "def f", "--max-new-tokens", "12",
                     "--temperature", "0", "--device", "cpu"]) == 0
    from_registry = capsys.readouterr().out
    assert cli_main(["generate", str(ckpt), "--prompt", "def f", "--max-new-tokens", "12", "--temperature", "0",
                     "--device", "cpu"]) == 0
    assert capsys.readouterr().out == from_registry
    # the same export registered again finds its version
    assert cli_main(args) == 0 and "already there" in capsys.readouterr().out
