"""The data flow: download -> extract+clean -> train_tokenizer -> tokenize, as Prefect tasks.

Thin wiring only: the stages (``pipeline/``) decide keys, output directories and "done"; this
flow asks each one ``completed()`` and otherwise runs it, submitting every unit of work (a file
to download, a unit to clean, a shard to encode) as a task on the flow's task runner, so the
same flow runs on threads, local processes or a Dask cluster by configuration alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from llmforge import tracking
from llmforge.console import say, warn
from llmforge.errors import ConfigError
from llmforge.pipeline.config import CorpusSpec
from llmforge.pipeline.download import DownloadStage
from llmforge.pipeline.fsutil import atomic_write_json, human_bytes
from llmforge.pipeline.prepare import Prepare, clean_warnings, dataset_line, load_spec, rate, summary_markdown
from llmforge.pipeline.shards import Dataset


# ---------------------------------------------------------------- tasks
@task(name="download", task_run_name="download {stage.config.name}", cache_policy=NO_CACHE)
def download_task(stage: DownloadStage, progress: bool = True) -> dict:
    return stage.run(progress=progress)


@task(name="unit", task_run_name="{label}", cache_policy=NO_CACHE)
def unit_task(fn: Callable[[Any], Any], item: Any, label: str) -> Any:
    """One unit of a stage's work (a unit to clean, a shard to encode)."""
    return fn(item)


def task_map(kind: str) -> Callable[[Callable, list], list]:
    """``map_units`` for a stage: each item becomes a task on the current flow's runner."""
    def run_all(fn: Callable, items: list) -> list:
        futures = [unit_task.submit(fn, it, f"{kind} {_label(it)}") for it in items]
        return [f.result() for f in futures]

    return run_all


def _label(item: Any) -> str:
    if isinstance(item, dict):
        return str(item.get("name", "unit"))
    if isinstance(item, tuple):
        return "/".join(getattr(x, "name", str(x)) for x in item)
    return str(item)


def make_task_runner(kind: str | None, workers: int | None):
    """``thread`` | ``process`` (default) | ``dask`` (a LocalCluster) | ``tcp://host:port`` (a Dask scheduler)."""
    kind = (kind or "process").lower()
    workers = workers or os.cpu_count() or 1
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "process":
        return ProcessPoolTaskRunner(max_workers=workers)
    if kind == "dask" or kind.startswith(("tcp://", "tls://", "dask://")):
        from prefect_dask import DaskTaskRunner

        if kind == "dask":
            return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                                  "dashboard_address": None})
        return DaskTaskRunner(address=kind.replace("dask://", "tcp://"))
    raise ConfigError(f"--task-runner {kind}: use thread, process, dask or tcp://scheduler:8786")


# ---------------------------------------------------------------- the flow
@flow(name="prepare", task_runner=ThreadPoolTaskRunner(max_workers=8))
def prepare_flow(
    corpus: str | None = "quickstart",
    sources: list[str] | None = None,
    out: str = "shards",
    vocab_size: int | None = None,
    workers: int | None = None,
    task_runner: str = "process",
    tokenizer_model: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    parent_run_id: str | None = None,
    experiment: str = tracking.EXPERIMENT,
) -> dict:
    """Prepare a token dataset; returns ``{"dataset": dir, "summary": markdown}``.

    ``tokenizer_model``: reuse this SentencePiece model (a base model's, for fine-tuning)
    instead of training one.
    """
    spec = load_spec(corpus, sources, vocab_size, overrides)
    plan = Prepare(spec, out, tokenizer_model)
    plan.root.mkdir(parents=True, exist_ok=True)
    with tracking.stage_run(tracking.run_name("prepare", spec.name), stage="prepare", experiment=experiment,
                            parent_run_id=parent_run_id, tags={tracking.TAG_CORPUS: spec.name}) as run:
        # 1. download: I/O bound, several files at once on this flow's threads
        t0 = time.time()
        done = [d.completed() for d in plan.downloads]
        pending = {i: download_task.submit(d, progress) for i, d in enumerate(plan.downloads) if done[i] is None}
        downloads = [pending[i].result() if i in pending else entry for i, entry in enumerate(done)]
        # 2-4. CPU-bound stages on the chosen task runner (processes, or a Dask cluster)
        runner = make_task_runner(task_runner, workers)
        result = process_flow.with_options(task_runner=runner)(spec.model_dump(mode="json"), out, tokenizer_model,
                                                               downloads, time.time() - t0)
        ds_dir = Path(result["dataset"])
        run.tags({tracking.TAG_DATASET: Dataset.open(ds_dir).fingerprint, tracking.TAG_DATASET_DIR: ds_dir})
        run.params({"corpus": spec.model_dump(mode="json")})
        run.metrics(result["metrics"])
        run.artifact(ds_dir / "manifest.json", "dataset")
        run.artifact(ds_dir / "tokenizer.model", "tokenizer")
        run.artifact(Path(result["clean_dir"]) / "manifest.json", "clean")
        run.text(result["summary"], "summary.md")
        if not (ds_dir / "mlflow_run.json").exists():  # the run that produced this dataset
            atomic_write_json(ds_dir / "mlflow_run.json", {"run_id": run.run_id})
    return {"dataset": result["dataset"], "summary": result["summary"]}


