"""Streaming readers for the corpus layouts people really download, yielding raw documents.

One entry point, :func:`iter_documents`, reads any of these without unpacking anything to
disk and holding at most one document (plus fixed-size buffers) in memory:

``openwebtext``      the Skylion007 ``openwebtext.tar.xz``: a tar of ``urlsf_subsetNN-M_data.xz``
                     members, each an xz-compressed tar of ``.txt`` documents.
``openwebtext_subset``  the HF mirror's ``subsets/urlsf_subset00.tar``: the same, uncompressed
                     outer tar. Both are read by the same code as ``tar``.
``tar``              tar / tar.gz / tar.xz / tar.bz2 / tar.zst of text files (one file = one doc);
                     nested archives and ``.jsonl`` members are read recursively.
``jsonl``            one JSON object per line (``.jsonl``, ``.json``, ``.ndjson``, optionally
                     ``.gz`` / ``.xz`` / ``.bz2`` / ``.zst``); the text is under ``text_key``.
``parquet``          read batch by batch from its row groups; the text column is ``text_key``.
``text``             a single text file (``.txt``, ``.md``, ``.py``, ...), optionally compressed:
                     one document, or many split at a ``separator`` (TinyStories).
``dir``              a directory of any of these, walked recursively in sorted path order with
                     include/exclude glob filters; hidden files and directories are skipped.

Document ids are stable and unique within a source: ``label:member/path`` for archive members
and directory files (nested archives join their paths with ``/``), ``label:line`` for jsonl
(1-based, as in editors and in error messages), ``label:row`` for parquet (0-based).

Bad input never raises out of the reader and never costs documents already read: each problem
is counted in :class:`ReadStats` under a ``read_error.*`` key and logged as a WARNING that names
the file (and member or line) and the problem. A truncated compressed stream yields every
complete document before the cut. Tar members are only ever read through ``extractfile``;
links, devices and names that are absolute or contain ``..`` are skipped and counted.

Hostile input cannot take unbounded memory or time (:class:`ReadLimits`): a document (a jsonl
line, a text file or tar member, a separated piece, a parquet value) longer than
``max_document_bytes`` is skipped and counted as ``read_error.too_long`` while reading goes on
with the next line or member; every decompression layer stops at ``max_expansion_ratio`` times
its compressed size (never below ``ratio_floor_bytes``) or ``max_decompressed_bytes``, counted as
``read_error.decompression_limit``, and the rest of that file or member is skipped. Directory
walks read regular files only: symlinks, FIFOs, sockets and devices are skipped, named and
counted (``read_error.symlink`` / ``read_error.special_file``) and never opened, unless
``follow_symlinks`` is set, which follows links to regular files and directories.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import io
import json
import logging
import lzma
import os
import stat
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterable, Iterator

import zstandard
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

FORMATS = ("openwebtext", "openwebtext_subset", "tar", "jsonl", "parquet", "text", "dir")
_TAR_FORMATS = ("openwebtext", "openwebtext_subset", "tar")

_BUF = 1 << 20  # read buffer for every layer; bounds memory independently of document sizes
_HEAD = 8192  # bytes sniffed for the binary-file check
_PARQUET_BATCH = 256

_COMPRESSION_SUFFIXES = {
    ".gz": "gz", ".gzip": "gz", ".xz": "xz", ".lzma": "xz", ".bz2": "bz2",
    ".zst": "zst", ".zstd": "zst",
}
_TAR_SHORT_SUFFIXES = {".tgz": "gz", ".txz": "xz", ".tbz2": "bz2", ".tbz": "bz2", ".tzst": "zst"}
_MAGIC = (
    (b"\x1f\x8b", "gz"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zst"),
    (b"BZh", "bz2"),
)
_JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson", ".jsonlines"}
_TEXT_SUFFIXES = {
    ".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".html", ".htm", ".xml", ".csv", ".tsv",
    ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts", ".go", ".rs", ".rb", ".sh",
    ".yaml", ".yml", ".toml", ".ini", ".cfg", ".log", ".srt", ".org", ".adoc",
}


MiB = 1 << 20
GiB = 1 << 30


class ReadLimits(BaseModel):
    """Hard caps that keep a hostile or broken file from taking unbounded memory or time.

    Defaults never trip on the corpora we know: the largest real documents are books of a few
    MB; real text compresses 2.5-5x (Gutenberg jsonl.zst 3.9x, xz'd web text ~4x, The Pile's
    jsonl.zst ~3.3x) and the largest single compressed files (The Pile shards) inflate to ~45 GB.
    Bombs of zeros compress 230-1000x (gzip), ~7000x (xz), ~30000x (zstd), ~150000x (bzip2).
    """

    model_config = ConfigDict(extra="forbid")

    max_document_bytes: int = Field(
        64 * MiB, gt=0,
        description="a jsonl line, text file, tar member, separated piece or parquet value (characters) "
        "longer than this is skipped and counted as read_error.too_long; reading goes on with the next",
    )
    max_expansion_ratio: float | None = Field(
        100.0, gt=1,
        description="a compressed file or member may inflate to at most this many times its compressed "
        "size (real text: 2.5-5x); beyond it the rest of that file is skipped (read_error.decompression_limit)",
    )
    ratio_floor_bytes: int = Field(
        256 * MiB, ge=0,
        description="the ratio limit never trips below this many decompressed bytes, so small files of "
        "very repetitive text are never flagged",
    )
    max_decompressed_bytes: int | None = Field(
        128 * GiB, gt=0,
        description="absolute cap on the decompressed bytes of one compressed file or member, whatever "
        "its size (The Pile's 14 GB jsonl.zst shards inflate to ~45 GB)",
    )

    def decompressed_cap(self, compressed_size: int | None) -> int | None:
        """How many bytes a compressed layer of ``compressed_size`` bytes may inflate to."""
        caps = []
        if self.max_expansion_ratio is not None and compressed_size is not None:
            caps.append(max(int(self.max_expansion_ratio * compressed_size), self.ratio_floor_bytes))
        if self.max_decompressed_bytes is not None:
            caps.append(self.max_decompressed_bytes)
        return min(caps) if caps else None


class LimitExceeded(Exception):
    """A size limit of :class:`ReadLimits` was hit; the message names the limit and the setting."""


class _TooLong(LimitExceeded):
    """A single piece (a tar metadata header) is over ``max_document_bytes``."""


def _human(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class RawDoc:
    """A document as read: ``bytes`` from text files and tar members (decoding is the cleaner's
    job, so its policy decides what undecodable bytes cost), ``str`` from JSON and parquet."""

    id: str
    data: bytes | str


@dataclass
class ReadStats:
    """What reading did: counters plus the first ``max_errors`` error messages.

    Counters: ``files`` (files opened), ``docs`` (documents yielded), ``bytes`` (their size as
    read), ``blank_lines`` / ``blank_documents`` (skipped empty jsonl lines / empty pieces
    between separators) and one ``read_error.<kind>`` per problem.
    Picklable and mergeable, so parallel workers can each keep one and the stage adds them up.
    """

    counts: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    max_errors: int = 100

    def error(self, path: str | os.PathLike, problem: str, count_key: str) -> None:
        """Count ``count_key`` and record/log ``"<path>: <problem>"`` (the first ``max_errors``
        at INFO, the rest at DEBUG so a badly broken corpus cannot flood the log). INFO, not
        WARNING: the stage that reads prints them once, grouped by kind with their counts, and
        lists every one in its manifest."""
        self.counts[count_key] += 1
        msg = f"{os.fspath(path)}: {problem}"
        if len(self.errors) < self.max_errors:
            self.errors.append(msg)
            log.info("%s", msg)
            if len(self.errors) == self.max_errors:
                log.info("further read errors are counted but not logged")
        else:
            log.debug("%s", msg)

    @property
    def n_errors(self) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith("read_error."))

    def record_skipped(self, root: str | os.PathLike, entries: Iterable["SkippedEntry"]) -> None:
        """Count and log the directory entries a walk refused (:func:`walk_regular_files`)."""
        for e in entries:
            self.error(os.path.join(root, e.rel), e.problem, e.key)

    def update(self, other: "ReadStats") -> None:
        """Add another worker's stats into this one."""
        self.counts.update(other.counts)
        room = self.max_errors - len(self.errors)
        if room > 0:
            self.errors.extend(other.errors[:room])

    def as_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "errors": list(self.errors)}


