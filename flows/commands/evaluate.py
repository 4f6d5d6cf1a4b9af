"""Evaluate a checkpoint: validation loss, perplexity and bits per byte over a whole split of a
token dataset, multiple-choice accuracy on a HellaSwag-layout JSONL, and sample generations.

The same scorer as training-time validation: with --max-tokens equal to the run's
train.eval_tokens it gives the number the training run logged. Runs as the Prefect flow
`evaluate` (unless --no-prefect) and records an MLflow run. Results go to --out (default
<checkpoint dir>/eval/<checkpoint>-<key>.json); the same checkpoint, data and settings again
prints the stored result. Bits per byte divides the summed NLL by the UTF-8 bytes of the split's
cleaned text, so it compares models with different tokenizers.

examples:
  llmforge evaluate runs/train-tiny-XXXX/best.pt --data shards/quickstart/tokens-XXXX
  llmforge evaluate ckpt.pt --data DIR --max-tokens 1000000 --stride 512
  llmforge evaluate ckpt.pt --mc hellaswag_val.jsonl --prompt "Once upon a time" --out eval.json
"""

from __future__ import annotations

import argparse

from llmforge.flows.options import add_config_options, add_flags, add_run_options

HELP = "validation loss / perplexity / bits per byte, multiple choice and samples of a checkpoint"


def configure(p: argparse.ArgumentParser) -> None:
    from llmforge.model.evaluate import EvalConfig
    from llmforge.model.generate import SamplingConfig

    p.add_argument("checkpoint", help="a checkpoint file (best.pt, ckpt-*.pt, a fine-tune's model.pt) or run directory")
    p.add_argument("--data", default=None, metavar="DATASET_DIR",
                   help="token dataset (the tokens-* directory) for loss / perplexity / bits per byte")
    p.add_argument("--mc", default=None, metavar="FILE.jsonl",
                   help='multiple-choice items, one per line: {"ctx": ..., "endings": [...], "label": i}')
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="prompt for a sample generation; repeatable (default: five built-in prompts)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="where to write the results")
    add_config_options(p, "eval.*", config_help="YAML with an eval: section")
    add_run_options(p)
    add_flags(p, EvalConfig, "eval", skip=["prompts", "mc_file"])
    add_flags(p, SamplingConfig, "eval.sampling", title="sampling options (also --set eval.sampling.NAME=VALUE)")


def build(args: argparse.Namespace):
    from llmforge.config import read_yaml
    from llmforge.flows.options import settings
    from llmforge.model.evaluate import EvalOptions, EvalStage
    from llmforge.model.runtime import check_device

    base = read_yaml(args.config, "an evaluation config") if args.config else {}
    if args.prompt is not None:
        base = {**base, "eval": {**base.get("eval", {}), "prompts": args.prompt}}
    if args.mc is not None:
        base = {**base, "eval": {**base.get("eval", {}), "mc_file": args.mc}}
    opts, _ = settings(args, base, lambda d, src: EvalOptions.load(d, source=src),
                       f"--config {args.config}" if args.config else "options")
    check_device(opts.eval.device)
    return EvalStage(args.checkpoint, args.data, opts.eval, out=args.out)


def run(args: argparse.Namespace) -> int:
    from llmforge.console import say

    stage = build(args)
    result = stage.completed()
    if result is not None:
        _print(result)
        say("(already evaluated with these inputs: the stored result is shown)")
    else:
        if args.no_prefect:
            result = stage.run(experiment=args.experiment)
        else:
            from llmforge.flows.session import prefect_session

            with prefect_session():
                from llmforge.flows.evaluate import evaluate_flow

                result = evaluate_flow(str(stage.checkpoint), args.data, config=stage.config.to_dict(),
                                       out=str(stage.result_path), experiment=args.experiment)
        _print(result)
    say(f"results: {result['out']}\nMLflow run: {result.get('mlflow_run_id')}")
    return 0


def _print(result: dict) -> None:
    from llmforge.console import say

    split = result["config"]["split"]
    if split in result:
        r = result[split]
        say(f"{split}: loss {r['loss']:.4f} | perplexity {r['perplexity']:.2f} | bits/byte {r['bits_per_byte']:.4f}"
            f" | {r['tokens']:,} tokens, {r['bytes']:,} bytes, {r['documents']:,} documents")
    if mc := result.get("multiple_choice"):
        say(f"multiple choice: acc {mc['acc']:.4f} | acc_norm {mc['acc_norm']:.4f} | {mc['items']} items"
            + (f" ({len(mc['skipped_lines'])} bad lines skipped)" if mc.get("skipped_lines") else ""))
    for s in result.get("samples", []):
        say(f"--- {s['prompt']!r}\n{s['prompt']}{s['completion']}")
