"""Run the whole DAG in this process: prepare -> train -> evaluate -> finetune -> evaluate.

Stages whose output is complete are skipped, so running the same command again after a crash
resumes it (training continues from its newest checkpoint). Settings: model.* and train.* (the
pretraining, from --config RECIPE and --preset), eval.* (both evaluations), finetune.* (the
fine-tune, with its own finetune.train.*). For the production path (a Prefect server, a worker,
`prefect deployment run`), see the README.

examples:
  llmforge pipeline --corpus quickstart --config cpu-tiny --sft configs/finetune/python-docs.jsonl
  llmforge pipeline --corpus gutenberg --preset tiny --set train.max_steps=500 --set eval.max_tokens=200000
  llmforge pipeline --corpus quickstart --sft pairs.jsonl --set finetune.mode=lora --set finetune.train.lr=2e-3
  llmforge pipeline --corpus quickstart --config cpu-tiny --sft pairs.jsonl --register my-gpt
"""

from __future__ import annotations

import argparse

from llmforge.flows.options import add_config_options, add_flags, add_run_options

HELP = "run prepare -> train -> evaluate -> finetune -> evaluate in one flow"


def configure(p: argparse.ArgumentParser) -> None:
    from llmforge.model.gpt import ModelSpec
    from llmforge.model.train import TrainConfig

    p.add_argument("--corpus", default="quickstart", help="corpus spec name or YAML (default: quickstart)")
    p.add_argument("--sft", metavar="JSONL", default=None, help="fine-tune on this prompt/response JSONL after pretraining")
    p.add_argument("--finetune-text", action="append", metavar="URL_OR_PATH", default=None,
                   help="fine-tune on this plain text (prepared with the base tokenizer); repeatable")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary size")
    p.add_argument("--workers", type=int, default=None, help="parallel data tasks (default: all cores)")
    p.add_argument("--task-runner", default="process", help="process (default), thread, dask or tcp://scheduler")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) for training under torchrun")
    p.add_argument("--shards", default="shards", help="root of the data stages' outputs (default: shards)")
    p.add_argument("--runs", default="runs", help="root of the training runs (default: runs)")
    p.add_argument("--register", metavar="NAME", default=None,
                   help="register the final (fine-tuned if any) model in MLflow as a new version of NAME")
    add_config_options(p, "model.*, train.*, eval.*, finetune.*")
    add_run_options(p, prefect=False)
    add_flags(p, ModelSpec, "model", only=["preset"], title="model options (also --set model.NAME=VALUE)")
    add_flags(p, TrainConfig, "train")


def run(args: argparse.Namespace) -> int:
    from llmforge.console import say
    from llmforge.flows.options import settings
    from llmforge.model.finetune import PipelineOptions
    from llmforge.model.runtime import check_device
    from llmforge.model.train import load_recipe
    from llmforge.pipeline.config import resolve_corpus_path

    resolve_corpus_path(args.corpus)
    base = load_recipe(args.config) if args.config else {}
    if args.sft or args.finetune_text:
        base = {**base, "finetune": {**(base.get("finetune") or {}), "sft": args.sft, "text": args.finetune_text}}
    opts, overrides = settings(args, base, lambda d, src: PipelineOptions.load(d, source=src),
                               f"--config {args.config}" if args.config else "options")
    check_device(opts.train.device)
    finetune = None
    if (ft := opts.finetune) is not None:
        if not (ft.sft or ft.text or ft.data):
            from llmforge.errors import ConfigError

            raise ConfigError("finetune settings given but no fine-tuning data: add --sft FILE.jsonl or --finetune-text")
        finetune = ft.model_dump(mode="json")
    from llmforge.flows.session import prefect_session

    model = dict(overrides.get("model") or {})
    preset = model.pop("preset", None)
    with prefect_session():
        from llmforge.flows.pipeline import pipeline_flow

        result = pipeline_flow(
            corpus=args.corpus, recipe=args.config, preset=preset, model=model or None, train=overrides.get("train"),
            evaluate=opts.eval.model_dump(mode="json", exclude_unset=True) if opts.eval else None,
            finetune=finetune, vocab_size=args.vocab_size, workers=args.workers, task_runner=args.task_runner,
            nproc=args.nproc, shards=args.shards, runs=args.runs, experiment=args.experiment, register=args.register)
    m = result["metrics"]
    say(f"\npipeline {result['status'].lower()} in {m['duration_s']:.0f}s (MLflow run {result['mlflow_run_id']})")
    say(f"  dataset:    {result['dataset']}\n  checkpoint: {result['checkpoint']}")
    if result.get("finetuned"):
        say(f"  finetuned:  {result['finetuned']}")
    if result.get("registered"):
        say(f"  registered: {result['registered']}  (llmforge chat|serve|generate {result['registered']})")
    for k in ("val/loss", "val/bpb", "ft/val/bpb", "tokens_per_s"):
        if m.get(k) is not None:
            say(f"  {k}: {m[k]:.4f}")
    from llmforge import tracking

    say(f"  compare runs: llmforge runs, or {tracking.ui_hint(args.experiment)}")
    return 0
