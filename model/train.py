"""The train stage: pretraining over token shards, and the loop fine-tuning reuses.

Read top to bottom, :func:`train` is: find where the run starts (its own newest checkpoint, a
base checkpoint's weights, or a fresh preset), build the model, optimizer and batches, then loop:
set the learning rate, accumulate gradients over micro-batches, clip, step (skipping a step whose
loss or gradient is not finite), log, validate, checkpoint, stop on a signal or a time limit.
Everything a bit-identical resume needs goes through :class:`~llmforge.model.checkpoint.CheckpointManager`;
everything MLflow sees goes through :mod:`llmforge.tracking`; devices and precision come from
:mod:`llmforge.model.runtime`; held-out loss from :func:`llmforge.model.evaluate.score_split`, the
same scorer ``llmforge evaluate`` uses. Several processes: :mod:`llmforge.model.launch`.

Running ``train`` again on the same ``out_dir`` resumes from its newest checkpoint and keeps
logging to the same MLflow run. Batches come from :class:`~llmforge.model.data.ShardBatcher`
unless the caller plugs in any :class:`~llmforge.model.data.BatchSource` (fine-tuning with loss
masks does).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import Field, model_validator

from llmforge import tracking
from llmforge.config import Config, Count, Duration, added_later, control, read_yaml
from llmforge.errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from llmforge.model.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    restore_rng_state,
    tokenizer_bytes,
)
from llmforge.model.data import BatchSource, Prefetcher, ShardBatcher
from llmforge.model.evaluate import SplitScorer
from llmforge.model.generate import DEFAULT_PROMPTS, SamplingConfig, format_samples, sample_texts
from llmforge.model.gpt import GPT, GPTConfig, ModelSpec, preset_path, resolve_model
from llmforge.model.lora import LoRALinear
from llmforge.model.loss import Sampler, head_loss
from llmforge.model.runtime import (FAST_BF16_SPEEDUP, DistInfo, all_reduce, autocast, cpu_bf16_speedup,
                                    peak_flops, resolve_device, resolve_dtype)
from llmforge.model.teacher import NgramTeacher
from llmforge.pipeline.fsutil import DirLock, atomic_write_json, atomic_write_text, read_json
from llmforge.pipeline.shards import Dataset
from llmforge.stage import Stage

SUMMARY_NAME = "summary.json"
RECIPE_DIR = Path(__file__).resolve().parents[1] / "configs" / "train"

__all__ = ["TrainConfig", "TrainRecipe", "TrainStage", "TrainingDiverged", "train", "lr_factor", "load_recipe"]


class TrainConfig(Config):
    """The training loop's settings (the ``train:`` section of a recipe)."""

    block_size: int | None = Field(None, gt=0, description="tokens per training sequence (default: the model's "
                                   "context; a new model's context defaults to it)")
    batch_size: int = Field(16, gt=0, description="sequences per micro-batch per process")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    max_steps: int = Field(2000, gt=0, description="optimizer steps, the schedule's horizon unless a time or "
                           "tokens budget is given")
    time: Duration | None = Field(None, gt=0, description="train for this wall-clock time (e.g. 10m, 1h30m): the "
                                  "schedule runs on the share of it spent and ends decayed, replacing max_steps")
    tokens: Count | None = Field(None, gt=0, description="train on this many tokens (e.g. 200M), replacing max_steps")
    schedule: Literal["cosine", "wsd"] = Field("cosine", description="after warm-up: cosine decay to min_lr, or wsd "
                                               "(constant, then a linear decay over the last `cooldown` share)")
    cooldown: float = Field(0.2, gt=0, le=1, description="wsd: share of the budget spent decaying to min_lr")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    min_lr: float | None = Field(None, ge=0, description="final learning rate of the decay (default: lr/10)")
    embedding_lr: float | None = added_later(None, "peak learning rate of the token embedding (and of the head "
                                             "when it is tied); default: lr", gt=0)
    head_lr: float | None = added_later(None, "peak learning rate of an untied LM head; default: lr", gt=0)
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices and embeddings")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2")
    grad_clip: float = Field(1.0, ge=0, description="clip the gradient norm to this; 0 = off")
    z_loss: float = added_later(0.0, "weight of PaLM's z-loss, mean(logsumexp(logits)^2), added to the objective "
                                "(1e-4 in PaLM; 0 = off); the logged loss stays the cross-entropy", ge=0)
    teacher_order: int = added_later(0, "an n-gram teacher of this order (2-4) counted from the training split "
                                     "gives soft targets (model/teacher.py); 0 = off", ge=0, le=4)
    teacher_weight: float = added_later(0.5, "the teacher's share of the loss at the start; it moves linearly to "
                                        "`teacher_final` at `teacher_until` of the budget", ge=0, le=1)
    teacher_until: float = added_later(1.0, "share of the budget at which the teacher's share reaches "
                                       "`teacher_final`", gt=0, le=1)
    teacher_final: float = added_later(0.0, "the teacher's share of the loss from `teacher_until` of the budget on "
                                       "(1.0 with teacher_weight 1.0: the teacher throughout)", ge=0, le=1)
    teacher_tokens: Count = added_later(64_000_000, "tokens of the training split the teacher counts", gt=0)
    sampled_softmax: float = added_later(0.0, "share of the budget during which the head's softmax runs over a "
                                         "sample of the vocabulary (the batch's targets and the "
                                         "`sampled_softmax_top` most frequent tokens; model/loss.py); 0 = off, "
                                         "1 = every step",
                                         ge=0, le=1)
    sampled_softmax_top: int = added_later(1024, "the most frequent tokens (counted over `teacher_tokens` of the "
                                           "training split) always in the sampled softmax", ge=0)
    sampled_softmax_min_q: float = added_later(0.1, "the sampled softmax' logQ correction counts a token's chance "
                                               "of being in a batch as at least this (1 = no correction)", gt=0, le=1)
    optimizer: Literal["adamw", "muon"] = Field("adamw", description="adamw, or muon for the hidden matrices + "
                                                "adamw for the rest")
    eval_every: int = Field(250, ge=0, description="validation every N steps; 0 = only at the end")
    eval_tokens: int | None = Field(262_144, gt=0, description="validation tokens per evaluation (whole "
                                    "documents, as llmforge evaluate --max-tokens); none = the whole split")
    seed: int = Field(1337, description="seed for the weights and the batch sequence")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA, fp32 elsewhere")
    train_split: str = Field("train", description="split of the dataset to train on")
    val_split: str = Field("val", description="split of the dataset to validate on")
    # how the run is watched, bounded and where it runs: not part of the run's key
    device: str = control("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N")
    compile: bool | None = control(None, "torch.compile the model; default: on with CUDA, off elsewhere")
    max_minutes: float | None = control(None, "stop after M minutes with a checkpoint (re-run to continue)", gt=0)
    log_every: int = control(10, "a progress line every N steps", gt=0)
    ckpt_every: int = control(500, "checkpoint every N steps; 0 = only at the end", ge=0)
    keep_last: int = control(3, "checkpoints kept besides best.pt", gt=0)
    max_bad_steps: int = control(10, "consecutive non-finite steps tolerated before the run stops", gt=0)
    sample_every: int = control(0, "sample text every N steps; 0 = only at the end", ge=0)
    sample_prompts: list[str] = control(list(DEFAULT_PROMPTS[:4]), "prompts for the samples")
    sample_tokens: int = control(64, "tokens per sample", ge=0)
    peak_tflops: float | None = control(None, "the GPU's dense bf16 TFLOP/s, for MFU when it is not in the "
                                        "built-in table", gt=0)
    log_checkpoints: bool = control(True, "log the final checkpoint, weights only, as the run's MLflow model")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.time is not None and self.tokens is not None:
            raise ValueError("give one budget: time or tokens (or max_steps), not both")
        return self

    @property
    def budget(self) -> str:
        """What a run of this config is called by its length: ``10m``, ``200M tokens``, ``2000 steps``."""
        if self.time is not None:
            return _clock(self.time).replace("m00s", "m") if self.time >= 60 else f"{self.time:g}s"
        if self.tokens is not None:
            return f"{self.tokens / 1e6:g}M tokens"
        return f"{self.max_steps} steps"

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr


