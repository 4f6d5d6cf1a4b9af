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

import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from llmforge import tracking
from llmforge.config import Config, control
from llmforge.errors import ConfigError, DataError, NotFound
from llmforge.model.evaluate import EvalConfig
from llmforge.model.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, tokenizer_bytes
from llmforge.model.gpt import GPT, GPTConfig, ModelSpec
from llmforge.model.lora import DEFAULT_TARGETS, apply_lora, count_trainable, lora_state_dict, merge_lora
from llmforge.model.train import TrainConfig, TrainRecipe, train
from llmforge.pipeline.fsutil import atomic_path, atomic_write_json, sha256_file
from llmforge.pipeline.shards import Dataset
from llmforge.stage import Stage

log = logging.getLogger(__name__)

SUMMARY_NAME = "finetune.json"
MODEL_NAME = "model.pt"
ADAPTER_NAME = "lora_adapter.pt"


def train_defaults(mode: str) -> dict[str, Any]:
    """The fine-tuning loop's defaults (a ``train:`` section only overrides what it sets)."""
    return {"max_steps": 500, "warmup_steps": 20, "batch_size": 8, "eval_every": 100, "ckpt_every": 250,
            "lr": 1e-3 if mode == "lora" else 1e-4, "weight_decay": 0.0 if mode == "lora" else 0.1,
            "sample_tokens": 96}


class FinetuneConfig(Config):
    """A fine-tune: how (full or LoRA), on what (exactly one of sft, text, data), and its loop
    (``train:``, the same TrainConfig pretraining uses, with fine-tuning defaults)."""

    mode: Literal["full", "lora"] = Field("full", description="update every weight, or LoRA adapters")
    lora_r: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scale numerator: update = alpha/r * B A")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    lora_targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS),
                                    description="module names whose Linear layers get adapters")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="SFT examples held out (by hash) for validation")
    pack: bool = Field(False, description="SFT: pack several examples per sequence")
    model: ModelSpec = Field(default_factory=ModelSpec, description="the model is the checkpoint's (model.preset is "
                             "not used); only model.dropout can change")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(**train_defaults("full")))
    # the data: exactly one; its identity (file hash, dataset fingerprint) is part of the key
    sft: str | None = control(None, "prompt/response (or Alpaca) JSONL; loss on the response only")
    text: list[str] | None = control(None, "raw text files, directories or URLs, prepared with the model's tokenizer")
    data: str | None = control(None, "a token dataset made with the model's tokenizer")

    @model_validator(mode="before")
    @classmethod
    def _train_defaults(cls, values: Any) -> Any:
        if isinstance(values, dict):
            t = values.get("train") or {}
            if isinstance(t, TrainConfig):
                t = t.model_dump(exclude_unset=True)
            values = {**values, "train": {**train_defaults(values.get("mode") or "full"), **t}}
        return values

    @model_validator(mode="after")
    def _one_source(self) -> "FinetuneConfig":
        given = [k for k in ("sft", "text", "data") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give exactly one data source, got {' and '.join(given)}")
        return self


class PipelineOptions(Config):
    """``llmforge pipeline``'s settings tree: pretraining (``model``, ``train``), both evaluations
    (``eval``) and the optional fine-tune (``finetune``, with its own ``finetune.train``)."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    finetune: FinetuneConfig | None = None
    name: str | None = control(None, "the recipe's name (its file's stem)")


def check_same_tokenizer(checkpoint: Path, ckpt_tok_fp: str | None, dataset: Dataset) -> None:
    """Refuse a dataset tokenized with anything but the checkpoint's tokenizer."""
    theirs = dataset.manifest["tokenizer"].get("fingerprint")
    if ckpt_tok_fp is None:
        raise DataError(f"{checkpoint}: checkpoint records no tokenizer, so it cannot be fine-tuned on token data")
    if ckpt_tok_fp != theirs:
        raise DataError(
            f"{dataset.root}: tokenized with tokenizer {theirs}, but {checkpoint} uses tokenizer {ckpt_tok_fp}; "
            f"fine-tuning keeps the model's tokenizer: prepare the text with `llmforge finetune --text` (or "
            f"`llmforge prepare --tokenizer <its tokenizer.model>`)")


class FinetuneStage(Stage):
    """Fine-tune a checkpoint. Output: ``<runs_root>/finetune-<mode>-<key>`` (unless ``out_dir``)
    holding ``train/`` (the resumable training run), ``model.pt`` (plain weights, LoRA merged),
    ``lora_adapter.pt`` (lora) and ``finetune.json`` (written last: the stage is done)."""

    name = "finetune"

    def __init__(self, checkpoint: str | os.PathLike, config: FinetuneConfig, *, out_dir: str | os.PathLike | None = None,
                 runs_root: str | os.PathLike = "runs"):
        self.config = config
        self.checkpoint = find_checkpoint(checkpoint)
        given = [k for k in ("sft", "text", "data") if getattr(config, k)]
        if not given:
            raise ConfigError("fine-tuning needs data: give --sft FILE.jsonl, --text SOURCE or --data DATASET_DIR")
        if config.sft and not Path(config.sft).is_file():
            raise NotFound(f"{config.sft}: no such SFT file" + (" (it is a directory)" if Path(config.sft).is_dir()
                                                                  else ""))
        self.dataset = Dataset.open(config.data) if config.data else None
        self._out = Path(out_dir) if out_dir is not None else None
        self.runs_root = Path(runs_root)

    def inputs(self) -> Any:
        if self.config.text:
            raise ConfigError("a --text fine-tune's key needs its prepared dataset: prepare the text first "
                              "(the finetune flow does) and pass it as data")
        data = f"sft:{sha256_file(self.config.sft)}" if self.config.sft else f"tokens:{self.dataset.fingerprint}"
        return [sha256_file(self.checkpoint), data]

    @property
    def out_dir(self) -> Path:
        return self._out or self.runs_root / f"finetune-{self.config.mode}-{self.key}"

    def completed(self) -> dict[str, Any] | None:
        summary = self.read_result(self.out_dir / SUMMARY_NAME)
        if summary is None or summary.get("key") != self.key or not (self.out_dir / MODEL_NAME).is_file():
            return None
        return summary

    def run(self, *, experiment: str = tracking.EXPERIMENT, parent_run_id: str | None = None) -> dict[str, Any]:
        from llmforge.pipeline.fsutil import DirLock

        # Inputs are checked before the lock creates the output directory: a refused fine-tune
        # leaves nothing behind.
        base = load_checkpoint(self.checkpoint, map_location="cpu")
        if self.dataset is not None:
            check_same_tokenizer(self.checkpoint, _tokenizer_fingerprint(base), self.dataset)
        with DirLock(self.out_dir):  # one writer per output directory
            return finetune(self, experiment=experiment, parent_run_id=parent_run_id, base=base)


def _tokenizer_fingerprint(base: dict[str, Any]) -> str | None:
    from llmforge.pipeline.tokenizer import Tokenizer

    tok_bytes = tokenizer_bytes(base)
    return Tokenizer(tok_bytes).fingerprint if tok_bytes else (base.get("lineage") or {}).get("tokenizer_fingerprint")


def _lora_hook(cfg: FinetuneConfig):
    def prepare(model: GPT) -> None:
        names = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           targets=cfg.lora_targets)
        trainable, total = count_trainable(model)
        print(f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on {len(names)} layers: "
              f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)", flush=True)

    return prepare


