"""The data flow: download -> extract+clean -> train_tokenizer -> tokenize, as Prefect tasks.

Thin wiring only: every task calls a plain function from ``pipeline/``. Parallel units (files to
download, units to clean, shards to encode) are ``.submit()``-ed to the flow's task runner, so the
same flow runs on threads, local processes or a Dask cluster (``task_runner="dask"`` or a
scheduler address) by configuration alone. Each stage writes into a directory named by the
fingerprint of its config and inputs and is skipped when that directory's manifest exists.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from llmforge.pipeline import extract, tokenize, tokenizer
from llmforge.pipeline.config import CorpusSpec, load_corpus
from llmforge.pipeline.download import SourceSpec, fetch
from llmforge.pipeline.fsutil import FORMAT_VERSION, atomic_write_json, clean_temp, fingerprint, human_bytes
from llmforge.pipeline.shards import Dataset


# ---------------------------------------------------------------- tasks (one per unit of work)
@task(name="download", task_run_name="download {src[url]}")
def download_task(src: dict, dest: str, progress: bool = True) -> dict:
    return fetch(SourceSpec(**src), Path(dest), progress=progress)


@task(name="clean-unit", task_run_name="clean {unit[name]}")
def clean_unit_task(unit: dict, clean_cfg: dict, out_dir: str) -> dict:
    from llmforge.pipeline.clean import CleanConfig

    return extract.clean_unit(unit, CleanConfig(**clean_cfg), out_dir)


@task(name="dedup-split")
def finalize_clean_task(out_dir: str, units: list[dict], split_cfg: dict, fp: str, config: dict) -> dict:
    from llmforge.pipeline.config import SplitConfig

    return extract.finalize(out_dir, units, SplitConfig(**split_cfg), fp=fp, config=config)


@task(name="train-tokenizer")
def train_tokenizer_task(clean_dir: str, clean_manifest: dict, tok_cfg: dict, out_dir: str) -> dict:
    cfg = tokenizer.TokenizerConfig(**tok_cfg)
    total = clean_manifest["splits"]["train"]["text_bytes"]
    texts = extract.iter_texts(clean_dir, clean_manifest, "train")
    return tokenizer.train_tokenizer(texts, total, cfg, out_dir)


@task(name="tokenize-shard", task_run_name="tokenize {part}")
def tokenize_part_task(part: str, out_dir: str, tokenizer_path: str, cfg: dict) -> dict:
    return tokenize.tokenize_part(part, out_dir, tokenizer_path, tokenize.TokenizeConfig(**cfg))


# ---------------------------------------------------------------- helpers
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
    raise ValueError(f"unknown task runner {kind!r}: use thread, process, dask or tcp://scheduler:8786")


def _summary_markdown(spec: CorpusSpec, rows: list[tuple], dataset: Path) -> str:
    lines = [f"# prepare `{spec.name}`", "", f"dataset: `{dataset}`", "",
             "| stage | status | input | output | seconds | MB/s |", "|---|---|---|---|---:|---:|"]
    for name, status, inp, out, secs, mbps in rows:
        lines.append(f"| {name} | {status} | {inp} | {out} | {secs:.1f} | {mbps} |")
    return "\n".join(lines) + "\n"


def _rate(nbytes: float, secs: float) -> str:
    return f"{nbytes / secs / 1e6:.1f}" if secs > 0 else "-"


# ---------------------------------------------------------------- the flow
@flow(name="prepare", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=8))
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
) -> dict:
    """Prepare a token dataset; returns ``{"dataset": dir, "summary": markdown}`` (the dataset
    directory's ``manifest.json`` lists the shards).

    ``tokenizer_model``: reuse this SentencePiece model (e.g. a base model's, for fine-tuning)
    instead of training one.
    """
    ov = dict(overrides or {})
    if vocab_size:
        ov = {**ov, "tokenizer": {**ov.get("tokenizer", {}), "vocab_size": vocab_size}}
    spec = load_corpus(corpus, sources=sources, overrides=ov)
    root = Path(out).resolve() / spec.name
    root.mkdir(parents=True, exist_ok=True)

    # 1. download: I/O bound, several files at once on this flow's threads
    t0 = time.time()
    futures = [download_task.submit(s.model_dump(), str(root / "downloads"), progress) for s in spec.sources]
    downloads = [f.result() for f in futures]
    dl_secs = time.time() - t0
    # 2-4. CPU-bound stages on the chosen task runner (processes, or a Dask cluster)
    runner = make_task_runner(task_runner, workers)
    return process_flow.with_options(task_runner=runner)(spec.model_dump(), downloads, dl_secs, str(root),
                                                         tokenizer_model, parent_run_id)


@flow(name="prepare-process", log_prints=True)
def process_flow(spec_dict: dict, downloads: list[dict], dl_secs: float, root: str,
                 tokenizer_model: str | None = None, parent_run_id: str | None = None) -> dict:
    """extract+clean -> train_tokenizer -> tokenize on the downloaded files."""
    logger = get_run_logger()
    spec = CorpusSpec.model_validate(spec_dict)
    root = Path(root)
    rows: list[tuple] = []
    metrics: dict[str, float] = {}
    t_all = time.time()
    dl_bytes = sum(d["size"] for d in downloads)
    fetched = [d for d in downloads if not d["skipped"]]
    rows.append(("download", "done" if fetched else "skipped", f"{len(downloads)} sources",
                 human_bytes(dl_bytes), dl_secs, _rate(sum(d["size"] for d in fetched), dl_secs) if fetched else "-"))
    metrics.update({"download.bytes": dl_bytes, "download.seconds": dl_secs})

    # 2. extract + clean: one task per unit, then dedup/split
    units = extract.plan_units(downloads, spec)
    clean_fp = extract.stage_fingerprint(units, spec)
    clean_dir = root / f"clean-{clean_fp}"
    clean_manifest = extract.load_manifest(clean_dir)
    t0 = time.time()
    if clean_manifest is None:
        clean_temp(clean_dir / "units")
        logger.info("extract+clean: %d units -> %s", len(units), clean_dir)
        futs = [clean_unit_task.submit(u, spec.clean.model_dump(), str(clean_dir)) for u in units]
        unit_stats = [f.result() for f in futs]
        for st in unit_stats:
            for e in st.get("errors", [])[:5]:
                logger.warning(e)
        clean_manifest = finalize_clean_task(str(clean_dir), units, spec.split.model_dump(), clean_fp,
                                             {"clean": spec.clean.model_dump(), "split": spec.split.model_dump()})
        status = "done"
    else:
        status = "skipped"
    secs = time.time() - t0
    cst = clean_manifest["stats"]
    kept_bytes = sum(s["text_bytes"] for s in clean_manifest["splits"].values())
    text_in = cst.get("read", {}).get("bytes", cst["bytes_in"])  # decompressed bytes read
    rows.append(("extract+clean", status, f"{cst['docs_in']} docs, {human_bytes(text_in)}",
                 f"{cst['docs_kept']} docs, {human_bytes(kept_bytes)}", secs,
                 _rate(text_in, secs) if status == "done" else "-"))
    metrics.update({"clean.docs_in": cst["docs_in"], "clean.docs_kept": cst["docs_kept"],
                    "clean.file_bytes": cst["bytes_in"], "clean.bytes_in": text_in, "clean.bytes_kept": kept_bytes})
    if status == "done":
        metrics["clean.seconds"] = secs
        metrics["clean.mb_per_s"] = text_in / max(secs, 1e-9) / 1e6
    for k, v in {**cst["counts"], **cst["read_errors"]}.items():  # every drop reason and read error
        metrics[f"clean.{k}"] = v

    # 3. train_tokenizer (or reuse one)
    t0 = time.time()
    if tokenizer_model:
        tok_manifest = tokenizer.tokenizer_manifest(tokenizer_model)
        tok_manifest["path"] = str(Path(tokenizer_model).resolve())
        status = "reused"
    else:
        tok_fp = fingerprint("tokenizer", FORMAT_VERSION, spec.tokenizer.model_dump(exclude={"threads"}), clean_fp)
        tok_dir = root / f"tokenizer-{tok_fp}"
        tok_manifest = tokenizer.load_manifest(tok_dir)
        status = "skipped"
        if tok_manifest is None:
            tok_manifest = train_tokenizer_task(str(clean_dir), clean_manifest, spec.tokenizer.model_dump(),
                                                str(tok_dir))
            status = "done"
        tok_manifest = {**tok_manifest, "path": str(tok_dir / tokenizer.TOKENIZER_FILE)}
    secs = time.time() - t0
    rows.append(("train_tokenizer", status, human_bytes(tok_manifest.get("stats", {}).get("sample_bytes", 0)),
                 f"{tok_manifest['vocab_size']} pieces", secs, "-"))
    metrics["tokenizer.vocab_size"] = tok_manifest["vocab_size"]

    # 4. tokenize: one task per cleaned part
    tokens_fp = fingerprint("tokens", FORMAT_VERSION, clean_fp, tok_manifest["fingerprint"])
    ds_dir = root / f"tokens-{tokens_fp}"
    t0 = time.time()
    done = (ds_dir / "manifest.json").is_file() and not Dataset.open(ds_dir).verify()
    if not done:
        jobs = []
        for split in ("train", "val"):
            (ds_dir / split).mkdir(parents=True, exist_ok=True)
            clean_temp(ds_dir / split)
            for part in extract.part_paths(clean_dir, clean_manifest, split):
                jobs.append((split, tokenize_part_task.submit(str(part), str(ds_dir / split), tok_manifest["path"],
                                                              spec.tokenize.model_dump())))
        entries: dict[str, list[dict]] = {"train": [], "val": []}
        for split, fut in jobs:
            entries[split].append(fut.result())
        tokenize.finalize(ds_dir, entries, fingerprint=tokens_fp, tokenizer=tok_manifest,
                          clean_manifest=clean_manifest, config={"corpus": spec.model_dump(mode="json")})
        status = "done"
    else:
        status = "skipped"
    secs = time.time() - t0
    ds = Dataset.open(ds_dir)
    ntok = sum(ds.num_tokens(s) for s in ds.splits())
    rows.append(("tokenize", status, human_bytes(kept_bytes), f"{ntok:,} tokens", secs,
                 _rate(kept_bytes, secs) if status == "done" else "-"))
    metrics.update({f"tokens.{s}": ds.num_tokens(s) for s in ds.splits()})
    metrics["tokens.bytes_per_token"] = kept_bytes / max(ntok, 1)
    if status == "done":
        metrics["tokenize.seconds"] = secs
        metrics["tokenize.mb_per_s"] = kept_bytes / max(secs, 1e-9) / 1e6
    metrics["total.seconds"] = time.time() - t_all

    md = _summary_markdown(spec, rows, ds_dir)
    create_markdown_artifact(md, key="prepare-summary", description=f"prepare {spec.name}")
    logger.debug("\n%s", md)
    _log_mlflow(spec, ds_dir, clean_dir, tok_manifest, metrics, md, parent_run_id)
    return {"dataset": str(ds_dir), "summary": md}


def _log_mlflow(spec: CorpusSpec, ds_dir: Path, clean_dir: Path, tok_manifest: dict, metrics: dict,
                summary_md: str, parent_run_id: str | None) -> None:
    from llmforge.pipeline import tracking

    with tracking.run(f"prepare-{spec.name}", parent_run_id=parent_run_id,
                      tags={"llmforge.stage": "prepare", "llmforge.corpus": spec.name,
                            "llmforge.dataset": str(ds_dir)}) as r:
        tracking.log_params({"corpus": spec.model_dump(mode="json")})
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_artifact(str(ds_dir / "manifest.json"), "dataset")
        mlflow.log_artifact(str(ds_dir / "tokenizer.model"), "tokenizer")
        mlflow.log_artifact(str(clean_dir / "manifest.json"), "clean")
        mlflow.log_text(summary_md, "summary.md")
        if not (ds_dir / "mlflow_run.json").exists():  # the run that produced this dataset
            atomic_write_json(ds_dir / "mlflow_run.json", {"run_id": r.info.run_id})
