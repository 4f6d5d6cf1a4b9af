"""The GPT: a decoder-only transformer in one file you can hold in your head.

Token embedding -> N pre-norm blocks (RMSNorm, causal self-attention with rotary positions
through ``scaled_dot_product_attention``, RMSNorm, GELU MLP) -> final RMSNorm -> LM head tied
to the embedding. Shaped after karpathy/nanoGPT ``model.py``; rotary positions and RMSNorm
instead of learned positions and LayerNorm, and a :class:`KVCache` for fast generation.

Options for the Llama shape (``model/export.py`` writes such a model as a Llama checkpoint):
``mlp="swiglu"`` (``c_proj(silu(c_gate(x)) * c_fc(x))``), ``n_kv_head`` < ``n_head``
(grouped-query attention: heads share keys/values in groups, and the KV cache holds only
``n_kv_head`` heads) and ``tie_embeddings=False``. ``qk_norm`` (RMSNorm on each head's q and
k before rotary, as in the modded-nanogpt speedrun) is for experiments; Llama has no such
weights, nor the lookups that cost no matrix products: ``ngram_buckets`` (a hashed embedding of
the previous token(s) and the token, added to the input) and ``value_embeds`` (a token embedding
added to the attention values of the first blocks, modded-nanogpt's). Every default is the
original GPT shape, so old checkpoints load unchanged.

Presets live in ``configs/model/<name>.yaml`` and hold model fields only; ``vocab_size`` comes
from the tokenizer / shard manifest at build time (``load_preset("tiny", vocab_size=8000)``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, create_model, model_validator

from llmforge.config import Config, added_later, read_yaml
from llmforge.errors import ConfigError, NotFound, did_you_mean

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


class GPTConfig(Config):
    """The model's shape. ``vocab_size`` comes from the tokenizer, the rest from a preset."""

    vocab_size: int = Field(32000, gt=0, description="token ids the model knows (set from the tokenizer)")
    block_size: int = Field(1024, gt=0, description="context length: longest sequence the model sees")
    n_layer: int = Field(12, gt=0, description="transformer blocks")
    n_head: int = Field(12, gt=0, description="attention heads per block")
    n_embd: int = Field(768, gt=0, description="width of the residual stream")
    n_kv_head: int | None = Field(None, gt=0, description="key/value heads for grouped-query attention; "
                                  "must divide n_head (none = n_head: plain multi-head attention)")
    mlp: Literal["gelu", "swiglu"] = Field("gelu", description="MLP kind: gelu (GPT-2) or swiglu (Llama; "
                                           "what the Hugging Face / GGUF export needs)")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden size as a multiple of n_embd (swiglu: 2/3 of "
                             "that, rounded up to a multiple of 64, so it costs what gelu does)")
    mlp_hidden: int | None = Field(None, gt=0, description="MLP hidden size, overriding mlp_ratio (none = "
                                   "from mlp_ratio)")
    qk_norm: bool = Field(False, description="RMSNorm on each head's queries and keys before rotary "
                          "(modded-nanogpt; not exportable to Llama)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on embeddings, attention and MLP outputs")
    bias: bool = Field(False, description="biases in Linear layers (GPT-2 had them; they buy nothing)")
    tie_embeddings: bool = Field(True, description="the LM head is the token embedding matrix")
    init: Literal["gpt2", "nanochat"] = added_later("gpt2", "initial weights: gpt2 (every weight N(0, 0.02), "
                                                    "residual projections / sqrt(2 n_layer)) or nanochat (untied "
                                                    "embedding N(0, 1) and head N(0, 0.001), input matrices "
                                                    "U(+-sqrt(3 / n_embd)), residual projections zero)")
    value_embeds: int = added_later(0, "layers (the first ones) whose attention values add an embedding of the "
                                    "token, a table per layer (modded-nanogpt's value embeddings; not Llama)", ge=0)
    ngram_buckets: int = added_later(0, "hash buckets of each n-gram embedding table: an embedding of (previous "
                                     "token, token), and of longer n-grams up to ngram_order, added to the input "
                                     "(0 = none; not Llama)", ge=0)
    ngram_order: int = added_later(2, "longest n-gram embedded (2 = bigrams; 3 adds a trigram table)", ge=2, le=8)
    rope_theta: float = Field(10000.0, gt=0, description="rotary position base")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon")

    @model_validator(mode="after")
    def _check_heads(self) -> "GPTConfig":
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"head size {self.n_embd // self.n_head} must be even for rotary embeddings")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_head``, or ``n_head`` when unset."""
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        """The MLP's hidden width. SwiGLU has three matrices where GELU has two, so Llama's rule
        takes 2/3 of the ratio (and rounds up to a multiple of 64 for fast matmuls)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return int(self.mlp_ratio * self.n_embd)
        return 64 * math.ceil(2 / 3 * self.mlp_ratio * self.n_embd / 64)


