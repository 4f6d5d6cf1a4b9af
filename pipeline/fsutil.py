"""Atomic writes, hashing and fingerprints: the three things every stage needs to be resumable.

Every file a stage commits goes through :func:`atomic_path` (write to a temp name in the same
directory, fsync, rename), so a kill at any moment leaves either the old file or the new one,
never a torn one. A stage's output directory is named by :func:`fingerprint` of its config and
its inputs' fingerprints, and is complete exactly when its ``manifest.json`` exists.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

FORMAT_VERSION = 1  # bump when any on-disk format changes: every fingerprint changes with it


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# temp files are created 0600 (mkstemp) and temp dirs 0700 (mkdtemp); what we rename into place
# gets the mode a plain open() would have given it, so a teammate can read a shared dataset
FILE_MODE = 0o666 & ~_read_umask()
DIR_MODE = 0o777 & ~_read_umask()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def fingerprint(*parts: Any, length: int = 16) -> str:
    """A short hex digest of JSON-able parts (configs, upstream fingerprints, versions)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(canonical_json(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    """Hex sha256 of a file; remembered per (path, size, mtime, inode) within a process, so a
    command that checks a stage's key and then runs it hashes a big checkpoint once."""
    st = os.stat(path)
    return _sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino, bufsize)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int, ino: int, bufsize: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(bufsize)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def serial_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """Run ``fn`` on each item in this process: the default unit runner of every stage (flows
    pass one that submits each unit as a Prefect task)."""
    return [fn(x) for x in items]


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it is renamed over ``path``.

    On any exception (or a kill) the temp file is removed / left as ``.*.tmp`` garbage that
    :func:`clean_temp` sweeps, and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if fsync:
            with open(tmp_path, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
        if fsync:
            _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temp name and rename it into place when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, DIR_MODE)
    try:
        yield tmp
        if path.exists():  # a concurrent/earlier identical run won: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_temp(directory: str | os.PathLike) -> int:
    """Remove ``.*.tmp`` leftovers of killed writers in ``directory``; return how many."""
    n = 0
    d = Path(directory)
    if not d.is_dir():
        return 0
    for p in d.glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        n += 1
    return n


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
