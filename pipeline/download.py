"""Download stage: fetch the files a corpus spec lists, resumably, and verify them.

A source is an ``http(s)://`` URL, a ``file://`` URL or a plain local path (see
:class:`SourceSpec`). Remote files are streamed into ``<dest>/<name>.part``; a retry or a
re-run continues from the bytes already there with an HTTP ``Range`` request, so a dropped
connection or a killed run costs only the bytes in flight. A finished file is verified
(size and sha256 when the spec gives them) and only then renamed to its final name, so the
final name always means "complete and verified". A file that fails verification is moved to
``<dest>/.rejected/`` for inspection, never used and never silently deleted.

Local sources are not copied (a corpus can be 40 GB): they are checked to exist, verified
when the spec gives a size or hash, and returned in place.

Every file's sha256 is remembered in a sidecar ``<dest>/<name>.sha256`` (JSON with the size
and mtime it was computed for), so a re-run does not re-hash tens of GB just to report it.

:func:`fetch` returns a manifest entry (a plain dict) that the next stage reads.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import http.client
import logging
import os
import re
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import requests
import urllib3
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from llmforge.config import Config
from llmforge.errors import DataError, NotFound
from llmforge.pipeline.fsutil import DiskFull, _is_disk_full, atomic_write_json, read_json, sha256_file
from llmforge.pipeline.readers import SkippedEntry, walk_regular_files
from llmforge.stage import Stage

log = logging.getLogger(__name__)

USER_AGENT = "llmforge-download/1"
MAX_BACKOFF_S = 300.0  # cap on one back-off sleep, Retry-After included
REJECTED_DIR = ".rejected"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


class DownloadError(DataError, RuntimeError):
    """A source could not be fetched or verified; the message names the URL/file and why."""


class SourceSpec(Config):
    """One entry of a corpus spec: where a file (or local directory) comes from and what it is.

    Strict: an unknown key (a typo in the YAML) is a validation error naming that key.
    """

    url: str = Field(description="http://, https:// or file:// URL, or a local path (made file://)")
    sha256: str | None = Field(default=None, description="expected hex sha256 of the file")
    size: int | None = Field(default=None, ge=0, description="expected size in bytes")
    name: str | None = Field(default=None, description="local file name; default: last URL segment")
    format: str | None = Field(default=None, description="reader format hint, carried along")
    include: list[str] = Field(default_factory=list, description="globs for directory sources")
    exclude: list[str] = Field(default_factory=list, description="globs for directory sources")
    text_key: str | None = Field(default=None, description="JSON field holding the text")
    separator: str | None = Field(
        default=None, description="plain-text sources: a line holding only this separates documents"
    )
    follow_symlinks: bool = Field(
        default=False,
        description="directory sources: read symlinked files and directories (wherever they point); by "
        "default links are skipped and counted, like FIFOs, sockets and devices, which are never read",
    )

    @field_validator("url")
    @classmethod
    def _normalise_url(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("url is empty")
        scheme = urllib.parse.urlsplit(v).scheme.lower()
        if scheme in ("http", "https"):
            if not urllib.parse.urlsplit(v).netloc:
                raise ValueError(f"{v!r} has no host")
            return v
        if scheme == "file":
            return v
        if scheme == "" or _WINDOWS_DRIVE.match(v):  # a plain path
            return Path(os.path.abspath(os.path.expanduser(v))).as_uri()
        raise ValueError(f"{v!r}: unsupported URL scheme {scheme!r} (use http, https, file or a path)")

    @field_validator("sha256")
    @classmethod
    def _check_sha256(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip().lower()
        if not _HEX64.match(v):
            raise ValueError(f"{v!r} is not a sha256 hex digest (64 hex characters)")
        return v

    @model_validator(mode="after")
    def _default_name(self) -> "SourceSpec":
        if self.name is None:
            if self.is_local:
                seg = self.local_path.name
            else:
                seg = urllib.parse.unquote(urllib.parse.urlsplit(self.url).path.rstrip("/").rsplit("/", 1)[-1])
            if not seg:
                raise ValueError(f"cannot derive a file name from {self.url!r}: give `name`")
            self.name = seg
        if self.name in (".", "..") or "/" in self.name or "\\" in self.name or "\x00" in self.name:
            raise ValueError(f"name {self.name!r} must be a plain file name (no path separators)")
        return self

    @property
    def is_local(self) -> bool:
        return self.url.lower().startswith("file:")

    @property
    def local_path(self) -> Path:
        """The filesystem path of a file:// source."""
        parts = urllib.parse.urlsplit(self.url)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{self.url!r}: file URLs on another host are not supported")
        return Path(urllib.request.url2pathname(parts.path))


