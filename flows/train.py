"""The train flow: one Prefect task that runs (or resumes) :func:`model.train.train`.

Thin wiring only. The run directory defaults to ``runs/train-<fingerprint>``, the fingerprint
of the training config and the dataset's fingerprint, so re-running a failed or interrupted
flow with the same inputs lands in the same directory and resumes from its newest checkpoint
(a finished run returns its summary at once). The task has no retries: a diverged run would
only diverge again, and a killed one is resumed by re-running the flow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from llmforge.pipeline.fsutil import fingerprint
from llmforge.pipeline.shards import Dataset

# fields that only say how a run is watched or bounded, not what it computes
RUN_CONTROL_FIELDS = {"max_minutes", "log_every", "sample_every", "log_checkpoints", "device", "compile"}


def default_out_dir(cfg_dict: dict[str, Any], dataset_fp: str, init_from: str | None = None, root: str = "runs") -> Path:
    """``runs/train-<fp>`` for (config minus run-control fields, dataset, initial weights)."""
    key = {k: v for k, v in cfg_dict.items() if k not in RUN_CONTROL_FIELDS}
    return Path(root) / f"train-{cfg_dict.get('preset', 'model')}-{fingerprint(key, dataset_fp, init_from)}"


@task(name="train", retries=0)
def train_task(cfg_dict: dict, data_dir: str, out_dir: str, nproc: int, init_from: str | None,
               experiment: str, parent_run_id: str | None) -> dict:
    from llmforge.model.train import TrainConfig, launch, train

    cfg = TrainConfig.from_dict(cfg_dict)
    if nproc > 1:
        return launch(cfg, data_dir, out_dir, nproc, init_from=init_from, experiment=experiment,
                      parent_run_id=parent_run_id)
    return train(cfg, data_dir, out_dir, init_from=init_from, experiment=experiment, parent_run_id=parent_run_id)


@flow(name="train", log_prints=True)
def train_flow(
    data_dir: str,
    preset: str = "tiny",
    out_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    nproc: int = 1,
    init_from: str | None = None,
    experiment: str = "llmforge",
    parent_run_id: str | None = None,
    runs_root: str = "runs",
) -> dict:
    """Train ``preset`` on the token dataset at ``data_dir``; ``overrides`` are TrainConfig
    fields (``{"max_steps": 500, "model": {"n_layer": 2}}``). Returns the run summary.
    Without ``out_dir`` the run lives in ``<runs_root>/train-<preset>-<fingerprint>``."""
    from llmforge.model.train import TrainConfig

    logger = get_run_logger()
    cfg = TrainConfig.from_dict({"preset": preset, **(overrides or {})})
    cfg.validate()
    dataset = Dataset.open(data_dir)
    out = Path(out_dir) if out_dir else default_out_dir(cfg.to_dict(), dataset.fingerprint, init_from, runs_root)
    logger.info("training %s on %s into %s", preset, data_dir, out)
    summary = train_task(cfg.to_dict(), str(data_dir), str(out), nproc, init_from, experiment, parent_run_id)
    val = summary.get("val_loss")
    create_markdown_artifact(
        key="train-summary",
        markdown=(
            f"### train: {summary['status']} at step {summary['step']}\n\n"
            f"| | |\n|---|---|\n| train loss | {summary['train_loss']:.4f} |\n"
            f"| val loss | {'-' if val is None else f'{val:.4f}'} |\n"
            f"| tokens/s | {summary['tokens_per_s']:,.0f} |\n"
            f"| checkpoint | `{summary['checkpoint']}` |\n| MLflow run | `{summary['mlflow_run_id']}` |\n"
        ),
        description="training run summary",
    )
    return summary
