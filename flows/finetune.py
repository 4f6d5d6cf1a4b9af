"""The finetune flow: (prepare plain text with the base tokenizer ->) fine-tune, as Prefect tasks.

Thin wiring only: :class:`~llmforge.model.finetune.FinetuneStage` keys a fine-tune by the base
checkpoint's bytes, the data and the settings, and knows when it is complete; an interrupted one
resumes from its newest checkpoint when the flow runs again. Plain text (``text``: files,
directories or URLs) first goes through the prepare flow *with the base checkpoint's tokenizer*,
so the fine-tuning data and the model always share their token ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from llmforge import tracking
from llmforge.console import say
from llmforge.model.finetune import FinetuneConfig, FinetuneStage


def base_tokenizer_file(checkpoint: str | Path, root: str | Path) -> Path:
    """The checkpoint's embedded SentencePiece model, written once to ``root``."""
    from llmforge.model.checkpoint import checkpoint_tokenizer, load_checkpoint
    from llmforge.pipeline.fsutil import atomic_write_bytes

    tok = checkpoint_tokenizer(load_checkpoint(checkpoint, map_location="cpu"), checkpoint)
    path = Path(root) / f"base-tokenizer-{tok.fingerprint}.model"
    if not path.is_file():
        atomic_write_bytes(path, tok.proto)
    return path


@task(name="finetune", retries=0, cache_policy=NO_CACHE)
def finetune_task(stage: FinetuneStage, experiment: str, parent_run_id: str | None) -> dict:
    return stage.run(experiment=experiment, parent_run_id=parent_run_id)


@flow(name="finetune")
def finetune_flow(
    checkpoint: str,
    config: dict[str, Any] | None = None,
    out_dir: str | None = None,
    shards_root: str = "shards",
    runs_root: str = "runs",
    experiment: str = tracking.EXPERIMENT,
    parent_run_id: str | None = None,
) -> dict:
    """Fine-tune ``checkpoint``; ``config`` holds :class:`~llmforge.model.finetune.FinetuneConfig`
    fields, including exactly one data source (``sft``, ``text`` or ``data``)."""
    cfg = FinetuneConfig.load(config, source="finetune config")
    if cfg.text:
        from llmforge.flows.data import prepare_flow

        tok_path = base_tokenizer_file(checkpoint, shards_root)
        say(f"preparing {', '.join(cfg.text)} with the base model's tokenizer {tok_path}")
        prepared = prepare_flow(corpus=None, sources=list(cfg.text), out=shards_root, tokenizer_model=str(tok_path),
                                parent_run_id=parent_run_id, experiment=experiment)
        cfg = cfg.model_copy(update={"text": None, "data": prepared["dataset"]})
    stage = FinetuneStage(checkpoint, cfg, out_dir=out_dir, runs_root=runs_root)
    if (done := stage.completed()) is not None:
        say(f"finetune: {stage.out_dir} already holds this fine-tune (skipped)")
        return {**done, "skipped": True}
    summary = finetune_task(stage, experiment, parent_run_id)
    if summary.get("status") == "completed":
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
