"""The finetune flow: (prepare plain text with the base tokenizer ->) fine-tune, as Prefect tasks.

Thin wiring only. The output directory defaults to ``runs/finetune-<mode>-<key>``, the key being
the fingerprint of (base checkpoint sha256, data identity, fine-tuning config); when it already
holds a finished fine-tune for that key the flow returns its summary without training, and an
interrupted one resumes from its newest checkpoint when the flow is run again.

Plain text given as ``text_sources`` (files, directories or URLs, like ``llmforge prepare
--source``) first goes through the prepare flow *with the base checkpoint's tokenizer* (written
next to the shards as ``base-tokenizer-<fingerprint>.model``), so the fine-tuning data and
the model always share their token ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact


def default_out_dir(mode: str, key: str, root: str = "runs") -> Path:
    return Path(root) / f"finetune-{mode}-{key}"


def base_tokenizer_file(checkpoint: str | Path, root: str | Path) -> Path:
    """Write the checkpoint's embedded SentencePiece model to ``root`` (atomically, once)."""
    from llmforge.model.checkpoint import load_checkpoint
    from llmforge.model.finetune import tokenizer_fingerprint
    from llmforge.pipeline.fsutil import atomic_write_bytes

    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    if ckpt.get("tokenizer") is None:
        raise ValueError(f"{checkpoint}: checkpoint carries no tokenizer, so its text data cannot be prepared")
    path = Path(root) / f"base-tokenizer-{tokenizer_fingerprint(ckpt)}.model"
    if not path.is_file():
        atomic_write_bytes(path, ckpt["tokenizer"].cpu().numpy().tobytes())
    return path


@task(name="finetune", retries=0)
def finetune_task(checkpoint: str, data_dir: str | None, sft_file: str | None, out_dir: str, cfg_dict: dict,
                  experiment: str, parent_run_id: str | None) -> dict:
    from llmforge.model.finetune import FinetuneConfig, finetune

    return finetune(checkpoint, data_dir=data_dir, sft_file=sft_file, out_dir=out_dir,
                    cfg=FinetuneConfig(**cfg_dict), experiment=experiment, parent_run_id=parent_run_id)


@flow(name="finetune", log_prints=True)
def finetune_flow(
    checkpoint: str,
    data_dir: str | None = None,
    sft_file: str | None = None,
    text_sources: list[str] | None = None,
    out_dir: str | None = None,
    config: dict[str, Any] | None = None,
    shards_root: str = "shards",
    runs_root: str = "runs",
    experiment: str = "llmforge",
    parent_run_id: str | None = None,
) -> dict:
    """Fine-tune ``checkpoint`` on exactly one of: a token dataset (``data_dir``), a
    prompt/response JSONL (``sft_file``) or raw text (``text_sources``, prepared here with the
    base tokenizer). ``config`` holds :class:`model.finetune.FinetuneConfig` fields."""
    from llmforge.model.finetune import FinetuneConfig, completed, data_identity, finetune_key
    from llmforge.pipeline.fsutil import sha256_file

    logger = get_run_logger()
    cfg = FinetuneConfig(**(config or {}))
    cfg.validate()
    if sum(x is not None for x in (data_dir, sft_file, text_sources)) != 1:
        raise ValueError("give exactly one of data_dir, sft_file or text_sources")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"{checkpoint}: base checkpoint not found")
    if text_sources is not None:
        from llmforge.flows.data import prepare_flow

        tok_path = base_tokenizer_file(checkpoint, shards_root)
        logger.info("preparing %s with the base model's tokenizer %s", text_sources, tok_path)
        prepared = prepare_flow(corpus=None, sources=list(text_sources), out=shards_root,
                                tokenizer_model=str(tok_path), parent_run_id=parent_run_id)
        data_dir = prepared["dataset"] if isinstance(prepared, dict) else prepared
    key = finetune_key(sha256_file(checkpoint), data_identity(data_dir, sft_file), cfg)
    out = Path(out_dir) if out_dir else default_out_dir(cfg.mode, key, runs_root)
    if (done := completed(out, key)) is not None:
        logger.info("fine-tune %s already done: %s (skipped)", key, out)
        return {**done, "skipped": True}
    summary = finetune_task(str(checkpoint), str(data_dir) if data_dir else None, str(sft_file) if sft_file else None,
                            str(out), cfg.to_dict(), experiment, parent_run_id)
    train = summary["train"]
    val = train.get("val_loss")
    create_markdown_artifact(
        key="finetune-summary",
        markdown=(
            f"### finetune ({summary['mode']}) at step {train['step']}\n\n| | |\n|---|---|\n"
            f"| base | `{summary['base_checkpoint']}` |\n| data | `{summary['data']['identity']}` |\n"
            f"| train loss | {train['train_loss']:.4f} |\n| val loss | {'-' if val is None else f'{val:.4f}'} |\n"
            f"| model | `{summary['model']}` |\n| MLflow run | `{summary['mlflow_run_id']}` |\n"
        ),
        description="fine-tuning summary",
    )
    return summary
