"""Evaluate a checkpoint: validation loss, perplexity and bits per byte over a whole split of a
token dataset, multiple-choice accuracy on a HellaSwag-layout JSONL, and sample generations.

Runs as the Prefect flow `evaluate` (unless --no-prefect) and records an MLflow run. Results go
to --out (default <checkpoint dir>/eval/<checkpoint>-<key>.json); the same checkpoint, data and
settings again is skipped and prints the stored result. Bits per byte divides the summed NLL
by the UTF-8 bytes of the split's cleaned text, so it compares models with different
tokenizers; the dataset must be tokenized with the checkpoint's own tokenizer.

examples:
  llmforge evaluate runs/train-tiny-XXXX/best.pt --data shards/quickstart/tokens-XXXX
  llmforge evaluate ckpt.pt --data DIR --max-tokens 1000000 --stride 512
  llmforge evaluate ckpt.pt --mc hellaswag_val.jsonl --prompt "Once upon a time" --out eval.json
"""

from __future__ import annotations

import argparse
import sys

HELP = "validation loss / perplexity / bits per byte, multiple choice and samples of a checkpoint"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint file (best.pt, ckpt-*.pt or a fine-tune's model.pt)")
    p.add_argument("--data", default=None, metavar="SHARD_DIR",
                   help="token dataset (the directory holding manifest.json) for loss / perplexity / bits per byte")
    p.add_argument("--split", default="val", help="split of --data to score (default: val)")
    p.add_argument("--mc", default=None, metavar="FILE.jsonl",
                   help='multiple-choice items, one per line: {"ctx": ..., "endings": [...], "label": i}')
    p.add_argument("--out", default=None, metavar="FILE.json", help="where to write the results")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="score only the first documents of the split that fit in N tokens (default: all)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="windows per forward pass (default: 8)")
    p.add_argument("--stride", type=int, default=None, metavar="S",
                   help="slide windows by S tokens, scoring the last S of each (default: block size, no overlap)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="prompt for a sample generation; repeatable (default: five built-in prompts)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="per sample; 0 = no samples")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed (default: 1337)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N")
    p.add_argument("--experiment", default="llmforge", help="MLflow experiment (default: llmforge)")
    p.add_argument("--no-prefect", action="store_true", help="run directly, not as a Prefect flow")


def _print(result: dict) -> None:
    split = result["config"]["split"]
    if split in result:
        r = result[split]
        print(f"{split}: loss {r['loss']:.4f} | perplexity {r['perplexity']:.2f} | bits/byte {r['bits_per_byte']:.4f}"
              f" | {r['tokens']:,} tokens, {r['bytes']:,} bytes, {r['documents']:,} documents")
    if mc := result.get("multiple_choice"):
        print(f"multiple choice: acc {mc['acc']:.4f} | acc_norm {mc['acc_norm']:.4f} | {mc['items']} items"
              + (f" ({len(mc['skipped_lines'])} bad lines skipped)" if mc.get("skipped_lines") else ""))
    for s in result.get("samples", []):
        print(f"--- {s['prompt']!r}\n{s['prompt']}{s['completion']}")


def run(args: argparse.Namespace) -> int:
    from llmforge.model.checkpoint import CheckpointError
    from llmforge.model.evaluate import DEFAULT_PROMPTS, EvalConfig

    if args.data is None and args.mc is None:
        print("error: give --data SHARD_DIR and/or --mc FILE.jsonl (something to evaluate on)", file=sys.stderr)
        return 2
    cfg = EvalConfig(split=args.split, batch_size=args.batch_size, max_tokens=args.max_tokens, stride=args.stride,
                     mc_file=args.mc, prompts=tuple(args.prompt) if args.prompt else DEFAULT_PROMPTS,
                     max_new_tokens=args.max_new_tokens, seed=args.seed)
    try:
        if args.no_prefect:
            from llmforge.model.evaluate import default_result_path, evaluate, result_key, stored_result

            key = result_key(args.checkpoint, args.data, cfg)
            out = args.out or default_result_path(args.checkpoint, key)
            result = stored_result(out, key)
            if result is not None:
                result["skipped"] = True
            else:
                result = evaluate(args.checkpoint, args.data, cfg=cfg, out=out, device=args.device,
                                  experiment=args.experiment)
        else:
            from llmforge.flows.evaluate import evaluate_flow

            result = evaluate_flow(args.checkpoint, args.data, out=args.out, config=cfg.to_dict(),
                                   device=args.device, experiment=args.experiment)
    except (ValueError, FileNotFoundError, KeyError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print(result)
    if result.get("skipped"):
        print("(already evaluated with these inputs: the stored result is shown)")
    print(f"results: {result['out']}\nMLflow run: {result.get('mlflow_run_id')}")
    return 0