def _optional_fields(exclude: set[str]) -> dict[str, Any]:
    return {name: (Optional[f.annotation], Field(None, description=f.description))
            for name, f in GPTConfig.model_fields.items() if name not in exclude}


# The ``model:`` section of a recipe: a preset plus any GPTConfig field (None = the preset's).
# Generated from GPTConfig so each field's help text is written once.
ModelSpec = create_model(
    "ModelSpec", __base__=Config,
    preset=(str, Field("tiny", description="model preset: a name in configs/model or a YAML path")),
    **_optional_fields({"vocab_size"}),
)
ModelSpec.__doc__ = "A model preset and the GPTConfig fields that override it (vocab_size comes from the data)."


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name_or_path: str) -> Path:
    """``configs/model/<name>.yaml``, or a YAML path; a wrong name says which ones exist."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise NotFound(f"{p}: model preset file not found")
        return p
    p = PRESET_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        raise NotFound(did_you_mean(name_or_path, preset_names(), "model preset"))
    return p


def load_preset(name_or_path: str, **overrides: Any) -> GPTConfig:
    """A GPTConfig from a preset plus overrides (``None`` values are ignored)."""
    p = preset_path(name_or_path)
    data = read_yaml(p, "a model preset")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return GPTConfig.load(data, source=str(p))


def resolve_model(spec: Any, vocab_size: int, block_size: int | None = None) -> GPTConfig:
    """The GPTConfig of a ``model:`` section for a tokenizer of ``vocab_size`` ids; a training
    sequence length (``block_size``) sets a new model's context unless the section sets it."""
    fields = {k: v for k, v in spec.model_dump().items() if k != "preset" and v is not None}
    if block_size is not None and "block_size" not in fields:
        fields["block_size"] = block_size
    try:
        return load_preset(spec.preset, vocab_size=vocab_size, **fields)
    except ConfigError as e:
        raise ConfigError(f"model: {e}") from None


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys/values for every layer, ``[B, H, max_len, D]`` each (``H`` is the number
    of key/value heads, fewer than the query heads under grouped-query attention), plus a position.

    ``GPT.forward(idx, kv_cache=cache)`` writes the new keys/values of layer ``i`` at
    ``[pos, pos + T)`` and, after the last layer, advances ``pos`` by ``T``.
    """

    def __init__(self, batch_size: int, n_layer: int, n_head: int, max_len: int, head_dim: int,
                 *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        self.last_tokens: torch.Tensor | None = None  # [B, <=8]: the last tokens fed, for n-gram embeddings

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` (``[B, H, T, D]``) at ``pos`` and return all keys/values so far."""
        t = k.size(2)
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: position {end} > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, tokens: torch.Tensor) -> None:
        """Move past ``tokens`` (``[B, T]``, just fed), remembering the last few for n-gram embeddings."""
        self.pos += tokens.size(1)
        seen = tokens if self.last_tokens is None else torch.cat([self.last_tokens, tokens], dim=1)
        self.last_tokens = seen[:, -8:]

    def reset(self) -> None:
        self.pos = 0
        self.last_tokens = None


# ---------------------------------------------------------------------------------------------
# modules


def rotary_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[length, head_dim/2]`` for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1[i], x2[i]) of the two halves of the head dim by position-dependent angles."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


# Up to this context, causal attention in half precision on a CPU is two matmuls and a softmax rather
# than torch's CPU flash kernel, whose backward in bfloat16 is slow: forward and backward of one layer
# of 32 x 4 heads x 128 positions x 32 dims took 17 ms with the kernel and 4.6 ms by matmuls, 16 x 256
# 14.4 / 8.4 ms, 8 x 512 23 / 17 ms, 4 x 1,024 26 / 82 ms (2 threads, AVX-512 bf16). In float32
# the kernel is as fast or faster (9.3 / 10.8 ms at 128), so float32 keeps it.
MATMUL_ATTENTION_MAX_T = 512


