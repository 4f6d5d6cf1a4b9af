"""Atomic writes, hashing, fingerprints and directory locks: what every stage needs to be resumable.

Every file a stage commits goes through :func:`atomic_path` (write to a temp name in the same
directory, fsync, rename), so a kill at any moment leaves either the old file or the new one,
never a torn one; a full disk there is one :class:`DiskFull` line naming the file and the space.
A stage's output directory is named by :func:`fingerprint` of its config and its inputs'
fingerprints, and is complete exactly when its ``manifest.json`` exists.

One process writes an output directory at a time: :class:`DirLock` (``flock`` on ``<dir>/.lock``,
released by the kernel when its holder dies, so a stale lock never needs clearing by hand). Temp
files carry their writer's host and PID in their name, so :func:`clean_temp` removes only those of
dead writers, or all of them when this process holds the directory's lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from llmforge.errors import UserError

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


def stat_key(st: os.stat_result) -> list[int]:
    """What identifies a file's content without reading it: size, mtime, ctime, inode, device.
    Any write, truncate, rename-over or ``touch -d`` changes the ctime, which no user can set
    back, so a hash remembered under this key cannot go stale (bit rot below the filesystem
    aside, which only a full re-hash finds: ``llmforge verify``)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    """Hex sha256 of a file; remembered per :func:`stat_key` within a process, so a command that
    checks a stage's key and then runs it hashes a big checkpoint once."""
    return _sha256(os.path.abspath(path), *stat_key(os.stat(path)), bufsize)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int, ctime_ns: int, ino: int, dev: int, bufsize: int) -> str:
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


class DiskFull(UserError):
    """The filesystem ran out of space (or quota) while a file was being written."""


# a device with less than this free after a failed write is full, whatever the library said
# (torch.save reports ENOSPC as "[enforce fail at inline_container.cc] unexpected pos ...")
FULL_BELOW = 1 << 20


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes this process may still write on the filesystem holding ``path`` (root may use the
    blocks reserved for it)."""
    st = os.statvfs(path)
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _is_disk_full(exc: BaseException, directory: Path) -> bool:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:  # an errno anywhere in the chain says it outright
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    if not isinstance(exc, (OSError, RuntimeError)):  # what pyarrow and torch wrap it in
        return False
    try:
        return free_bytes(directory) < FULL_BELOW
    except OSError:
        return False


def _disk_full(path: Path, tmp: Path, size_hint: int | None) -> DiskFull:
    try:
        written = tmp.stat().st_size
    except OSError:
        written = 0
    try:
        free = human_bytes(free_bytes(path.parent))
    except OSError:
        free = "unknown"
    need = (f"{human_bytes(size_hint)} needed" if size_hint else
            f"{human_bytes(written)} written before it ran out")
    return DiskFull(f"{path}: no space left on the device while writing it ({free} free, {need}); "
                    f"nothing half-written was kept: free some space (or write elsewhere) and run the "
                    f"command again, it resumes")


_HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "host"
_TEMP_OWNER = re.compile(r"\.w(\d+)@([^@/]+)\.[A-Za-z0-9_]+\.tmp$")


def _temp_prefix(name: str) -> str:
    """``.<name>.w<pid>@<host>.``: who writes a temp file is in its name (see clean_temp)."""
    return f".{name}.w{os.getpid()}@{_HOST}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it is renamed over ``path``.

    On any exception (or a kill) the temp file is removed / left as ``.*.tmp`` garbage that
    :func:`clean_temp` sweeps, and ``path`` is untouched. A write that fails because the device
    is full raises :class:`DiskFull` naming ``path`` and the space (``size_hint``: the bytes the
    file needs, when the caller knows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
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
    except BaseException as e:
        full = isinstance(e, Exception) and _is_disk_full(e, path.parent)
        error = _disk_full(path, tmp_path, size_hint) if full else None
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if error is not None:
            raise error from e
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
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent))
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


def _writer_alive(name: str) -> bool | None:
    """Whether the process that made temp file ``name`` still runs: None when that cannot be
    told (a writer on another host). A name without a writer was made before writers were
    named, by a process long gone."""
    m = _TEMP_OWNER.search(name)
    if m is None:
        return False
    if m.group(2) != _HOST:
        return None
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_temp(directory: str | os.PathLike) -> int:
    """Remove ``.*.tmp`` leftovers of killed writers in ``directory``; return how many.

    Only files whose writer is known to be dead (this host, PID gone) are removed, unless this
    process holds the :class:`DirLock` of ``directory`` (or of a directory above it): then no one
    else may be writing there and every leftover goes."""
    n = 0
    d = Path(directory)
    if not d.is_dir():
        return 0
    locked = holds_lock(d)
    for p in d.glob(".*.tmp"):
        if not locked and _writer_alive(p.name) is not False:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# one writer per output directory

LOCK_NAME = ".lock"
_held: dict[Path, list[int]] = {}  # directories this process holds the lock of -> [its flocked .lock fd, depth]
_held_mutex = threading.Lock()


class DirectoryBusy(UserError):
    """Another live process holds the output directory's lock."""


def holds_lock(directory: str | os.PathLike) -> bool:
    """Whether this process holds the lock of ``directory`` or of a directory above it."""
    d = Path(directory).resolve()
    with _held_mutex:
        return any(d == h or h in d.parents for h in _held)


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 65536).decode() or "{}")
        if not info.get("pid"):
            return "another process"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
        return f"process {info.get('pid')} on {info.get('host')} (`{info.get('command', '?')}`, since {since})"
    return "another process"


def lock_holder(directory: str | os.PathLike) -> str | None:
    """Who holds ``directory``'s lock ("process 123 on host (...)"), or None when no one else
    does. Creates nothing: a command can ask before it starts any server."""
    d = Path(directory)
    if holds_lock(d):
        return None
    try:
        fd = os.open(d / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class DirLock:
    """Exclusive use of an output directory by this process: ``with DirLock(out_dir): ...``.

    A second process fails at once with :class:`DirectoryBusy` naming the holder (PID, host,
    command, start time) rather than waiting: two writers of one directory are nearly always a
    mistake (the same command started twice, a retried flow run whose first attempt still runs),
    a wait would look like a hang, and the second run, started again later, resumes from whatever
    the first one committed. The lock is ``flock`` on ``<dir>/.lock``: the kernel drops it when the
    holder exits or dies, so a crashed run leaves nothing to clean up (the PID in the file is
    informational only). Re-entrant within a process; works on local filesystems and NFSv4."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self._key: Path | None = None

    def __enter__(self) -> "DirLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        key = self.dir.resolve()
        # The whole acquisition holds the mutex: two threads of one process (download or
        # tokenize tasks on the thread runner) would otherwise both miss `_held` and the second
        # one's flock, on its own open file, would fail against the first's.
        with _held_mutex:
            if key in _held:
                _held[key][1] += 1
                self._key = key
                return self
            fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise DirectoryBusy(f"{self.dir}: in use by {holder}; two runs must not write one directory: "
                                    f"wait for it to finish (or stop it), then run again, it resumes") from None
            info = {"pid": os.getpid(), "host": _HOST, "since": time.time(),
                    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else "python"}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            self._key = key
            _held[key] = [fd, 1]
        return self

    def __exit__(self, *exc: Any) -> None:
        with _held_mutex:
            held = _held[self._key]
            held[1] -= 1
            if held[1] > 0:
                return
            # The last user of this process's lock releases it, whichever DirLock object took it.
            del _held[self._key]
            fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
