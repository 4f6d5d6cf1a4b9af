"""The export stage: a checkpoint as a Llama model, for Hugging Face ``transformers`` or llama.cpp.

``--format hf`` writes a directory that ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``
load without custom code: ``model.safetensors`` (or shards + ``model.safetensors.index.json``),
``config.json`` (``LlamaConfig``), ``generation_config.json``, the tokenizer (``tokenizer.model``,
``tokenizer.json``, ``tokenizer_config.json`` with the fine-tune's chat template,
``special_tokens_map.json``), a model card ``README.md`` with lineage, and ``llmforge.json``
(what was exported from what; the stage's "is it done?" record). ``--format gguf`` writes one
GGUF file for llama.cpp / ollama (f32, f16, bf16 or q8_0), carrying the same record in its
metadata. :func:`load_hf_export` reads an hf export back into a :class:`GPT`.

**Which models.** Llama is our model with ``mlp="swiglu"`` (gate/up/down), RMSNorm, rotary
positions, optional grouped-query attention, tied or untied head. A GELU MLP or QK-norm has no
Llama counterpart, so such a checkpoint is refused in one line before anything is written.

**Rotary convention.** :func:`llmforge.model.gpt.apply_rotary` turns each pair ``(x1[i], x2[i])``
(the two halves of a head) by ``-theta``; Hugging Face's ``rotate_half`` turns the same pairs by
``+theta``. With ``S`` = "negate the second half", ``R(-theta) = S R(+theta) S``, so Hugging
Face's rotation of ``S q`` is ``S`` times ours of ``q``, and since ``S`` is orthogonal the scores
``<S a, S b> = <a, b>`` are unchanged. So we negate the rows of the q and k projections that
produce each head's second half (:func:`_negate_second_half`) and get identical attention;
checkpoints keep their meaning. llama.cpp's rope turns adjacent pairs ``(x[2i], x[2i+1])`` (also
by ``+theta``), so the GGUF writer then interleaves the halves of each head's q/k rows as
llama.cpp's own ``convert_hf_to_gguf.py`` does for Llama (:func:`_interleave_halves`).

**Tokenizer.** ``tokenizer.model`` is our SentencePiece model as is (llama.cpp and sentencepiece
users read it). ``tokenizer.json`` is a ``tokenizers`` BPE built from it so that the fast
tokenizer gives exactly :meth:`Tokenizer.encode`'s ids: merges are every split of a piece into
two pieces, ranked by the piece's score (SentencePiece's BPE merges the best-scoring adjacent
pair), byte fallback on, no normaliser and no pre-tokeniser (our model has no dummy prefix and
identity normalisation), and the meta symbol ``▁`` written as the space it stands for, so a
literal ``▁`` in text is not in the vocabulary and falls back to its three bytes exactly as
:meth:`Tokenizer.encode` does. No BOS is added: llmforge starts a document after an EOS, so
``bos_token`` is the EOS token and a prompt is ``[eos_token_id] + encode(prompt)``. The one
difference: Hugging Face reads the literal text ``</s>`` as the EOS token, as every HF tokenizer
does with its special tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from pydantic import Field

from llmforge.config import Config
from llmforge.errors import CheckpointError, ConfigError, NotFound
from llmforge.model.checkpoint import checkpoint_tokenizer, find_checkpoint, load_checkpoint, sniff_kind
from llmforge.model.generate import _clean_state_dict, model_config_from_checkpoint
from llmforge.model.gpt import GPT, GPTConfig
from llmforge.pipeline.fsutil import (DIR_MODE, _fsync_dir, atomic_path, atomic_write_json, atomic_write_text,
                                      read_json, sha256_file)
from llmforge.pipeline.tokenizer import Tokenizer
from llmforge.stage import Stage

RECORD = "llmforge.json"  # what an hf export holds about itself (and the stage's completion record)
GGUF_RECORD_KEY = "llmforge.export"  # the same record inside a GGUF file's metadata
SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportConfig(Config):
    """What an export writes; ``dtype`` applies to ``hf``, ``type`` to ``gguf``."""

    format: Literal["hf", "gguf"] = Field("hf", description="hf: a Hugging Face Llama directory; gguf: one file "
                                          "for llama.cpp / ollama")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="hf: weight dtype")
    type: Literal["f32", "f16", "bf16", "q8_0"] = Field("f16", description="gguf: tensor type (q8_0: 8-bit "
                                                        "weights; norms stay f32)")
    max_shard_size: int = Field(5_000_000_000, gt=0, description="hf: bytes per safetensors file before the "
                                "weights are split into shards")

    def key_dict(self) -> dict[str, Any]:
        """Only the fields that change this format's output (``--dtype`` does not change a GGUF)."""
        d = super().key_dict()
        for name in (("type",) if self.format == "hf" else ("dtype", "max_shard_size")):
            d.pop(name)
        return d


