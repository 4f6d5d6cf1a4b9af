"""List the pipeline runs recorded in MLflow, newest first, to compare them side by side.

Each row is one `llmforge pipeline` / `prefect deployment run 'llm-pipeline/...'` run: corpus,
preset, model size, steps, final val loss, bits per byte of the base and the fine-tuned model,
training tokens/s, duration, status and start time. Reads the local store (mlruns/, or
LLMFORGE_MLRUNS) unless MLFLOW_TRACKING_URI or --tracking-uri names another (an `mlflow server`).

examples:
  llmforge runs
  llmforge runs --last 5 --all
  llmforge runs --json | jq '.[0].bpb'
  MLFLOW_TRACKING_URI=http://127.0.0.1:5000 llmforge runs
"""

from __future__ import annotations

import argparse
import json

HELP = "compare the pipeline runs recorded in MLflow"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", default="llmforge", help="MLflow experiment (default: llmforge)")
    p.add_argument("--last", type=int, default=20, metavar="N", help="newest N pipeline runs (default: 20; 0: all)")
    p.add_argument("--all", action="store_true", dest="include_stages",
                   help="also list each pipeline's stage runs (prepare, train, evaluate, finetune) under it")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list instead of a table")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)")


def run(args: argparse.Namespace) -> int:
    from llmforge import tracking
    from llmforge.errors import ConfigError, NotFound
    from llmforge.model.runs import format_table, query

    if args.last < 0:
        raise ConfigError(f"--last {args.last}: must be >= 0")
    uri = args.tracking_uri or tracking.tracking_uri()
    if not tracking.store_exists(uri):
        raise NotFound(f"no MLflow store at {uri[len('sqlite:///'):]}: run `llmforge pipeline` first, or point "
                       f"LLMFORGE_MLRUNS / MLFLOW_TRACKING_URI at a store")
    try:
        rows = query(tracking.client(uri), args.experiment, last=args.last or None,
                     include_stages=args.include_stages)
    except LookupError as e:
        raise NotFound(f"{uri}: {e}") from None
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    if not rows:
        print(f"no pipeline runs in experiment {args.experiment!r} at {uri}")
        return 0
    print(format_table(rows))
    print(f"\n{sum(r.stage == 'pipeline' for r in rows)} pipeline run(s) from {uri}; details: "
          f"{tracking.ui_hint(args.experiment)}")
    return 0