class TrainRecipe(Config):
    """A training recipe (``configs/train/*.yaml``, ``--config FILE``): the model and the loop."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainConfig = Field(default_factory=TrainConfig)
    name: str | None = control(None, "the recipe's name (its file's stem)")

    @property
    def label(self) -> str:
        """What a run of this recipe is called: the recipe name, else the preset's."""
        return self.name or Path(self.model.preset).stem


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """The mapping in a recipe file (``configs/train/<name>.yaml`` or any YAML path)."""
    from llmforge.errors import NotFound, did_you_mean

    p = Path(name_or_path)
    if not (p.suffix in (".yaml", ".yml") or p.exists()):
        p = RECIPE_DIR / f"{name_or_path}.yaml"
        if not p.is_file():
            raise NotFound(f"--config {name_or_path}: " + did_you_mean(name_or_path, recipe_names(), "recipe"))
    data = read_yaml(p, "a training recipe")
    data.setdefault("name", p.stem)
    return data


def lr_factor(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Multiplier on the base lr for 0-based ``step``: linear warm-up, then the decay to
    ``min_lr`` at ``progress``, the share of the budget spent (1.0 on the last step). Without a
    ``progress`` (a step budget) the cosine runs from the end of warm-up to ``max_steps``."""
    floor = cfg.final_lr / cfg.lr
    if progress is None:  # a step budget: the classic warm-up + cosine (exactly as before budgets)
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            span = max(cfg.max_steps - cfg.warmup_steps, 1)
            p = min((step - cfg.warmup_steps) / span, 1.0)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
        progress = min((step + 1) / cfg.max_steps, 1.0)
    warm = (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else 1.0
    return min(warm, decay(progress, cfg, floor))


def decay(progress: float, cfg: TrainConfig, floor: float) -> float:
    """The schedule after warm-up as a function of the budget share spent, 1 -> ``floor``."""
    p = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    stable = 1.0 - cfg.cooldown
    return 1.0 if p <= stable else floor + (1.0 - floor) * (1.0 - p) / cfg.cooldown


class Budget:
    """How long a run trains and how far it is: a step count, a token count (an exact step count
    once the batch is known) or wall-clock seconds of the training loop (periodic evaluations and
    checkpoints included, start-up and the final evaluation not), carried across resumes."""

    def __init__(self, cfg: TrainConfig, tokens_per_step: int, spent_s: float = 0.0):
        self.cfg = cfg
        self.seconds = cfg.time
        self.total_steps = None if cfg.time is not None else (
            math.ceil(cfg.tokens / tokens_per_step) if cfg.tokens is not None else cfg.max_steps)
        self.spent_before = spent_s
        self.t0 = time.perf_counter()
        self.frozen: float | None = None  # the clock stops after the last step (the final eval is not in it)
        self.step_time = None  # moving average of one step's wall time (time budgets)
        self.unrecorded = 2  # this process' first steps, which may (re)compile and warm up, are not in the average
        self.share = 0.0  # the budget share the last lr factor was computed at

    @property
    def by_time(self) -> bool:
        return self.seconds is not None

    def elapsed(self) -> float:
        return self.frozen if self.frozen is not None else self.spent_before + time.perf_counter() - self.t0

    def freeze(self) -> None:
        self.frozen = self.elapsed()

    def progress(self, step: int) -> float:
        return self.elapsed() / self.seconds if self.by_time else step / self.total_steps

    def is_last(self, step: int) -> bool:
        """Whether the step about to run is the last one (a time budget: the next step would not
        finish within it), so that it runs at the schedule's floor."""
        if not self.by_time:
            return step + 1 >= self.total_steps
        return self.elapsed() + (self.step_time or 0.0) >= self.seconds

    def lr_factor(self, step: int, last: bool, progress: float | None = None) -> float:
        if not self.by_time and self.cfg.tokens is None:
            self.share = step / self.total_steps
            return lr_factor(step, self.cfg)  # bit-identical to a run before budgets existed
        self.share = 1.0 if last else (self.progress(step) if progress is None else progress)
        return lr_factor(step, self.cfg, self.share)

    def teacher_weight(self) -> float:
        """The n-gram teacher's share of the loss for the step whose lr was set last."""
        cfg = self.cfg
        if not cfg.teacher_order:
            return 0.0
        reached = min(1.0, self.share / cfg.teacher_until)  # with teacher_final 0: bit for bit the weight before it
        return cfg.teacher_weight * (1.0 - reached) + cfg.teacher_final * reached

    def sampled(self) -> bool:
        """Whether the step whose lr was set last runs the sampled softmax (every step at 1.0)."""
        return self.share < self.cfg.sampled_softmax or self.cfg.sampled_softmax >= 1.0

    def next_step(self, step: int, dist: DistInfo, device: torch.device) -> tuple[bool, float]:
        """(is this the last step, its lr factor). Under DDP a time budget is read off rank 0's
        clock and broadcast, so every rank applies the same learning rate and stops together."""
        if not (self.by_time and dist.enabled):
            last = self.is_last(step)
            return last, self.lr_factor(step, last)
        import torch.distributed as tdist

        state = torch.tensor([float(self.is_last(step)), self.progress(step)], dtype=torch.float64, device=device)
        tdist.broadcast(state, src=0)
        last = bool(state[0])
        return last, self.lr_factor(step, last, float(state[1]))

    def record(self, seconds: float) -> None:
        """Fold a step's wall time into the average that decides the last step. The first two
        steps of a process are left out: they can carry a compilation the warm-up before the clock
        did not cover (a batch of another shape: 20-30 s on a CPU), which would make a short budget
        stop after a few steps."""
        if self.unrecorded:
            self.unrecorded -= 1
            return
        self.step_time = seconds if self.step_time is None else 0.8 * self.step_time + 0.2 * seconds


# ---------------------------------------------------------------------------------------------
# the stage


class TrainStage(Stage):
    """Train (or resume) a recipe on a token dataset.

    Output: a run directory, ``<runs_root>/train-<recipe or preset>-<key>`` unless ``out_dir``
    names one, holding ``ckpt-*.pt``, ``best.pt``, ``latest.json`` and, once finished,
    ``summary.json``. The key covers the recipe (control fields excluded), the dataset and the
    initial weights, so the same command lands in the same directory and resumes there.
    """

    name = "train"

    def __init__(self, recipe: TrainRecipe, data_dir: str | os.PathLike, *, out_dir: str | os.PathLike | None = None,
                 init_from: str | os.PathLike | None = None, runs_root: str | os.PathLike = "runs"):
        self.config = recipe
        self.data_dir = Path(data_dir)
        if init_from is None:
            preset_path(recipe.model.preset)  # a wrong name fails before the data is opened (and checked)
        self.dataset = Dataset.open(data_dir)
        for split in (recipe.train.train_split,):
            if split not in self.dataset.splits():
                raise DataError(f"{self.dataset.root}: no {split!r} split to train on "
                                f"(has {', '.join(self.dataset.splits())})")
        self.init_from = find_checkpoint(init_from) if init_from is not None else None
        self._out = Path(out_dir) if out_dir is not None else None
        self.runs_root = Path(runs_root)
        if self.init_from is None:  # a fresh model: its preset and fields must make a valid model
            model = resolve_model(recipe.model, self.dataset.vocab_size, recipe.train.block_size)
            if recipe.train.block_size and recipe.train.block_size > model.block_size:
                raise ConfigError(f"train.block_size {recipe.train.block_size} exceeds the model's context "
                                  f"{model.block_size} (model.block_size)")

    def inputs(self) -> Any:
        return [self.dataset.fingerprint, str(self.init_from.resolve()) if self.init_from else None]

    @property
    def out_dir(self) -> Path:
        return self._out or self.runs_root / f"train-{self.config.label}-{self.key}"

    def completed(self) -> dict[str, Any] | None:
        """The summary of a run that finished its schedule (its final checkpoint still there)."""
        summary = self.read_result(self.out_dir / SUMMARY_NAME)
        if summary is None:
            return None
        ckpt = summary.get("checkpoint")
        t = self.config.train
        if summary.get("status") != "completed" or (t.time is None and t.tokens is None and summary.get("step") != t.max_steps):
            return None
        return summary if ckpt and Path(ckpt).is_file() else None

    def run(self, *, nproc: int = 1, experiment: str = tracking.EXPERIMENT,
            parent_run_id: str | None = None) -> dict[str, Any]:
        # one process writes a run directory (under torchrun: rank 0, or the launcher)
        lock = DirLock(self.out_dir) if DistInfo.from_env().is_main else contextlib.nullcontext()
        with lock:
            if nproc > 1:
                from llmforge.model.launch import launch

                return launch(self.config, self.data_dir, self.out_dir, nproc, init_from=self.init_from,
                              experiment=experiment, parent_run_id=parent_run_id)
            return train(self.config, self.data_dir, self.out_dir, init_from=self.init_from, experiment=experiment,
                         parent_run_id=parent_run_id)


# ---------------------------------------------------------------------------------------------
# where a run starts


@dataclass
class Start:
    """Resume (this run's newest checkpoint) > init_from (a base checkpoint's weights, fresh
    optimizer) > fresh (a preset); with the model config and tokenizer that go with it."""

    model_cfg: GPTConfig
    resume: dict | None
    resume_path: Path | None
    base: dict | None
    base_path: Path | None
    tokenizer: bytes | None
    tokenizer_fingerprint: str | None


ARCHITECTURE_FIELDS = ("block_size", "n_layer", "n_head", "n_embd", "mlp_ratio", "bias", "tie_embeddings",
                       "rope_theta", "norm_eps")


def _newest_loadable(out_dir: Path, dist: DistInfo) -> tuple[dict | None, Path | None]:
    """Rank 0 picks the newest checkpoint that loads (a damaged one is skipped, kept); all
    ranks load the same one."""
    resume, path = None, None
    if dist.is_main and out_dir.is_dir():
        for _, p in reversed(CheckpointManager.list(out_dir)):
            try:
                resume, path = load_checkpoint(p, map_location="cpu"), p
                break
            except CheckpointError as e:
                print(f"warning: skipping unreadable checkpoint: {e}", file=sys.stderr, flush=True)
    if dist.enabled:
        import torch.distributed as tdist

        box = [str(path) if path else None]
        tdist.broadcast_object_list(box, src=0)
        path = Path(box[0]) if box[0] else None
        if path is not None and not dist.is_main:
            resume = load_checkpoint(path, map_location="cpu")
    return resume, path


def starting_point(recipe: TrainRecipe, dataset: Dataset | None, out_dir: Path, dist: DistInfo,
                   init_from: str | os.PathLike | None) -> Start:
    cfg = recipe.train
    resume, resume_path = _newest_loadable(out_dir, dist)
    if resume is not None and resume["config"].get("train", {}).get("seed", cfg.seed) != cfg.seed:
        raise ConfigError(f"{resume_path}: checkpoint was trained with seed {resume['config']['train']['seed']}, "
                          f"this config has seed {cfg.seed} (resuming would change the batches)")
    base_path = find_checkpoint(init_from) if init_from is not None else None
    base = load_checkpoint(base_path, map_location="cpu") if base_path is not None else None

    tok, tok_fp = None, None
    if dataset is not None:
        tok, tok_fp = dataset.tokenizer_path.read_bytes(), dataset.manifest["tokenizer"].get("fingerprint")
    if base is not None:
        base_fp = (base.get("lineage") or {}).get("tokenizer_fingerprint")
        if tok_fp and base_fp and base_fp != tok_fp:
            raise DataError(f"{base_path}: model was trained with tokenizer {base_fp} but {dataset.root} is "
                            f"tokenized with {tok_fp}; token ids would mean different things (prepare the data "
                            f"with this model's tokenizer: llmforge prepare --tokenizer)")
        tok, tok_fp = tok or tokenizer_bytes(base), tok_fp or base_fp
    if tok is None and resume is not None:
        tok = tokenizer_bytes(resume)

    overrides = {k: v for k, v in recipe.model.model_dump().items() if k != "preset" and v is not None}
    if resume is not None:
        model_cfg = GPTConfig.load(resume["config"]["model"], source=str(resume_path))
    elif base is not None:
        base_model = base["config"]["model"]
        changed = [k for k in ARCHITECTURE_FIELDS if k in overrides and overrides[k] != base_model.get(k)]
        if changed:
            k = changed[0]
            raise ConfigError(f"model.{k}={overrides[k]}: the model's shape comes from {base_path} "
                              f"({k}={base_model.get(k)}); only model.dropout can change when starting from a checkpoint")
        model_cfg = GPTConfig.load({**base_model, **overrides}, source=str(base_path))
    else:
        model_cfg = resolve_model(recipe.model, dataset.vocab_size, cfg.block_size)
    if dataset is not None and dataset.vocab_size > model_cfg.vocab_size:
        raise DataError(f"{dataset.root}: tokenizer has {dataset.vocab_size} tokens but the model's vocab_size "
                        f"is {model_cfg.vocab_size}")
    return Start(model_cfg, resume, resume_path, base, base_path, tok, tok_fp)


# ---------------------------------------------------------------------------------------------
# the loop


class Health:
    """Loss, gradient norm and the count of non-finite steps, kept on the device and read (one
    host-device sync) only when the loop needs them: at log, evaluation and checkpoint steps."""

    def __init__(self, bad_steps: int, device: torch.device):
        self.total = torch.tensor(bad_steps, dtype=torch.int64, device=device)
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.last = torch.full((2,), float("nan"), device=device)
        self.seen = bad_steps

    def record(self, stats: torch.Tensor) -> torch.Tensor:
        """``stats`` = [loss, grad norm]; returns whether this step is non-finite (a device bool)."""
        bad = ~torch.isfinite(stats).all()
        self.total += bad
        self.streak = (self.streak + bad) * bad
        self.last = stats
        return bad

    def read(self) -> tuple[float, float, int, int, int]:
        """(loss, grad norm, non-finite steps in all, in a row now, new since the last read)."""
        loss, norm, total, streak = torch.cat([self.last.double(), self.total.double().view(1),
                                               self.streak.double().view(1)]).tolist()
        new, self.seen = int(total) - self.seen, int(total)
        return loss, norm, int(total), int(streak), new


def _skips_on_device(optimizer: Any, scaler: Any) -> bool:
    """Fused AdamW takes a ``found_inf`` flag and skips the update on the device itself."""
    return isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused")) \
        and not scaler.is_enabled()


class StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks after each step (main thread only); a second
    signal stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing this step, then checkpointing", flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """``step 120/480 (25%) | loss 4.21 | ... | 3,300 tok/s | 1m02s, ETA 3m07s`` (a time budget:
    ``step 120 (25% of 10m)``)."""

    def __init__(self, start_step: int, budget: Budget):
        self.start_step, self.budget = start_step, budget
        self.t0 = time.perf_counter()

    def line(self, step: int, loss: float, lr: float, norm: float, tok_s: float, mfu: float | None) -> str:
        elapsed = time.perf_counter() - self.t0
        b = self.budget
        if b.by_time:
            pct, eta = 100 * b.progress(step), max(b.seconds - b.elapsed(), 0.0)
            where = f"step {step:>6} ({pct:3.0f}% of {b.cfg.budget})"
        else:
            done = step - self.start_step
            pct = 100 * step / b.total_steps
            eta = elapsed / done * (b.total_steps - step) if done else float("nan")
            where = f"step {step:>6}/{b.total_steps} ({pct:3.0f}%)"
        return (f"{where} | loss {loss:.4f} | lr {lr:.2e} | grad norm {norm:.3f} | {tok_s:,.0f} tok/s"
                + (f" | mfu {100 * mfu:.1f}%" if mfu is not None else "") + f" | {_clock(elapsed)}"
                + (f", ETA {_clock(eta)}" if math.isfinite(eta) and pct < 100 else ""))


def train(
    recipe: TrainRecipe,
    data_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    init_from: str | os.PathLike | None = None,
    batcher: BatchSource | Callable[[int, int, torch.device], BatchSource] | None = None,
    val_source: Any = None,
    experiment: str = tracking.EXPERIMENT,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    stage: str = "train",
    prepare_model: Callable[[GPT], None] | None = None,
    lineage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (or resume training) and return a summary dict.

    - ``data_dir``: a token dataset; may be None when ``batcher`` is given and ``init_from``
      supplies the model config and tokenizer.
    - ``batcher`` / ``val_source``: a :class:`~llmforge.model.data.BatchSource` and an object with
      ``score(model, device=, dtype=, dist=) -> {"loss", ...}`` (or factories
      ``(rank, world_size, device) -> ...``); defaults read the dataset's train / val splits.
    - ``init_from``: start from this checkpoint's weights (file or run directory) with a fresh
      optimizer; ignored when ``out_dir`` already has a checkpoint, which is resumed instead.
    - ``prepare_model``: called on the model after its initial weights are loaded and before the
      optimizer is built (e.g. to add LoRA adapters); only parameters requiring grad are trained.
    - ``lineage``: extra entries recorded in checkpoints and as MLflow tags.
    """
    dist = DistInfo.from_env()
    device = resolve_device(recipe.train.device, dist)
    own_group = False
    if dist.enabled:
        import torch.distributed as tdist

        if not tdist.is_initialized():
            tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            own_group = True
    try:
        return _train(recipe, data_dir, Path(out_dir), dist, device, init_from=init_from, batcher=batcher,
                      val_source=val_source, experiment=experiment, parent_run_id=parent_run_id, run_name=run_name,
                      stage=stage, prepare_model=prepare_model, extra_lineage=lineage or {})
    finally:
        if own_group:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _train(recipe: TrainRecipe, data_dir: Any, out_dir: Path, dist: DistInfo, device: torch.device, *,
           init_from: Any, batcher: Any, val_source: Any, experiment: str, parent_run_id: str | None,
           run_name: str | None, stage: str, prepare_model: Callable[[GPT], None] | None,
           extra_lineage: dict[str, Any]) -> dict[str, Any]:
    cfg = recipe.train
    t_start = time.time()
    dataset = Dataset.open(data_dir) if data_dir is not None else None
    if dataset is None and (batcher is None or init_from is None):
        raise ConfigError("train() needs data_dir (a token dataset), or both batcher and init_from")
    start = starting_point(recipe, dataset, out_dir, dist, init_from)
    resume, model_cfg = start.resume, start.model_cfg
    block_size = cfg.block_size or model_cfg.block_size
    if block_size > model_cfg.block_size:
        raise ConfigError(f"train.block_size {block_size} exceeds the model's context of {model_cfg.block_size}")

    # --- model and optimizer -------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every (re)start
    model = GPT(model_cfg)
    if start.base is not None:
        model.load_state_dict(start.base["model_state"])
    if prepare_model is not None:
        prepare_model(model)
    if resume is not None:
        model.load_state_dict(resume["model_state"])
    model.to(device)
    dtype = resolve_dtype(cfg.dtype, device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), device.type,
                                           muon=cfg.optimizer == "muon", embedding_lr=cfg.embedding_lr,
                                           head_lr=cfg.head_lr, bf16=dtype == torch.bfloat16)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not params:
        raise ConfigError("no parameter requires grad: nothing to train")
    if device.type == "cpu" and dtype == torch.bfloat16 and dist.is_main and cpu_bf16_speedup() < FAST_BF16_SPEEDUP:
        print(f"train.dtype bfloat16: this CPU multiplies bfloat16 matrices {cpu_bf16_speedup():.2f}x as fast as "
              "float32 ones (no bfloat16 instructions its matmul uses): --set train.dtype=float32 trains faster here",
              flush=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step, bad_steps, best_val, last_loss, val_loss, run_id, spent = 0, 0, None, float("nan"), None, None, 0.0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer_state"])
        step = int(resume["step"])
        sched = resume.get("scheduler_state") or {}
        bad_steps = int(sched.get("bad_steps", 0))
        spent = float(sched.get("budget_spent", 0.0))
        if sched.get("scaler"):
            scaler.load_state_dict(sched["scaler"])
        run_id = resume["lineage"].get("mlflow_run_id")
        extra = resume.get("extra") or {}
        best_val, last_loss, val_loss = extra.get("best_val_loss"), float(extra.get("train_loss") or "nan"), \
            resume.get("val_loss")

    # --- data ------------------------------------------------------------------------------------
    own_batches = batcher is None  # windows of the token dataset, as opposed to a caller's (fine-tuning) source
    if batcher is None:
        batcher = ShardBatcher(dataset, cfg.train_split, block_size, cfg.batch_size, seed=cfg.seed,
                               rank=dist.rank, world_size=dist.world_size)
    elif callable(batcher) and not hasattr(batcher, "get_batch"):
        batcher = batcher(dist.rank, dist.world_size, device)
    if device.type == "cuda":  # the next batch is gathered and copied while this step runs
        batcher = Prefetcher(batcher, cfg.grad_accum, device)
    if val_source is None and dataset is not None and cfg.val_split in dataset.splits():
        val_source = SplitScorer(dataset, cfg.val_split, block_size, cfg.eval_tokens)
    elif callable(val_source) and not hasattr(val_source, "score"):
        val_source = val_source(dist.rank, dist.world_size, device)
    if resume is not None and resume.get("data_state"):
        batcher.load_state_dict(resume["data_state"])
    tokens_per_step = getattr(batcher, "batch_size", cfg.batch_size) * getattr(batcher, "block_size", block_size) \
        * cfg.grad_accum * dist.world_size

    # --- wrappers: compile, DDP ------------------------------------------------------------------
    raw_model = eval_model = model
    compile_s = None
    if cfg.compile or (cfg.compile is None and device.type == "cuda"):
        model, compile_s = _compiled(model, getattr(batcher, "batch_size", cfg.batch_size),
                                     getattr(batcher, "block_size", block_size), device, dtype, say=dist.is_main)
        if device.type == "cuda":  # off CUDA a second compilation, for scoring, costs more than it saves
            eval_model = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    flops_per_token = raw_model.flops_per_token(block_size)
    peak = peak_flops(device, cfg.peak_tflops)

    lineage = {"dataset_fingerprint": dataset.fingerprint if dataset is not None else None,
               "dataset_dir": str(dataset.root.resolve()) if dataset is not None else None,
               "tokenizer_fingerprint": start.tokenizer_fingerprint,
               "base_checkpoint": str(start.base_path) if start.base_path else None, **extra_lineage}
    if resume is not None:
        lineage = {**resume["lineage"], **{k: v for k, v in lineage.items() if v is not None}}
    manager = CheckpointManager(out_dir, keep_last=cfg.keep_last, tokenizer=start.tokenizer) if dist.is_main else None

    # a finished run run again: nothing to do (every rank loaded the same checkpoint step)
    budget = Budget(cfg, tokens_per_step, spent)
    spent_all = spent >= budget.seconds if budget.by_time else step >= budget.total_steps
    if spent_all and (out_dir / SUMMARY_NAME).is_file():
        summary = read_json(out_dir / SUMMARY_NAME)
        if summary.get("step") == step:
            if dist.is_main:
                print(f"{out_dir}: already trained to step {step}; nothing to do")
            return summary

    # the head is applied inside the loss, chunk by chunk (model/loss.py): a plain head by its weight, a
    # LoRA head by its product's operands (the hidden states with the adapter's input appended, W with B)
    head = raw_model.lm_head
    base_head = head.base if isinstance(head, LoRALinear) else head
    if type(base_head) is not torch.nn.Linear or base_head.bias is not None:
        raise ConfigError(f"the LM head is a {type(head).__name__}: training takes an nn.Linear without a bias, "
                          "or a LoRA adapter on one")
    head_operands = head.product if isinstance(head, LoRALinear) else (lambda hidden: (hidden, head.weight))
    teacher = None
    if cfg.teacher_order:
        if dataset is None or not own_batches:  # (on CUDA any source is wrapped in a Prefetcher)
            raise ConfigError("train.teacher_order: an n-gram teacher needs a token dataset and the built-in batches")
        teacher = NgramTeacher.count(dataset, cfg.train_split, cfg.teacher_order, cfg.teacher_tokens).to(device)
        budget.spent_before += teacher.seconds  # the counting is part of what the run spends
        if dist.is_main:
            print(f"n-gram teacher: order {teacher.order} over {teacher.tokens:,} tokens in {teacher.seconds:.1f} s "
                  f"(counted in the budget)", flush=True)
    sampler = None
    if cfg.sampled_softmax:
        if dataset is None:
            raise ConfigError("train.sampled_softmax: the sampled softmax counts its tokens in a token dataset")
        sampler = Sampler.count(dataset, cfg.train_split, cfg.teacher_tokens, cfg.sampled_softmax_top,
                                cfg.batch_size * block_size, cfg.sampled_softmax_min_q).to(device)
        budget.spent_before += sampler.seconds
        if dist.is_main:
            span = "the whole budget" if cfg.sampled_softmax >= 1 else f"the first {cfg.sampled_softmax:.0%} of the budget"
            print(f"sampled softmax for {span}: the batch's targets and "
                  f"the {len(sampler.frequent):,} most frequent tokens (counted in {sampler.seconds:.1f} s)", flush=True)

    corpus = ((dataset.manifest.get("config") or {}).get("corpus") or {}).get("name") if dataset else None
    name = run_name or tracking.run_name(stage, corpus, recipe.label, cfg.budget)
    tags = {tracking.TAG_CORPUS: corpus, tracking.TAG_RECIPE: recipe.label,
            tracking.TAG_DATASET: lineage.get("dataset_fingerprint"), tracking.TAG_DATASET_DIR: lineage.get("dataset_dir"),
            tracking.TAG_TOKENIZER: lineage.get("tokenizer_fingerprint"),
            tracking.TAG_BASE_CHECKPOINT: lineage.get("base_checkpoint")}
    run_ctx = (tracking.stage_run(name, stage=stage, experiment=experiment, run_id=run_id, parent_run_id=parent_run_id,
                                  tags=tags) if dist.is_main else contextlib.nullcontext(None))
    status, last_norm, tok_s, mfu, ckpt_path, streak = "completed", float("nan"), 0.0, None, None, 0
    with run_ctx as mlrun, StopFlag() as stop:
        if mlrun is not None:
            run_id = lineage["mlflow_run_id"] = mlrun.run_id
            mlrun.params({"model": {**model_cfg.to_dict(), "params": raw_model.num_params(),
                                    "flops_per_token": flops_per_token},
                          "train": cfg.key_dict(),
                          "data": {"block_size": block_size, "tokens_per_step": tokens_per_step,
                                   "world_size": dist.world_size, "device": str(device), "dtype": str(dtype),
                                   "batcher": type(batcher).__name__}})
            mlrun.tags({f"llmforge.lineage.{k}": v for k, v in extra_lineage.items()})
            if resume is not None:
                mlrun.tags({tracking.TAG_RESUMED_FROM: step})
            print(f"training {raw_model.num_params() / 1e6:.2f}M params on {device} ({dtype}, world "
                  f"{dist.world_size}), {tokens_per_step} tokens/step, budget {cfg.budget} from step {step}; "
                  f"run dir {out_dir}; MLflow run {run_id}", flush=True)

        save_due = False  # a save that fell inside a non-finite streak: done at the next finite step

        def save(at_step: int, v_loss: float | None) -> Path | None:
            nonlocal save_due
            save_due = bool(streak)  # never a checkpoint from inside a non-finite streak
            if manager is None or save_due:
                return None
            return manager.save(
                at_step, model_state=raw_model.state_dict(), optimizer_state=optimizer.state_dict(),
                scheduler_state={"step": at_step, "lr_factor": factor, "bad_steps": bad_steps,
                                 "budget_spent": budget.elapsed(),
                                 "scaler": scaler.state_dict() if scaler.is_enabled() else None},
                data_state=batcher.state_dict(), rng_state=capture_rng_state(),
                config={"model": model_cfg.to_dict(), "train": cfg.to_dict()}, lineage=lineage,
                extra={"best_val_loss": best_val, "train_loss": last_loss}, val_loss=v_loss)

        if resume is not None:
            restore_rng_state(resume["rng_state"])
            resume = start.resume = None  # free the host copy of the weights/optimizer before training
        model.train()
        window_tokens, window_time = 0, 0.0
        health = Health(bad_steps, device)
        skip_on_device = _skips_on_device(optimizer, scaler)
        sync_every = min(cfg.log_every, cfg.max_bad_steps)
        budget.t0 = time.perf_counter()  # the budget's clock runs from here (start-up is not in it)
        progress = Progress(step, budget)
        finished, factor = False, budget.lr_factor(step, False)
        while not finished:
            t0 = time.perf_counter()
            finished, factor = budget.next_step(step, dist, device)
            for g, base_lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base_lr * factor
            teacher_w = budget.teacher_weight()  # 0 without a teacher
            sampled = sampler is not None and budget.sampled()
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = batcher.get_batch(step, micro)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = micro == cfg.grad_accum - 1 or not dist.enabled
                with (contextlib.nullcontext() if sync else model.no_sync()), autocast(device, dtype):
                    h, _ = model(x, hidden=True)  # the head and the loss chunk by chunk; the logged loss is the data's
                    h, w = head_operands(h)
                    objective, loss = head_loss(h, w, y, teacher=teacher, idx=x, share=teacher_w, z_loss=cfg.z_loss,
                                                sample=sampler(y) if sampled else None)
                    objective, loss = objective / cfg.grad_accum, loss / cfg.grad_accum
                scaler.scale(objective).backward()
                loss_sum += loss.detach()
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            bad = health.record(all_reduce(torch.stack([loss_sum.float(), norm.float().to(device)]), "avg"))
            if skip_on_device:  # fused AdamW skips a non-finite step itself: no host-device sync
                optimizer.grad_scale, optimizer.found_inf = None, bad.float()
                optimizer.step()
            elif not bool(bad):  # other optimizers, or fp16's scaler, decide on the host
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            budget.record(time.perf_counter() - t0)
            if finished:
                budget.freeze()
            window_time += time.perf_counter() - t0
            window_tokens += tokens_per_step

            # the step's numbers stay on the device; they are read here, every few steps
            due = lambda every: bool(every) and step % every == 0  # noqa: E731
            out_of_time = cfg.max_minutes is not None and time.time() - t_start > cfg.max_minutes * 60
            if not (finished or due(sync_every) or due(cfg.ckpt_every) or due(cfg.eval_every) or save_due
                    or step == progress.start_step + 1 or stop.signal is not None or out_of_time):
                continue
            last_loss, last_norm, bad_steps, streak, new_bad = health.read()
            if new_bad and dist.is_main:
                print(f"step {step}: {new_bad} step(s) with a non-finite loss or gradient norm skipped "
                      f"({streak} in a row, {bad_steps} in all; last loss {last_loss}, grad norm {last_norm})",
                      flush=True)
            if streak >= cfg.max_bad_steps:
                if mlrun is not None:
                    mlrun.metrics({tracking.BAD_STEPS: bad_steps}, step=step)
                    mlrun.tags({tracking.TAG_STATUS: "diverged"})
                raise TrainingDiverged(
                    f"stopping at step {step}: {streak} consecutive steps with non-finite loss or gradient "
                    f"norm (loss {last_loss}, grad norm {last_norm}); lower the learning rate (train.lr={cfg.lr}) or "
                    f"raise train.warmup_steps. The last good checkpoint is {manager.last_good() if manager else 'on rank 0'}")

            if step % cfg.log_every == 0 or finished or step == progress.start_step + 1:
                tok_s = window_tokens / max(window_time, 1e-9)
                mfu = tok_s * flops_per_token / (peak * dist.world_size) if peak else None
                window_tokens, window_time = 0, 0.0
                if mlrun is not None:
                    mlrun.metrics({tracking.TRAIN_LOSS: last_loss, tracking.LR: cfg.lr * factor,
                                   tracking.GRAD_NORM: last_norm, tracking.TOKENS_PER_S: tok_s,
                                   tracking.BAD_STEPS: bad_steps, tracking.MFU: mfu}, step=step)
                    print(progress.line(step, last_loss, cfg.lr * factor, last_norm, tok_s, mfu), flush=True)

            evaluated = None
            if val_source is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or finished):
                result = val_source.score(eval_model, device=device, dtype=dtype, dist=dist)
                evaluated = val_loss = result["loss"]
                if math.isfinite(evaluated) and (best_val is None or evaluated < best_val):
                    best_val = evaluated
                if mlrun is not None:
                    mlrun.metrics({tracking.VAL_LOSS: evaluated, tracking.VAL_PPL: math.exp(min(evaluated, 50)),
                                   tracking.VAL_BPB: result.get("bits_per_byte")}, step=step)
                    bpb = result.get("bits_per_byte")
                    print(f"step {step:>6} | val loss {evaluated:.4f}" + (f" | val bpb {bpb:.4f}" if bpb else ""),
                          flush=True)

            if mlrun is not None and cfg.sample_every and step % cfg.sample_every == 0 and not finished:
                if text := _samples(raw_model, start.tokenizer, cfg, device):
                    mlrun.text(text, f"samples/step-{step:08d}.txt")

            flags = [stop.signal is not None, out_of_time]
            if dist.enabled:  # every rank stops at the same step
                flags = [bool(f) for f in all_reduce(torch.tensor(flags, dtype=torch.float32, device=device), "max")]
            stopping = any(flags) and not finished
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or finished or stopping or save_due:
                ckpt_path = save(step, evaluated)
            if stopping:
                status = "interrupted" if flags[0] else "time_limit"
                if dist.is_main:
                    print(f"stopping at step {step} ({status}); checkpoint {ckpt_path}", flush=True)
                break

        # --- the end: samples, curve, artifacts, summary -----------------------------------------
        if ckpt_path is None and manager is not None:
            ckpt_path = manager.last_good()
        summary: dict[str, Any] = {
            "status": status, "step": step, "max_steps": budget.total_steps, "budget": cfg.budget,
            "budget_spent_s": budget.elapsed(), "budget_done": status == "completed", "final_lr": cfg.lr * factor,
            "train_loss": last_loss,
            "val_loss": val_loss, "best_val_loss": best_val, "grad_norm": last_norm, "tokens_per_s": tok_s,
            "mfu": mfu, "bad_steps": bad_steps, "tokens_per_step": tokens_per_step, "compile_s": compile_s,
            "out_dir": str(out_dir.resolve()),
            "checkpoint": str(ckpt_path) if ckpt_path else None,
            "best_checkpoint": str(manager.best()) if manager is not None and manager.best() else None,
            "checkpoints": [str(p) for _, p in manager.checkpoints()] if manager is not None else [],
            "mlflow_run_id": run_id, "experiment": experiment, "params": raw_model.num_params(),
            "elapsed_s": time.time() - t_start,
        }
        if mlrun is not None:
            mlrun.metrics({tracking.ELAPSED_S: summary["elapsed_s"]}, step=step)
            if status != "interrupted":  # Ctrl-C means "stop now": samples and plots wait for the end
                if text := _samples(raw_model, start.tokenizer, cfg, device):
                    atomic_write_text(out_dir / "samples.txt", text)
                    mlrun.text(text, f"samples/step-{step:08d}.txt")
                if png := tracking.plot_loss_curves(mlrun, out_dir / "loss_curve.png"):
                    mlrun.artifact(png, "plots")
            if status == "completed" and cfg.log_checkpoints and summary["checkpoint"]:
                # one file: the final checkpoint (what evaluate and finetune take), weights only, as an MLflow model
                summary["model_uri"] = mlrun.model(summary["checkpoint"])["model_uri"]
            mlrun.tags({tracking.TAG_STATUS: status, tracking.TAG_CHECKPOINT: summary["checkpoint"]})
            atomic_write_json(out_dir / SUMMARY_NAME, summary)
            mlrun.artifact(out_dir / SUMMARY_NAME)
            print(f"{status} at step {step}: train loss {last_loss:.4f}"
                  + (f", val loss {val_loss:.4f}" if val_loss is not None else "")
                  + f"; checkpoints in {out_dir}", flush=True)
    return summary


