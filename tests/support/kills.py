"""Kill a stage at each of its commits, as a kill -9 would, from inside the process.

Every file a stage commits is renamed into place by ``os.replace``. :func:`count_commits` counts
those of an uninterrupted run; :func:`killed_at` stops a run just before (``after=False``) or
just after (``after=True``) its ``k``-th one by raising :class:`Killed`, which nothing in the
code under test catches.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator


class Killed(BaseException):
    """What a kill -9 looks like from inside: nothing after this point runs."""


@contextlib.contextmanager
def count_commits(monkeypatch) -> Iterator[list[int]]:
    """``with count_commits(mp) as n: run()`` -> ``n[0]`` renames-into-place happened."""
    real_replace, n = os.replace, [0]

    def counting(a, b, **kw):
        n[0] += 1
        return real_replace(a, b, **kw)

    monkeypatch.setattr(os, "replace", counting)
    try:
        yield n
    finally:
        monkeypatch.setattr(os, "replace", real_replace)


def killed_at(monkeypatch, k: int, after: bool, run: Callable[[], object]) -> None:
    """Run ``run()`` and stop it at its ``k``-th commit (before or after the rename)."""
    real_replace, seen = os.replace, [0]

    def replace(a, b, **kw):
        seen[0] += 1
        if seen[0] == k and not after:
            raise Killed()
        r = real_replace(a, b, **kw)
        if seen[0] == k:
            raise Killed()
        return r

    monkeypatch.setattr(os, "replace", replace)
    try:
        with contextlib.suppress(Killed):
            run()
    finally:
        monkeypatch.setattr(os, "replace", real_replace)
