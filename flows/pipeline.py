"""The whole DAG as one flow: prepare -> train -> evaluate -> finetune (optional) -> evaluate
(-> register, optional).

Each stage is a subflow that skips itself when its output is complete, so re-running (or
retrying) a failed pipeline run redoes only what is missing, and training continues from its
newest checkpoint. MLflow gets one parent run per pipeline run (reused when Prefect retries the
same flow run) with a child run per stage.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from prefect import flow

from llmforge import tracking
from llmforge.console import say
from llmforge.flows.data import prepare_flow
from llmforge.flows.evaluate import evaluate_flow
from llmforge.flows.finetune import finetune_flow
from llmforge.flows.train import train_flow
from llmforge.model.evaluate import eval_metrics

# Prefect validates a call's parameters with a pydantic model named after the flow; a parameter
# called `register` (the deployment's documented option) shadows BaseModel.register, which pydantic
# warns about on every run. The field works; the warning is noise on the user's terminal.
warnings.filterwarnings("ignore", message='Field name "register" in "Pipeline_FlowModel" shadows', category=UserWarning)

# after instruction tuning, the samples answer questions in the chat template (model/sft.py)
SFT_SAMPLE_QUESTIONS = (
    "What is the Python module `json` for?",
    "What does the function `shutil.copyfile` do?",
    "What is the Python module `sqlite3` for?",
    "What does the class `collections.OrderedDict` do?",
)


@flow(name="llm-pipeline")
def pipeline_flow(
    corpus: str = "quickstart",
    recipe: str | None = None,
    preset: str | None = None,
    model: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    evaluate: dict[str, Any] | None = None,
    finetune: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    workers: int | None = None,
    task_runner: str = "process",
    nproc: int = 1,
    shards: str = "shards",
    runs: str = "runs",
    experiment: str = tracking.EXPERIMENT,
    register: str | None = None,
) -> dict:
    """Corpus to evaluated (and optionally fine-tuned) model.

    ``recipe``: a training recipe (name in configs/train or a YAML path); ``preset``, ``model``
    and ``train`` override it (``train={"max_steps": 2000}``); ``evaluate``: EvalConfig fields;
    ``finetune``: ``None`` to skip, or FinetuneConfig fields with one data source
    (``{"sft": PATH, "mode": "lora", "train": {"max_steps": 200}}``); ``register``: a registered
    model name in MLflow under which the final (fine-tuned if any) model becomes a new version.
    """
    from prefect.runtime import flow_run

    t0 = time.time()
    params = {"corpus": corpus, "recipe": recipe, "preset": preset, "model": model or {}, "train": train or {},
              "evaluate": evaluate or {}, "finetune": finetune or {}, "vocab_size": vocab_size, "nproc": nproc,
              "register": register}
    label = Path(recipe or preset or "tiny").stem
    corpus_name = Path(corpus).stem if corpus.endswith((".yaml", ".yml")) else corpus
    parent = tracking.pipeline_run(experiment, tracking.run_name("pipeline", corpus_name, label), params,
                                   str(flow_run.id or ""), tags={tracking.TAG_CORPUS: corpus_name,
                                                                 tracking.TAG_RECIPE: label})
    metrics: dict[str, float | None] = {}
    rows: list[tuple[str, str]] = []
    ckpt = ft_model = data_dir = registered = None
    status = "FINISHED"
    try:
        prepared = prepare_flow(corpus=corpus, out=shards, vocab_size=vocab_size, workers=workers,
                                task_runner=task_runner, progress=False, parent_run_id=parent.run_id,
                                experiment=experiment)
        data_dir = prepared["dataset"]
        rows.append(("prepare", data_dir))

        summary = train_flow(data_dir=data_dir, recipe=recipe, preset=preset, model=model, train=train, nproc=nproc,
                             experiment=experiment, parent_run_id=parent.run_id, runs_root=runs)
        ckpt = summary["checkpoint"]
        metrics.update({tracking.TRAIN_LOSS: summary.get("train_loss"), tracking.TOKENS_PER_S: summary.get("tokens_per_s"),
                        "train_steps": summary.get("step")})
        rows.append(("train", ckpt))
        if summary.get("status") not in ("completed", None):
            status = "KILLED"
            say(f"pipeline: training stopped early ({summary['status']}); run the pipeline again to resume it")
            return _finish(parent, metrics, rows, status, t0, data_dir, ckpt, None)

        result = evaluate_flow(ckpt, data_dir, config=evaluate, experiment=experiment, parent_run_id=parent.run_id)
        metrics.update(eval_metrics(result, "val"))
        rows.append(("evaluate", result.get("out") or "done"))

        if finetune:
            ft = dict(finetune)
            ft_summary = finetune_flow(ckpt, config=ft, shards_root=shards, runs_root=runs, experiment=experiment,
                                       parent_run_id=parent.run_id)
            if ft_summary.get("status") != "completed":
                status = "KILLED"
                return _finish(parent, metrics, rows, status, t0, data_dir, ckpt, None)
            ft_model = ft_summary["model"]
            rows.append(("finetune", ft_model))
            ft_eval_cfg = dict(evaluate or {})
            if ft.get("sft") and "prompts" not in ft_eval_cfg:
                from llmforge.model.sft import format_prompt

                ft_eval_cfg["prompts"] = [format_prompt(q) for q in SFT_SAMPLE_QUESTIONS]
            ft_eval = evaluate_flow(ft_model, data_dir, config=ft_eval_cfg, experiment=experiment,
                                    parent_run_id=parent.run_id)
            metrics.update(eval_metrics(ft_eval, "val", prefix="ft/"))
            rows.append(("evaluate finetuned", ft_eval.get("out") or "done"))

        if register:
            source_run = ft_summary["mlflow_run_id"] if ft_model else summary["mlflow_run_id"]
            version = _register(register, ft_model or ckpt, source_run, data_dir, parent.run_id,
                                metrics.get(f"{'ft/' if ft_model else ''}{tracking.VAL_BPB}"))
            parent.tags({"llmforge.registered_model": version["uri"]})
            registered = version["uri"]
            rows.append(("register", registered))
    except KeyboardInterrupt:
        _finish(parent, metrics, rows, "KILLED", t0, data_dir, ckpt, ft_model)
        raise
    except BaseException:
        _finish(parent, metrics, rows, "FAILED", t0, data_dir, ckpt, ft_model)
        raise
    return {**_finish(parent, metrics, rows, status, t0, data_dir, ckpt, ft_model), "registered": registered}


def _register(name: str, checkpoint: str, run_id: str, data_dir: str, pipeline_run_id: str,
              val_bpb: float | None) -> dict:
    """The final model as a version of registered model ``name``, with its lineage: the run that
    made it (which already holds it as its MLflow model), the pretraining dataset, the tokenizer
    and the bits per byte this pipeline measured."""
    from llmforge.pipeline.shards import Dataset

    version = tracking.log_model(checkpoint, run_id=run_id, register=name, tags={
        tracking.TAG_DATASET: Dataset.open(data_dir).fingerprint, "llmforge.val_bpb": val_bpb,
        "llmforge.pipeline_run": pipeline_run_id})
    say(f"registered {version['uri']} (from run {run_id})" + ("" if version["created"] else ", already there"))
    return version


def _finish(parent: tracking.StageRun, metrics: dict, rows: list, status: str, t0: float, data_dir: Any, ckpt: Any,
            ft_model: Any) -> dict:
    from prefect.artifacts import create_markdown_artifact

    metrics[tracking.DURATION_S] = time.time() - t0
    parent.metrics(metrics)
    md = "### llm-pipeline\n\n| stage | output |\n|---|---|\n" + "\n".join(f"| {a} | `{b}` |" for a, b in rows)
    md += "\n\n| metric | value |\n|---|---|\n" + "\n".join(
        f"| {k} | {v:.4g} |" for k, v in metrics.items() if v is not None)
    parent.text(md, "pipeline_summary.md")
    parent.finish(status)
    if status == "FINISHED":
        create_markdown_artifact(key="pipeline-summary", markdown=md, description="pipeline run summary")
    return {"mlflow_run_id": parent.run_id, "dataset": data_dir, "checkpoint": ckpt, "metrics": metrics,
            "finetuned": ft_model, "status": status}