# ---------------------------------------------------------------------------------------------
# Format detection


def _split_compression(name: str) -> tuple[str, str | None]:
    """``"a.tar.xz"`` -> ``("a.tar", "xz")``; ``"a.tgz"`` -> ``("a.tar", "gz")``; lower-cased."""
    low = name.lower()
    for suf, comp in _TAR_SHORT_SUFFIXES.items():
        if low.endswith(suf):
            return low[: -len(suf)] + ".tar", comp
    for suf, comp in _COMPRESSION_SUFFIXES.items():
        if low.endswith(suf):
            return low[: -len(suf)], comp
    return low, None


def _magic_compression(head: bytes) -> str | None:
    """Compression named by the first bytes (at least 10 for bzip2, whose 3-byte magic is
    plausible text: "BZh" must be followed by a block size digit and the block magic)."""
    for magic, comp in _MAGIC:
        if head.startswith(magic):
            if comp == "bz2" and not (head[3:4].isdigit() and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90")):
                continue
            return comp
    return None


def _is_tar_header(head: bytes) -> bool:
    return len(head) >= 262 and head[257:262] == b"ustar"


def _suffix(name: str) -> str:
    return PurePosixPath(name).suffix.lower()


def detect_format(path: Path) -> str:
    """Which reader ``path`` needs: one of :data:`FORMATS`.

    By extension first (``.tar*`` / ``.tgz``, ``.jsonl*`` / ``.json*``, ``.parquet``, text
    extensions); a tar is ``openwebtext`` when its first file member is itself a compressed
    archive (the ``urlsf_subset*_data.xz`` layout), else ``tar``. Unknown extensions are sniffed:
    compression magic, then a tar header, ``PAR1``, or a line that is a JSON object; anything
    else is ``text`` (the text reader skips binary files with a counted error).
    """
    path = Path(path)
    if path.is_dir():
        return "dir"
    base, _ = _split_compression(path.name)
    ext = _suffix(base)
    if ext == ".tar":
        return _tar_flavor(path)
    if ext in _JSONL_SUFFIXES:
        return "jsonl"
    if ext == ".parquet":
        return "parquet"
    if ext in _TEXT_SUFFIXES:
        return "text"
    return _sniff(path)


def _read_head(path: Path, n: int = _HEAD) -> bytes:
    """The first ``n`` decompressed bytes of ``path`` ('' when unreadable)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(16)
            f.seek(0)
            comp = _magic_compression(magic)
            if comp is None:
                return f.read(n)
            stream = _decompressor(f, comp)
            out = bytearray()
            while len(out) < n:
                chunk = stream.read(n - len(out))
                if not chunk:
                    break
                out += chunk
            return bytes(out)
    except Exception:  # noqa: BLE001 - sniffing is best effort; the reader reports the problem
        return b""


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        if f.read(4) == b"PAR1":
            return "parquet"
    head = _read_head(path)
    if _is_tar_header(head):
        return _tar_flavor(path)
    first = head.lstrip().split(b"\n", 1)[0]
    if first.startswith(b"{"):
        try:
            if isinstance(json.loads(first), dict):
                return "jsonl"
        except ValueError:
            if b"\n" not in head.lstrip():  # a first line longer than the sniffed head
                return "jsonl"
    return "text"


def _tar_flavor(path: Path) -> str:
    """``openwebtext`` if the first file member of the tar is a compressed archive, else ``tar``."""
    try:
        with open(path, "rb") as f:
            base, comp = _split_compression(path.name)
            comp = comp or _magic_compression(f.read(16))
            f.seek(0)
            stream = _decompressor(f, comp) if comp else f
            tarinfo = _capped_tarinfo(ReadLimits().max_document_bytes)
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=tarinfo) as tf:
                for m in tf:
                    if m.isfile():
                        _, member_comp = _split_compression(m.name)
                        return "openwebtext" if member_comp else "tar"
    except Exception:  # noqa: BLE001 - the reader reports unreadable archives properly
        pass
    return "tar"


# ---------------------------------------------------------------------------------------------
# Byte streams: decompression with error attribution


class _Src:
    """One layer of input (a file, or a member inside an archive) that errors are charged to."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _SourceError(Exception):
    """A read failure of ``owner``'s bytes, travelling up through the layers stacked on it."""

    def __init__(self, owner: _Src, cause: BaseException):
        super().__init__(f"{owner.name}: {cause}")
        self.owner = owner
        self.cause = cause


class _Guarded(io.RawIOBase):
    """Raw stream over ``inner`` that tags any read failure with its owner.

    Reads with ``read1`` where available (one decompression step at a time), so data decoded
    before a truncation point is handed out before the error surfaces, not lost with it.
    With a ``cap`` (a decompressed layer), reading more than ``cap`` bytes fails with
    :class:`LimitExceeded`, which is what stops a decompression bomb.
    """

    def __init__(self, inner: BinaryIO, owner: _Src, cap: int | None = None, compressed_size: int | None = None):
        self._inner = inner
        self._owner = owner
        self._read1 = getattr(inner, "read1", None)
        self._cap = cap
        self._compressed_size = compressed_size
        self._total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        try:
            if self._read1 is not None:
                data = self._read1(len(b))
                n = len(data)
                b[:n] = data
            else:
                n = self._inner.readinto(b)  # type: ignore[attr-defined]
        except _SourceError:
            raise
        except Exception as e:  # noqa: BLE001 - every decoder has its own error types
            raise _SourceError(self._owner, e) from e
        self._total += n
        if self._cap is not None and self._total > self._cap:
            raise _SourceError(self._owner, self._limit_error())
        return n

    def _limit_error(self) -> LimitExceeded:
        size = self._compressed_size
        of = f" from {_human(size)} compressed" if size is not None else ""
        return LimitExceeded(
            f"decompressed past {_human(self._cap)}{of} (read.max_expansion_ratio / read.max_decompressed_bytes): "
            "looks like a decompression bomb; skipped the rest of it"
        )


class _ZstdFrames(io.RawIOBase):
    """Passes compressed zstd bytes through unchanged while following the frame structure
    (RFC 8878: frame header, block headers, checksum, skippable frames), so that a stream that
    stops in the middle of a frame raises ``EOFError`` instead of ending quietly, which is what
    ``zstandard``'s ``stream_reader`` does on its own. Only headers are inspected; block contents
    are skipped by length, so this costs a few Python operations per 128 KB block.
    """

    def __init__(self, src: BinaryIO):
        self._src = src
        self._pos = 0  # compressed bytes seen, for error messages
        self._need = 4  # header bytes still to collect into _buf before calling _then
        self._buf = bytearray()
        self._then = self._on_magic
        self._skip = 0  # content bytes still to pass over before collecting the next header
        self._checksum = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = self._src.readinto(b)  # type: ignore[attr-defined]
        if not n:
            if self._skip or self._buf or self._then != self._on_magic:
                raise EOFError(f"zstd stream ended in the middle of a frame (after {self._pos} bytes)")
            return 0
        self._scan(memoryview(b)[:n])
        return n

    def _scan(self, mv: memoryview) -> None:
        i, n = 0, len(mv)
        while i < n:
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
                i += k
                continue
            k = min(self._need - len(self._buf), n - i)
            self._buf += mv[i : i + k]
            i += k
            if len(self._buf) == self._need:
                header = bytes(self._buf)
                self._buf.clear()
                self._then(header)
        self._pos += n

    def _collect(self, n: int, then) -> None:
        self._need, self._then = n, then

    def _on_magic(self, b: bytes) -> None:
        magic = int.from_bytes(b, "little")
        if magic == 0xFD2FB528:
            self._collect(1, self._on_frame_header)
        elif magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame: 4-byte size, then data
            self._collect(4, self._on_skippable_size)
        else:
            raise ValueError(f"not a zstd frame at byte {self._pos} (magic {b.hex()})")

    def _on_skippable_size(self, b: bytes) -> None:
        self._skip = int.from_bytes(b, "little")
        self._collect(4, self._on_magic)

    def _on_frame_header(self, b: bytes) -> None:
        fhd = b[0]
        single_segment = bool(fhd & 0x20)
        self._checksum = bool(fhd & 0x04)
        fcs = (1 if single_segment else 0, 2, 4, 8)[fhd >> 6]
        did = (0, 1, 2, 4)[fhd & 0x03]
        self._skip = (0 if single_segment else 1) + did + fcs
        self._collect(3, self._on_block_header)

    def _on_block_header(self, b: bytes) -> None:
        h = int.from_bytes(b, "little")
        last, btype, size = h & 1, (h >> 1) & 3, h >> 3
        if btype == 3:
            raise ValueError(f"corrupt zstd block header at byte {self._pos}")
        self._skip = 1 if btype == 1 else size  # RLE blocks store one byte
        if not last:
            self._collect(3, self._on_block_header)
        else:
            if self._checksum:
                self._skip += 4
            self._collect(4, self._on_magic)


def _decompressor(src: BinaryIO, comp: str) -> BinaryIO:
    if comp == "gz":
        return gzip.GzipFile(fileobj=src, mode="rb")
    if comp == "xz":
        return lzma.LZMAFile(src)
    if comp == "bz2":
        return bz2.BZ2File(src)
    if comp == "zst":
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)  # files made with --long=31
        return dctx.stream_reader(_ZstdFrames(src), read_across_frames=True)
    raise ValueError(f"unknown compression {comp!r}")


