"""The training loop: pretraining over token shards, and the loop fine-tuning reuses.

``train(cfg, data_dir, out_dir)`` builds the GPT of a preset (or starts from the weights of
``init_from``), then runs: linear warm-up and cosine decay to ``min_lr``, gradient
accumulation, clipping (the pre-clip grad norm is recorded), bf16 autocast on CUDA, optional
``torch.compile``, DDP under ``torchrun``. A step whose loss or grad norm is not finite is
skipped and counted; ``max_bad_steps`` of them in a row stop the run with
:class:`TrainingDiverged`, leaving the last good checkpoint in place.

Everything a bit-identical resume needs goes through :class:`model.checkpoint.CheckpointManager`
(model, optimizer, schedule position, data state, RNG states, config, lineage, tokenizer) every
``ckpt_every`` steps, at the end, and when SIGINT/SIGTERM or ``max_minutes`` ends the run early.
Running ``train`` again on the same ``out_dir`` resumes from its newest checkpoint and keeps
logging to the same MLflow run. Batches come from :class:`model.data.ShardBatcher` unless the
caller plugs in any :class:`model.data.BatchSource` (fine-tuning with loss masks does).

``python -m model.train --config cfg.json --data DIR --out DIR`` is the worker entry point
that ``torchrun`` starts (see :func:`launch`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from llmforge.model.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from llmforge.model.data import IGNORE_INDEX, BatchSource, ShardBatcher, ShardEvalSource
from llmforge.model.gpt import GPT, GPTConfig, load_preset
from llmforge.pipeline.fsutil import atomic_path, atomic_write_json, atomic_write_text, read_json
from llmforge.pipeline.shards import Dataset

SUMMARY_NAME = "summary.json"
EVAL_STEP_BASE = 1 << 40  # a plugged BatchSource without eval_batches() is evaluated at these steps
DEFAULT_PROMPTS = ["The ", "def ", "In the beginning", "Once upon a time"]

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


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


@dataclass
class TrainConfig:
    """Everything that shapes a training run. ``model`` overrides fields of the preset."""

    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # e.g. {"n_layer": 2, "dropout": 0.1}
    block_size: int | None = None  # None: the preset's block_size
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 2000  # optimizer steps; also the horizon of the cosine schedule
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still recorded)
    optimizer: str = "adamw"  # "adamw" | "muon"
    eval_every: int = 250  # 0: only at the end
    eval_tokens: int | None = 262_144  # target tokens of the val split per evaluation; None: all
    eval_iters: int = 20  # batches per evaluation for a plugged val source without eval_batches()
    log_every: int = 10
    ckpt_every: int = 500  # 0: only at the end
    keep_last: int = 3
    seed: int = 1337
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N" | "mps"
    dtype: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 elsewhere) | "float32" | "bfloat16" | "float16"
    compile: bool = False
    max_bad_steps: int = 10  # consecutive non-finite steps tolerated before giving up
    max_minutes: float | None = None  # stop (with a checkpoint) after this much wall time
    sample_every: int = 0  # 0: samples only at the end
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    sample_tokens: int = 64
    sample_top_k: int | None = 40  # None: greedy
    sample_temperature: float = 0.8
    peak_tflops: float | None = None  # per-device bf16 peak for MFU when the GPU is not in the table
    log_checkpoints: bool = True  # copy the final and best checkpoints into the MLflow run
    train_split: str = "train"
    val_split: str = "val"

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.sample_prompts = list(self.sample_prompts)

    def validate(self) -> None:
        problems = []
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "keep_last", "max_bad_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "sample_every", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            problems.append(f"min_lr must be in [0, lr] (got {self.min_lr} with lr {self.lr})")
        if self.optimizer not in ("adamw", "muon"):
            problems.append(f"optimizer must be 'adamw' or 'muon' (got {self.optimizer!r})")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            problems.append(f"dtype must be auto, float32, bfloat16 or float16 (got {self.dtype!r})")
        if self.max_minutes is not None and self.max_minutes <= 0:
            problems.append(f"max_minutes must be > 0 (got {self.max_minutes})")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "train config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier on the base lr for 0-based ``step``: linear warm-up, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.final_lr / cfg.lr
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# devices, precision, distributed


@dataclass
class DistInfo:
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
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
        )


def resolve_device(name: str, dist: DistInfo) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


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


def _all_reduce(t: torch.Tensor, op: str = "avg") -> torch.Tensor:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        if op == "avg":
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
            t /= tdist.get_world_size()
        else:
            tdist.all_reduce(t, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX}[op])
    return t


# ---------------------------------------------------------------------------------------------
# evaluation and samples


def _eval_batches(source: Any, iters: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(source, "eval_batches"):
        return source.eval_batches()
    # a plain BatchSource: a fixed set of batches, drawn at "steps" that training never reaches
    return (source.get_batch(EVAL_STEP_BASE + i, 0) for i in range(iters))


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, source: Any, device: torch.device, autocast: Any, iters: int = 20
) -> float:
    """Mean cross-entropy over every non-ignored target of the source (summed across ranks)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in _eval_batches(source, iters):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        n = (y != IGNORE_INDEX).sum()
        if n == 0:
            continue
        with autocast():
            _, loss = model(x, y)
        total[0] += loss.double() * n
        total[1] += n
    model.train(was_training)
    _all_reduce(total, "sum")
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