class ExportOptions(Config):
    """``llmforge export``'s settings tree (``--set export.type=q8_0``)."""

    export: ExportConfig = Field(default_factory=ExportConfig)


# ---------------------------------------------------------------------------------------------
# our weights <-> Llama's


def check_exportable(cfg: GPTConfig, where: str | os.PathLike) -> None:
    """Refuse, in one line, a model that Llama cannot hold."""
    if cfg.mlp != "swiglu":
        raise ConfigError(f"{where}: a {cfg.mlp.upper()} MLP has no Llama equivalent (Llama uses SwiGLU); export "
                          "a model trained with --set model.mlp=swiglu")
    if cfg.qk_norm:
        raise ConfigError(f"{where}: QK-norm weights have no place in a Llama model; export a model trained "
                          "without --set model.qk_norm=true")
    extras = [f"{k}={v}" for k, v in (("value_embeds", cfg.value_embeds), ("ngram_buckets", cfg.ngram_buckets)) if v]
    if extras:
        raise ConfigError(f"{where}: {', '.join(extras)} has no place in a Llama model; export a model trained "
                          "without it")


def _negate_second_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Negate, in each head, the rows that produce the second half of its dims (q/k weights or
    biases); its own inverse (see the module docstring)."""
    w = w.reshape(n_heads, 2, -1, *w.shape[1:]).clone()
    w[:, 1] = -w[:, 1]
    return w.reshape(-1, *w.shape[3:])


def _interleave_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from ``[x1 | x2]`` (Hugging Face) to ``[x1[0], x2[0], x1[1], ...]`` (llama.cpp)."""
    return w.reshape(n_heads, 2, -1, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _layer_names(i: int) -> list[tuple[str, str]]:
    """(ours, Hugging Face's) parameter prefixes of layer ``i`` (q/k/v come from ``c_attn``)."""
    ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
    return [(ours + "ln_1", hf + "input_layernorm"), (ours + "attn.c_proj", hf + "self_attn.o_proj"),
            (ours + "ln_2", hf + "post_attention_layernorm"), (ours + "mlp.c_gate", hf + "mlp.gate_proj"),
            (ours + "mlp.c_fc", hf + "mlp.up_proj"), (ours + "mlp.c_proj", hf + "mlp.down_proj")]


def to_llama(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict as ``LlamaForCausalLM``'s (names, split q/k/v, Hugging Face's rotary sign)."""
    H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"],
           "model.norm.weight": state["transformer.ln_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layer):
        for ours, hf in _layer_names(i):
            for suffix in (".weight", ".bias"):
                if ours + suffix in state:
                    out[hf + suffix] = state[ours + suffix]
        for suffix in (".weight", ".bias"):
            qkv = state.get(f"transformer.h.{i}.attn.c_attn{suffix}")
            if qkv is None:
                continue
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D])
            attn = f"model.layers.{i}.self_attn."
            out[attn + "q_proj" + suffix] = _negate_second_half(q, H)
            out[attn + "k_proj" + suffix] = _negate_second_half(k, Hkv)
            out[attn + "v_proj" + suffix] = v
    return out


def from_llama(tensors: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_llama`: a ``LlamaForCausalLM`` state dict as ours."""
    H, Hkv = cfg.n_head, cfg.kv_heads
    out = {"transformer.wte.weight": tensors["model.embed_tokens.weight"],
           "transformer.ln_f.weight": tensors["model.norm.weight"],
           "lm_head.weight": tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])}
    for i in range(cfg.n_layer):
        for ours, hf in _layer_names(i):
            for suffix in (".weight", ".bias"):
                if hf + suffix in tensors:
                    out[ours + suffix] = tensors[hf + suffix]
        attn = f"model.layers.{i}.self_attn."
        for suffix in (".weight", ".bias"):
            if attn + "q_proj" + suffix in tensors:
                out[f"transformer.h.{i}.attn.c_attn{suffix}"] = torch.cat([
                    _negate_second_half(tensors[attn + "q_proj" + suffix], H),
                    _negate_second_half(tensors[attn + "k_proj" + suffix], Hkv),
                    tensors[attn + "v_proj" + suffix]])
    return out


