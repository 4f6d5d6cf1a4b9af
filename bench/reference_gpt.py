"""A plain reference GPT training step: the baseline llmforge's engine is measured against.

The same model as ``model/gpt.py`` with its default shape (RMSNorm pre-norm blocks, rotary
positions in llmforge's convention, GELU MLP, head tied to the embedding), written the way a
first implementation would be: attention as explicit matmuls with a causal mask and softmax, the
loss as one cross-entropy, and one step as forward, backward, clip, ``torch.optim.AdamW`` with its
default (non-fused) implementation, bf16 autocast on CUDA. No torch.compile, no fused kernels, no
prefetching. :func:`load_llmforge_state` takes llmforge's weights, so both compute the same loss on
the same batch (``tests/test_reference_step.py`` checks it) and the speed ratio is a fair one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RefBlock(nn.Module):
    def __init__(self, d: int, n_head: int, hidden: int, eps: float):
        super().__init__()
        self.n_head, self.eps = n_head, eps
        self.norm1 = nn.Parameter(torch.ones(d))
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.Parameter(torch.ones(d))
        self.fc = nn.Linear(d, hidden, bias=False)
        self.out = nn.Linear(hidden, d, bias=False)

    def rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = self.n_head
        q, k, v = self.qkv(self.rms(x, self.norm1)).split(C, dim=2)
        q, k, v = (t.view(B, T, h, C // h).transpose(1, 2) for t in (q, k, v))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // h)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.rms(x, self.norm2))))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class ReferenceGPT(nn.Module):
    def __init__(self, vocab: int, block: int, n_layer: int, n_head: int, d: int, hidden: int,
                 eps: float = 1e-5, theta: float = 10000.0):
        super().__init__()
        self.eps = eps
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([RefBlock(d, n_head, hidden, eps) for _ in range(n_layer)])
        self.norm = nn.Parameter(torch.ones(d))
        inv = 1.0 / (theta ** (torch.arange(0, d // n_head, 2, dtype=torch.float32) / (d // n_head)))
        ang = torch.outer(torch.arange(block, dtype=torch.float32), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        x = self.wte(idx)
        for b in self.blocks:
            x = b(x, self.cos[:T], self.sin[:T])
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm
        logits = x @ self.wte.weight.t()  # the head is the embedding
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def from_config(cfg) -> ReferenceGPT:
    """A reference model of the shape of a llmforge GPTConfig (default architecture only)."""
    if getattr(cfg, "mlp", "gelu") != "gelu" or (getattr(cfg, "n_kv_head", None) or cfg.n_head) != cfg.n_head \
            or not cfg.tie_embeddings or cfg.bias or getattr(cfg, "qk_norm", False):
        raise ValueError("the reference step covers the default architecture (GELU, full attention, tied, no bias)")
    return ReferenceGPT(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                        int(cfg.mlp_ratio * cfg.n_embd), cfg.norm_eps, cfg.rope_theta)


def load_llmforge_state(ref: ReferenceGPT, state: dict[str, torch.Tensor]) -> ReferenceGPT:
    """Copy llmforge's GPT weights into the reference model (names mapped one to one)."""
    own = {"wte.weight": state["transformer.wte.weight"], "norm": state["transformer.ln_f.weight"]}
    for i in range(len(ref.blocks)):
        p = f"transformer.h.{i}."
        own.update({f"blocks.{i}.norm1": state[p + "ln_1.weight"], f"blocks.{i}.qkv.weight": state[p + "attn.c_attn.weight"],
                    f"blocks.{i}.proj.weight": state[p + "attn.c_proj.weight"], f"blocks.{i}.norm2": state[p + "ln_2.weight"],
                    f"blocks.{i}.fc.weight": state[p + "mlp.c_fc.weight"], f"blocks.{i}.out.weight": state[p + "mlp.c_proj.weight"]})
    ref.load_state_dict(own)
    return ref


def reference_step(model: ReferenceGPT, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """One plain optimizer step; returns the loss (a tensor, not synced)."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()
