"""`llmforge` command line: a thin dispatcher over ``flows/commands/<name>.py``."""

from __future__ import annotations

import argparse
import importlib
import sys

# order = order in --help; each name is a module in flows/commands
COMMANDS = ["prepare", "train", "generate", "evaluate", "finetune", "pipeline", "runs"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmforge",
        description="Build your own GPT: corpus -> clean -> tokenizer -> shards -> train -> "
        "evaluate -> finetune, as resumable Prefect flows tracked in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"llmforge.flows.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"llmforge.flows.commands.{name}":
                continue  # command not built yet
            raise
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=(mod.__doc__ or mod.HELP).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.configure(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
