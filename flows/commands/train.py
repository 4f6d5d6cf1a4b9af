"""Pretrain a GPT on token shards (the output of `llmforge prepare`).

Runs as the Prefect flow `train` (unless --no-prefect) and records the run in MLflow.
Checkpoints go to --out (default runs/train-<preset>-<fingerprint of config and data>);
running the same command again resumes from the newest checkpoint there, bit-identically,
and keeps logging to the same MLflow run. Ctrl-C (or SIGTERM) finishes the current step,
writes a checkpoint and exits.

examples:
  llmforge train --data shards/tokens-XXXX --preset tiny --max-steps 2000
  llmforge train --data shards/tokens-XXXX --preset tiny --max-minutes 10
  llmforge train --data shards/tokens-XXXX --preset gpt2-124m --batch-size 16 --grad-accum 32 --compile
  llmforge train --data shards/tokens-XXXX --preset small --nproc 4      # DDP under torchrun
  llmforge train --data shards/tokens-XXXX --set n_layer=2 --set n_embd=128 --no-prefect
"""

from __future__ import annotations

import argparse
import os
import sys

HELP = "pretrain a GPT on token shards (resumable, tracked in MLflow)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="SHARD_DIR",
                   help="token dataset directory (the one holding manifest.json, printed by `llmforge prepare`)")
    p.add_argument("--preset", default="tiny", metavar="NAME_OR_YAML",
                   help="model size: tiny, small, gpt2-124m, gpt2-350m, gpt-1b (configs/model) or a YAML path "
                        "(default: tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="model_overrides",
                   help="override a model field of the preset, e.g. --set n_layer=2 --set dropout=0.1; repeatable")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="run directory for checkpoints (default: runs/train-<preset>-<fingerprint>); "
                        "an existing run there is resumed")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="optimizer steps, also the length of the cosine schedule (default: 2000)")
    p.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="stop after M minutes of wall time with a checkpoint (re-run to continue)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="sequences per micro-batch per process (default: 16)")
    p.add_argument("--grad-accum", type=int, default=None, metavar="K",
                   help="micro-batches per optimizer step (default: 1)")
    p.add_argument("--block-size", type=int, default=None, metavar="T",
                   help="tokens per training sequence (default: the preset's context length)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3)")
    p.add_argument("--min-lr", type=float, default=None, help="final learning rate of the cosine (default: lr/10)")
    p.add_argument("--warmup-steps", type=int, default=None, metavar="N", help="linear warm-up steps (default: 100)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: 0.1)")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this; 0 = off (default: 1.0)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default=None,
                   help="adamw, or muon for the hidden weight matrices + adamw for the rest (default: adamw)")
    p.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="validation loss every N steps; 0 = only at the end (default: 250)")
    p.add_argument("--eval-tokens", type=int, default=None, metavar="N",
                   help="validation tokens per evaluation, 0 = the whole val split (default: 262144)")
    p.add_argument("--ckpt-every", type=int, default=None, metavar="N",
                   help="checkpoint every N steps; 0 = only at the end (default: 500)")
    p.add_argument("--keep-last", type=int, default=None, metavar="K", help="checkpoints kept besides best.pt (default: 3)")
    p.add_argument("--log-every", type=int, default=None, metavar="N", help="log a line every N steps (default: 10)")
    p.add_argument("--seed", type=int, default=None, help="seed for weights and batch sampling (default: 1337)")
    p.add_argument("--device", default=None, help="auto (default: cuda > mps > cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                   help="auto = bf16 autocast on CUDA, fp32 elsewhere (default: auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (faster on GPU after warm-up)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="your GPU's dense bf16 TFLOP/s, for MFU when it is not in the built-in table")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (file or run dir) with a fresh optimizer")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes (GPUs) for DDP; re-launches through torch.distributed.run (default: 1)")
    p.add_argument("--experiment", default="llmforge", help="MLflow experiment (default: llmforge)")
    p.add_argument("--no-prefect", action="store_true", help="run the training directly, not as a Prefect flow")


def _overrides(args: argparse.Namespace) -> dict:
    import yaml

    o: dict = {}
    for name in ("max_steps", "max_minutes", "batch_size", "grad_accum", "block_size", "lr", "min_lr",
                 "warmup_steps", "weight_decay", "grad_clip", "optimizer", "eval_every", "ckpt_every",
                 "keep_last", "log_every", "seed", "device", "dtype", "peak_tflops"):
        v = getattr(args, name)
        if v is not None:
            o[name] = v
    if args.eval_tokens is not None:
        o["eval_tokens"] = args.eval_tokens or None
    if args.compile:
        o["compile"] = True
    model = {}
    for item in args.model_overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set n_layer=2")
        model[key.strip()] = yaml.safe_load(value)
    if model:
        o["model"] = model
    return o


def run(args: argparse.Namespace) -> int:
    from llmforge.model.train import TrainConfig, TrainingDiverged, launch, train
    from llmforge.pipeline import tracking
    from llmforge.pipeline.shards import Dataset

    try:
        overrides = _overrides(args)
        cfg = TrainConfig.from_dict({"preset": args.preset, **overrides})
        cfg.validate()
        dataset = Dataset.open(args.data)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    in_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        if args.no_prefect or in_torchrun:
            from llmforge.flows.train import default_out_dir

            out = args.out or str(default_out_dir(cfg.to_dict(), dataset.fingerprint, args.init_from))
            if args.nproc > 1 and not in_torchrun:
                summary = launch(cfg, args.data, out, args.nproc, init_from=args.init_from, experiment=args.experiment)
            else:
                summary = train(cfg, args.data, out, init_from=args.init_from, experiment=args.experiment)
        else:
            from llmforge.flows.train import train_flow

            summary = train_flow(data_dir=args.data, preset=args.preset, out_dir=args.out,
                                 overrides={k: v for k, v in overrides.items() if k != "preset"},
                                 nproc=args.nproc, init_from=args.init_from, experiment=args.experiment)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"\n{summary['status']} at step {summary['step']}/{summary['max_steps']}")
    print(f"  checkpoints: {summary['out_dir']} (latest {summary['checkpoint']}, best {summary['best_checkpoint']})")
    print(f"  MLflow run:  {summary['mlflow_run_id']} in experiment {summary['experiment']!r} at "
          f"{tracking.tracking_uri()}")
    print(f"  browse with: mlflow ui --backend-store-uri {tracking.tracking_uri()}")
    if summary["status"] != "completed":
        print(f"  resume with the same command (--out {summary['out_dir']})")
    return 0