def _open_layer(
    raw: BinaryIO, raw_owner: _Src, name: str, owner: _Src, size_hint: int | None, limits: ReadLimits
) -> tuple[io.BufferedReader, str, bool]:
    """Decompress ``raw`` (by the name's suffix, else by magic bytes).

    Errors reading ``raw`` are charged to ``raw_owner`` (the file, or the archive holding this
    member); errors decoding it to ``owner``. Returns (stream, name without the compression
    suffix, whether it was compressed). ``size_hint`` (the file's or tar member's size) keeps
    the read buffer of small members small and sets the decompression cap of ``limits``.
    """
    bufsize = _BUF if size_hint is None else max(4096, min(_BUF, size_hint + 1))
    src = io.BufferedReader(_Guarded(raw, raw_owner), bufsize)
    base, comp = _split_compression(name)
    if comp is None:
        comp = _magic_compression(src.peek(16)[:16])
    if comp is None:
        return src, base, False
    cap = limits.decompressed_cap(size_hint)
    return io.BufferedReader(_Guarded(_decompressor(src, comp), owner, cap, size_hint), _BUF), base, True


def _looks_binary(head: bytes) -> bool:
    """NUL bytes, >10% control bytes, or invalid UTF-8 that is >30% high bytes: not text."""
    if not head:
        return False
    if b"\x00" in head:
        return True
    control = len(head.translate(None, _TEXTISH))
    if control > 0.1 * len(head):
        return True
    try:
        head.decode("utf-8")
        return False
    except UnicodeDecodeError as e:
        if e.start >= len(head) - 3 and e.reason == "unexpected end of data":
            return False  # a multibyte character cut by the sniff window
    high = len(head) - len(head.translate(None, bytes(range(128, 256))))
    return high > 0.3 * len(head)