def as_spec(src: SourceSpec | Mapping[str, Any] | str | os.PathLike) -> SourceSpec:
    """Accept a spec, a dict from YAML, or a bare URL/path."""
    if isinstance(src, SourceSpec):
        return src
    if isinstance(src, Mapping):
        return SourceSpec.model_validate(dict(src))
    return SourceSpec(url=os.fspath(src))


# ---------------------------------------------------------------------------------------------
# sha256 sidecars


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _cached_sha256(path: Path, sidecar: Path) -> str | None:
    """The digest recorded in ``sidecar`` if it is still about ``path`` as it is now."""
    try:
        rec = read_json(sidecar)
        st = path.stat()
    except (OSError, ValueError):
        return None
    if (
        isinstance(rec, dict)
        and rec.get("path") == str(path.resolve())
        and rec.get("size") == st.st_size
        and rec.get("mtime_ns") == st.st_mtime_ns
        and isinstance(rec.get("sha256"), str)
        and _HEX64.match(rec["sha256"])
    ):
        return rec["sha256"]
    return None


def _write_sidecar(path: Path, sidecar: Path, digest: str) -> None:
    st = path.stat()
    atomic_write_json(
        sidecar,
        {"path": str(path.resolve()), "sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns},
    )


def _sha256_cached(path: Path, sidecar: Path) -> str:
    digest = _cached_sha256(path, sidecar)
    if digest is None:
        digest = sha256_file(path)
        _write_sidecar(path, sidecar, digest)
    return digest


# ---------------------------------------------------------------------------------------------
# helpers


def _entry(src: SourceSpec, path: Path, size: int, sha256: str | None, *, skipped: bool,
           resumed_from: int = 0, attempts: int = 0) -> dict:
    return {
        "url": src.url,
        "name": src.name,
        "path": str(path.absolute()),
        "size": size,
        "sha256": sha256,
        "skipped": skipped,
        "resumed_from": resumed_from,
        "attempts": attempts,
        # carried along for the reader stage, which only reads this manifest
        "format": src.format,
        "include": list(src.include),
        "exclude": list(src.exclude),
        "text_key": src.text_key,
    }


def _reject(path: Path, dest_dir: Path) -> Path:
    """Move a bad file into ``dest_dir/.rejected/`` under a name that overwrites nothing."""
    rej_dir = dest_dir / REJECTED_DIR
    rej_dir.mkdir(parents=True, exist_ok=True)
    name = path.name[: -len(".part")] if path.name.endswith(".part") else path.name
    target = rej_dir / name
    n = 1
    while target.exists():
        target = rej_dir / f"{name}.{n}"
        n += 1
    os.replace(path, target)
    return target


def _mismatch(src: SourceSpec, size: int, digest: str | None) -> str | None:
    """Describe how a file of ``size``/``digest`` differs from the spec, or None if it matches."""
    if src.size is not None and size != src.size:
        return f"size mismatch: expected {src.size} bytes, got {size}"
    if src.sha256 is not None and digest is not None and digest != src.sha256:
        return f"sha256 mismatch: expected {src.sha256}, got {digest}"
    return None


def _backoff_delay(backoff: float, attempt: int, retry_after: float | None) -> float:
    delay = backoff * (2 ** (attempt - 1))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, MAX_BACKOFF_S)


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare; plain back-off is good enough


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.I)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes a-b/total`` -> (a, total); ``bytes */total`` -> (None, total)."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return start, total


