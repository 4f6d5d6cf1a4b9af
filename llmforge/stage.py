"""The shape every stage has: a typed config, a key, an output directory, ``completed()``, ``run()``.

    download -> clean -> tokenizer -> tokenize -> train -> evaluate -> finetune -> export

A stage object is built from its config and its inputs (paths or upstream stages). Building it
checks everything that can be checked without doing the work and creates nothing on disk, so
commands build their stages first and fail in one line before any server starts or any
directory is made. Then:

- ``key``: the fingerprint of every config field that changes the output (control fields such
  as the device are left out, see :func:`llmforge.config.control`), the inputs' fingerprints and
  the on-disk format version; computed once per object.
- ``out_dir``: where the output goes (``<root>/<name>-<key>`` unless the user named a place).
- ``completed()``: the stage's result (its manifest or summary) when the output exists and
  verifies, else ``None``. This is the one "is it done?" check; flows skip a stage on it.
- ``run()``: do the work (resuming committed units of an interrupted run) and return the result.

Flows (``flows/``) and commands call stages; nothing else decides where a stage writes or
whether it is done.
"""

from __future__ import annotations

import abc
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from llmforge.pipeline.fsutil import FORMAT_VERSION, fingerprint


class Stage(abc.ABC):
    """Base of every stage; subclasses set ``name`` and ``config`` and implement the rest."""

    name: ClassVar[str]
    config: Any  # a llmforge.config.Config

    @abc.abstractmethod
    def inputs(self) -> Any:
        """What the stage reads, as JSON-able identities (upstream keys, file hashes)."""

    @cached_property
    def key(self) -> str:
        return fingerprint(self.name, FORMAT_VERSION, self.config.key_dict(), self.inputs())

    @property
    @abc.abstractmethod
    def out_dir(self) -> Path:
        """Where the stage writes its output."""

    @abc.abstractmethod
    def completed(self) -> dict[str, Any] | None:
        """The result when the output exists and verifies, else None."""

    @abc.abstractmethod
    def run(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Do (or resume) the work; return the result."""

    @staticmethod
    def read_result(path: Path) -> dict[str, Any] | None:
        """A stage's JSON result file, or None when it is missing or unreadable (then the stage
        is simply not complete: a torn or hand-edited file is never trusted)."""
        from llmforge.pipeline.fsutil import read_json

        try:
            result = read_json(path)
        except (OSError, ValueError):
            return None
        return result if isinstance(result, dict) else None

    def ensure(self, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], bool]:
        """``(result, skipped)``: the completed result, or the result of running the stage."""
        done = self.completed()
        if done is not None:
            return done, True
        return self.run(*args, **kwargs), False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self.key}, out_dir={self.out_dir})"
