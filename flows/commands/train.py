"""Pretrain a GPT on token shards (the output of `llmforge prepare`).

A run is a recipe (--config: a YAML file with model: and train: sections; configs/train has the
shipped ones) with flags and --set on top. It runs as the Prefect flow `train` (unless
--no-prefect) and is recorded in MLflow. Checkpoints go to --out (default
runs/train-<recipe or preset>-<key>); the same command again resumes from the newest checkpoint
there, bit-identically, logging to the same MLflow run, and does nothing once the run finished.
Ctrl-C (or SIGTERM) finishes the current step, writes a checkpoint and exits.

examples:
  llmforge train --data shards/quickstart/tokens-XXXX --config cpu-tiny
  llmforge train --data DIR --preset tiny --max-steps 2000
  llmforge train --data DIR --config configs/train/gpt2-124m.yaml --compile
  llmforge train --data DIR --preset small --nproc 4                   # DDP under torchrun
  llmforge train --data DIR --set model.n_layer=2 --set train.lr=3e-4 --no-prefect
"""

from __future__ import annotations

import argparse
import os

from llmforge.flows.options import add_config_options, add_flags, add_run_options

HELP = "pretrain a GPT on token shards (resumable, tracked in MLflow)"


def configure(p: argparse.ArgumentParser) -> None:
    from llmforge.model.gpt import ModelSpec
    from llmforge.model.train import TrainConfig

    p.add_argument("--data", required=True, metavar="DATASET_DIR",
                   help="token dataset directory (the tokens-* directory `llmforge prepare` printed)")
    add_config_options(p, "model.*, train.*")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="run directory (default: runs/train-<recipe or preset>-<key>); an existing run there resumes")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (file or run directory) with a fresh optimizer")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes (GPUs) for DDP; launches torch.distributed.run (default: 1)")
    p.add_argument("--runs-root", default="runs", metavar="DIR", help="where default run directories go (default: runs)")
    add_run_options(p)
    add_flags(p, ModelSpec, "model", only=["preset"], title="model options (also --set model.NAME=VALUE)")
    add_flags(p, TrainConfig, "train")


def build(args: argparse.Namespace):
    """The validated recipe, the command-line overrides and the stage (nothing written yet)."""
    from llmforge.flows.options import settings
    from llmforge.model.runtime import check_device
    from llmforge.model.train import TrainRecipe, TrainStage, load_recipe

    base = load_recipe(args.config) if args.config else {}
    recipe, overrides = settings(args, base, lambda d, src: TrainRecipe.load(d, source=src),
                                 f"--config {args.config}" if args.config else "defaults")
    check_device(recipe.train.device)
    if args.nproc < 1:
        from llmforge.errors import ConfigError

        raise ConfigError(f"--nproc {args.nproc}: must be >= 1")
    stage = TrainStage(recipe, args.data, out_dir=args.out, init_from=args.init_from, runs_root=args.runs_root)
    return recipe, overrides, stage


def run(args: argparse.Namespace) -> int:
    from llmforge import tracking
    from llmforge.console import say

    recipe, overrides, stage = build(args)
    in_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    busy(stage.out_dir)
    if (done := stage.completed()) is not None and not in_torchrun:
        say(f"{stage.out_dir}: already trained to step {done['step']}; nothing to do")
        _report(done, stage)
        return 0
    if args.no_prefect or in_torchrun:
        summary = stage.run(nproc=1 if in_torchrun else args.nproc, experiment=args.experiment)
    else:
        from llmforge.flows.session import prefect_session

        with prefect_session():
            from llmforge.flows.train import train_flow

            summary = train_flow(data_dir=str(args.data), recipe=args.config, model=overrides.get("model"),
                                 train=overrides.get("train"), out_dir=str(stage.out_dir), nproc=args.nproc,
                                 init_from=args.init_from, experiment=args.experiment)
    if int(os.environ.get("RANK", "0")) == 0:
        _report(summary, stage)
        say(f"  browse with: {tracking.ui_hint(args.experiment)}")
    return 0


def busy(directory) -> None:
    """A directory another process is writing: say so now, before any server starts."""
    from llmforge.errors import UserError
    from llmforge.pipeline.fsutil import lock_holder

    if (holder := lock_holder(directory)) is not None:
        raise UserError(f"{directory}: in use by {holder}; wait for it to finish (or stop it), then run this again")


def _report(summary: dict, stage) -> None:
    from llmforge.console import say

    say(f"\n{summary['status']} at step {summary['step']} (budget {summary.get('budget')}, final lr "
        f"{summary.get('final_lr', float('nan')):.2e})")
    say(f"  checkpoints: {summary['out_dir']} (latest {summary['checkpoint']}, best {summary['best_checkpoint']})")
    say(f"  MLflow run:  {summary['mlflow_run_id']} in experiment {summary['experiment']!r}")
    if summary["status"] != "completed":
        say(f"  resume with the same command (the run directory is {stage.out_dir})")
