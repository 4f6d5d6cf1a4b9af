"""The evaluate flow: one Prefect task that runs :func:`model.evaluate.evaluate`.

Thin wiring only. The result file defaults to ``<checkpoint dir>/eval/<checkpoint stem>-<key>.json``
where the key is the fingerprint of (checkpoint sha256, dataset fingerprint, evaluation config,
multiple-choice file sha256); when that file exists with the same key the flow returns it
without loading the model, so re-running a pipeline never re-evaluates what it already has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact


@task(name="evaluate", retries=0)
def evaluate_task(checkpoint: str, data_dir: str | None, cfg_dict: dict, out: str, device: str,
                  experiment: str, parent_run_id: str | None) -> dict:
    from llmforge.model.evaluate import EvalConfig, evaluate

    return evaluate(checkpoint, data_dir, cfg=EvalConfig(**cfg_dict), out=out, device=device,
                    experiment=experiment, parent_run_id=parent_run_id)


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


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    checkpoint: str,
    data_dir: str | None = None,
    *,
    out: str | None = None,
    config: dict[str, Any] | None = None,
    device: str = "auto",
    experiment: str = "llmforge",
    parent_run_id: str | None = None,
) -> dict:
    """Evaluate ``checkpoint`` on the token dataset ``data_dir`` (and/or ``config["mc_file"]``);
    ``config`` holds :class:`model.evaluate.EvalConfig` fields. Returns the result dict."""
    from llmforge.model.evaluate import EvalConfig, default_result_path, result_key, stored_result

    logger = get_run_logger()
    cfg = EvalConfig(**(config or {}))
    key = result_key(checkpoint, data_dir, cfg)
    target = Path(out) if out else default_result_path(checkpoint, key)
    if (done := stored_result(target, key)) is not None:
        logger.info("evaluation %s already done: %s (skipped)", key, target)
        return {**done, "skipped": True}
    result = evaluate_task(str(checkpoint), str(data_dir) if data_dir else None, cfg.to_dict(), str(target),
                           device, experiment, parent_run_id)
    create_markdown_artifact(key="evaluate-summary", markdown=summary_markdown(result),
                             description="evaluation results")
    return result
