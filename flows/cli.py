"""`llmforge` command line: a thin dispatcher over ``flows/commands/<name>.py``.

Every command fails the same way: a :class:`~llmforge.errors.UserError` (a wrong name, a missing
file, a bad option) is ONE line on stderr and exit code 2 (3 when training diverged); anything
else is a bug and prints its traceback (exit 1). ``--debug`` shows the traceback of user errors
too. Checks that can fail run before any Prefect server starts or any directory is made.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

# order = order in --help; each name is a module in flows/commands
COMMANDS = ["prepare", "train", "generate", "chat", "serve", "evaluate", "finetune", "export", "pipeline",
            "runs", "verify"]


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str] | None = None) -> Parser:
    """The parser; only the command named in ``argv`` is configured (and imports what its
    options need), so ``llmforge --help`` and every command start fast."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = Parser(
        prog="llmforge",
        description="Build your own GPT: corpus -> clean -> tokenizer -> shards -> train -> "
        "evaluate -> finetune, as resumable Prefect flows tracked in MLflow.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for name in COMMANDS:
        mod = importlib.import_module(f"llmforge.flows.commands.{name}")
        p = sub.add_parser(name, help=mod.HELP, description=(mod.__doc__ or mod.HELP).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == chosen:
            mod.configure(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks of user errors too")
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    from llmforge.errors import UserError, one_line
    from llmforge.flows.session import quiet_defaults

    quiet_defaults()  # before anything imports prefect
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except UserError as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