@torch.no_grad()
def sample_texts(model: GPT, tokenizer_bytes: bytes | None, cfg: TrainConfig, device: torch.device) -> str:
    """Continuations of the fixed prompts, decoded. Sampling uses its own seeded generator
    (``model.generate``), so the training RNG stream, and with it resume, is untouched."""
    if not tokenizer_bytes or not cfg.sample_prompts:
        return ""
    from llmforge.model.generate import generate
    from llmforge.pipeline.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_bytes)
    was_training = model.training
    out = []
    for prompt in cfg.sample_prompts:
        ids = torch.tensor([tok.encode(prompt)[-model.config.block_size:]], dtype=torch.long, device=device)
        seq = generate(model, ids, cfg.sample_tokens, temperature=cfg.sample_temperature if cfg.sample_top_k else 0.0,
                       top_k=cfg.sample_top_k, seed=cfg.seed, eos_id=tok.eos_id)
        new = [t for t in seq[0, ids.size(1):].tolist() if t != tok.eos_id]
        out.append(f"### {prompt!r}\n{prompt}{tok.decode(new)}\n")
    model.train(was_training)
    return "\n".join(out)


def plot_loss_curve(run_id: str, path: Path) -> Path | None:
    """train/val loss against step from the run's MLflow history, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    client = mlflow.MlflowClient()
    fig, ax = plt.subplots(figsize=(7, 4))
    any_data = False
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        points = {m.step: m.value for m in client.get_metric_history(run_id, key)}  # last write wins
        if points:
            steps = sorted(points)
            ax.plot(steps, [points[s] for s in steps], style, label=key, markersize=3)
            any_data = True
    if not any_data:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# the loop


class _StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks after each step (main thread only)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a Prefect worker thread)
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing this step, then checkpointing", flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)


def _resolve_init(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory's best.pt (else its newest ckpt-*.pt)."""
    p = Path(path)
    if p.is_dir():
        if (p / "best.pt").is_file():
            return p / "best.pt"
        found = sorted(p.glob("ckpt-*.pt"))
        if found:
            return found[-1]
        raise FileNotFoundError(f"{p}: no checkpoint (ckpt-*.pt or best.pt) to initialise from")
    if not p.is_file():
        raise FileNotFoundError(f"init_from checkpoint not found: {p}")
    return p


@dataclass
class _Start:
    """Where a run starts: its own newest checkpoint (resume), a base checkpoint's weights
    (init_from), or a fresh preset; with the model config and tokenizer that go with it."""

    model_cfg: GPTConfig
    resume: dict | None
    resume_path: Path | None
    base: dict | None
    base_path: Path | None
    tokenizer_bytes: bytes | None
    tokenizer_fingerprint: str | None


