"""Run the whole DAG in this process: prepare -> train -> evaluate -> finetune -> evaluate.

Stages whose fingerprinted output exists are skipped, so running the same command again after
a crash resumes it (training continues from its newest checkpoint). For the production path
(a Prefect server, a worker, `prefect deployment run`), see the README.

examples:
  llmforge pipeline --corpus quickstart --preset tiny --sft configs/finetune/python-docs.jsonl
  llmforge pipeline --corpus gutenberg --preset tiny --set max_minutes=10
"""

from __future__ import annotations

import argparse
import json

HELP = "run prepare -> train -> evaluate -> finetune -> evaluate in one flow"


def _kv(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="quickstart", help="corpus spec name or YAML (default: quickstart)")
    p.add_argument("--preset", default="tiny", help="model preset (configs/model): tiny, small, gpt2-124m, ...")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", dest="train_set",
                   help="a training option, e.g. --set max_steps=500 --set batch_size=32 (JSON values)")
    p.add_argument("--eval-set", action="append", metavar="KEY=VALUE",
                   help="an evaluation option, e.g. --eval-set max_tokens=100000 --eval-set mc_file=hs.jsonl")
    p.add_argument("--sft", metavar="JSONL", help="fine-tune on this prompt/response JSONL after pretraining")
    p.add_argument("--finetune-text", action="append", metavar="URL_OR_PATH",
                   help="fine-tune on this plain text (prepared with the base tokenizer); repeatable")
    p.add_argument("--ft-set", action="append", metavar="KEY=VALUE",
                   help="a fine-tuning option, e.g. --ft-set mode=lora --ft-set max_steps=200")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary size")
    p.add_argument("--workers", type=int, default=None, help="parallel data tasks (default: all cores)")
    p.add_argument("--task-runner", default="process", help="process (default), thread, dask or tcp://scheduler")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) for training under torchrun")
    p.add_argument("--shards", default="shards", help="root of the data stages' outputs (default: shards)")
    p.add_argument("--runs", default="runs", help="root of the training runs (default: runs)")


def run(args: argparse.Namespace) -> int:
    from llmforge.flows.pipeline import pipeline_flow

    finetune = None
    if args.sft or args.finetune_text:
        finetune = {"sft_file": args.sft, "text_sources": args.finetune_text, "config": _kv(args.ft_set)}
    result = pipeline_flow(
        corpus=args.corpus, preset=args.preset, train=_kv(args.train_set), evaluate=_kv(args.eval_set),
        finetune=finetune, vocab_size=args.vocab_size, workers=args.workers, task_runner=args.task_runner,
        nproc=args.nproc, shards=args.shards, runs=args.runs,
    )
    m = result["metrics"]
    print(f"\npipeline done in {m['duration_s']:.0f}s (MLflow run {result['mlflow_run_id']})")
    print(f"  dataset:    {result['dataset']}\n  checkpoint: {result['checkpoint']}")
    if result.get("finetuned"):
        print(f"  finetuned:  {result['finetuned']}")
    for k in ("val_loss", "eval_val_bpb", "ft_eval_val_bpb", "tokens_per_s"):
        if m.get(k) is not None:
            print(f"  {k}: {m[k]:.4f}")
    print("  compare runs: llmforge runs   (or: mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db)")
    return 0
