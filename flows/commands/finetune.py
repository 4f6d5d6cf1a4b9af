"""Fine-tune a checkpoint, keeping its tokenizer: on plain text (domain adaptation) or on
prompt/response pairs (instruction tuning), updating every weight or LoRA adapters.

Data (exactly one):
  --data SHARD_DIR   a token dataset made with the checkpoint's tokenizer
                     (`llmforge prepare --tokenizer ...`); a different tokenizer is refused
  --text SOURCE      raw text (file, directory or URL; repeatable): prepared here with the
                     checkpoint's tokenizer, then fine-tuned on
  --sft FILE.jsonl   {"prompt": ..., "response": ...} or Alpaca {"instruction", "input", "output"}
                     lines; loss on the response only (see docs/finetuning.md for the template)

The result is --out/model.pt (default runs/finetune-<mode>-<key>), a plain checkpoint (LoRA
adapters merged) that `llmforge generate` and `llmforge evaluate` take as is. Running the same
command again resumes an interrupted run or, when it finished, does nothing.

examples:
  llmforge finetune runs/train-tiny-XXXX/best.pt --sft tests/data/sft_facts.jsonl --max-steps 200
  llmforge finetune best.pt --sft alpaca.jsonl --mode lora --lora-r 16 --max-steps 1000
  llmforge finetune best.pt --text ./my_domain_texts/ --max-steps 500
"""

from __future__ import annotations

import argparse
import sys

HELP = "fine-tune a checkpoint on text or prompt/response data (full or LoRA)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="the base checkpoint (best.pt, ckpt-*.pt or an earlier fine-tune's model.pt)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", metavar="SHARD_DIR", help="token dataset made with the checkpoint's tokenizer")
    data.add_argument("--sft", metavar="FILE.jsonl", help="prompt/response (or Alpaca) JSONL")
    data.add_argument("--text", action="append", metavar="SOURCE",
                      help="raw text file, directory or URL, prepared with the checkpoint's tokenizer; repeatable")
    p.add_argument("--mode", choices=["full", "lora"], default="full", help="update all weights, or LoRA adapters")
    p.add_argument("--lora-r", type=int, default=8, metavar="R", help="LoRA rank (default: 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator: update = alpha/r * B A (16)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (default: 0)")
    p.add_argument("--lora-targets", default="attn,mlp", metavar="NAMES",
                   help="comma-separated module names whose Linear layers get adapters (default: attn,mlp)")
    p.add_argument("--max-steps", type=int, default=500, metavar="N", help="optimizer steps (default: 500)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-4 full, 1e-3 lora)")
    p.add_argument("--warmup-steps", type=int, default=20, metavar="N")
    p.add_argument("--weight-decay", type=float, default=None, help="(default: 0.1 full, 0 lora)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B")
    p.add_argument("--grad-accum", type=int, default=1, metavar="K")
    p.add_argument("--block-size", type=int, default=None, metavar="T", help="sequence length (default: the model's)")
    p.add_argument("--eval-every", type=int, default=100, metavar="N", help="validation loss every N steps")
    p.add_argument("--ckpt-every", type=int, default=250, metavar="N", help="checkpoint every N steps")
    p.add_argument("--val-fraction", type=float, default=0.05, help="SFT examples held out for validation")
    p.add_argument("--pack", action="store_true", help="SFT: pack several examples per sequence")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: runs/finetune-<mode>-<key>)")
    p.add_argument("--shards-root", default="shards", metavar="DIR", help="where --text data is prepared")
    p.add_argument("--experiment", default="llmforge", help="MLflow experiment (default: llmforge)")
    p.add_argument("--no-prefect", action="store_true", help="run directly, not as a Prefect flow")


def config_from_args(args: argparse.Namespace) -> dict:
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return dict(mode=args.mode, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                lora_targets=targets, max_steps=args.max_steps, lr=args.lr, warmup_steps=args.warmup_steps,
                weight_decay=args.weight_decay, batch_size=args.batch_size, grad_accum=args.grad_accum,
                block_size=args.block_size, eval_every=args.eval_every, ckpt_every=args.ckpt_every,
                val_fraction=args.val_fraction, pack=args.pack, seed=args.seed, device=args.device,
                dtype=args.dtype, compile=args.compile)


def run(args: argparse.Namespace) -> int:
    from llmforge.model.checkpoint import CheckpointError
    from llmforge.model.finetune import FinetuneConfig
    from llmforge.model.train import TrainingDiverged

    config = config_from_args(args)
    try:
        FinetuneConfig(**config).validate()
        if args.no_prefect:
            summary = _run_direct(args, config)
        else:
            from llmforge.flows.finetune import finetune_flow

            summary = finetune_flow(args.checkpoint, data_dir=args.data, sft_file=args.sft, text_sources=args.text,
                                    out_dir=args.out, config=config, shards_root=args.shards_root,
                                    experiment=args.experiment)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    t = summary["train"]
    if summary.get("skipped"):
        print("(already fine-tuned with these inputs: nothing to do)")
    data = summary["data"]
    if data.get("bad_lines"):
        print(f"{data['sft_file']}: {data['bad_lines']} bad line(s) skipped, e.g. {data['bad_line_examples'][0]}")
    val = t.get("val_loss")
    print(f"\nfine-tuned ({summary['mode']}) for {t['step']} steps: train loss {t['train_loss']:.4f}"
          + (f", val loss {val:.4f}" if val is not None else ""))
    print(f"  model:      {summary['model']}")
    if summary.get("adapter"):
        print(f"  adapter:    {summary['adapter']}")
    print(f"  MLflow run: {summary['mlflow_run_id']}"
          + (f" (base model's run {summary['base_run_id']})" if summary.get("base_run_id") else ""))
    print(f"  try it:     llmforge generate {summary['model']} --prompt ...")
    return 0


def _run_direct(args: argparse.Namespace, config: dict) -> dict:
    from llmforge.flows.finetune import default_out_dir
    from llmforge.model.finetune import FinetuneConfig, data_identity, finetune, finetune_key
    from llmforge.pipeline.fsutil import sha256_file

    if args.text:
        raise ValueError("--text prepares data through the Prefect flows; drop --no-prefect, or prepare it with "
                         "`llmforge prepare --tokenizer` and pass --data")
    cfg = FinetuneConfig(**config)
    out = args.out
    if out is None:
        key = finetune_key(sha256_file(args.checkpoint), data_identity(args.data, args.sft), cfg)
        out = default_out_dir(cfg.mode, key)
    return finetune(args.checkpoint, data_dir=args.data, sft_file=args.sft, out_dir=out, cfg=cfg,
                    experiment=args.experiment)