def _starting_point(cfg: TrainConfig, dataset: Dataset | None, data_dir: Any, out_dir: Path, dist: DistInfo,
                    init_from: str | os.PathLike | None) -> _Start:
    """Resume > init_from > fresh. Rank 0 picks the checkpoint to resume; all ranks load it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    resume, resume_path = None, None
    if dist.is_main:  # the newest checkpoint that loads (a damaged newest one is skipped, kept)
        for _, path in reversed(CheckpointManager(out_dir, keep_last=cfg.keep_last).checkpoints()):
            try:
                resume, resume_path = load_checkpoint(path, map_location="cpu"), path
                break
            except CheckpointError as e:
                print(f"warning: skipping unreadable checkpoint: {e}", file=sys.stderr, flush=True)
    if dist.enabled:
        import torch.distributed as tdist

        box = [str(resume_path) if resume_path else None]
        tdist.broadcast_object_list(box, src=0)
        resume_path = Path(box[0]) if box[0] else None
        if resume_path is not None and not dist.is_main:
            resume = load_checkpoint(resume_path, map_location="cpu")
    if resume is not None:
        if resume["config"].get("train", {}).get("seed", cfg.seed) != cfg.seed:
            raise ValueError(f"{resume_path}: checkpoint was trained with seed "
                             f"{resume['config']['train']['seed']}, this config has seed {cfg.seed}")
    base = None
    base_path = None
    if init_from is not None:
        base_path = _resolve_init(init_from)
        base = load_checkpoint(base_path, map_location="cpu")

    tokenizer_bytes: bytes | None = None
    tok_fp = None
    if dataset is not None:
        tokenizer_bytes = dataset.tokenizer_path.read_bytes()
        tok_fp = dataset.manifest["tokenizer"].get("fingerprint")
    if base is not None:
        base_tok_fp = base.get("lineage", {}).get("tokenizer_fingerprint")
        if tok_fp and base_tok_fp and base_tok_fp != tok_fp:
            raise ValueError(
                f"{base_path}: model was trained with tokenizer {base_tok_fp} but {data_dir} is tokenized "
                f"with {tok_fp}; token ids would mean different things (re-tokenize with the model's tokenizer)")
        if tokenizer_bytes is None and base.get("tokenizer") is not None:
            tokenizer_bytes = base["tokenizer"].cpu().numpy().tobytes()
        tok_fp = tok_fp or base_tok_fp
    if tokenizer_bytes is None and resume is not None and resume.get("tokenizer") is not None:
        tokenizer_bytes = resume["tokenizer"].cpu().numpy().tobytes()
    if resume is not None:
        model_cfg = GPTConfig.from_dict(resume["config"]["model"], source=str(resume_path))
    elif base is not None:
        model_cfg = GPTConfig.from_dict({**base["config"]["model"], **cfg.model}, source=str(base_path))
    else:
        model_cfg = load_preset(cfg.preset, vocab_size=dataset.vocab_size, **{
            **({"block_size": cfg.block_size} if cfg.block_size else {}), **cfg.model})
    if dataset is not None and dataset.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"{data_dir}: tokenizer has {dataset.vocab_size} tokens but the model's vocab_size "
                         f"is {model_cfg.vocab_size}")

    return _Start(model_cfg, resume, resume_path, base, base_path, tokenizer_bytes, tok_fp)


def train(
    cfg: TrainConfig,
    data_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    init_from: str | os.PathLike | None = None,
    batcher: BatchSource | Callable[[int, int, torch.device], BatchSource] | None = None,
    val_batcher: Any = None,
    experiment: str = "llmforge",
    parent_run_id: str | None = None,
    run_name: str | None = None,
    prepare_model: Callable[[GPT], None] | None = None,
    lineage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (or resume training) and return a summary dict.

    - ``data_dir``: a token dataset (``pipeline.shards``); may be None when ``batcher`` is given
      and ``init_from`` supplies the model config and tokenizer.
    - ``batcher`` / ``val_batcher``: a :class:`~model.data.BatchSource` (or a factory
      ``(rank, world_size, device) -> BatchSource``) and an eval source (``eval_batches()`` or
      a BatchSource); defaults read the dataset's train / val splits.
    - ``init_from``: start from this checkpoint's weights (file, or run directory: its best.pt
      or newest checkpoint), with a fresh optimizer. Ignored when ``out_dir`` already has a
      checkpoint: then the run resumes from that.
    - ``prepare_model``: called on the model after initial weights are loaded and before the
      optimizer is built (e.g. to add LoRA adapters); only parameters that still require grad
      are optimised.
    - ``lineage``: extra lineage entries recorded in checkpoints and MLflow params.
    """
    cfg.validate()
    dist = DistInfo.from_env()
    device = resolve_device(cfg.device, dist)
    own_group = False
    if dist.enabled:
        import torch.distributed as tdist

        if not tdist.is_initialized():
            tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            own_group = True
    try:
        return _train(cfg, data_dir, Path(out_dir), dist, device, init_from=init_from, batcher=batcher,
                      val_batcher=val_batcher, experiment=experiment, parent_run_id=parent_run_id,
                      run_name=run_name, prepare_model=prepare_model, extra_lineage=lineage or {})
    finally:
        if own_group:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _train(
    cfg: TrainConfig,
    data_dir: str | os.PathLike | None,
    out_dir: Path,
    dist: DistInfo,
    device: torch.device,
    *,
    init_from: str | os.PathLike | None,
    batcher: Any,
    val_batcher: Any,
    experiment: str,
    parent_run_id: str | None,
    run_name: str | None,
    prepare_model: Callable[[GPT], None] | None,
    extra_lineage: dict[str, Any],
) -> dict[str, Any]:
    from llmforge.pipeline import tracking

    t_start = time.time()
    dataset = Dataset.open(data_dir) if data_dir is not None else None
    if dataset is None and (batcher is None or init_from is None):
        raise ValueError("train() needs data_dir (a token dataset), or both batcher and init_from")

    start = _starting_point(cfg, dataset, data_dir, out_dir, dist, init_from)
    resume, base, model_cfg, tokenizer_bytes = start.resume, start.base, start.model_cfg, start.tokenizer_bytes
    block_size = cfg.block_size or model_cfg.block_size
    if block_size > model_cfg.block_size:
        raise ValueError(f"block_size {block_size} exceeds the model's context of {model_cfg.block_size}")

    # --- model, optimizer ----------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and every (re)start
    model = GPT(model_cfg)
    if base is not None:
        model.load_state_dict(base["model_state"])
    if prepare_model is not None:
        prepare_model(model)
    if resume is not None:
        model.load_state_dict(resume["model_state"])
    model.to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, cfg.betas, device.type,
                                           muon=cfg.optimizer == "muon")
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not params:
        raise ValueError("no parameter requires grad: nothing to train")
    dtype = resolve_dtype(cfg.dtype, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step = 0
    bad_steps = 0
    run_id = None
    best_val = None
    last_loss = float("nan")
    val_loss = None
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer_state"])
        step = int(resume["step"])
        sched = resume.get("scheduler_state") or {}
        bad_steps = int(sched.get("bad_steps", 0))
        if sched.get("scaler"):
            scaler.load_state_dict(sched["scaler"])
        run_id = resume["lineage"].get("mlflow_run_id")
        best_val = resume.get("extra", {}).get("best_val_loss")
        last_loss = float(resume.get("extra", {}).get("train_loss") or float("nan"))
        val_loss = resume.get("val_loss")

    # --- data ----------------------------------------------------------------------------------
    if batcher is None:
        batcher = ShardBatcher(dataset, cfg.train_split, block_size, cfg.batch_size, seed=cfg.seed,
                               rank=dist.rank, world_size=dist.world_size, device=device)
    elif callable(batcher) and not hasattr(batcher, "get_batch"):
        batcher = batcher(dist.rank, dist.world_size, device)
    if val_batcher is None and dataset is not None and cfg.val_split in dataset.splits():
        val_batcher = ShardEvalSource(dataset, cfg.val_split, block_size, cfg.batch_size, cfg.eval_tokens,
                                      device=device, rank=dist.rank, world_size=dist.world_size)
    elif callable(val_batcher) and not (hasattr(val_batcher, "get_batch") or hasattr(val_batcher, "eval_batches")):
        val_batcher = val_batcher(dist.rank, dist.world_size, device)
    if resume is not None and resume.get("data_state"):
        batcher.load_state_dict(resume["data_state"])

    # --- wrappers: compile, DDP ----------------------------------------------------------------
    raw_model = model
    eval_model: nn.Module = model
    if cfg.compile:
        model = eval_model = torch.compile(model)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    lineage = {
        "dataset_fingerprint": dataset.fingerprint if dataset is not None else None,
        "dataset_dir": str(Path(data_dir).resolve()) if data_dir is not None else None,
        "tokenizer_fingerprint": start.tokenizer_fingerprint,
        "base_checkpoint": str(start.base_path) if start.base_path else None,
        **extra_lineage,
    }
    if resume is not None:
        lineage = {**resume["lineage"], **{k: v for k, v in lineage.items() if v is not None}}
    config_record = {"model": model_cfg.to_dict(), "train": cfg.to_dict()}
    manager = CheckpointManager(out_dir, keep_last=cfg.keep_last, tokenizer=tokenizer_bytes) if dist.is_main else None
    tokens_per_step = cfg.batch_size * block_size * cfg.grad_accum * dist.world_size
    if hasattr(batcher, "batch_size") and hasattr(batcher, "block_size"):
        tokens_per_step = batcher.batch_size * batcher.block_size * cfg.grad_accum * dist.world_size
    flops_per_token = raw_model.flops_per_token()
    peak = peak_flops(device, cfg.peak_tflops)

    # a finished run re-run: nothing to do (every rank loaded the same checkpoint step)
    if step >= cfg.max_steps and (out_dir / SUMMARY_NAME).is_file():
        summary = read_json(out_dir / SUMMARY_NAME)
        if summary.get("step") == step:
            if dist.is_main:
                print(f"{out_dir}: already trained to step {step}; nothing to do")
            return summary

    run_ctx = (tracking.run(run_name or f"train-{model_cfg.n_layer}x{model_cfg.n_embd}", experiment=experiment,
                            run_id=run_id, parent_run_id=parent_run_id, tags={"llmforge.stage": "train"})
               if dist.is_main else contextlib.nullcontext(None))
    status = "completed"
    last_norm = float("nan")
    tok_s = 0.0
    mfu = None
    ckpt_path: Path | None = None
    with run_ctx as mlrun, _StopFlag() as stop:
        import mlflow

        if mlrun is not None:
            run_id = mlrun.info.run_id
            lineage["mlflow_run_id"] = run_id
            if resume is None:
                tracking.log_params({
                    "model": {**model_cfg.to_dict(), "params": raw_model.num_params(),
                              "flops_per_token": flops_per_token},
                    "train": cfg.to_dict(),
                    "data": {"block_size": block_size, "tokens_per_step": tokens_per_step,
                             "world_size": dist.world_size, "device": str(device), "dtype": str(dtype),
                             "batcher": type(batcher).__name__},
                    "lineage": lineage,
                })
            else:
                mlflow.set_tag("llmforge.resumed_from_step", str(step))
            print(f"training {raw_model.num_params() / 1e6:.2f}M params on {device} ({dtype}, world {dist.world_size}),"
                  f" {tokens_per_step} tokens/step, steps {step}->{cfg.max_steps}; MLflow run {run_id}", flush=True)

        def save(at_step: int, v_loss: float | None) -> Path | None:
            if manager is None:
                return None
            return manager.save(
                at_step,
                model_state=raw_model.state_dict(),
                optimizer_state=optimizer.state_dict(),
                scheduler_state={"step": at_step, "lr_factor": lr_factor(at_step, cfg), "bad_steps": bad_steps,
                                 "scaler": scaler.state_dict() if scaler.is_enabled() else None},
                data_state=batcher.state_dict(),
                rng_state=capture_rng_state(),
                config=config_record,
                lineage=lineage,
                extra={"best_val_loss": best_val, "train_loss": last_loss},
                val_loss=v_loss,
            )

        if resume is not None:
            restore_rng_state(resume["rng_state"])
            resume = None  # free the host copy of the weights/optimizer before training
        model.train()
        consecutive_bad = 0
        window_tokens, window_time = 0, 0.0
        start_step = step
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            factor = lr_factor(step, cfg)
            for g, base_lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base_lr * factor
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = batcher.get_batch(step, micro)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = micro == cfg.grad_accum - 1 or not dist.enabled
                with (contextlib.nullcontext() if sync else model.no_sync()), autocast():
                    _, loss = model(x, y)
                    loss = loss / cfg.grad_accum
                scaler.scale(loss).backward()
                loss_sum += loss.detach()
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            stats = _all_reduce(torch.stack([loss_sum.float(), norm.float().to(device)]), "avg")
            last_loss, last_norm = float(stats[0]), float(stats[1])
            finite = math.isfinite(last_loss) and (math.isfinite(last_norm) or scaler.is_enabled())
            if finite:
                scaler.step(optimizer)
                consecutive_bad = 0
            else:
                bad_steps += 1
                consecutive_bad += 1
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_time += time.perf_counter() - t0
            window_tokens += tokens_per_step

            if not finite and dist.is_main:
                print(f"step {step}: non-finite loss {last_loss} / grad norm {last_norm}: update skipped "
                      f"({consecutive_bad} in a row, {bad_steps} in all)", flush=True)
            if consecutive_bad >= cfg.max_bad_steps:
                msg = (f"stopping at step {step}: {consecutive_bad} consecutive steps with non-finite loss or "
                       f"gradient norm (loss {last_loss}, grad norm {last_norm}); the model diverged. Lower the "
                       f"learning rate (now {cfg.lr}) or raise warmup_steps. The last good checkpoint is "
                       f"{manager.latest() if manager else 'on rank 0'}")
                if mlrun is not None:
                    mlflow.log_metric("bad_steps", bad_steps, step=step)
                    mlflow.set_tag("llmforge.status", "diverged")
                raise TrainingDiverged(msg)

            if step % cfg.log_every == 0 or step == cfg.max_steps or step == start_step + 1:
                tok_s = window_tokens / max(window_time, 1e-9)
                mfu = tok_s * flops_per_token / (peak * dist.world_size) if peak else None
                window_tokens, window_time = 0, 0.0
                if mlrun is not None:
                    metrics = {"train/loss": last_loss, "lr": cfg.lr * factor, "grad_norm": last_norm,
                               "tokens_per_s": tok_s, "bad_steps": bad_steps}
                    if mfu is not None:
                        metrics["mfu"] = mfu
                    mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)
                    print(f"step {step:>6}/{cfg.max_steps} | loss {last_loss:.4f} | lr {cfg.lr * factor:.2e} | "
                          f"grad norm {last_norm:.3f} | {tok_s:,.0f} tok/s"
                          + (f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""), flush=True)

            evaluated = None
            if val_batcher is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
                evaluated = evaluate_loss(eval_model, val_batcher, device, autocast, cfg.eval_iters)
                val_loss = evaluated
                if math.isfinite(evaluated) and (best_val is None or evaluated < best_val):
                    best_val = evaluated
                if mlrun is not None:
                    mlflow.log_metrics({"val/loss": evaluated, "val/ppl": math.exp(min(evaluated, 50))}, step=step)
                    print(f"step {step:>6} | val loss {evaluated:.4f}", flush=True)

            if mlrun is not None and cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.max_steps:
                text = sample_texts(raw_model, tokenizer_bytes, cfg, device)
                if text:
                    mlflow.log_text(text, f"samples/step-{step:08d}.txt")

            flags = [stop.signal is not None,
                     cfg.max_minutes is not None and time.time() - t_start > cfg.max_minutes * 60]
            if dist.enabled:  # every rank stops at the same step
                flags = [bool(f) for f in _all_reduce(torch.tensor(flags, dtype=torch.float32, device=device), "max")]
            stopping = any(flags)
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.max_steps or stopping:
                ckpt_path = save(step, evaluated)
            if stopping:
                status = "interrupted" if flags[0] else "time_limit"
                if dist.is_main:
                    print(f"stopping at step {step} ({status}); checkpoint {ckpt_path}", flush=True)
                break

        # --- the end: samples, curve, artifacts, summary ---------------------------------------
        if ckpt_path is None and manager is not None:
            ckpt_path = manager.latest()
        summary: dict[str, Any] = {
            "status": status,
            "step": step,
            "max_steps": cfg.max_steps,
            "train_loss": last_loss,
            "val_loss": val_loss,
            "best_val_loss": best_val,
            "grad_norm": last_norm,
            "tokens_per_s": tok_s,
            "mfu": mfu,
            "bad_steps": bad_steps,
            "tokens_per_step": tokens_per_step,
            "out_dir": str(out_dir.resolve()),
            "checkpoint": str(ckpt_path) if ckpt_path else None,
            "best_checkpoint": str(manager.best()) if manager is not None and manager.best() else None,
            "checkpoints": [str(p) for _, p in manager.checkpoints()] if manager is not None else [],
            "mlflow_run_id": run_id,
            "experiment": experiment,
            "params": raw_model.num_params(),
            "elapsed_s": time.time() - t_start,
        }
        if mlrun is not None:
            mlflow.log_metric("elapsed_s", summary["elapsed_s"], step=step)
            text = sample_texts(raw_model, tokenizer_bytes, cfg, device)
            if text:
                atomic_write_text(out_dir / "samples.txt", text)
                mlflow.log_text(text, f"samples/step-{step:08d}.txt")
            png = plot_loss_curve(run_id, out_dir / "loss_curve.png")
            if png:
                mlflow.log_artifact(str(png), "plots")
            if status == "completed" and cfg.log_checkpoints:
                for key in ("checkpoint", "best_checkpoint"):
                    if summary[key]:
                        mlflow.log_artifact(summary[key], "checkpoints")
            mlflow.set_tag("llmforge.status", status)
            atomic_write_json(out_dir / SUMMARY_NAME, summary)
            mlflow.log_artifact(str(out_dir / SUMMARY_NAME))
            print(f"{status} at step {step}: train loss {last_loss:.4f}"
                  + (f", val loss {val_loss:.4f}" if val_loss is not None else "")
                  + f"; checkpoints in {out_dir}; MLflow run {run_id} (experiment {experiment!r}, "
                  f"store {tracking.tracking_uri()})", flush=True)
    return summary


