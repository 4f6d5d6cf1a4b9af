"""The finetune stage: continue training any checkpoint, keeping its tokenizer.

Two kinds of data, two ways to update:

- plain text (domain adaptation): a token dataset made by the prepare stage *with the base
  model's tokenizer* (``llmforge prepare --tokenizer``); its manifest's tokenizer fingerprint
  must equal the checkpoint's, else token ids would mean different things.
- prompt/response JSONL (instruction tuning): :mod:`model.sft` formats each record with the
  chat template and masks the loss to the response (+ EOS).
- ``mode="full"`` updates every weight; ``mode="lora"`` freezes the model and trains
  low-rank adapters (:mod:`model.lora`) on the attention/MLP projections, which needs far less
  optimizer memory; at the end the adapters are merged so the result is a plain checkpoint.

The loop is :func:`model.train.train` (``init_from`` the base checkpoint, a custom batcher for
SFT, ``prepare_model`` adding the adapters), so resume, clipping, bf16, DDP and MLflow logging
are the same as pretraining's. Layout of ``out_dir``::

    train/            the training run (resumable ckpt-*.pt, latest.json, summary.json, samples)
    model.pt          the fine-tuned model: a plain checkpoint (LoRA merged) with the tokenizer
    lora_adapter.pt   (lora only) just the adapter weights and their settings
    finetune.json     the stage summary; written last, so its presence means the stage is done

The training run is the stage's MLflow run (named ``finetune-<mode>``), tagged
``llmforge.stage=finetune`` and ``llmforge.base_run_id`` (the base checkpoint's run), and the
checkpoint lineage names the base checkpoint's path and sha256.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llmforge.model.checkpoint import load_checkpoint, save_checkpoint
from llmforge.model.gpt import GPT, GPTConfig
from llmforge.model.lora import DEFAULT_TARGETS, apply_lora, count_trainable, lora_state_dict, merge_lora
from llmforge.pipeline.fsutil import atomic_path, atomic_write_json, fingerprint, read_json, sha256_file
from llmforge.pipeline.shards import Dataset

log = logging.getLogger(__name__)

SUMMARY_NAME = "finetune.json"
MODEL_NAME = "model.pt"
ADAPTER_NAME = "lora_adapter.pt"


@dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run; ``None`` means "the mode's default" (see :meth:`resolved`)."""

    mode: str = "full"  # "full" | "lora"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    lr: float | None = None  # full: 1e-4, lora: 1e-3
    min_lr: float | None = None  # None: lr / 10
    weight_decay: float | None = None  # full: 0.1, lora: 0.0
    warmup_steps: int = 20
    max_steps: int = 500
    batch_size: int = 8
    grad_accum: int = 1
    block_size: int | None = None  # None: the base model's
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_tokens: int | None = 262_144  # plain-text fine-tuning: target tokens per evaluation
    ckpt_every: int = 250
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    dropout: float | None = None  # None: keep the base model's
    # prompt/response data
    val_fraction: float = 0.05  # share of SFT examples held out (by hash) for validation loss
    pack: bool = False  # pack several examples per row instead of one padded example per row

    def __post_init__(self) -> None:
        self.lora_targets = tuple(self.lora_targets)

    def validate(self) -> None:
        problems = []
        if self.mode not in ("full", "lora"):
            problems.append(f"mode must be 'full' or 'lora' (got {self.mode!r})")
        if self.lora_r < 1:
            problems.append(f"lora_r must be >= 1 (got {self.lora_r})")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if not 0 <= self.val_fraction < 1:
            problems.append(f"val_fraction must be in [0, 1) (got {self.val_fraction})")
        if problems:
            raise ValueError("invalid fine-tuning config: " + "; ".join(problems))

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.mode == "lora" else 1e-4)

    @property
    def resolved_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else (0.0 if self.mode == "lora" else 0.1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    def train_config(self, **overrides: Any):
        """The :class:`model.train.TrainConfig` that runs this fine-tune."""
        from llmforge.model.train import TrainConfig

        fields = dict(
            model={"dropout": self.dropout} if self.dropout is not None else {},
            block_size=self.block_size,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            max_steps=self.max_steps,
            lr=self.resolved_lr,
            min_lr=self.min_lr,
            warmup_steps=min(self.warmup_steps, self.max_steps),
            weight_decay=self.resolved_weight_decay,
            grad_clip=self.grad_clip,
            eval_every=self.eval_every,
            eval_tokens=self.eval_tokens,
            ckpt_every=self.ckpt_every,
            seed=self.seed,
            device=self.device,
            dtype=self.dtype,
            compile=self.compile,
        )
        return TrainConfig(**{**fields, **overrides})


def tokenizer_fingerprint(ckpt: dict[str, Any]) -> str | None:
    """Fingerprint of the checkpoint's embedded tokenizer (same definition as the manifests':
    sha256 of the SentencePiece model bytes, 16 hex digits), else its lineage's."""
    t = ckpt.get("tokenizer")
    if t is not None:
        return hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest()[:16]
    return (ckpt.get("lineage") or {}).get("tokenizer_fingerprint")


def check_same_tokenizer(checkpoint: str | os.PathLike, ckpt: dict[str, Any], dataset: Dataset) -> None:
    """Refuse a dataset tokenized with anything but the checkpoint's tokenizer."""
    ours = tokenizer_fingerprint(ckpt)
    theirs = dataset.manifest["tokenizer"].get("fingerprint")
    if ours is None:
        raise ValueError(f"{checkpoint}: checkpoint records no tokenizer, so it cannot be fine-tuned on token data")
    if ours != theirs:
        raise ValueError(
            f"{dataset.root}: tokenized with tokenizer {theirs}, but {checkpoint} uses tokenizer {ours}. "
            f"Fine-tuning keeps the base model's tokenizer: prepare the corpus again with "
            f"`llmforge prepare --tokenizer <its tokenizer.model>` (or `llmforge finetune --text`, which does that)."
        )


def finetune_key(base_sha256: str, data_id: str, cfg: FinetuneConfig) -> str:
    """What makes two fine-tunes the same: base checkpoint bytes, data identity, config
    (the device does not change the result's meaning and is left out)."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("device",)}
    return fingerprint("finetune", base_sha256, data_id, d)


def data_identity(data_dir: str | os.PathLike | None, sft_file: str | os.PathLike | None) -> str:
    if (data_dir is None) == (sft_file is None):
        raise ValueError("fine-tuning needs exactly one of data_dir (token shards) or sft_file (prompt/response JSONL)")
    if data_dir is not None:
        return "tokens:" + Dataset.open(data_dir).fingerprint
    return "sft:" + sha256_file(sft_file)


def completed(out_dir: str | os.PathLike, key: str | None = None) -> dict[str, Any] | None:
    """The summary of a finished fine-tune in ``out_dir`` (matching ``key`` if given), else None."""
    p = Path(out_dir) / SUMMARY_NAME
    if not p.is_file() or not (Path(out_dir) / MODEL_NAME).is_file():
        return None
    summary = read_json(p)
    if key is not None and summary.get("key") != key:
        return None
    return summary


def _lora_hook(cfg: FinetuneConfig):
    def prepare(model: GPT) -> None:
        names = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           targets=cfg.lora_targets)
        trainable, total = count_trainable(model)
        print(f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on {len(names)} layers: "
              f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)", flush=True)

    return prepare


def finetune(
    checkpoint: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    sft_file: str | os.PathLike | None = None,
    out_dir: str | os.PathLike,
    cfg: FinetuneConfig | None = None,
    parent_run_id: str | None = None,
    experiment: str = "llmforge",
) -> dict[str, Any]:
    """Fine-tune ``checkpoint`` on a token dataset (``data_dir``) or prompt/response JSONL
    (``sft_file``); write ``out_dir/model.pt`` and return the stage summary. Re-running on the
    same ``out_dir`` resumes an interrupted run, or returns at once when it already finished."""
    from llmforge.model.train import train

    cfg = cfg or FinetuneConfig()
    cfg.validate()
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir)
    t0 = time.time()
    data_id = data_identity(data_dir, sft_file)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: base checkpoint not found")
    base_sha = sha256_file(checkpoint)
    key = finetune_key(base_sha, data_id, cfg)
    if (done := completed(out_dir, key)) is not None:
        print(f"{out_dir}: fine-tune already complete ({done['model']}); nothing to do")
        return done

    base = load_checkpoint(checkpoint, map_location="cpu")
    base_cfg = GPTConfig.from_dict(base["config"]["model"], source=f"{checkpoint} config['model']")
    base_lineage = base.get("lineage") or {}
    base_run_id = base_lineage.get("mlflow_run_id")
    block_size = min(cfg.block_size or base_cfg.block_size, base_cfg.block_size)
    tok_bytes = base["tokenizer"].cpu().numpy().tobytes() if base.get("tokenizer") is not None else None
    data_info: dict[str, Any] = {"identity": data_id}

    train_kwargs: dict[str, Any] = {}
    if data_dir is not None:
        dataset = Dataset.open(data_dir)
        check_same_tokenizer(checkpoint, base, dataset)
        data_info.update(kind="text", data_dir=str(Path(data_dir).resolve()), train_tokens=dataset.num_tokens("train"))
        tcfg = cfg.train_config(block_size=block_size)
        data_arg = data_dir
    else:
        from llmforge.model import sft

        if tok_bytes is None:
            raise ValueError(f"{checkpoint}: checkpoint carries no tokenizer; cannot encode {sft_file}")
        from llmforge.pipeline.tokenizer import Tokenizer

        tok = Tokenizer(tok_bytes)
        examples, bad = sft.load_sft_jsonl(sft_file)
        for b in bad[:20]:
            log.warning("%s:%d: skipped: %s", sft_file, b.line, b.reason)
        if bad:
            print(f"{sft_file}: skipped {len(bad)} bad line(s), e.g. line {bad[0].line}: {bad[0].reason}", flush=True)
        train_ex, val_ex = sft.split_examples(examples, cfg.val_fraction)
        try:
            rows = sft.build_rows(train_ex, tok, block_size, tok.eos_id, pack=cfg.pack)
            val_rows = sft.build_rows(val_ex, tok, block_size, tok.eos_id, pack=cfg.pack) if val_ex else None
        except ValueError as e:
            raise ValueError(f"{sft_file}: {e}") from e
        data_info.update(
            kind="sft", sft_file=str(Path(sft_file).resolve()), examples=len(examples), bad_lines=len(bad),
            bad_line_examples=[f"line {b.line}: {b.reason}" for b in bad[:20]],
            train_examples=len(train_ex), val_examples=len(val_ex), rows=rows.stats,
            val_rows=val_rows.stats if val_rows else None,
        )
        prompts = [ex.prompt_text() for ex in (val_ex or train_ex)[:3]]
        tcfg = cfg.train_config(block_size=block_size, sample_prompts=prompts, sample_tokens=96)
        train_kwargs["batcher"] = lambda rank, world, device: sft.SFTBatcher(
            rows, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world, device=device)
        if val_rows is not None:
            train_kwargs["val_batcher"] = lambda rank, world, device: sft.SFTEvalSource(
                val_rows, cfg.batch_size, rank=rank, world_size=world, device=device)
        data_arg = None

    lineage = {"base_checkpoint_sha256": base_sha, "base_run_id": base_run_id, "finetune_mode": cfg.mode,
               "finetune_data": data_id}
    del base  # the loop loads the base weights itself; do not hold two copies
    summary = train(
        tcfg, data_arg, out_dir / "train", init_from=checkpoint, experiment=experiment,
        parent_run_id=parent_run_id, run_name=f"finetune-{cfg.mode}",
        prepare_model=_lora_hook(cfg) if cfg.mode == "lora" else None, lineage=lineage, **train_kwargs,
    )
    if summary.get("status") != "completed":
        raise RuntimeError(f"fine-tuning stopped early ({summary.get('status')}) at step {summary.get('step')}; "
                           f"run the same command again to resume from {summary.get('checkpoint')}")
    final = Path(summary["checkpoint"])
    result = export_model(final, out_dir, cfg)
    out = {
        "key": key,
        "mode": cfg.mode,
        "base_checkpoint": str(checkpoint.resolve()),
        "base_checkpoint_sha256": base_sha,
        "base_run_id": base_run_id,
        "data": data_info,
        "config": cfg.to_dict(),
        "train": {k: summary.get(k) for k in ("step", "train_loss", "val_loss", "best_val_loss", "tokens_per_s",
                                               "elapsed_s", "out_dir")},
        "model": str(result["model"]),
        "adapter": str(result["adapter"]) if result.get("adapter") else None,
        "mlflow_run_id": summary.get("mlflow_run_id"),
        "seconds": round(time.time() - t0, 3),
    }
    if out["mlflow_run_id"]:
        _record(out, experiment)
    atomic_write_json(out_dir / SUMMARY_NAME, out)
    return out


def export_model(final: Path, out_dir: Path, cfg: FinetuneConfig) -> dict[str, Path]:
    """Turn the last training checkpoint into ``out_dir/model.pt``: plain weights (LoRA merged),
    no optimizer state, loadable by every other tool with ``GPT(config)``."""
    ckpt = load_checkpoint(final, map_location="cpu")
    model_cfg = GPTConfig.from_dict(ckpt["config"]["model"], source=str(final))
    model = GPT(model_cfg)
    paths: dict[str, Path] = {}
    if cfg.mode == "lora":
        apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)
        model.load_state_dict(ckpt["model_state"])
        adapter = {"lora": lora_state_dict(model),
                   "settings": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "targets": list(cfg.lora_targets)},
                   "base_checkpoint_sha256": ckpt["lineage"].get("base_checkpoint_sha256")}
        with atomic_path(out_dir / ADAPTER_NAME) as tmp:
            torch.save(adapter, tmp)
        paths["adapter"] = out_dir / ADAPTER_NAME
        merge_lora(model)
    else:
        model.load_state_dict(ckpt["model_state"])
    paths["model"] = save_checkpoint(
        out_dir / MODEL_NAME, model_state=model.state_dict(), optimizer_state=None, scheduler_state=None,
        step=ckpt["step"], data_state={}, rng_state=ckpt["rng_state"], config=ckpt["config"],
        lineage=ckpt["lineage"], tokenizer=ckpt.get("tokenizer"), val_loss=ckpt.get("val_loss"),
        extra={**(ckpt.get("extra") or {}), "finetune_mode": cfg.mode, "merged_lora": cfg.mode == "lora"},
    )
    return paths


def _record(out: dict[str, Any], experiment: str) -> None:
    """Tag the training run as this fine-tune (linked to the base model's run) and attach the
    stage's own params and summary."""
    from mlflow.entities import Param, RunTag

    from llmforge.pipeline import tracking

    mlflow = tracking.setup(experiment)
    client = mlflow.MlflowClient()
    rid = out["mlflow_run_id"]
    tags = {"llmforge.stage": "finetune", "llmforge.finetune_mode": out["mode"],
            "llmforge.base_checkpoint": out["base_checkpoint"]}
    if out["base_run_id"]:
        tags["llmforge.base_run_id"] = out["base_run_id"]
    data = {k: v for k, v in out["data"].items() if not isinstance(v, (dict, list))}
    existing = client.get_run(rid).data.params  # params are write-once: a resumed run logged them already
    params = [Param(k, str(v)[:6000]) for k, v in tracking.flatten({"finetune": {**out["config"], "data": data}}).items()
              if k not in existing]
    client.log_batch(rid, params=params, tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_dict(rid, out, SUMMARY_NAME)
