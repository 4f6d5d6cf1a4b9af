"""The evaluate flow: one Prefect task that runs the evaluate stage.

Thin wiring only: :class:`~llmforge.model.evaluate.EvalStage` keys an evaluation by the
checkpoint's bytes, the data and the settings, so re-running a pipeline never re-evaluates what
it already has.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from llmforge import tracking
from llmforge.console import say
from llmforge.model.evaluate import EvalConfig, EvalStage


@task(name="evaluate", retries=0, cache_policy=NO_CACHE)
def evaluate_task(stage: EvalStage, experiment: str, parent_run_id: str | None) -> dict:
    return stage.run(experiment=experiment, parent_run_id=parent_run_id)


def summary_markdown(result: dict[str, Any]) -> str:
    rows = [("checkpoint", f"`{result['checkpoint']}`")]
    for key, r in result.items():
        if isinstance(r, dict) and "bits_per_byte" in r:
            rows += [(f"{key} loss", f"{r['loss']:.4f}"), (f"{key} perplexity", f"{r['perplexity']:.2f}"),
                     (f"{key} bits/byte", f"{r['bits_per_byte']:.4f}"), (f"{key} tokens", f"{r['tokens']:,}")]
    if mc := result.get("multiple_choice"):
        rows += [("mc acc", f"{mc['acc']:.4f}"), ("mc acc_norm", f"{mc['acc_norm']:.4f}"), ("mc items", mc["items"])]
    rows.append(("MLflow run", f"`{result.get('mlflow_run_id')}`"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"### evaluate\n\n| | |\n|---|---|\n{table}\n"


@flow(name="evaluate")
def evaluate_flow(
    checkpoint: str,
    data_dir: str | None = None,
    *,
    config: dict[str, Any] | None = None,
    out: str | None = None,
    experiment: str = tracking.EXPERIMENT,
    parent_run_id: str | None = None,
) -> dict:
    """Evaluate ``checkpoint`` on the token dataset ``data_dir`` (and/or ``config["mc_file"]``);
    ``config`` holds :class:`~llmforge.model.evaluate.EvalConfig` fields. Returns the result."""
    stage = EvalStage(checkpoint, data_dir, EvalConfig.load(config, source="evaluate config"), out=out)
    if (done := stage.completed()) is not None:
        say(f"evaluate: {stage.result_path} already holds this evaluation (skipped)")
        return {**done, "skipped": True}
    result = evaluate_task(stage, experiment, parent_run_id)
    create_markdown_artifact(key="evaluate-summary", markdown=summary_markdown(result),
                             description="evaluation results")
    return result