def _compiled(model: GPT, batch_size: int, block_size: int, device: torch.device, dtype: torch.dtype | None, *,
              say: bool = True) -> tuple[torch.nn.Module, float | None]:
    """``torch.compile(model)``, compiled before the budget's clock starts: one forward and backward
    on a batch of zeros of the training shape, its gradients dropped and the random state put back,
    so the weights, the optimizer, the data and the RNG are as they were (modded-nanogpt times its
    records the same way). Compilation is start-up, like loading the data: on a CPU it takes 20-30 s,
    which a ten-minute budget would otherwise lose. Where compiling fails (no C++ compiler for
    inductor on a CPU, an unsupported backend), one line says so and the run trains eagerly.
    Returns the model to train and the seconds compiling took (None: not compiled)."""
    t0 = time.perf_counter()
    compiled = torch.compile(model)
    rng = capture_rng_state()
    x = torch.zeros(batch_size, block_size, dtype=torch.long, device=device)
    try:
        with autocast(device, dtype):
            h, _ = compiled(x, hidden=True)
        if h.requires_grad:  # (not when only the head trains)
            h.float().square().mean().backward()
    except Exception as e:  # noqa: BLE001 - any failure to compile leaves the eager model, which works
        if say:
            why = (str(e).strip().splitlines() or [""])[0]
            print(f"torch.compile failed ({type(e).__name__}{': ' + why if why else ''}); training without it",
                  flush=True)
        return model, None
    finally:
        model.zero_grad(set_to_none=True)
        restore_rng_state(rng)
    seconds = time.perf_counter() - t0
    if say:
        print(f"torch.compile: {seconds:.1f} s (start-up: not in the budget)", flush=True)
    return compiled, seconds