def finetune(stage: FinetuneStage, *, experiment: str = tracking.EXPERIMENT,
             parent_run_id: str | None = None, base: dict[str, Any]) -> dict[str, Any]:
    """Run a fine-tune of ``base`` (the loaded base checkpoint, its inputs already checked by
    :meth:`FinetuneStage.run`): write ``model.pt`` and ``finetune.json`` and return the summary.
    Run again on the same directory it resumes an interrupted run."""
    from llmforge.model import sft

    cfg, checkpoint, out_dir = stage.config, stage.checkpoint, stage.out_dir
    t0 = time.time()
    base_sha, data_id = stage.inputs()
    base_cfg = GPTConfig.load(base["config"]["model"], source=f"{checkpoint} config['model']")
    base_lineage = base.get("lineage") or {}
    base_run_id = base_lineage.get("mlflow_run_id")
    block_size = min(cfg.train.block_size or base_cfg.block_size, base_cfg.block_size)
    tok_bytes = tokenizer_bytes(base)
    data_info: dict[str, Any] = {"identity": data_id}
    # the run's MLflow model is the merged model.pt (logged below), not the loop's last checkpoint
    tcfg = cfg.train.model_copy(update={"block_size": block_size, "log_checkpoints": False,
                                        "warmup_steps": min(cfg.train.warmup_steps, cfg.train.max_steps)})
    train_kwargs: dict[str, Any] = {}
    if stage.dataset is not None:
        data_info.update(kind="text", data_dir=str(stage.dataset.root.resolve()),
                         train_tokens=stage.dataset.num_tokens("train"))
        data_arg = stage.dataset.root
    else:
        from llmforge.pipeline.tokenizer import Tokenizer

        if tok_bytes is None:
            raise DataError(f"{checkpoint}: checkpoint carries no tokenizer; cannot encode {cfg.sft}")
        tok = Tokenizer(tok_bytes)
        examples, bad = sft.load_sft_jsonl(cfg.sft)
        if bad:
            print(f"{cfg.sft}: skipped {len(bad)} bad line(s): "
                  + "; ".join(f"line {b.line}: {b.reason}" for b in bad[:5]) + (" ..." if len(bad) > 5 else ""),
                  flush=True)
        train_ex, val_ex = sft.split_examples(examples, cfg.val_fraction)
        try:
            rows = sft.build_rows(train_ex, tok, block_size, tok.eos_id, pack=cfg.pack)
            val_rows = sft.build_rows(val_ex, tok, block_size, tok.eos_id, pack=cfg.pack) if val_ex else None
        except DataError as e:
            raise DataError(f"{cfg.sft}: {e}") from None
        data_info.update(
            kind="sft", sft_file=str(Path(cfg.sft).resolve()), examples=len(examples), bad_lines=len(bad),
            bad_line_examples=[f"line {b.line}: {b.reason}" for b in bad[:20]],
            train_examples=len(train_ex), val_examples=len(val_ex), rows=rows.stats,
            val_rows=val_rows.stats if val_rows else None)
        tcfg = tcfg.model_copy(update={"sample_prompts": [ex.prompt_text() for ex in (val_ex or train_ex)[:3]]})
        train_kwargs["batcher"] = lambda rank, world, device: sft.SFTBatcher(
            rows, tcfg.batch_size, seed=tcfg.seed, rank=rank, world_size=world, device=device)
        if val_rows is not None:
            train_kwargs["val_source"] = sft.SFTScorer(val_rows, tcfg.batch_size)
        data_arg = None

    lineage = {"base_checkpoint_sha256": base_sha, "base_run_id": base_run_id, "finetune_mode": cfg.mode,
               "finetune_data": data_id}
    del base  # the loop loads the base weights itself; do not hold two copies
    recipe = TrainRecipe(model=cfg.model, train=tcfg, name=f"{cfg.mode}")
    data_label = Path(cfg.sft).stem if cfg.sft else ((stage.dataset.manifest.get("config") or {}).get("corpus")
                                                     or {}).get("name")
    summary = train(recipe, data_arg, out_dir / "train", init_from=checkpoint, experiment=experiment,
                    parent_run_id=parent_run_id, stage="finetune",
                    run_name=tracking.run_name("finetune", cfg.mode, data_label, f"from {checkpoint.parent.name}",
                                               f"{tcfg.max_steps} steps"),
                    prepare_model=_lora_hook(cfg) if cfg.mode == "lora" else None, lineage=lineage, **train_kwargs)
    train_summary = {k: summary.get(k) for k in ("step", "train_loss", "val_loss", "best_val_loss", "tokens_per_s",
                                                  "elapsed_s", "out_dir", "checkpoint")}
    if summary.get("status") != "completed":  # interrupted: the next run resumes from its checkpoint
        return {"status": summary.get("status"), "key": stage.key, "mode": cfg.mode, "train": train_summary,
                "model": None, "mlflow_run_id": summary.get("mlflow_run_id"), "data": data_info}
    result = export_model(Path(summary["checkpoint"]), out_dir, cfg)
    out = {
        "status": "completed", "key": stage.key, "mode": cfg.mode, "base_checkpoint": str(checkpoint.resolve()),
        "base_checkpoint_sha256": base_sha, "base_run_id": base_run_id, "data": data_info,
        "config": cfg.to_dict(),
        "train": train_summary,
        "model": str(result["model"]), "adapter": str(result["adapter"]) if result.get("adapter") else None,
        "mlflow_run_id": summary.get("mlflow_run_id"), "seconds": round(time.time() - t0, 3),
    }
    if out["mlflow_run_id"]:
        run = tracking.StageRun(tracking.client(), out["mlflow_run_id"], experiment)
        run.tags({tracking.TAG_BASE_RUN: base_run_id, tracking.TAG_BASE_CHECKPOINT: out["base_checkpoint"],
                  "llmforge.finetune_mode": cfg.mode})
        run.params({"finetune": {k: v for k, v in cfg.key_dict().items() if k not in ("train", "model")},
                    "data": {k: v for k, v in data_info.items() if not isinstance(v, (dict, list))}})
        if cfg.train.log_checkpoints:
            out["model_uri"] = run.model(result["model"])["model_uri"]
        run.json(out, SUMMARY_NAME)
    atomic_write_json(out_dir / SUMMARY_NAME, out)
    return out