_TEXTISH = bytes(range(32, 256)) + b"\t\n\r\f\b\x1b"


_TAR_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                   tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


def _capped_tarinfo(max_bytes: int) -> type[tarfile.TarInfo]:
    """A TarInfo class that refuses pax / GNU long-name headers over ``max_bytes``.

    tarfile reads such a header's whole payload into memory before it yields the member it
    describes, so a tar header claiming a 10 GB pax record of zeros is a memory bomb that no
    per-member check can catch. ``tarinfo=`` is tarfile's public hook for the header class.
    """

    class _CappedTarInfo(tarfile.TarInfo):
        def _proc_member(self, tf):  # type: ignore[override]
            if self.type in _TAR_META_TYPES and self.size > max_bytes:
                raise _TooLong(f"tar metadata header of {_human(self.size)} (type {self.type!r}) exceeds "
                               f"read.max_document_bytes ({_human(max_bytes)}); skipped the rest of the archive")
            return super()._proc_member(tf)

    return _CappedTarInfo


def _unsafe_member_reason(m: tarfile.TarInfo) -> str | None:
    if m.issym():
        return f"symlink to {m.linkname!r}"
    if m.islnk():
        return f"hardlink to {m.linkname!r}"
    if m.ischr() or m.isblk():
        return "device file"
    if m.isfifo():
        return "fifo"
    if not m.isfile():
        return f"special member type {m.type!r}"
    name = m.name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in name.split("/"):
        return "path escapes the archive (..)"
    return None


