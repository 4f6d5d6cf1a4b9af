"""The train flow: one Prefect task that runs (or resumes) the train stage.

Thin wiring only: :class:`~llmforge.model.train.TrainStage` decides the run directory (a
fingerprint of the recipe, the dataset and the initial weights) and whether the run is already
complete, so re-running a failed or interrupted flow with the same inputs lands in the same
directory and resumes from its newest checkpoint. The task has no retries: a diverged run would
only diverge again, and a killed one is resumed by re-running the flow.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from llmforge import tracking
from llmforge.console import say
from llmforge.model.train import TrainStage, build_recipe


@task(name="train", retries=0, cache_policy=NO_CACHE)
def train_task(stage: TrainStage, nproc: int, experiment: str, parent_run_id: str | None) -> dict:
    return stage.run(nproc=nproc, experiment=experiment, parent_run_id=parent_run_id)


@flow(name="train")
def train_flow(
    data_dir: str,
    recipe: str | None = None,
    preset: str | None = None,
    model: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    out_dir: str | None = None,
    nproc: int = 1,
    init_from: str | None = None,
    experiment: str = tracking.EXPERIMENT,
    parent_run_id: str | None = None,
    runs_root: str = "runs",
) -> dict:
    """Train on the token dataset at ``data_dir``: a recipe file (``recipe``, a name in
    configs/train or a path) with ``model`` / ``train`` sections over it and ``preset`` on top.
    Returns the run summary."""
    stage = TrainStage(build_recipe(recipe, preset=preset, model=model, train=train), data_dir, out_dir=out_dir,
                       init_from=init_from, runs_root=runs_root)
    if (done := stage.completed()) is not None:
        say(f"train: {stage.out_dir} already finished step {done['step']} (skipped)")
        return {**done, "skipped": True}
    summary = train_task(stage, nproc, experiment, parent_run_id)
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
