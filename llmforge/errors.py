"""The errors a user can fix, in one family, and how the command line shows them.

Everything that is the user's to fix (a wrong name, a missing file, a bad option, a file of the
wrong kind, bad data) is a :class:`UserError`: ``llmforge`` prints its message as ONE line on
stderr and exits with its ``exit_code`` (2). A run that diverged is :class:`TrainingDiverged`
(exit 3). Anything else is a bug or an environment failure: the command prints the traceback
and exits 1. ``llmforge --debug ...`` prints the traceback for user errors too.

Messages name the thing (file, option, field) first, then the problem, then the fix:
``--preset tny: no such model preset; did you mean tiny? (presets: tiny, small, ...)``.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """A problem the user can fix; shown as one line, exit code 2."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config file, option or ``--set`` value that does not validate."""


class NotFound(UserError, FileNotFoundError):
    """A named thing (file, directory, preset, corpus, checkpoint) that does not exist."""


class DataError(UserError, ValueError):
    """Input data that cannot be used as it is (a damaged shard, an empty split, a bad line)."""


class CheckpointError(UserError):
    """A checkpoint file that is missing, truncated, unsafe, not finite or not one of ours."""


class TrainingDiverged(UserError, RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm (exit code 3)."""

    exit_code = 3


def suggest(name: str, choices: Iterable[str]) -> str:
    """``"did you mean tiny? (known: small, tiny)"``, or just the known names."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    listed = f"(known: {', '.join(choices) if choices else 'none'})"
    return f"did you mean {close[0]}? {listed}" if close else listed


def did_you_mean(name: str, choices: Iterable[str], what: str) -> str:
    """``"no such model preset 'tny'; did you mean tiny? (known: small, tiny)"``."""
    return f"no such {what} {name!r}; {suggest(name, choices)}"


def one_line(text: str, limit: int = 600) -> str:
    """Collapse a multi-line message into one line (for errors from libraries)."""
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."
