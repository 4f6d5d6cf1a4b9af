"""Fine-tune a checkpoint, keeping its tokenizer: on plain text (domain adaptation) or on
prompt/response pairs (instruction tuning), updating every weight or LoRA adapters.

Data (exactly one):
  --sft FILE.jsonl   {"prompt": ..., "response": ...} or Alpaca {"instruction", "input", "output"}
                     lines; loss on the response only (see docs/finetuning.md for the template)
  --text SOURCE      raw text (file, directory or URL; repeatable): prepared here with the
                     checkpoint's tokenizer, then fine-tuned on
  --data DIR         a token dataset made with the checkpoint's tokenizer

Settings: train.* is the fine-tune's own training loop (the same fields as `llmforge train`,
with fine-tuning defaults: 500 steps, lr 1e-4 full / 1e-3 lora), model.dropout the only model
field that may change, and the fields below (mode, lora_r, ...) how to fine-tune. --config FILE
is a YAML of the same shape (train: and model: sections, mode: lora, ...); in `llmforge
pipeline` the same settings live under finetune.*

The result is <out>/model.pt (default runs/finetune-<mode>-<key>), a plain checkpoint (LoRA
adapters merged) that `llmforge generate` and `llmforge evaluate` take as is. Running the same
command again resumes an interrupted run or, when it finished, does nothing.

examples:
  llmforge finetune runs/train-tiny-XXXX/best.pt --sft tests/data/sft_facts.jsonl --max-steps 200
  llmforge finetune best.pt --sft alpaca.jsonl --mode lora --lora-r 16 --set train.lr=2e-3
  llmforge finetune best.pt --text ./my_domain_texts/ --max-steps 500
"""

from __future__ import annotations

import argparse

from llmforge.flows.options import add_config_options, add_flags, add_run_options

HELP = "fine-tune a checkpoint on text or prompt/response data (full or LoRA)"


def configure(p: argparse.ArgumentParser) -> None:
    from llmforge.model.finetune import FinetuneConfig
    from llmforge.model.train import TrainConfig

    p.add_argument("checkpoint", help="the base checkpoint (best.pt, ckpt-*.pt, a fine-tune's model.pt) or run directory")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--sft", metavar="FILE.jsonl", default=None, help="prompt/response (or Alpaca) JSONL")
    data.add_argument("--text", action="append", metavar="SOURCE", default=None,
                      help="raw text file, directory or URL, prepared with the checkpoint's tokenizer; repeatable")
    data.add_argument("--data", metavar="DATASET_DIR", default=None, help="token dataset made with the checkpoint's tokenizer")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: runs/finetune-<mode>-<key>)")
    p.add_argument("--shards-root", default="shards", metavar="DIR", help="where --text data is prepared")
    p.add_argument("--runs-root", default="runs", metavar="DIR", help="where default run directories go")
    add_config_options(p, "model.*, train.*, mode, lora_r, ...", config_help="YAML with train: and model: sections "
                       "and fine-tuning fields (mode: lora, ...)")
    add_run_options(p)
    add_flags(p, FinetuneConfig, None, skip=["sft", "data"], title="fine-tuning options (also --set NAME=VALUE)")
    add_flags(p, TrainConfig, "train")


def build(args: argparse.Namespace):
    from llmforge.config import read_yaml
    from llmforge.flows.options import settings
    from llmforge.model.finetune import FinetuneConfig, FinetuneStage
    from llmforge.model.runtime import check_device

    base = read_yaml(args.config, "a fine-tuning config") if args.config else {}
    base.update({k: v for k, v in (("sft", args.sft), ("text", args.text), ("data", args.data)) if v is not None})
    cfg, _ = settings(args, base, lambda d, src: FinetuneConfig.load(d, source=src),
                      f"--config {args.config}" if args.config else "options")
    check_device(cfg.train.device)
    stage = None if cfg.text else FinetuneStage(args.checkpoint, cfg, out_dir=args.out, runs_root=args.runs_root)
    if cfg.text:
        from llmforge.model.checkpoint import find_checkpoint

        find_checkpoint(args.checkpoint)
        if args.no_prefect:
            from llmforge.errors import ConfigError

            raise ConfigError("--text prepares data through the Prefect flows; drop --no-prefect, or prepare it with "
                              "`llmforge prepare --tokenizer` and pass --data")
    assert isinstance(cfg, FinetuneConfig)
    return cfg, stage


def run(args: argparse.Namespace) -> int:
    from llmforge.console import say

    from llmforge.flows.commands.train import busy

    cfg, stage = build(args)
    if stage is not None:
        busy(stage.out_dir)
    summary = stage.completed() if stage is not None else None
    if summary is not None:
        say("(already fine-tuned with these inputs: nothing to do)")
    elif args.no_prefect:
        summary = stage.run(experiment=args.experiment)
    else:
        from llmforge.flows.session import prefect_session

        with prefect_session():
            from llmforge.flows.finetune import finetune_flow

            summary = finetune_flow(args.checkpoint, config=cfg.model_dump(mode="json", exclude_unset=False),
                                    out_dir=args.out, shards_root=args.shards_root, runs_root=args.runs_root,
                                    experiment=args.experiment)
    t = summary["train"]
    if summary.get("status") != "completed":
        say(f"\nfine-tune {summary.get('status')} at step {t['step']}; run the same command again to resume")
        return 0
    data = summary["data"]
    if data.get("bad_lines"):
        say(f"{data['sft_file']}: {data['bad_lines']} bad line(s) skipped, e.g. {data['bad_line_examples'][0]}")
    val = t.get("val_loss")
    say(f"\nfine-tuned ({summary['mode']}) for {t['step']} steps: train loss {t['train_loss']:.4f}"
        + (f", val loss {val:.4f}" if val is not None else ""))
    say(f"  model:      {summary['model']}")
    if summary.get("adapter"):
        say(f"  adapter:    {summary['adapter']}")
    say(f"  MLflow run: {summary['mlflow_run_id']}"
        + (f" (base model's run {summary['base_run_id']})" if summary.get("base_run_id") else ""))
    say(f"  try it:     llmforge generate {summary['model']} --prompt ...")
    return 0