# ---------------------------------------------------------------------------------------------
# multi-process launch (torchrun) and its worker entry point


def launch(
    cfg: TrainConfig,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    nproc: int,
    *,
    init_from: str | os.PathLike | None = None,
    experiment: str = "llmforge",
    parent_run_id: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run :func:`train` in ``nproc`` processes under ``torch.distributed.run`` and return the
    summary rank 0 wrote. The config travels as ``out_dir/train_config.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.validate()
    cfg_path = out_dir / "train_config.json"
    atomic_write_json(cfg_path, cfg.to_dict())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llmforge.model.train", "--config", str(cfg_path), "--data", str(data_dir), "--out", str(out_dir),
           "--experiment", experiment]
    if init_from:
        cmd += ["--init-from", str(init_from)]
    if parent_run_id:
        cmd += ["--parent-run-id", parent_run_id]
    env = {**os.environ, **(extra_env or {})}
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    started = time.time()
    proc = subprocess.run(cmd, env=env)
    if proc.returncode == 3:
        raise TrainingDiverged(f"training diverged (see the log above); last good checkpoint in {out_dir}")
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun training exited with status {proc.returncode} ({' '.join(cmd)})")
    summary_path = out_dir / SUMMARY_NAME
    if not summary_path.is_file() or summary_path.stat().st_mtime < started - 1:
        raise RuntimeError(f"{summary_path}: torchrun finished but rank 0 wrote no summary")
    return read_json(summary_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.train", description="training worker (run by torchrun)")
    p.add_argument("--config", required=True, help="TrainConfig as JSON")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--init-from")
    p.add_argument("--experiment", default="llmforge")
    p.add_argument("--parent-run-id")
    args = p.parse_args(argv)
    cfg = TrainConfig.from_dict(json.loads(Path(args.config).read_text()), source=args.config)
    try:
        train(cfg, args.data, args.out, init_from=args.init_from, experiment=args.experiment,
              parent_run_id=args.parent_run_id)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