def export_model(final: Path, out_dir: Path, cfg: FinetuneConfig) -> dict[str, Path]:
    """Turn the last training checkpoint into ``out_dir/model.pt``: plain weights (LoRA merged),
    no optimizer state, loadable by every other tool with ``GPT(config)``."""
    ckpt = load_checkpoint(final, map_location="cpu")  # noqa: the training run's last checkpoint
    model_cfg = GPTConfig.load(ckpt["config"]["model"], source=str(final))
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
    extra = {**(ckpt.get("extra") or {}), "finetune_mode": cfg.mode, "merged_lora": cfg.mode == "lora"}
    if cfg.sft:  # instruction-tuned: `llmforge chat` / `serve` lay conversations out as it was trained
        from llmforge.model.chat import TEMPLATE_KEY
        from llmforge.model.sft import CHAT_TEMPLATE

        extra[TEMPLATE_KEY] = CHAT_TEMPLATE
    paths["model"] = save_checkpoint(
        out_dir / MODEL_NAME, model_state=model.state_dict(), optimizer_state=None, scheduler_state=None,
        step=ckpt["step"], data_state={}, rng_state=ckpt["rng_state"], config=ckpt["config"],
        lineage=ckpt["lineage"], tokenizer=ckpt.get("tokenizer"), val_loss=ckpt.get("val_loss"), extra=extra,
    )
    return paths