def _attention_by_matmuls(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and \
        q.size(-2) <= MATMUL_ATTENTION_MAX_T


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)`` written out:
    ``softmax(q k^T / sqrt(d))`` over the keys at or before each query (with dropout on those
    weights), times ``v``; ``q`` is ``[B, H, T, D]``, ``k`` and ``v`` ``[B, H_kv, T, D]`` (grouped
    query heads share a key/value head)."""
    T, groups = q.size(-2), q.size(1) // k.size(1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q * q.size(-1) ** -0.5) @ k.mT
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    if dropout:
        weights = F.dropout(weights, dropout)
    return weights @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        # one matmul for q (n_head heads), k and v (n_kv_head heads each): [q | k | v] rows
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * self.n_kv_head) * self.head_dim,
                                bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        if kw.get("is_causal") and _attention_by_matmuls(q):
            return causal_attention(q, k, v, dropout)
        if self.n_kv_head != self.n_head:  # query heads share each key/value head in groups
            kw["enable_gqa"] = True
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, **kw)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None = None, ve: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.size()
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([C, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        if ve is not None:
            v = v + ve
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is None:
            y = self._sdpa(q, k, v, is_causal=True)
        else:
            pos = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # a float32 cache under bf16 autocast
            if T == 1:  # one new token sees every cached position
                y = self._sdpa(q, k, v)
            elif pos == 0:  # prefill of an empty cache: the plain causal case
                y = self._sdpa(q, k, v, is_causal=True)
            else:  # chunk after a prefix: query i (absolute pos+i) sees keys j <= pos+i
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
                y = self._sdpa(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GELU: ``c_proj(gelu(c_fc(x)))``; SwiGLU: ``c_proj(silu(c_gate(x)) * c_fc(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.hidden_dim
        if config.mlp == "swiglu":
            self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.c_gate(x)) * self.c_fc(x) if hasattr(self, "c_gate") else F.gelu(self.c_fc(x))
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None = None, ve: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cos, sin, kv_cache, ve)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    _LOOKUPS = ("value_embeds.", "ngram_embeds.")  # embedding tables besides wte: gathers, not matmuls

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.RMSNorm(config.n_embd, eps=config.norm_eps),
        ))
        if config.value_embeds:
            self.value_embeds = nn.ModuleList(nn.Embedding(config.vocab_size, config.kv_heads * config.head_dim)
                                              for _ in range(min(config.value_embeds, config.n_layer)))
        if config.ngram_buckets:
            self.ngram_embeds = nn.ModuleList(nn.Embedding(config.ngram_buckets, config.n_embd)
                                              for _ in range(config.ngram_order - 1))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        cos, sin = rotary_tables(config.head_dim, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # recomputed, never checkpointed
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        if config.init == "nanochat":
            self._init_nanochat()
            return
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @torch.no_grad()
    def _init_nanochat(self) -> None:
        """karpathy/nanochat's initialisation: every block starts as the identity (its residual
        projections are zero), the embedding at unit scale and the head nearly silent, so the
        first steps learn the bigram path and each block adds to it as its output grows."""
        bound = math.sqrt(3.0 / self.config.n_embd)  # uniform with std 1/sqrt(n_embd)
        if not self.config.tie_embeddings:  # a tied embedding is the head too: it keeps N(0, 0.02)
            nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for name, p in self.transformer.h.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                nn.init.uniform_(p, -bound, bound)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. ``non_embedding`` leaves out the embedding *lookup* table; when it is
        tied to the LM head it still counts (its matmul is real compute), as nanoGPT counts."""
        n = sum(p.numel() for p in self.parameters())  # parameters() de-duplicates tied weights
        if non_embedding:  # lookups only: the n-gram and value embedding tables too
            n -= sum(p.numel() for name, p in self.named_parameters() if name.startswith(self._LOOKUPS))
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B as in nanoGPT's
        ``estimate_mfu``: 6N for the matmuls plus 12*L*H*Q*T for attention over sequences of
        ``seq_len`` tokens (default: the full context)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * (seq_len or cfg.block_size)

    def make_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache sized for this model (``max_len`` defaults to ``block_size``)."""
        p = self.lm_head.weight
        return KVCache(batch_size, self.config.n_layer, self.config.kv_heads, max_len or self.config.block_size,
                       self.config.head_dim, device=p.device, dtype=p.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                kv_cache: KVCache | None = None, hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and (with ``targets``) the cross-entropy, ignoring target ``-100``.

        - with targets: logits ``[B, T, V]`` and the mean loss over scored targets, in float32
          (the trainer and the scorer apply the head chunk by chunk instead: ``model/loss.py``);
        - no targets, no cache: logits of the last position only, ``[B, 1, V]``;
        - with ``hidden``: the head's input ``[B, T, n_embd]`` instead of logits, for a loss that
          applies the head itself (``model/loss.py``'s ``head_loss``);
        - with ``kv_cache``: logits ``[B, T, V]`` for the tokens fed, which sit at positions
          ``kv_cache.pos ...``; their keys/values are appended and ``pos`` advances by ``T``.
        """
        B, T = idx.size()
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
        cos = self.rope_cos[start:start + T]
        sin = self.rope_sin[start:start + T]
        x = self.embed(idx, kv_cache)
        for block, ve in zip(self.transformer.h, self.value_embeddings(idx)):
            x = block(x, cos, sin, kv_cache, ve)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.advance(idx)
        if hidden:
            return x, None
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-100)
            return logits, loss
        if kv_cache is not None:
            return self.lm_head(x), None
        return self.lm_head(x[:, [-1], :]), None  # inference: only the last position is needed

    def embed(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The first block's input: the token embedding, plus the n-gram embeddings when set."""
        x = self.transformer.wte(idx)
        if self.config.ngram_buckets:
            for table, ids in zip(self.ngram_embeds, self.ngram_ids(idx, kv_cache)):
                x = x + table(ids)
        return self.transformer.drop(x)

    def value_embeddings(self, idx: torch.Tensor) -> list[torch.Tensor | None]:
        """Each block's value embedding of the tokens (``None`` for blocks without one)."""
        ves = [table(idx) for table in self.value_embeds] if self.config.value_embeds else []
        return ves + [None] * (self.config.n_layer - len(ves))

    def ngram_ids(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> list[torch.Tensor]:
        """For n = 2 .. ngram_order, the hash bucket of the n tokens ending at each position;
        before the first token of a sequence come markers (vocab_size) that no token id equals."""
        n = self.config.ngram_order
        before = torch.full_like(idx[:, :1], self.config.vocab_size).expand(-1, n - 1)
        if kv_cache is not None and kv_cache.pos > 0:  # generation: the tokens fed before these
            before = torch.cat([before, kv_cache.last_tokens], 1)[:, -(n - 1):]
        seq = torch.cat([before, idx], 1)
        T, buckets = idx.size(1), self.config.ngram_buckets
        h, out = seq[:, n - 1:], []
        for k in range(1, n):  # fold in the token k places back
            h = (h * 1000003 + seq[:, n - 1 - k:n - 1 - k + T] * (2 * k + 1) + k) % buckets
            out.append(h)
        return out

    def configure_optimizers(self, weight_decay: float, lr: float, betas: tuple[float, float],
                             device_type: str, muon: bool = False, embedding_lr: float | None = None,
                             head_lr: float | None = None, bf16: bool = False) -> torch.optim.Optimizer:
        """AdamW with weight decay on >=2-D weights only (matrices and embeddings, not norms or
        biases); fused (on CUDA and CPU).

        ``embedding_lr`` is the peak lr of the token embedding (and of the head when it is tied),
        ``head_lr`` that of an untied head; both default to ``lr``. Each group's ``lr`` is its
        peak, so a schedule that multiplies every group's initial lr keeps their ratios; their
        weight decay is scaled so that ``lr * weight_decay`` (the shrink per step) is the matrices'.

        With ``muon=True`` the 2-D matrices inside the blocks go to :class:`Muon` (with
        ``adjust_lr_fn="match_rms_adamw"`` so the same ``lr`` and decay apply) and everything else
        (embedding/head, norms, biases) to AdamW. Either way ONE optimizer object comes back
        (:class:`MuonWithAdamW` in the Muon case) whose ``param_groups``, ``step``, ``zero_grad``
        and ``state_dict`` behave like any torch optimizer, so LR schedulers work unchanged.
        ``bf16`` (a run in bfloat16 autocast) runs Muon's iteration in bfloat16 on a CPU too.
        """
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}  # a tied head appears once, as wte
        fused = device_type in ("cuda", "cpu")  # one kernel per step; and it can skip a non-finite step
        # a group of its own only when its lr differs, so the default layout (and old checkpoints'
        # optimizer state) stays [matrices, vectors]
        lookups = [n for n in params if n.startswith(self._LOOKUPS)]  # tables, learning like wte
        special = {n: g_lr for n, g_lr in (("transformer.wte.weight", embedding_lr), ("lm_head.weight", head_lr),
                                           *((n, embedding_lr) for n in lookups))
                   if n in params and g_lr is not None and g_lr != lr}

        def in_muon(name: str, p: torch.Tensor) -> bool:
            return muon and p.dim() == 2 and name.startswith("transformer.h.")

        # decoupled decay shrinks a weight by lr * weight_decay per step: keep that product at the
        # matrices' rate, so a 50x embedding lr does not mean a 50x pull towards zero
        groups = [{"params": [params[n]], "weight_decay": weight_decay * lr / g_lr, "lr": g_lr}
                  for n, g_lr in special.items()]
        rest = {n: p for n, p in params.items() if n not in special and not in_muon(n, p)}
        groups += [{"params": [p for p in rest.values() if p.dim() >= 2], "weight_decay": weight_decay, "lr": lr},
                   {"params": [p for p in rest.values() if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]
        adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
        if not muon:
            return adamw
        if not hasattr(torch.optim, "Muon"):
            raise RuntimeError(f"muon=True needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}")
        matrices = [p for n, p in params.items() if in_muon(n, p)]
        muon_opt = Muon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw", bf16=bf16)
        return MuonWithAdamW(muon_opt, adamw)


def newton_schulz(g: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration on a stack of matrices ``[n, rows, cols]``: each
    comes back with its singular values pushed to about 1 (0.5-1.5, by design), computed in
    ``dtype`` and returned in it. Keller Jordan's iteration, batched: one product per step for
    every matrix of a shape."""
    a, b, c = coefficients
    x = g.to(dtype)
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.mT


def _closure_loss(closure: Any) -> Any:
    """An optimizer's ``step(closure)``: the loss the closure computes, with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


_MUON_BASE: Any = getattr(torch.optim, "Muon", torch.optim.Optimizer)  # torch.optim.Muon: torch >= 2.9


class Muon(_MUON_BASE):
    """``torch.optim.Muon``, with its Newton-Schulz iteration run in a precision the device is fast
    at: bfloat16 on CUDA, as torch does, and in a run that trains in bfloat16 autocast (``bf16=True``,
    as ``configure_optimizers`` passes it: on an AMD EPYC with AVX-512 bf16, 4.1 against 15.2 ms per step
    for the matrices of a 4x128 SwiGLU model), float32 elsewhere; decided by the run's settings, not
    by timing the machine, so a resumed run repeats the same arithmetic. torch's iteration is
    bfloat16 everywhere, and a CPU without bfloat16 matrix units runs it ~13x slower than float32:
    963 ms against 76 ms per step for the same matrices on an AVX2 machine, where the model's own
    step took ~350 ms. Matrices of one shape go through the iteration
    together (one batched product each). Parameter groups and state are torch's
    (``momentum_buffer``), so optimizer state moves between the two unchanged.
    """

    def __init__(self, *args: Any, bf16: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bf16 = bf16  # the iteration in bfloat16 off CUDA too (not optimizer state: a property of the run)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            by_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                by_shape.setdefault((tuple(p.shape), p.device), []).append((p, update))
            for (shape, device), items in by_shape.items():
                dtype = torch.bfloat16 if device.type == "cuda" or self.bf16 else torch.float32
                ortho = newton_schulz(torch.stack([u for _, u in items]), group["ns_steps"],
                                      group["ns_coefficients"], group["eps"], dtype)
                rows, cols = shape
                if group["adjust_lr_fn"] == "match_rms_adamw":  # Moonshot: the update's RMS matches AdamW's
                    step_lr = 0.2 * math.sqrt(max(rows, cols)) * lr
                else:  # Keller Jordan's original
                    step_lr = lr * math.sqrt(max(1.0, rows / cols))
                for (p, _), o in zip(items, ortho):
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(o.to(p.dtype), alpha=-step_lr)
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for hidden matrices + AdamW for the rest, presented as one optimizer.

    ``param_groups`` are the two inner optimizers' own group dicts (Muon's first), so setting
    ``group["lr"]`` (by hand or by an ``LRScheduler``) reaches the optimizer that uses it.
    ``state_dict()`` is ``{"muon": ..., "adamw": ...}``.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw
        super().__init__([p for g in muon.param_groups + adamw.param_groups for p in g["params"]], {})
        self.param_groups = muon.param_groups + adamw.param_groups

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = _closure_loss(closure)
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