def _clean_name(name: str) -> str:
    """Member names undecodable as UTF-8 come back with surrogate escapes; make them printable."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _classify(cause: BaseException) -> tuple[str, str]:
    """(counter key, problem text) for a read failure."""
    if isinstance(cause, _TooLong):
        return "read_error.too_long", str(cause)
    if isinstance(cause, LimitExceeded):
        return "read_error.decompression_limit", str(cause)
    text = str(cause) or type(cause).__name__
    low = text.lower()
    if isinstance(cause, EOFError) or "unexpected end" in low or "ended" in low or "truncated" in low:
        return "read_error.truncated", f"truncated: {text}; kept the documents read before the cut"
    return "read_error.unreadable", f"unreadable ({type(cause).__name__}: {text})"


# ---------------------------------------------------------------------------------------------
# Readers


class _Reader:
    def __init__(self, stats: ReadStats, text_key: str, separator: str | None = None,
                 limits: ReadLimits | None = None, follow_symlinks: bool = False):
        self.stats = stats
        self.text_key = text_key
        self.separator = separator.encode("utf-8") if separator else None
        self.limits = limits or ReadLimits()
        self.max_doc = self.limits.max_document_bytes
        self.follow_symlinks = follow_symlinks

    def _fail(self, src: _Src | str, cause: BaseException) -> None:
        key, problem = _classify(cause)
        self.stats.error(src.name if isinstance(src, _Src) else src, problem, key)

    def _doc(self, doc_id: str, data: bytes | str) -> RawDoc:
        self.stats.counts["docs"] += 1
        self.stats.counts["bytes"] += len(data)
        return RawDoc(doc_id, data)

    def _too_long(self, where: str, what: str) -> None:
        self.stats.error(where, f"{what} is longer than read.max_document_bytes ({_human(self.max_doc)}); "
                         "skipped", "read_error.too_long")

    # -- files --------------------------------------------------------------------------------

    def file(self, path: Path, fmt: str, base: str, text_id: str, nested: bool) -> Iterator[RawDoc]:
        self.stats.counts["files"] += 1
        src = _Src(str(path))
        if fmt == "parquet":
            yield from self.parquet(path, src, base)
            return
        try:
            # O_NONBLOCK: should a FIFO appear here after the walk checked the path, opening it
            # must not hang the worker; fstat below then refuses it.
            raw = open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb", buffering=0)
        except OSError as e:
            self.stats.error(path, f"unreadable ({e.strerror or e})", "read_error.unreadable")
            return
        with raw:
            st = os.fstat(raw.fileno())
            if not stat.S_ISREG(st.st_mode):
                self.stats.error(path, f"not a regular file ({_special_kind(st.st_mode)}); skipped",
                                 "read_error.special_file")
                return
            yield from self.stream(raw, src, src, path.name, fmt, base, text_id, nested, st.st_size)

    def stream(
        self,
        raw: BinaryIO,
        raw_owner: _Src,
        owner: _Src,
        name: str,
        fmt: str | None,
        base: str,
        text_id: str,
        nested: bool,
        size_hint: int | None = None,
    ) -> Iterator[RawDoc]:
        """Read one unit (a file or a member) of format ``fmt`` (None: decide by name/content).

        Ids: a text document is ``text_id``; jsonl lines ``base:line``; tar members
        ``base:member`` at the top level and ``base/member`` when nested (in a directory or in
        another archive), so every id reads as ``label:path/inside/the/source``.
        """
        try:
            stream, base_name, compressed = _open_layer(raw, raw_owner, name, owner, size_hint, self.limits)
            if fmt is None:
                fmt = self._member_format(stream, base_name, compressed)
            if fmt in _TAR_FORMATS:
                yield from self.tar(stream, owner, f"{base}/" if nested else f"{base}:")
            elif fmt == "jsonl":
                yield from self.jsonl(stream, owner, base)
            elif fmt == "parquet":
                self.stats.error(owner.name, "parquet inside an archive cannot be streamed (it needs "
                                 "random access); extract it and list it directly", "read_error.unreadable")
            elif self.separator is not None:
                yield from self.separated_text(stream, owner, base)
            else:
                yield from self.text(stream, owner, text_id)
        except _SourceError as e:
            if e.owner is not owner:
                raise
            self._fail(owner, e.cause)

    @staticmethod
    def _member_format(stream: io.BufferedReader, base_name: str, compressed: bool) -> str:
        ext = _suffix(base_name)
        if ext == ".tar":
            return "tar"
        if ext in _JSONL_SUFFIXES:
            return "jsonl"
        if ext == ".parquet":
            return "parquet"
        if ext not in _TEXT_SUFFIXES and _is_tar_header(stream.peek(512)[:512]):
            return "tar"  # e.g. OpenWebText's urlsf_subset00-1_data.xz
        return "text"

    # -- formats ------------------------------------------------------------------------------

    def _text_head(self, stream: BinaryIO, owner: _Src) -> bytes | None:
        """The first bytes of a text file, or None (counted and named) if it is empty or binary."""
        head = stream.read(_HEAD)
        if not head:
            self.stats.error(owner.name, "empty file", "read_error.empty_file")
            return None
        if _looks_binary(head):
            self.stats.error(owner.name, "binary content (NUL or non-text bytes in the first 8 KB); "
                             "skipped", "read_error.binary_file")
            return None
        return head

    def text(self, stream: BinaryIO, owner: _Src, doc_id: str) -> Iterator[RawDoc]:
        """One file = one document, read whole (never split: a line-less 50 MB file is fine)
        unless it is longer than ``max_document_bytes``: then it is skipped, never truncated."""
        head = self._text_head(stream, owner)
        if head is None:
            return
        chunks = [head]
        size = len(head)
        while size <= self.max_doc:
            chunk = stream.read(min(_BUF, self.max_doc + 1 - size))
            if not chunk:
                yield self._doc(doc_id, b"".join(chunks) if len(chunks) > 1 else head)
                return
            chunks.append(chunk)
            size += len(chunk)
        del chunks
        self._too_long(owner.name, "document")

    def separated_text(self, stream: BinaryIO, owner: _Src, base: str) -> Iterator[RawDoc]:
        """A text file holding many documents between separators (TinyStories' ``<|endoftext|>``).

        Streams in 1 MB chunks, searching only the new bytes each time (linear however long a
        document is). Documents are stripped of surrounding whitespace (the newlines around the
        separator) and numbered from 1 like jsonl lines; blank ones are counted, not yielded.
        """
        sep = self.separator
        assert sep is not None
        head = self._text_head(stream, owner)
        if head is None:
            return
        buf = bytearray(head)
        n = 0
        scan = 0  # buf[:scan] holds no separator start
        eof = False
        skipping = False  # the current piece is over the cap: drop its bytes until the next separator
        while True:
            i = buf.find(sep, scan)
            if i < 0:
                if eof:
                    break
                if len(buf) > self.max_doc and not skipping:
                    skipping = True
                    self._too_long(owner.name, f"document {n + 1}")
                if skipping:  # keep only what could be the start of a separator cut by the chunk
                    del buf[: max(0, len(buf) - len(sep) + 1)]
                scan = max(0, len(buf) - len(sep) + 1)
                chunk = stream.read(_BUF)
                if chunk:
                    buf += chunk
                else:
                    eof = True
                continue
            n += 1
            piece = None if skipping or i > self.max_doc else bytes(buf[:i]).strip()
            if piece is None and not skipping:
                self._too_long(owner.name, f"document {n}")
            skipping = False
            del buf[: i + len(sep)]
            scan = 0
            if piece:
                yield self._doc(f"{base}:{n}", piece)
            elif piece is not None:
                self.stats.counts["blank_documents"] += 1
        if skipping:
            return
        if len(buf) > self.max_doc:
            self._too_long(owner.name, f"document {n + 1}")
            return
        piece = bytes(buf).strip()
        if piece:
            yield self._doc(f"{base}:{n + 1}", piece)

    def _lines(self, stream: BinaryIO, owner: _Src) -> Iterator[tuple[int, bytes | None]]:
        """(line number, line) of a stream, reading no line past ``max_document_bytes``: a longer
        line is counted as too long, its bytes are passed over in bounded chunks, and it comes
        out as ``(lineno, None)``."""
        cap = self.max_doc
        readline = stream.readline  # BufferedReader.readline: linear in line length
        lineno = 0
        while line := readline(cap + 1):
            lineno += 1
            if len(line) <= cap or line.endswith(b"\n"):
                yield lineno, line
                continue
            del line
            self._too_long(owner.name, f"line {lineno}")  # first: passing over it may hit a decompression cap
            yield lineno, None
            while (rest := readline(_BUF)) and not rest.endswith(b"\n"):
                pass

    def jsonl(self, stream: BinaryIO, owner: _Src, base: str) -> Iterator[RawDoc]:
        key = self.text_key
        any_bytes = False
        for lineno, line in self._lines(stream, owner):
            any_bytes = True
            if line is None:  # too long: counted by _lines
                continue
            if line.isspace():
                self.stats.counts["blank_lines"] += 1
                continue
            try:
                s = line.decode("utf-8")
            except UnicodeDecodeError as e:
                s = line.decode("utf-8", "replace")
                self.stats.error(owner.name, f"line {lineno}: invalid UTF-8 at byte {e.start}; decoded "
                                 "with replacement characters", "read_error.jsonl_bad_utf8")
            if lineno == 1 and s.startswith("\ufeff"):
                s = s[1:]
            try:
                obj = json.loads(s)
            except ValueError as e:
                where = f" ({e.msg} at column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
                self.stats.error(owner.name, f"line {lineno}: not valid JSON{where}", "read_error.bad_json")
                continue
            text = obj.get(key) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                what = "not a JSON object" if not isinstance(obj, dict) else (
                    f"no {key!r} key" if key not in obj else f"{key!r} is {type(text).__name__}, not a string")
                self.stats.error(owner.name, f"line {lineno}: {what}", "read_error.missing_text_key")
                continue
            yield self._doc(f"{base}:{lineno}", text)
        if not any_bytes:
            self.stats.error(owner.name, "empty file", "read_error.empty_file")

    def tar(self, stream: BinaryIO, owner: _Src, prefix: str) -> Iterator[RawDoc]:
        """Members in archive order, read through ``extractfile`` only; nested archives recurse."""
        try:
            tf = tarfile.open(fileobj=stream, mode="r|", tarinfo=_capped_tarinfo(self.max_doc))
        except _TooLong as e:
            self._fail(owner, e)
            return
        except tarfile.ReadError as e:
            if "empty" in str(e) or "end of file header" in str(e):
                self.stats.error(owner.name, "empty archive", "read_error.empty_file")
            else:
                self._fail(owner, e)
            return
        try:
            while (m := tf.next()) is not None:
                tf.members.clear()  # TarFile keeps every TarInfo it has seen: millions for OpenWebText
                if m.isdir():
                    continue
                mname = _clean_name(m.name)
                reason = _unsafe_member_reason(m)
                if reason:
                    self.stats.error(owner.name, f"member {mname!r}: unsafe tar member ({reason}); skipped",
                                     "read_error.unsafe_tar_member")
                    continue
                f = tf.extractfile(m)
                if f is None:  # pragma: no cover - isfile() members always have data
                    continue
                member = _Src(f"{owner.name}:{mname}")
                mid = f"{prefix}{mname}"
                yield from self.stream(f, owner, member, m.name, None, mid, mid, True, m.size)
            # tarfile ends quietly when a header is cut short; a complete archive ends with a
            # zero block that was fully read.
            tstream = tf.fileobj
            if hasattr(tstream, "pos") and tstream.pos < tf.offset + tarfile.BLOCKSIZE:
                self.stats.error(owner.name, "truncated: archive ends inside a member header; kept the "
                                 "documents read before the cut", "read_error.truncated")
        except _SourceError as e:
            if e.owner is not owner:
                raise
            self._fail(owner, e.cause)
        except (tarfile.TarError, _TooLong) as e:
            self._fail(owner, e)

    def parquet(self, path: Path, src: _Src, base: str) -> Iterator[RawDoc]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        key = self.text_key
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - ArrowInvalid, OSError, ...
            if path.stat().st_size == 0:
                self.stats.error(src.name, "empty file", "read_error.empty_file")
            else:
                self._fail(src, e)
            return
        with pf:
            schema = pf.schema_arrow
            if key not in schema.names:
                self.stats.error(src.name, f"no column {key!r} (columns: {', '.join(schema.names)})",
                                 "read_error.missing_text_key")
                return
            typ = schema.field(key).type
            if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
                self.stats.error(src.name, f"column {key!r} is {typ}, not a string column",
                                 "read_error.missing_text_key")
                return
            row = 0
            try:
                for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=[key]):
                    for value in batch.column(0).to_pylist():
                        if value is None:
                            self.stats.error(src.name, f"row {row}: {key!r} is null", "read_error.missing_text_key")
                        elif len(value) > self.max_doc:  # characters: a lower bound of its bytes
                            self._too_long(src.name, f"row {row}")
                        else:
                            yield self._doc(f"{base}:{row}", value)
                        row += 1
            except Exception as e:  # noqa: BLE001 - a corrupt row group: keep what came before
                self._fail(src, e)

    def directory(self, root: Path, label: str, include: Iterable[str], exclude: Iterable[str]) -> Iterator[RawDoc]:
        include, exclude = list(include), list(exclude)
        rels, skipped = _walk(root, include, exclude, self.follow_symlinks)
        self.stats.record_skipped(root, skipped)
        for rel in rels:
            path = root / rel
            try:
                fmt = detect_format(path)
            except OSError as e:
                self.stats.error(path, f"unreadable ({e})", "read_error.unreadable")
                continue
            yield from self.file(path, fmt, f"{label}:{rel}", f"{label}:{rel}", True)


def _matches(rel: str, patterns: list[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _walk(root: Path, include: list[str], exclude: list[str], follow_symlinks: bool) -> tuple[list[str], list[SkippedEntry]]:
    """Relative posix paths of the regular files under ``root`` in sorted order, hidden entries
    skipped, plus the entries refused (links, FIFOs, devices, sockets).

    A pattern matches the relative path or the bare file name (``*.txt``, ``sub/*``)."""

    def keep_file(rel: str) -> bool:
        if rel.rsplit("/", 1)[-1].startswith("."):
            return False
        return (not include or _matches(rel, include)) and not (exclude and _matches(rel, exclude))

    files, skipped = walk_regular_files(root, keep_file=keep_file, follow_symlinks=follow_symlinks,
                                        keep_dir=lambda rel: not rel.rsplit("/", 1)[-1].startswith("."))
    return [rel for rel, _ in files], skipped


@dataclass(frozen=True)
class SkippedEntry:
    """A directory entry a walk refused to read: ``rel`` (posix path under the root), the
    counter ``key`` (``read_error.symlink`` / ``read_error.special_file`` /
    ``read_error.unreadable``) and the ``problem`` in words."""

    rel: str
    key: str
    problem: str


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    return "special file"


def walk_regular_files(
    root: Path,
    *,
    keep_file=lambda rel: True,
    keep_dir=lambda rel: True,
    follow_symlinks: bool = False,
) -> tuple[list[tuple[str, os.stat_result]], list[SkippedEntry]]:
    """The regular files under ``root`` as sorted ``(relative posix path, stat)``, and the
    entries refused, also sorted.

    Only regular files are ever returned, and nothing is opened while walking (``lstat`` only),
    so a FIFO cannot block the walk. Symlinks are refused (a link inside a corpus directory can
    point anywhere: ``passwd.txt -> /etc/passwd``) unless ``follow_symlinks``, which follows links
    to regular files and directories wherever they point (the user opted in), never into a
    directory already entered (no loops). FIFOs, sockets and devices are always refused.
    ``keep_file(rel)`` / ``keep_dir(rel)`` select files and prune directories; entries they
    reject are not reported.
    """
    files: list[tuple[str, os.stat_result]] = []
    skipped: list[SkippedEntry] = []
    top = os.stat(root)
    entered = {(top.st_dev, top.st_ino)}
    stack = [("", os.fspath(root))]
    while stack:
        prefix, directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as e:
            skipped.append(SkippedEntry(prefix.rstrip("/") or ".", "read_error.unreadable",
                                        f"unreadable directory ({e.strerror or e}); skipped"))
            continue
        for entry in entries:
            rel = prefix + entry.name
            try:
                st = entry.stat(follow_symlinks=False)
                link = stat.S_ISLNK(st.st_mode)
                if link:
                    target = os.readlink(entry.path)
                    try:
                        st = os.stat(entry.path)  # stat, not open: safe on a FIFO or device
                    except OSError:
                        if keep_file(rel):
                            skipped.append(SkippedEntry(rel, "read_error.symlink", f"broken symlink to {target!r}; skipped"))
                        continue
            except FileNotFoundError:  # removed while walking
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if not (keep_dir(rel) if is_dir else keep_file(rel)):
                continue
            if link and not follow_symlinks:
                what = "directory " if is_dir else ""
                skipped.append(SkippedEntry(rel, "read_error.symlink", f"symlink to {what}{target!r}; not followed "
                                            "(set follow_symlinks: true on the source to read links)"))
            elif is_dir:
                if (st.st_dev, st.st_ino) in entered:
                    skipped.append(SkippedEntry(rel, "read_error.symlink", "link to a directory already walked "
                                                "(a loop); skipped"))
                else:
                    entered.add((st.st_dev, st.st_ino))
                    stack.append((rel + "/", entry.path))
            elif stat.S_ISREG(st.st_mode):
                files.append((rel, st))
            else:
                via = f" (via symlink to {target!r})" if link else ""
                skipped.append(SkippedEntry(rel, "read_error.special_file",
                                            f"{_special_kind(st.st_mode)}{via}, not a regular file; skipped"))
    files.sort(key=lambda f: f[0])
    skipped.sort(key=lambda e: e.rel)
    return files, skipped


def iter_documents(
    path: Path,
    fmt: str | None = None,
    *,
    text_key: str = "text",
    label: str | None = None,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    separator: str | None = None,
    limits: ReadLimits | None = None,
    follow_symlinks: bool = False,
    stats: ReadStats,
) -> Iterator[RawDoc]:
    """Stream the documents of ``path`` (a file or directory) in a deterministic order.

    ``fmt`` overrides :func:`detect_format`. ``text_key`` is the JSON key / parquet column of the
    text. ``label`` prefixes every id (default: the file or directory name). ``include`` /
    ``exclude`` are glob patterns for the files of a directory. ``separator`` (e.g.
    ``"<|endoftext|>"``) splits text files into many documents, ids ``label:1``, ``label:2``, ...
    instead of one document per file. ``limits`` caps document and decompressed sizes (default:
    :class:`ReadLimits`). ``follow_symlinks`` lets a directory walk follow links (default: links
    and special files inside a directory are skipped and counted). Problems are counted in
    ``stats`` and never raised, except a ``path`` that does not exist (a configuration error).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus path does not exist: {path}")
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    mode = path.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # never open a FIFO or device: it may block
        stats.error(path, f"not a regular file ({_special_kind(mode)}); skipped", "read_error.special_file")
        return
    fmt = fmt or detect_format(path)
    label = label if label is not None else path.name
    reader = _Reader(stats, text_key, separator, limits, follow_symlinks)
    if fmt == "dir":
        yield from reader.directory(path, label, include, exclude)
    else:
        yield from reader.file(path, fmt, label, f"{label}:{path.name}", False)
