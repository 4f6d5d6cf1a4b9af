"""Several processes: run :func:`llmforge.model.train.train` under ``torch.distributed.run``.

:func:`launch` writes the recipe to ``out_dir/train_recipe.json``, starts ``torchrun --standalone
--nproc_per_node=N -m llmforge.model.launch ...`` and returns the summary rank 0 wrote;
``python -m llmforge.model.launch`` is the worker entry point each process runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmforge import tracking
from llmforge.errors import TrainingDiverged, UserError
from llmforge.model.train import SUMMARY_NAME, TrainRecipe, train
from llmforge.pipeline.fsutil import atomic_write_json, read_json

RECIPE_FILE = "train_recipe.json"


def launch(recipe: TrainRecipe, data_dir: str | os.PathLike, out_dir: str | os.PathLike, nproc: int, *,
           init_from: str | os.PathLike | None = None, experiment: str = tracking.EXPERIMENT,
           parent_run_id: str | None = None, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Train in ``nproc`` processes (DDP) and return rank 0's summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = out_dir / RECIPE_FILE
    atomic_write_json(recipe_path, recipe.to_dict())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llmforge.model.launch", "--recipe", str(recipe_path), "--data", str(data_dir), "--out", str(out_dir),
           "--experiment", experiment]
    if init_from:
        cmd += ["--init-from", str(init_from)]
    if parent_run_id:
        cmd += ["--parent-run-id", parent_run_id]
    env = {**os.environ, **(extra_env or {})}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    started = time.time()
    proc = subprocess.run(cmd, env=env)
    if proc.returncode == TrainingDiverged.exit_code:
        raise TrainingDiverged(f"training diverged (see the log above); the last good checkpoint is in {out_dir}")
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun training exited with status {proc.returncode} ({' '.join(cmd)})")
    summary_path = out_dir / SUMMARY_NAME
    if not summary_path.is_file() or summary_path.stat().st_mtime < started - 1:
        raise RuntimeError(f"{summary_path}: torchrun finished but rank 0 wrote no summary")
    return read_json(summary_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmforge.model.launch", description="training worker (run by torchrun)")
    p.add_argument("--recipe", required=True, help="TrainRecipe as JSON")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--init-from")
    p.add_argument("--experiment", default=tracking.EXPERIMENT)
    p.add_argument("--parent-run-id")
    args = p.parse_args(argv)
    try:
        recipe = TrainRecipe.load(json.loads(Path(args.recipe).read_text()), source=args.recipe)
        train(recipe, args.data, args.out, init_from=args.init_from, experiment=args.experiment,
              parent_run_id=args.parent_run_id)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