class _Retry(Exception):
    """A transient failure of one attempt (network, 5xx, 429, short body)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


# Transport errors that a retry can cure. Disk errors (OSError from our own writes) are not here.
_TRANSIENT = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,  # ProtocolError, ReadTimeoutError, IncompleteRead, ...
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)


class _PartFile:
    """The ``.part`` file plus a running sha256 of its bytes, kept across attempts.

    Hashing while writing means a finished download is not read back a second time; when the
    ``.part`` was left by an earlier process its bytes are hashed once before appending.
    """

    def __init__(self, path: Path):
        self.path = path
        self.hasher = hashlib.sha256()
        self.hashed = 0  # bytes of the file covered by self.hasher

    @property
    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def restart(self) -> None:
        """Truncate to zero: the server is sending the whole body again."""
        with open(self.path, "wb"):
            pass
        self.hasher = hashlib.sha256()
        self.hashed = 0

    def catch_up(self) -> None:
        """Make the hasher cover the bytes already on disk (a .part from an earlier run)."""
        size = self.size
        if self.hashed == size:
            return
        if self.hashed > size:  # shrank under us: start the hash over
            self.hasher, self.hashed = hashlib.sha256(), 0
        with open(self.path, "rb") as f:
            f.seek(self.hashed)
            while chunk := f.read(1 << 20):
                self.hasher.update(chunk)
                self.hashed += len(chunk)

    def digest(self) -> str:
        self.catch_up()
        return self.hasher.hexdigest()


def _attempt(session: requests.Session, src: SourceSpec, part: _PartFile, bar: tqdm, *,
             timeout: float, chunk_size: int) -> int:
    """One HTTP request; return the byte offset it resumed from. Raises _Retry or DownloadError."""
    url = src.url
    offset = part.size
    headers = {"Accept-Encoding": "identity"}  # we want the bytes as published, not re-encoded
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with session.get(url, headers=headers, stream=True, timeout=(timeout, timeout)) as r:
        status = r.status_code
        if status == 416 and offset:
            _, total = _parse_content_range(r.headers.get("Content-Range"))
            known = total if total is not None else src.size
            if known == offset:
                return offset  # the .part is already complete
            log.warning("%s: server refused range from %d (size %s); restarting from 0", url, offset, known)
            part.restart()
            bar.reset()
            raise _Retry(f"HTTP 416 for a .part of {offset} bytes")
        if status == 429 or status >= 500:
            raise _Retry(f"HTTP {status} {r.reason}", _parse_retry_after(r.headers.get("Retry-After")))
        if status >= 400:
            raise DownloadError(f"{url}: HTTP {status} {r.reason}")
        if status not in (200, 206):
            raise DownloadError(f"{url}: unexpected HTTP {status} {r.reason}")

        length = r.headers.get("Content-Length")
        body_len = int(length) if length and length.isdigit() else None
        if status == 206:
            start, total = _parse_content_range(r.headers.get("Content-Range"))
            if start != offset:
                # a range we did not ask for: do not splice it in; start over cleanly
                log.warning("%s: asked for bytes %d-, got Content-Range %r; restarting from 0",
                            url, offset, r.headers.get("Content-Range"))
                part.restart()
                bar.reset()
                raise _Retry("server answered a different range")
            mode = "ab"
        else:  # 200: the whole body, whatever we asked for
            if offset:
                log.info("%s: server ignored Range; restarting from 0", url)
            offset, total = 0, body_len
            part.restart()
            bar.reset()
            mode = "ab"
        if total is not None:
            bar.total = total
        bar.n = offset
        bar.refresh()

        part.catch_up()
        got = 0
        try:
            with open(part.path, mode) as f:
                for chunk in r.raw.stream(chunk_size, decode_content=False):
                    f.write(chunk)
                    part.hasher.update(chunk)
                    part.hashed += len(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        except _TRANSIENT as e:
            raise _Retry(f"connection lost after {got} bytes of this response: {type(e).__name__}: {e}") from e
        except OSError as e:
            if _is_disk_full(e, part.path.parent):
                need = f"; {src.size - part.size:,} bytes more needed" if src.size else ""
                raise DiskFull(f"{part.path}: no space left on the device while downloading {url} ({part.size:,} "
                               f"bytes kept: free some space and run again, it resumes from them{need})") from None
            raise DownloadError(f"{part.path}: cannot write download of {url}: {e}") from e
        if body_len is not None and got < body_len:
            raise _Retry(f"truncated body: got {got} of {body_len} bytes")
        return offset


@dataclass
class DirectoryScan:
    """What a directory source selects: ``files`` as ``(relative path, size, mtime_ns)``, sorted
    (the shape :func:`select_files` returns), and the ``skipped`` entries (links, FIFOs,
    sockets, devices) that would have been selected but are refused, to be named and counted
    (``ReadStats.record_skipped(root, scan.skipped)``)."""

    files: list[tuple[str, int, int]] = field(default_factory=list)
    skipped: list[SkippedEntry] = field(default_factory=list)


def scan_directory(path: Path, include: list[str], exclude: list[str], *,
                   follow_symlinks: bool = False) -> DirectoryScan:
    """The files a directory source selects and the entries it refuses.

    Regular files only: a symlink (to a file or a directory) is refused unless
    ``follow_symlinks``, and FIFOs, sockets and devices always are; nothing is opened while
    walking. Subtrees that an exclude pattern covers are not walked.
    """

    def keep_dir(rel: str) -> bool:
        return not any(fnmatch.fnmatch(f"{rel}/_", p) for p in exclude)

    def keep_file(rel: str) -> bool:
        if include and not any(fnmatch.fnmatch(rel, p) for p in include):
            return False
        return not any(fnmatch.fnmatch(rel, p) for p in exclude)

    found, skipped = walk_regular_files(Path(path), keep_file=keep_file, keep_dir=keep_dir,
                                        follow_symlinks=follow_symlinks)
    return DirectoryScan([(rel, st.st_size, st.st_mtime_ns) for rel, st in found], skipped)


def select_files(path: Path, include: list[str], exclude: list[str], *,
                 follow_symlinks: bool = False) -> list[tuple[str, int, int]]:
    """``(relative path, size, mtime_ns)`` of the regular files a directory source selects,
    sorted; see :func:`scan_directory` for what is refused and how to report it."""
    return scan_directory(path, include, exclude, follow_symlinks=follow_symlinks).files


def _fetch_local(src: SourceSpec, dest_dir: Path) -> dict:
    path = src.local_path
    if not path.exists():
        raise DownloadError(f"{path}: local source does not exist (url {src.url})")
    if path.is_dir():
        # entries it refuses are named and counted by the clean stage (once), not on every check
        scan = scan_directory(path, src.include, src.exclude, follow_symlinks=src.follow_symlinks)
        total = sum(f[1] for f in scan.files)
        if src.size is not None and total != src.size:
            raise DownloadError(f"{path}: size mismatch: expected {src.size} bytes, got {total}")
        return _entry(src, path, total, None, skipped=True)
    size = path.stat().st_size
    if src.size is not None and size != src.size:
        raise DownloadError(f"{path}: size mismatch: expected {src.size} bytes, got {size}")
    # The sidecar lives in dest_dir (the source's folder may be read-only) and records the
    # source path, so it is never confused with a downloaded file of the same name.
    digest = _sha256_cached(path, _sidecar(dest_dir / src.name))
    if (why := _mismatch(src, size, digest)) is not None:
        raise DownloadError(f"{path}: {why}")  # the user's own file: reported, never moved
    return _entry(src, path, size, digest, skipped=True)


def fetch(src: SourceSpec, dest_dir: Path, *, retries: int = 5, backoff: float = 1.0,
          timeout: float = 60, progress: bool = True, chunk_size: int = 1 << 20) -> dict:
    """Fetch one source into ``dest_dir`` (or locate it, for file://) and return its manifest entry.

    Entry keys: url, name, path (absolute), size, sha256, skipped (no bytes transferred: the
    file was already finished, or is local), resumed_from (bytes already on disk when the
    successful request began), attempts (HTTP requests made), and the reader hints format,
    include, exclude, text_key carried over from the spec.

    ``retries`` is how many times a transient failure (connection error, timeout, truncated
    body, 5xx, 429) is retried after the first attempt, sleeping ``backoff * 2**k`` seconds.
    """
    src = as_spec(src)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    if src.is_local:
        return _fetch_local(src, dest_dir)

    url = src.url
    final = dest_dir / src.name
    sidecar = _sidecar(final)
    part = _PartFile(dest_dir / f"{src.name}.part")

    if final.exists():
        size = final.stat().st_size
        why = _mismatch(src, size, None)
        digest = None if why else _sha256_cached(final, sidecar)
        why = why or _mismatch(src, size, digest)
        if why is None:
            return _entry(src, final, size, digest, skipped=True)
        moved = _reject(final, dest_dir)
        with contextlib.suppress(FileNotFoundError):
            sidecar.unlink()
        log.warning("%s: existing %s does not match the spec (%s); moved to %s, downloading again",
                    url, final, why, moved)

    attempts = 0
    with requests.Session() as session, tqdm(
        total=src.size, initial=0, unit="B", unit_scale=True, unit_divisor=1024,
        desc=src.name, disable=None if progress else True, leave=False,
    ) as bar:
        session.headers["User-Agent"] = USER_AGENT
        while True:
            attempts += 1
            try:
                resumed_from = _attempt(session, src, part, bar, timeout=timeout, chunk_size=chunk_size)
                break
            except _Retry as e:
                reason, retry_after = str(e), e.retry_after
            except _TRANSIENT as e:
                reason, retry_after = f"{type(e).__name__}: {e}", None

            if attempts > retries:
                raise DownloadError(
                    f"{url}: giving up after {attempts} attempts; last error: {reason} "
                    f"({part.size} bytes kept in {part.path} for the next run)"
                )
            delay = _backoff_delay(backoff, attempts, retry_after)
            log.warning("%s: attempt %d failed (%s); retrying in %.2fs", url, attempts, reason, delay)
            time.sleep(delay)

    size = part.size
    digest = part.digest()
    if (why := _mismatch(src, size, digest)) is not None:
        moved = _reject(part.path, dest_dir)
        raise DownloadError(f"{url}: {why}; the file was moved to {moved}")
    os.replace(part.path, final)  # atomic: the final name only ever holds a verified file
    _write_sidecar(final, sidecar, digest)
    return _entry(src, final, size, digest, skipped=False, resumed_from=resumed_from, attempts=attempts)


class DownloadStage(Stage):
    """One source: an http(s) file fetched into ``downloads/`` (resumed, retried, verified), or a
    local file or directory read in place. Complete when the file is there and matches the spec's
    size and sha256 (checked without the network)."""

    name = "download"

    def __init__(self, source: SourceSpec, dest_dir: str | os.PathLike):
        self.config, self.dest_dir = source, Path(dest_dir)

    def inputs(self) -> list:
        return []

    @property
    def out_dir(self) -> Path:
        return self.config.local_path if self.config.is_local else self.dest_dir

    def completed(self) -> dict | None:
        src = self.config
        if src.is_local:  # read in place: "complete" as soon as it exists and verifies
            if not src.local_path.exists():
                raise NotFound(f"{src.local_path}: local source does not exist")
            return _fetch_local(src, self.dest_dir)
        final = self.dest_dir / src.name
        if not final.is_file() or _mismatch(src, final.stat().st_size, None):
            return None
        digest = _sha256_cached(final, _sidecar(final))
        if _mismatch(src, final.stat().st_size, digest):
            return None  # run() moves it aside and downloads again
        return _entry(src, final, final.stat().st_size, digest, skipped=True)

    def run(self, progress: bool = True) -> dict:
        from llmforge.pipeline.fsutil import DirLock

        with DirLock(self.dest_dir):  # one downloading process per downloads/ directory
            return fetch(self.config, self.dest_dir, progress=progress)


def fetch_all(sources: Iterable[SourceSpec | Mapping[str, Any] | str], dest_dir: Path, *,
              workers: int = 4, **kw: Any) -> list[dict]:
    """Fetch several sources concurrently; entries come back in source order.

    Every source is attempted even when one fails, so the good files are finished and kept;
    then the first failure (in source order) is raised, with the others attached as notes.
    """
    specs = [as_spec(s) for s in sources]
    names: dict[str, str] = {}
    for s in specs:  # two downloads into one .part would corrupt each other: refuse up front
        if s.is_local:
            continue
        if s.name in names:
            raise DownloadError(
                f"{s.url} and {names[s.name]} would both be saved as {s.name!r} in {dest_dir}: "
                "remove the duplicate or give one a different `name`"
            )
        names[s.name] = s.url
    dest_dir = Path(dest_dir)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="download") as pool:
        futures = [pool.submit(fetch, s, dest_dir, **kw) for s in specs]
    results: list[dict] = []
    errors: list[BaseException] = []
    for fut in futures:
        exc = fut.exception()
        if exc is None:
            results.append(fut.result())
        else:
            errors.append(exc)
    if errors:
        first = errors[0]
        if len(errors) > 1:
            first.add_note(f"{len(errors) - 1} more of {len(specs)} sources failed:")
            for e in errors[1:]:
                first.add_note(f"  {e}")
        raise first
    return results