def _samples(model: GPT, tokenizer: bytes | None, cfg: TrainConfig, device: torch.device) -> str:
    """Samples from the fixed prompts (own seeded generator: the training RNG is untouched)."""
    if not tokenizer or not cfg.sample_prompts or not cfg.sample_tokens:
        return ""
    from llmforge.pipeline.tokenizer import Tokenizer

    samples = sample_texts(model, Tokenizer(tokenizer), cfg.sample_prompts, max_new_tokens=cfg.sample_tokens,
                           sampling=SamplingConfig(temperature=0.8, top_k=40, seed=cfg.seed), device=device)
    return format_samples(samples)


def build_recipe(recipe: str | None = None, *, preset: str | None = None, model: dict[str, Any] | None = None,
                 train: dict[str, Any] | None = None) -> TrainRecipe:
    """A recipe from a recipe file (name or path) with ``model`` / ``train`` sections merged over
    it and ``preset`` (``model.preset``) on top: how commands, flows and deployments assemble one."""
    from llmforge.config import deep_merge

    data: dict[str, Any] = load_recipe(recipe) if recipe else {}
    data = deep_merge(data, {"model": model or {}, "train": train or {}})
    if preset is not None:
        data["model"]["preset"] = preset
    return TrainRecipe.load(data, source=f"--config {recipe}" if recipe else "train config")