def llama_config(cfg: GPTConfig, tok: Tokenizer, dtype: str) -> dict[str, Any]:
    """``config.json``. ``rope_theta`` is written both where transformers 5 reads it
    (``rope_parameters``) and where older readers (transformers 4, llama.cpp's converter) do."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": None, "torch_dtype": dtype,
    }


def gpt_config_from_llama(c: dict[str, Any], where: str) -> GPTConfig:
    """The GPTConfig of a Llama ``config.json`` (one of ours, or any plain Llama of this shape)."""
    if c.get("model_type") != "llama":
        raise CheckpointError(f"{where}: model_type {c.get('model_type')!r} is not llama")
    rope = c.get("rope_parameters") or {}
    if c.get("hidden_act", "silu") != "silu" or rope.get("rope_type", "default") != "default" or c.get("rope_scaling"):
        raise CheckpointError(f"{where}: only plain Llama models load (silu, unscaled rotary positions)")
    if c.get("attention_bias", False) != c.get("mlp_bias", False):
        raise CheckpointError(f"{where}: attention_bias and mlp_bias differ; llmforge models have both or neither")
    if c.get("head_dim", c["hidden_size"] // c["num_attention_heads"]) * c["num_attention_heads"] != c["hidden_size"]:
        raise CheckpointError(f"{where}: head_dim * num_attention_heads != hidden_size")
    kv = c.get("num_key_value_heads") or c["num_attention_heads"]
    return GPTConfig.load({
        "vocab_size": c["vocab_size"], "block_size": c["max_position_embeddings"], "n_layer": c["num_hidden_layers"],
        "n_head": c["num_attention_heads"], "n_kv_head": None if kv == c["num_attention_heads"] else kv,
        "n_embd": c["hidden_size"], "mlp": "swiglu", "mlp_hidden": c["intermediate_size"],
        "bias": c.get("attention_bias", False), "tie_embeddings": c.get("tie_word_embeddings", False),
        "rope_theta": rope.get("rope_theta", c.get("rope_theta", 10000.0)), "norm_eps": c.get("rms_norm_eps", 1e-6),
    }, source=where)


# ---------------------------------------------------------------------------------------------
# the tokenizer for Hugging Face


def _sp_pieces(proto: bytes) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every piece of a SentencePiece model (types as in its proto:
    1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)."""
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(proto)
    return [(p.piece, p.score, p.type) for p in m.pieces]


NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def tokenizer_json(tok: Tokenizer) -> str:
    """A ``tokenizers`` BPE that encodes exactly as :meth:`Tokenizer.encode` (module docstring)."""
    from tokenizers import AddedToken, Tokenizer as FastTokenizer, decoders, models

    pieces = _sp_pieces(tok.proto)
    vocab: dict[str, int] = {}
    mergeable: dict[str, tuple[float, int]] = {}
    for i, (piece, score, kind) in enumerate(pieces):
        text = piece.replace("\u2581", " ") if kind in (NORMAL, USER_DEFINED) else piece
        vocab[text] = i
        if kind in (NORMAL, USER_DEFINED):
            mergeable[text] = (score, i)
    ranked = []
    for text, (score, i) in mergeable.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, i, mergeable[left][1], left, right))
    ranked.sort()  # best score first; ties (never seen in BPE models) by piece id, then by split
    unk = next(p for p, _, kind in pieces if kind == UNKNOWN)
    fast = FastTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked], unk_token=unk,
                                    byte_fallback=True, fuse_unk=False))
    fast.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    fast.add_special_tokens([AddedToken(p, special=True, normalized=False)
                             for p, _, kind in pieces if kind in (UNKNOWN, CONTROL)])
    return fast.to_str(pretty=False)


