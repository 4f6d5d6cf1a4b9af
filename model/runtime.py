"""Where and how tensors run: device, precision, distributed helpers, peak FLOPs. One home for
what train, generate, evaluate and the benchmarks all need (nanochat's ``common.py``).

- :func:`resolve_device` turns ``auto`` / ``cpu`` / ``cuda[:N]`` / ``mps`` into a device and says,
  in one line, when the asked-for device is not there (a CPU build of torch asked for ``cuda``);
- :func:`resolve_dtype` and :func:`autocast`: bf16 autocast on CUDA by default, fp32 elsewhere;
  :func:`cpu_bf16_speedup`: how much faster this CPU multiplies bfloat16 matrices than float32 ones;
- :class:`DistInfo` and :func:`all_reduce` for DDP under ``torchrun``;
- :func:`peak_flops` for MFU.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass
from typing import ContextManager

import torch

from llmforge.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# dense bf16 tensor-core peak, FLOP/s, matched against torch.cuda.get_device_name()
# (first match wins, so the more specific names come first)
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("B100", 1.75e15),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / NVL
    ("H800", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A6000", 155e12),
    ("A40", 150e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("MI300X", 1307e12),
    ("MI250", 362e12),
]


@dataclass
class DistInfo:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        return cls(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                   world_size=int(os.environ.get("WORLD_SIZE", 1)))


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def check_device(name: str) -> None:
    """Fail early, in one line, when ``name`` is not a device this machine has."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"--device {name}: {why}; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not _mps_available():
        raise ConfigError(f"--device {name}: MPS is not available on this machine; use --device cpu (or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: unsupported device type; use auto, cpu, cuda, cuda:N or mps")


def resolve_device(name: str = "auto", dist: DistInfo | None = None) -> torch.device:
    """``auto`` -> cuda > mps > cpu; under DDP ``cuda`` means this rank's local GPU."""
    check_device(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if device.index is None:
            local = dist.local_rank if dist is not None and dist.enabled else torch.cuda.current_device()
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA (autocast), fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


FAST_BF16_SPEEDUP = 1.5  # a CPU at least this much faster at bf16 matmuls than at float32 ones is "fast at bf16"


@functools.cache
def cpu_bf16_speedup() -> float:
    """float32 matmul time over bfloat16 matmul time on this CPU (torch's CPU matmul, this
    process' threads): ~4.5 on a CPU with AVX-512 bf16 that oneDNN drives at full rate (an AMD
    EPYC: 965 against 212 GFLOP/s on two cores), below 1 where bfloat16 is emulated or its casts
    cost more than the product saves (an Intel Xeon with AVX-512 bf16: 0.6 on 256 x 128 x 8,192). Timed once
    per process on a 256 x 128 x 256 product, best of 5, a few milliseconds. A timing: for advice
    (a line when a run asks for bf16 on a CPU slower than ``FAST_BF16_SPEEDUP``), never to choose
    arithmetic, which a resumed run must repeat exactly."""
    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(256, 128).to(dtype), torch.randn(128, 256).to(dtype)
        a @ b  # noqa: B018 - warm-up (the first call picks and builds the kernel)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b  # noqa: B018
            times.append(time.perf_counter() - t0)
        return min(times)
    return best(torch.float32) / max(best(torch.bfloat16), 1e-9)


def autocast(device: torch.device, dtype: torch.dtype) -> ContextManager:
    """Mixed precision for the forward pass (a no-op in fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Per-device dense bf16 peak (FLOP/s) for MFU, or None when unknown (then no MFU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None


def all_reduce(t: torch.Tensor, op: str = "avg") -> torch.Tensor:
    """In-place all-reduce across ranks (``avg``, ``sum`` or ``max``); a no-op when alone."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        if op == "avg":
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
            t /= tdist.get_world_size()
        else:
            tdist.all_reduce(t, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX}[op])
    return t