@flow(name="prepare-process")
def process_flow(spec: dict, out: str, tokenizer_model: str | None, downloads: list[dict], dl_secs: float) -> dict:
    """extract+clean -> train_tokenizer -> tokenize on the downloaded files."""
    plan = Prepare(CorpusSpec.load(spec), out, tokenizer_model)
    rows: list[tuple] = []
    metrics: dict[str, float] = {}
    t_all = time.time()
    dl_bytes = sum(d["size"] for d in downloads)
    fetched = [d for d in downloads if not d["skipped"]]
    rows.append(("download", "done" if fetched else "skipped", f"{len(downloads)} sources", human_bytes(dl_bytes),
                 dl_secs, rate(sum(d["size"] for d in fetched), dl_secs) if fetched else "-"))
    metrics.update({"download.bytes": dl_bytes, "download.seconds": dl_secs})

    # 2. extract + clean: one task per unit, then dedup/split
    clean = plan.clean(downloads)
    t0 = time.time()
    manifest, skipped = clean.ensure(task_map("clean"))
    secs = time.time() - t0
    cst = manifest["stats"]
    kept_bytes = sum(s["text_bytes"] for s in manifest["splits"].values())
    text_in = cst.get("read", {}).get("bytes", cst["bytes_in"])  # decompressed bytes read
    rows.append(("extract+clean", "skipped" if skipped else "done", f"{cst['docs_in']} docs, {human_bytes(text_in)}",
                 f"{cst['docs_kept']} docs, {human_bytes(kept_bytes)}", secs, "-" if skipped else rate(text_in, secs)))
    metrics.update({"clean.docs_in": cst["docs_in"], "clean.docs_kept": cst["docs_kept"],
                    "clean.file_bytes": cst["bytes_in"], "clean.bytes_in": text_in, "clean.bytes_kept": kept_bytes})
    if not skipped:
        metrics.update({"clean.seconds": secs, "clean.mb_per_s": text_in / max(secs, 1e-9) / 1e6})
        for line in clean_warnings(manifest, clean.out_dir / "manifest.json"):
            warn(line)
    for k, v in {**cst["counts"], **cst["read_errors"]}.items():  # every drop reason and read error
        metrics[f"clean.{k}"] = v

    # 3. train_tokenizer (or reuse one)
    t0 = time.time()
    tok_stage = plan.tokenizer(clean)
    if tok_stage is None:
        tok, status = plan.reused_tokenizer, "reused"
    else:
        tok, skipped = tok_stage.ensure(clean.texts(manifest), manifest["splits"]["train"]["text_bytes"])
        status = "skipped" if skipped else "done"
    rows.append(("train_tokenizer", status, human_bytes(tok.get("stats", {}).get("sample_bytes", 0)),
                 f"{tok['vocab_size']} pieces", time.time() - t0, "-"))
    metrics["tokenizer.vocab_size"] = tok["vocab_size"]

    # 4. tokenize: one task per cleaned part
    t0 = time.time()
    tokenize = plan.tokenize(clean, tok)
    _, skipped = tokenize.ensure(clean.parts(manifest), manifest, plan.spec.model_dump(mode="json"),
                                 task_map("tokenize"))
    secs = time.time() - t0
    ds = Dataset.open(tokenize.out_dir)
    ntok = sum(ds.num_tokens(s) for s in ds.splits())
    rows.append(("tokenize", "skipped" if skipped else "done", human_bytes(kept_bytes), f"{ntok:,} tokens", secs,
                 "-" if skipped else rate(kept_bytes, secs)))
    metrics.update({f"tokens.{s}": ds.num_tokens(s) for s in ds.splits()})
    metrics["tokens.bytes_per_token"] = kept_bytes / max(ntok, 1)
    if not skipped:
        metrics.update({"tokenize.seconds": secs, "tokenize.mb_per_s": kept_bytes / max(secs, 1e-9) / 1e6})
    metrics["total.seconds"] = time.time() - t_all
    tok_manifest = Dataset.open(tokenize.out_dir, check=False).manifest
    for key, value in (("clean.disk_bytes", manifest.get("disk_bytes")),
                       ("clean.disk_bytes_peak", manifest.get("disk_bytes_peak")),
                       ("tokens.disk_bytes", tok_manifest.get("disk_bytes"))):
        if value is not None:
            metrics[key] = value

    md = summary_markdown(plan.spec.name, rows, tokenize.out_dir)
    create_markdown_artifact(md, key="prepare-summary", description=f"prepare {plan.spec.name}")
    say(md)
    say(f"dataset ready: {tokenize.out_dir / 'manifest.json'}\n  {dataset_line(tokenize.out_dir)}")
    return {"dataset": str(tokenize.out_dir), "clean_dir": str(clean.out_dir), "summary": md, "metrics": metrics}
