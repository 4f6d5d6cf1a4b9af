"""What a person reads: progress and results on stdout, warnings on stderr, each once.

Stage code calls :func:`say` and :func:`warn` instead of ``print`` and logging. The terminal
gets the plain text; when the code runs inside a Prefect flow or task run, the same line also
goes to that run's log (so the Prefect UI shows it), while Prefect's own console handler is
kept at WARNING for commands (see ``flows/session.py``), so nothing appears twice.
:class:`WarningTally` prints a repeated kind of problem once, with its count.
"""

from __future__ import annotations

import sys
from collections import Counter


def _run_logger():
    prefect = sys.modules.get("prefect")
    if prefect is None:
        return None
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return None
        return get_run_logger()
    except Exception:  # never let logging break the work
        return None


def say(msg: str) -> None:
    """A line of progress or result."""
    print(msg, flush=True)
    if (logger := _run_logger()) is not None:
        logger.info(msg)


def warn(msg: str) -> None:
    """A line the user should look at (stderr, ``warning:`` prefix)."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)
    if (logger := _run_logger()) is not None:
        logger.info(f"warning: {msg}")


class WarningTally:
    """Collects problems by kind and prints each kind once: ``3 x empty file (e.g. a.py, b.py)``."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, kind: str, example: str = "") -> None:
        self.counts[kind] += 1
        if example and len(self.examples.setdefault(kind, [])) < 3:
            self.examples[kind].append(example)

    def lines(self) -> list[str]:
        out = []
        for kind, n in self.counts.most_common():
            ex = self.examples.get(kind) or []
            more = f"; e.g. {', '.join(ex)}" if ex else ""
            out.append(f"{n} x {kind}{more}")
        return out
