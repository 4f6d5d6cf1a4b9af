"""LoRA (low-rank adaptation) for our GPT: a frozen ``nn.Linear`` plus a trainable ``B @ A``.

``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T`` with ``A`` (r x in) drawn like a Linear's
weight and ``B`` (out x r) zero, so an adapted model starts out exactly equal to its base.
Only ``A`` and ``B`` train; after training :func:`merge_lora` folds ``(alpha / r) * B @ A`` into
``W`` and puts plain ``nn.Linear`` layers back, so the merged model's state dict loads into a
plain :class:`model.gpt.GPT` and every other tool (generate, evaluate, export) never sees LoRA.

Why not ``peft``: peft's LoRA targets Hugging Face ``transformers`` modules and configs, and
would add a dependency plus a wrapper model class around ours. Our GPT is made of plain
``nn.Linear`` layers, so the whole technique is the ~80 lines below, and the saved checkpoint
stays our own format.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmforge.errors import ConfigError

DEFAULT_TARGETS = ("attn", "mlp")


class LoRALinear(nn.Module):
    """Wrap ``base`` (kept, frozen) with a rank-``r`` trainable update scaled by ``alpha / r``."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r}")
        self.base = base
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        for p in self.base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # the base weight, for code that inspects ``.weight``
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling
        return self.base(x) + update

    def product(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x', W')`` with ``x' @ W'.T == self(x)`` (the same dropout draw): ``x'`` is ``x`` with the
        scaled adapter input ``(alpha / r) dropout(x) A^T`` appended (``r`` more columns) and ``W'`` is
        ``W`` with ``B`` appended. A loss that applies the head matrix itself, chunk by chunk
        (``model/loss.py``'s ``head_loss``), so takes a LoRA head as it takes a plain one, and the
        gradients reach ``A`` through ``x'`` and ``B`` through ``W'``. The base layer's bias, if it has
        one, is not in the product (an LM head has none)."""
        adapter_in = F.linear(self.dropout(x), self.lora_A) * self.scaling
        return torch.cat([x, adapter_in.to(x.dtype)], -1), torch.cat([self.base.weight, self.lora_B], 1)

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight is ``W + (alpha / r) B A`` (same device and dtype)."""
        b = self.base
        out = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None, device=b.weight.device, dtype=b.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            out.weight.copy_((b.weight.float() + delta).to(b.weight.dtype))
            if b.bias is not None:
                out.bias.copy_(b.bias)
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def _is_target(name: str, targets: Iterable[str]) -> bool:
    """``name`` is a dotted module path; a target matches any path component exactly, so
    ``"attn"`` picks every Linear under an ``attn`` module and ``"c_fc"`` picks just those."""
    parts = name.split(".")
    return any(t in parts for t in targets)


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Iterable[str] = DEFAULT_TARGETS,
) -> list[str]:
    """Replace each targeted ``nn.Linear`` with a :class:`LoRALinear` and freeze everything else.

    Returns the names of the adapted layers; raises if ``targets`` matched none (a typo would
    otherwise train nothing). Call before building the optimizer: only LoRA params require grad.
    """
    targets = tuple(targets)
    chosen = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _is_target(n, targets)]
    if not chosen:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"LoRA targets {targets} match no nn.Linear layer; the model has {linears[:8]}...")
    names: dict[int, list[str]] = {}  # a weight shared by several modules (a tied head) has several names
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    for name in chosen:
        tied = [n for n in names[id(model.get_submodule(name).weight)] if n != f"{name}.weight"]
        if tied:
            raise ConfigError(f"LoRA target {name}: its weight is tied to {tied[0]}, and merging an adapter into it "
                              f"would change that too; leave {name} out of the targets (or adapt a model with an "
                              "untied head)")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r=r, alpha=alpha, dropout=dropout))
    return chosen


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place; the model is plain ``nn.Linear`` again."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, m.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Just the adapter weights (``...lora_A`` / ``...lora_B``): a small file to share or resume."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
