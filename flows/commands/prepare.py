"""Download, clean, train a tokenizer for and tokenize a corpus into memory-mapped Arrow shards.

Every stage is skipped when its output (named by a fingerprint of its config and inputs) already
exists, and a killed run resumes where it stopped: run the same command again. A corpus that is
already prepared is reported at once, without starting Prefect.

examples:
  llmforge prepare --corpus quickstart
  llmforge prepare --corpus openwebtext --workers 16
  llmforge prepare --source https://example.org/data.jsonl.zst --source ./more_texts/ --vocab-size 16000
"""

from __future__ import annotations

import argparse

from llmforge.flows.options import add_run_options

HELP = "download + clean + tokenize a corpus into token shards (the data flow)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", metavar="NAME_OR_YAML",
                   help="a spec in configs/corpus (quickstart, tinystories, openwebtext, openwebtext-hf, gutenberg) "
                        "or a path to a YAML spec; default: quickstart, or 'custom' when --source is given")
    p.add_argument("--source", action="append", metavar="URL_OR_PATH", default=None,
                   help="an http(s)/file URL or a local file/directory; repeatable. Replaces the spec's sources")
    p.add_argument("--format", default=None,
                   help="reader format for --source inputs (openwebtext, tar, jsonl, parquet, text, dir); "
                        "default: detected from the file")
    p.add_argument("--text-key", default=None, help="JSON key / parquet column with the text (default: text)")
    p.add_argument("--out", default="shards", metavar="DIR",
                   help="root directory for all stage outputs (default: ./shards)")
    p.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help="tokenizer vocabulary size (default: the spec's, 32000 if it sets none)")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="reuse this SentencePiece .model instead of training one (e.g. to fine-tune a base model)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="parallel tasks (processes) for downloading, cleaning and tokenizing (default: all cores)")
    p.add_argument("--task-runner", default="process", metavar="KIND",
                   help="where tasks run: process (default), thread, dask (a local Dask cluster) or the address "
                        "of a running Dask scheduler (tcp://host:8786)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_run_options(p, prefect=False)


def run(args: argparse.Namespace) -> int:
    from llmforge.console import say
    from llmforge.errors import ConfigError
    from llmforge.pipeline.prepare import Prepare, dataset_line, load_spec

    overrides = {k: v for k, v in (("format", args.format), ("text_key", args.text_key)) if v}
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be >= 1")
    corpus = args.corpus if (args.corpus or args.source) else "quickstart"
    spec = load_spec(corpus, args.source, args.vocab_size, overrides)
    plan = Prepare(spec, args.out, args.tokenizer)
    from llmforge.flows.commands.train import busy

    for directory in plan.directories():
        busy(directory)
    if (ds_dir := plan.done()) is not None:
        say(f"dataset ready (every stage was done before): {ds_dir / 'manifest.json'}\n  {dataset_line(ds_dir)}\n"
            f"  train with: llmforge train --data {ds_dir}")
        return 0
    from llmforge.flows.session import prefect_session

    with prefect_session():
        from llmforge.flows.data import prepare_flow

        result = prepare_flow(corpus=corpus, sources=args.source, out=args.out, vocab_size=args.vocab_size,
                              workers=args.workers, task_runner=args.task_runner, tokenizer_model=args.tokenizer,
                              overrides=overrides or None, progress=not args.no_progress, experiment=args.experiment)
    say(f"  train with: llmforge train --data {result['dataset']}")
    return 0