def tokenizer_files(tok: Tokenizer, block_size: int, chat_template: str | None) -> dict[str, Any]:
    """The tokenizer files of an hf export: name -> bytes / JSON-able content."""
    eos = tok.sp.id_to_piece(tok.eos_id)
    unk = tok.sp.id_to_piece(tok.sp.unk_id())
    special = {"bos_token": eos, "eos_token": eos, "unk_token": unk}
    config: dict[str, Any] = {
        # the generic fast tokenizer, so transformers uses tokenizer.json as written instead of
        # rebuilding a Llama pipeline (which adds a dummy prefix and a BOS)
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "pad_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": block_size,
    }
    if chat_template:
        config["chat_template"] = chat_template
    return {"tokenizer.model": tok.proto, "tokenizer.json": tokenizer_json(tok),
            "tokenizer_config.json": config, "special_tokens_map.json": special}


# ---------------------------------------------------------------------------------------------
# writers


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order, cut into groups of at most ``max_bytes`` (a bigger tensor goes alone)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += n
    return groups


def write_safetensors(dest: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> None:
    """``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + the index transformers reads."""
    from safetensors.torch import save_file

    groups = _shards(tensors, max_bytes)
    if len(groups) == 1:
        with atomic_path(dest / "model.safetensors") as tmp:
            save_file(groups[0], str(tmp), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, group in enumerate(groups, 1):
        name = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        with atomic_path(dest / name) as tmp:
            save_file(group, str(tmp), metadata={"format": "pt"})
        weight_map.update({t: name for t in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write_json(dest / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_hf(dest: Path, model: GPT, tok: Tokenizer, cfg: ExportConfig, chat_template: str | None,
             card: str) -> None:
    """Everything of an hf export but its record, into ``dest``."""
    dtype = HF_DTYPES[cfg.dtype]
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in to_llama(model.state_dict(), model.config).items()}
    write_safetensors(dest, tensors, cfg.max_shard_size)
    atomic_write_json(dest / "config.json", llama_config(model.config, tok, cfg.dtype))
    atomic_write_json(dest / "generation_config.json", {
        "bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id})
    for name, content in tokenizer_files(tok, model.config.block_size, chat_template).items():
        if isinstance(content, bytes):
            with atomic_path(dest / name) as tmp:
                tmp.write_bytes(content)
        elif isinstance(content, str):
            atomic_write_text(dest / name, content)
        else:
            atomic_write_json(dest / name, content)
    atomic_write_text(dest / "README.md", card)


# GGUF names of LlamaForCausalLM's tensors (llama.cpp's LLM_ARCH_LLAMA)
_GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
               "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _gguf_name(hf_name: str) -> str:
    stem, suffix = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, i, rest = stem.split(".", 3)
        return f"blk.{i}.{_GGUF_NAMES[rest]}.{suffix}"
    return f"{_GGUF_NAMES[stem]}.{suffix}"


def gguf_tensors(model: GPT) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor) in llama.cpp's layout: Hugging Face's weights with each q/k
    head's halves interleaved."""
    cfg = model.config
    for name, t in to_llama(model.state_dict(), cfg).items():
        t = t.detach().float()
        if ".q_proj." in name:
            t = _interleave_halves(t, cfg.n_head)
        elif ".k_proj." in name:
            t = _interleave_halves(t, cfg.kv_heads)
        yield _gguf_name(name), t


def pack_gguf_tensor(data: np.ndarray, typ: str) -> tuple[np.ndarray, Any]:
    """``data`` as a GGUF of ``typ`` (f32, f16, bf16, q8_0) stores it: (the packed array, its
    ``GGMLQuantizationType``). Norms and biases stay f32, as llama.cpp's converter keeps them;
    rows that do not fill whole q8_0 blocks fall back to f16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    want = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[typ] if data.ndim > 1 else Q.F32
    try:
        return gguf.quants.quantize(data, want), want
    except gguf.QuantError:
        return gguf.quants.quantize(data, Q.F16), Q.F16


def write_gguf(path: Path, model: GPT, tok: Tokenizer, cfg: ExportConfig, record: dict[str, Any],
               chat_template: str | None, name: str) -> None:
    """One GGUF file (llama architecture, SentencePiece vocabulary) written with the ``gguf`` package."""
    import gguf

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[cfg.type]
    m = model.config
    w = gguf.GGUFWriter(path=None, arch="llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(m.block_size)
    w.add_embedding_length(m.n_embd)
    w.add_block_count(m.n_layer)
    w.add_feed_forward_length(m.hidden_dim)
    w.add_head_count(m.n_head)
    w.add_head_count_kv(m.kv_heads)
    w.add_rope_dimension_count(m.head_dim)
    w.add_rope_freq_base(m.rope_theta)
    w.add_layer_norm_rms_eps(m.norm_eps)
    w.add_vocab_size(m.vocab_size)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # vocabulary: SentencePiece pieces with their scores and kinds, padded to the model's rows
    pieces = _sp_pieces(tok.proto)
    kinds = {NORMAL: gguf.TokenType.NORMAL, UNKNOWN: gguf.TokenType.UNKNOWN, CONTROL: gguf.TokenType.CONTROL,
             USER_DEFINED: gguf.TokenType.USER_DEFINED, UNUSED: gguf.TokenType.UNUSED, BYTE: gguf.TokenType.BYTE}
    tokens = [p.encode("utf-8") for p, _, _ in pieces]
    scores = [float(s) for _, s, _ in pieces]
    types = [kinds[k] for _, _, k in pieces]
    for i in range(len(pieces), m.vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tok.eos_id)  # a document starts after an EOS (see the module docstring)
    w.add_eos_token_id(tok.eos_id)
    w.add_unk_token_id(tok.sp.unk_id())
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    if chat_template:
        w.add_chat_template(chat_template)
    w.add_string(GGUF_RECORD_KEY, json.dumps(record, sort_keys=True))

    for gname, t in gguf_tensors(model):
        packed, kind = pack_gguf_tensor(t.numpy(), cfg.type)
        w.add_tensor(gname, np.ascontiguousarray(packed), raw_dtype=kind)

    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_gguf_record(path: Path) -> dict[str, Any] | None:
    """The export record in a GGUF file's metadata, or None (not ours, or damaged)."""
    try:
        import gguf

        field = gguf.GGUFReader(path).get_field(GGUF_RECORD_KEY)
        return None if field is None else json.loads(bytes(field.parts[-1]).decode("utf-8"))
    except Exception:  # a truncated or foreign file: not a finished export of ours
        return None


# ---------------------------------------------------------------------------------------------
# the model card


def _eval_results(checkpoint: Path, sha256: str) -> list[dict[str, Any]]:
    """Results of ``llmforge evaluate`` on exactly this checkpoint, from ``<dir>/eval/``."""
    out = []
    for p in sorted((checkpoint.parent / "eval").glob(f"{checkpoint.stem}-*.json")):
        with contextlib.suppress(OSError, ValueError):
            r = read_json(p)
            if isinstance(r, dict) and r.get("checkpoint_sha256") == sha256 and r.get("metrics"):
                out.append({"file": p.name, "data": r.get("data_dir"), "metrics": r["metrics"]})
    return out


def model_card(record: dict[str, Any], chat_template: str | None) -> str:
    m, lin = record["model"], record.get("lineage") or {}
    params = record["parameters"]
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [llmforge, llama]", "---", "",
        f"# {record['name']}", "",
        f"A {params / 1e6:.1f}M-parameter Llama-architecture model trained with llmforge and exported from "
        f"`{record['checkpoint']}` (step {record.get('step')}).", "",
        "## Lineage", "",
        f"- checkpoint sha256: `{record['checkpoint_sha256']}`",
        f"- dataset fingerprint: `{lin.get('dataset_fingerprint')}`",
        f"- tokenizer fingerprint: `{record['tokenizer_fingerprint']}` (SentencePiece BPE, {record['tokenizer_vocab']} "
        "pieces, byte fallback)",
        f"- MLflow run: `{lin.get('mlflow_run_id')}`",
    ]
    if lin.get("base_checkpoint"):
        lines.append(f"- fine-tuned from: `{lin['base_checkpoint']}`")
    lines += ["", "## Shape", "",
              f"{m['n_layer']} layers, width {m['n_embd']}, {m['n_head']} heads ({m.get('n_kv_head') or m['n_head']} "
              f"key/value), SwiGLU MLP, context {m['block_size']} tokens, vocabulary {m['vocab_size']}, "
              f"{'tied' if m['tie_embeddings'] else 'untied'} LM head.", ""]
    evals = record.get("evaluations") or []
    if evals:
        lines += ["## Evaluation", "", "| data | metric | value |", "|---|---|---|"]
        for e in evals:
            for k, v in sorted(e["metrics"].items()):
                lines.append(f"| `{e['data']}` | {k} | {v:.4f} |")
        lines.append("")
    lines += ["## Use", "",
              "A document starts after an end-of-text token, and the tokenizer adds none, so prompt with "
              "`[tokenizer.eos_token_id] + tokenizer(prompt).input_ids`:", "", "```python",
              "import torch", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(PATH)", "model = AutoModelForCausalLM.from_pretrained(PATH)",
              "ids = torch.tensor([[tok.eos_token_id] + tok('Once upon a time').input_ids])",
              "print(tok.decode(model.generate(ids, max_new_tokens=50)[0]))", "```", ""]
    if chat_template:
        lines += ["It was fine-tuned with a chat template (in `tokenizer_config.json`): use "
                  "`tok.apply_chat_template(messages, add_generation_prompt=True)`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the stage


@contextlib.contextmanager
def _new_dir(path: Path) -> Iterator[Path]:
    """Build a directory under a temp name; on success it replaces ``path`` (an earlier export)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, DIR_MODE)
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}.tmp")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ExportStage(Stage):
    """Export one checkpoint. Output: ``<checkpoint dir>/export/<stem>-hf-<key>/`` or
    ``<checkpoint dir>/export/<stem>-<type>-<key>.gguf`` unless ``out`` names another place.

    Building the stage loads the checkpoint and refuses, in one line and before anything is
    written, a model Llama cannot hold, a checkpoint without a tokenizer and an ``out`` that is
    not an earlier export (it is never overwritten)."""

    name = "export"

    def __init__(self, checkpoint: str | os.PathLike, config: ExportConfig | None = None, *,
                 out: str | os.PathLike | None = None):
        self.config = config or ExportConfig()
        self.checkpoint = find_checkpoint(checkpoint)
        ckpt = load_checkpoint(self.checkpoint)
        for unused in ("optimizer_state", "scheduler_state", "rng_state", "data_state"):
            ckpt.pop(unused, None)  # not exported: free the memory now
        self.model_config = model_config_from_checkpoint(ckpt, self.checkpoint)
        check_exportable(self.model_config, self.checkpoint)
        self.tokenizer = checkpoint_tokenizer(ckpt, self.checkpoint)
        if self.tokenizer.vocab_size > self.model_config.vocab_size:
            raise CheckpointError(f"{self.checkpoint}: embedded tokenizer has {self.tokenizer.vocab_size} pieces but "
                                  f"the model only {self.model_config.vocab_size}")
        self._ckpt = ckpt
        self._out = Path(out) if out is not None else None
        self._check_out()

    def _check_out(self) -> None:
        p, fmt = self.out_dir, self.config.format
        if not p.exists():
            return
        if fmt == "hf" and not p.is_dir():
            raise ConfigError(f"--out {p}: a file; an hf export is a directory")
        if fmt == "hf" and any(p.iterdir()) and not (p / RECORD).is_file():
            raise ConfigError(f"--out {p}: a directory that is not an llmforge export; give a new or empty one")
        if fmt == "gguf" and p.is_dir():
            raise ConfigError(f"--out {p}: a directory; a gguf export is one file (e.g. --out model.gguf)")
        if fmt == "gguf" and p.stat().st_size and read_gguf_record(p) is None:
            what = "a GGUF file not written by llmforge" if sniff_kind(p) == "gguf" else "a file that is not GGUF"
            raise ConfigError(f"--out {p}: {what}; it is never overwritten, give a new path")

    def inputs(self) -> Any:
        return [sha256_file(self.checkpoint)]

    @property
    def out_dir(self) -> Path:
        """The export: a directory (hf) or a file (gguf)."""
        if self._out is not None:
            return self._out
        stem = f"{self.checkpoint.stem}-{'hf' if self.config.format == 'hf' else self.config.type}-{self.key}"
        return self.checkpoint.parent / "export" / (stem if self.config.format == "hf" else stem + ".gguf")

    def completed(self) -> dict[str, Any] | None:
        p = self.out_dir
        if self.config.format == "gguf":
            record = read_gguf_record(p) if p.is_file() else None
            if not record or record.get("key") != self.key:
                return None
            return {**record, "bytes": p.stat().st_size, "out": str(p)}
        try:
            record = read_json(p / RECORD)
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("key") != self.key:
            return None
        files = record.get("files") or {}
        ok = all((p / f).is_file() and (p / f).stat().st_size == n for f, n in files.items())
        return {**record, "out": str(p)} if ok and files else None

    def _record(self, model: GPT) -> dict[str, Any]:
        ckpt, sha = self._ckpt, self.inputs()[0]
        return {
            "format": "llmforge.export", "key": self.key, "export": self.config.to_dict(),
            "name": f"{self.checkpoint.parent.name}-{self.checkpoint.stem}",
            "checkpoint": str(self.checkpoint.resolve()), "checkpoint_sha256": sha,
            "step": ckpt.get("step"), "val_loss": ckpt.get("val_loss"), "lineage": ckpt.get("lineage") or {},
            "model": self.model_config.to_dict(), "parameters": model.num_params(non_embedding=False),
            "tokenizer_fingerprint": self.tokenizer.fingerprint, "tokenizer_vocab": self.tokenizer.vocab_size,
            "evaluations": _eval_results(self.checkpoint, sha),
        }

    def run(self) -> dict[str, Any]:
        t0 = time.time()
        with torch.device("meta"):  # no random init of weights that are replaced at once
            model = GPT(self.model_config)
        try:  # strict: the checkpoint's tensors must be exactly the model's, in name and shape
            model.load_state_dict(_clean_state_dict(self._ckpt["model_state"]), assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"{self.checkpoint}: model weights do not match its own config: {e}") from e
        record = self._record(model)
        chat_template = (self._ckpt.get("extra") or {}).get("chat_template")
        out = self.out_dir
        if self.config.format == "hf":
            with _new_dir(out) as tmp:
                write_hf(tmp, model, self.tokenizer, self.config, chat_template, model_card(record, chat_template))
                record["files"] = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
                record["bytes"] = sum(record["files"].values())
                record["seconds"] = round(time.time() - t0, 3)
                atomic_write_json(tmp / RECORD, record)  # last: its presence means complete
        else:
            record["seconds"] = None  # the record goes inside the file, before its size is known
            with atomic_path(out) as tmp:
                write_gguf(tmp, model, self.tokenizer, self.config, record, chat_template, record["name"])
            record["bytes"] = out.stat().st_size
            record["seconds"] = round(time.time() - t0, 3)
        return {**record, "out": str(out)}


# ---------------------------------------------------------------------------------------------
# reading an hf export back


def is_hf_export(path: str | os.PathLike) -> bool:
    """A directory with a ``config.json`` (what ``load_hf_export`` takes)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def load_hf_export(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """``(model, tokenizer, meta)`` from an hf export directory (any plain Llama directory with
    a SentencePiece ``tokenizer.model`` works too): the model in float32, eval mode, on
    ``device``; ``meta`` as :func:`llmforge.model.generate.load_for_inference` gives it (``path,
    step, val_loss, config, lineage, extra`` with the chat template) plus ``export`` (the record)."""
    from safetensors.torch import load_file

    from llmforge.model.runtime import resolve_device

    root = Path(path)
    if not is_hf_export(root):
        raise NotFound(f"{root}: not a Hugging Face model directory (no config.json)")
    try:
        hf_cfg = read_json(root / "config.json")
    except ValueError as e:
        raise CheckpointError(f"{root / 'config.json'}: not valid JSON ({e})") from None
    cfg = gpt_config_from_llama(hf_cfg, str(root / "config.json"))
    if (root / SAFETENSORS_INDEX).is_file():
        files = sorted(set(read_json(root / SAFETENSORS_INDEX)["weight_map"].values()))
    elif (root / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise NotFound(f"{root}: no model.safetensors (or {SAFETENSORS_INDEX})")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(root / f)))
    if not (root / "tokenizer.model").is_file():
        raise NotFound(f"{root}: no tokenizer.model (llmforge needs the SentencePiece model)")
    tok = Tokenizer.load(root / "tokenizer.model")
    model = GPT(cfg)
    try:
        model.load_state_dict({k: v.float() for k, v in from_llama(tensors, cfg).items()})
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{root}: weights do not match config.json: {e}") from None
    dev = resolve_device(device) if isinstance(device, str) else device
    model.to(dev).eval()
    record = read_json(root / RECORD) if (root / RECORD).is_file() else {}
    chat_template = None
    if (root / "tokenizer_config.json").is_file():
        chat_template = read_json(root / "tokenizer_config.json").get("chat_template")
    meta = {"path": str(root), "step": record.get("step"), "val_loss": record.get("val_loss"),
            "config": {"model": cfg.to_dict()}, "lineage": record.get("lineage") or {},
            "extra": {"chat_template": chat_template} if chat_template else {}, "export": record}
    return model, tok, meta
