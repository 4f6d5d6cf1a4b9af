"""The whole DAG as one flow: prepare -> train -> evaluate -> finetune (optional) -> evaluate.

Each stage is a subflow that skips itself when its fingerprinted output exists, so re-running
(or retrying) a failed pipeline run redoes only what is missing, and training continues from its
newest checkpoint. MLflow gets one parent run per pipeline run (reused when Prefect retries the
same flow run) with a child run per stage.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from llmforge.flows.data import prepare_flow
from llmforge.flows.evaluate import evaluate_flow
from llmforge.flows.finetune import finetune_flow
from llmforge.flows.train import train_flow

PIPELINE_TAG = "llmforge.pipeline"
# after instruction tuning, the samples answer questions in the chat template (model/sft.py)
SFT_SAMPLE_QUESTIONS = (
    "What is the Python module `json` for?",
    "What does the function `shutil.copyfile` do?",
    "What is the Python module `sqlite3` for?",
    "What does the class `collections.OrderedDict` do?",
)


def _parent_run(experiment: str, name: str, params: dict[str, Any]) -> str:
    """The pipeline's MLflow parent run: the one tagged with this Prefect flow run's id, or a new one."""
    from prefect.runtime import flow_run

    from llmforge.pipeline import tracking

    mlflow = tracking.setup(experiment)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    fr_id = str(flow_run.id or "")
    if fr_id:
        found = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{fr_id}'", max_results=1)
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    run = client.create_run(exp.experiment_id, run_name=name,
                            tags={PIPELINE_TAG: "true", "prefect.flow_run_id": fr_id, "llmforge.stage": "pipeline"})
    for k, v in tracking.flatten(params).items():
        client.log_param(run.info.run_id, k, str(v)[:6000])
    return run.info.run_id


def _finish_parent(run_id: str, metrics: dict[str, float], status: str, summary_md: str | None = None) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for k, v in metrics.items():
        if v is not None:
            client.log_metric(run_id, k, float(v))
    if summary_md:
        client.log_text(run_id, summary_md, "pipeline_summary.md")
    client.set_terminated(run_id, status=status)


def _eval_metrics(prefix: str, result: dict) -> dict[str, float]:
    out = {}
    for split, r in result.items():
        if isinstance(r, dict) and "bits_per_byte" in r:
            out[f"{prefix}{split}_loss"] = r["loss"]
            out[f"{prefix}{split}_bpb"] = r["bits_per_byte"]
            out[f"{prefix}{split}_ppl"] = r["perplexity"]
    if mc := result.get("multiple_choice"):
        out[f"{prefix}mc_acc_norm"] = mc["acc_norm"]
    return out


@flow(name="llm-pipeline", log_prints=True)
def pipeline_flow(
    corpus: str = "quickstart",
    preset: str = "tiny",
    train: dict[str, Any] | None = None,
    evaluate: dict[str, Any] | None = None,
    finetune: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    workers: int | None = None,
    task_runner: str = "process",
    nproc: int = 1,
    shards: str = "shards",
    runs: str = "runs",
    experiment: str = "llmforge",
) -> dict:
    """Corpus to evaluated (and optionally fine-tuned) model.

    ``train``: TrainConfig overrides (``{"max_steps": 2000, "batch_size": 16}``);
    ``evaluate``: EvalConfig fields; ``finetune``: ``None`` to skip, or
    ``{"sft_file": PATH}`` / ``{"text_sources": [...]}`` / ``{"data_dir": DIR}`` plus ``"config"``
    (FinetuneConfig fields, e.g. ``{"mode": "lora", "max_steps": 200}``).
    """
    logger = get_run_logger()
    t0 = time.time()
    params = {"corpus": corpus, "preset": preset, "train": train or {}, "evaluate": evaluate or {},
              "finetune": finetune or {}, "vocab_size": vocab_size, "nproc": nproc}
    parent = _parent_run(experiment, f"pipeline-{corpus}-{preset}", params)
    metrics: dict[str, float] = {}
    rows = []
    ft_model = None
    try:
        prepared = prepare_flow(corpus=corpus, out=shards, vocab_size=vocab_size, workers=workers,
                                task_runner=task_runner, progress=False, parent_run_id=parent)
        data_dir = prepared["dataset"]
        rows.append(("prepare", data_dir))

        summary = train_flow(data_dir=data_dir, preset=preset, overrides=train, nproc=nproc,
                             experiment=experiment, parent_run_id=parent, runs_root=runs)
        ckpt = summary["checkpoint"]
        metrics.update({"train_loss": summary.get("train_loss"), "val_loss": summary.get("val_loss"),
                        "tokens_per_s": summary.get("tokens_per_s"), "train_steps": summary.get("step")})
        rows.append(("train", ckpt))

        result = evaluate_flow(ckpt, data_dir, config=evaluate, experiment=experiment, parent_run_id=parent)
        metrics.update(_eval_metrics("eval_", result))
        rows.append(("evaluate", result.get("out") or result.get("path") or "done"))

        if finetune:
            ft = dict(finetune)
            ft_summary = finetune_flow(ckpt, data_dir=ft.get("data_dir"), sft_file=ft.get("sft_file"),
                                       text_sources=ft.get("text_sources"), config=ft.get("config"),
                                       shards_root=shards, runs_root=runs, experiment=experiment,
                                       parent_run_id=parent)
            ft_model = ft_summary["model"]
            rows.append(("finetune", ft_model))
            ft_eval_cfg = {**(evaluate or {}), **(ft.get("evaluate") or {})}
            if ft.get("sft_file") and "prompts" not in (ft.get("evaluate") or {}):
                from llmforge.model.sft import format_prompt

                ft_eval_cfg["prompts"] = [format_prompt(q) for q in SFT_SAMPLE_QUESTIONS]
            ft_eval = evaluate_flow(ft_model, data_dir, config=ft_eval_cfg, experiment=experiment,
                                    parent_run_id=parent)
            metrics.update(_eval_metrics("ft_eval_", ft_eval))
            rows.append(("evaluate finetuned", "done"))
    except BaseException:
        _finish_parent(parent, {**metrics, "duration_s": time.time() - t0}, "FAILED")
        raise
    metrics["duration_s"] = time.time() - t0
    md = "### llm-pipeline\n\n| stage | output |\n|---|---|\n" + "\n".join(f"| {a} | `{b}` |" for a, b in rows)
    md += "\n\n| metric | value |\n|---|---|\n" + "\n".join(
        f"| {k} | {v:.4g} |" for k, v in metrics.items() if v is not None)
    create_markdown_artifact(key="pipeline-summary", markdown=md, description="pipeline run summary")
    _finish_parent(parent, metrics, "FINISHED", md)
    logger.info("pipeline finished in %.0fs: %s", metrics["duration_s"], rows[-1][1])
    return {"mlflow_run_id": parent, "dataset": data_dir, "checkpoint": ckpt, "metrics": metrics,
            "finetuned": ft_model}
