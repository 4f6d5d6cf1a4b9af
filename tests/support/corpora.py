"""Corpus builders for tests: real English text, written in the layouts people download.

``sample_texts`` gives real prose (paragraphs of the Python standard library's own docstrings,
so it works on a fresh clone with nothing else installed); ``gutenberg_texts`` gives book text
from ``../shared/corpus/gutenberg`` when that exists. The writers produce the exact on-disk
layouts the readers must handle (OpenWebText's tar of xz tars, jsonl[.gz|.zst|.xz], parquet, a
directory tree, plain tars) and the helpers make the bad inputs a real download produces
(truncated files, hostile tar members).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import inspect
import io
import json
import lzma
import random
import re
import tarfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import zstandard

REPO = Path(__file__).resolve().parents[2]
SHARED_CORPUS = REPO.parent / "shared" / "corpus"

# Modules with long prose docstrings; importing them has no side effects.
_STDLIB_MODULES = (
    "argparse", "asyncio", "collections", "concurrent.futures", "configparser", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions",
    "functools", "gettext", "heapq", "http.client", "http.cookiejar", "imaplib", "inspect",
    "io", "ipaddress", "json", "locale", "logging", "mailbox", "multiprocessing", "netrc",
    "optparse", "os", "pathlib", "pickle", "pickletools", "pydoc", "queue", "random", "sched",
    "selectors", "shelve", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "ssl",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "tkinter", "trace", "traceback", "turtle", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile", "zoneinfo",
)


def _is_prose(par: str) -> bool:
    """A paragraph of running English text: no code, tables, doctests or argument lists."""
    lines = par.split("\n")
    if any(line.startswith((" ", "\t")) for line in lines) or ">>>" in par:
        return False
    words = par.split()
    if len(words) < 12:
        return False
    alpha = sum(1 for w in words if w.isalpha() or (w[:-1].isalpha() and w[-1] in ".,;:"))
    if alpha < 0.85 * len(words):
        return False
    mean = sum(map(len, words)) / len(words)
    return 3.5 <= mean <= 8 and par.rstrip().endswith(".") and "#" not in par and "..." not in par


@lru_cache(maxsize=1)
def stdlib_paragraphs() -> tuple[str, ...]:
    """Distinct prose paragraphs from stdlib docstrings, in a fixed order (for this Python)."""
    seen: set[str] = set()
    out: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _STDLIB_MODULES:
            try:
                mod = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - e.g. tkinter missing: just fewer paragraphs
                continue
            objs = [mod] + [v for _, v in sorted(vars(mod).items()) if inspect.isclass(v) or inspect.isroutine(v)]
            for obj in objs:
                doc = inspect.getdoc(obj)
                if not doc:
                    continue
                for par in re.split(r"\n\s*\n", doc):
                    par = par.strip()
                    if par not in seen and _is_prose(par):
                        seen.add(par)
                        out.append(par)
    return tuple(out)


def sample_texts(n: int, seed: int = 0, *, min_words: int = 80) -> list[str]:
    """``n`` distinct documents of real English prose, deterministic for (n, seed, Python).

    Each is a few stdlib docstring paragraphs joined by blank lines until it has at least
    ``min_words`` words, so with the default it passes the Gopher filters of ``pipeline.clean``.
    """
    pars = stdlib_paragraphs()
    rng = random.Random(seed)
    docs: list[str] = []
    seen: set[str] = set()
    while len(docs) < n:
        chosen: list[str] = []
        words = 0
        while words < min_words:
            p = pars[rng.randrange(len(pars))]
            if p not in chosen:
                chosen.append(p)
                words += len(p.split())
        doc = "\n\n".join(chosen)
        if doc not in seen:
            seen.add(doc)
            docs.append(doc)
    return docs


def gutenberg_shards() -> list[Path]:
    """The shared Gutenberg jsonl.zst shards, or [] on a fresh clone without ../shared."""
    d = SHARED_CORPUS / "gutenberg"
    return sorted(d.glob("gutenberg-*.jsonl.zst")) if d.is_dir() else []


def gutenberg_texts(n: int, shard: int = 0) -> list[str]:
    """The first ``n`` books of a shared Gutenberg shard (callers skip when it is absent)."""
    shards = gutenberg_shards()
    if not shards:
        raise FileNotFoundError(f"no Gutenberg corpus under {SHARED_CORPUS}")
    out = []
    with open(shards[shard], "rb") as f:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        for line in reader:
            out.append(json.loads(line)["text"])
            if len(out) >= n:
                break
    return out


# ---------------------------------------------------------------------------------------------
# Writers


def _data(doc: str | bytes) -> bytes:
    return doc if isinstance(doc, bytes) else doc.encode("utf-8")


def _tar_mode(path: Path) -> str:
    name = path.name
    if name.endswith((".tar.gz", ".tgz")):
        return "w:gz"
    if name.endswith((".tar.xz", ".txz")):
        return "w:xz"
    if name.endswith(".tar.bz2"):
        return "w:bz2"
    return "w"


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_560_000_000
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def _write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> None:
    """A tar of (name, bytes); compression by suffix, including ``.tar.zst``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith((".tar.zst", ".tzst")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for name, data in members:
                _add_bytes(tf, name, data)
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(buf.getvalue()))
        return
    with tarfile.open(path, _tar_mode(path)) as tf:
        for name, data in members:
            _add_bytes(tf, name, data)


def owt_doc_name(i: int, doc: str | bytes) -> str:
    """OpenWebText's member naming: a running number and a hash of the document."""
    return f"{i:07d}-{hashlib.sha1(_data(doc)).hexdigest()[:30]}.txt"


def write_openwebtext_tar(
    path: Path, docs: Sequence[str | bytes], docs_per_subarchive: int = 50
) -> list[str]:
    """Write the Skylion007 layout; return each document's path ``outer_member/inner_member``.

    ``path`` is an outer tar (``.tar.xz`` as downloaded, or ``.tar`` like the HF mirror's
    ``subsets/urlsf_subset00.tar``) of ``openwebtext/urlsf_subset00-<k>_data.xz`` members, each
    an xz-compressed tar of ``<nnnnnnn>-<hash>.txt`` documents.
    """
    subs: list[tuple[str, bytes]] = []
    paths: list[str] = []
    for k, start in enumerate(range(0, len(docs), docs_per_subarchive), start=1):
        outer = f"openwebtext/urlsf_subset00-{k}_data.xz"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as inner:
            for i in range(start, min(start + docs_per_subarchive, len(docs))):
                name = owt_doc_name(i, docs[i])
                _add_bytes(inner, name, _data(docs[i]))
                paths.append(f"{outer}/{name}")
        subs.append((outer, buf.getvalue()))
    _write_tar(Path(path), subs)
    return paths


def write_text_tar(path: Path, docs: Sequence[str | bytes], prefix: str = "docs/") -> list[str]:
    """A tar (compression by suffix: .tar, .tar.gz, .tar.xz, .tar.bz2, .tar.zst) of one .txt per
    document; returns the member names in archive order."""
    names = [f"{prefix}{i:05d}.txt" for i in range(len(docs))]
    _write_tar(Path(path), zip(names, map(_data, docs)))
    return names


def write_jsonl(
    path: Path,
    docs: Sequence[str],
    compression: str | None = None,
    text_key: str = "text",
) -> Path:
    """One ``{"id", text_key, "meta"}`` object per line; ``compression`` None, "gz", "zst" or "xz"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(
        json.dumps({"id": f"doc-{i}", text_key: d, "meta": {"source": "test"}}, ensure_ascii=False) + "\n"
        for i, d in enumerate(docs)
    ).encode("utf-8")
    if compression is None:
        path.write_bytes(payload)
    elif compression == "gz":
        path.write_bytes(gzip.compress(payload, mtime=0))
    elif compression == "zst":
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(payload))
    elif compression == "xz":
        path.write_bytes(lzma.compress(payload))
    else:
        raise ValueError(f"unknown compression {compression!r}")
    return path


def write_parquet(path: Path, docs: Sequence[str | None], column: str = "text", row_group_size: int = 64) -> Path:
    """A parquet file with ``column`` (plus an ``id`` column), several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": [f"doc-{i}" for i in range(len(docs))], column: pa.array(docs, pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_text_dir(directory: Path, docs: Sequence[str | bytes], per_subdir: int = 10) -> list[str]:
    """One ``.txt`` per document in numbered subdirectories (``000/00000.txt``), so sorted path
    order is document order; returns the relative paths."""
    directory = Path(directory)
    rels = []
    for i, d in enumerate(docs):
        rel = f"{i // per_subdir:03d}/{i:05d}.txt"
        p = directory / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_data(d))
        rels.append(rel)
    return rels


# ---------------------------------------------------------------------------------------------
# Bad inputs


def truncate(path: Path, fraction: float) -> int:
    """Cut ``path`` to ``fraction`` of its length in place (a download that stopped); returns
    the new length."""
    path = Path(path)
    size = int(path.stat().st_size * fraction)
    with open(path, "r+b") as f:
        f.truncate(size)
    return size


@dataclass
class TarMember:
    """One member to put in a hand-made tar: any type, any name, no sanitising."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""


def unsafe_members() -> list[TarMember]:
    """The hostile members a tar can carry: path traversal, absolute paths, links, devices."""
    return [
        TarMember("../evil.txt", b"escaped the archive " * 20),
        TarMember("docs/../../evil2.txt", b"escaped the archive too " * 20),
        TarMember("/etc/evil.txt", b"absolute path " * 20),
        TarMember("docs/link-to-passwd", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
        TarMember("docs/hardlink", type=tarfile.LNKTYPE, linkname="docs/00000.txt"),
        TarMember("docs/null-device", type=tarfile.CHRTYPE),
        TarMember("docs/pipe", type=tarfile.FIFOTYPE),
    ]


def write_tar_members(path: Path, members: Iterable[TarMember]) -> None:
    """A tar with exactly these members (compression by suffix, as :func:`write_text_tar`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, _tar_mode(path), format=tarfile.GNU_FORMAT) as tf:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.type
            info.linkname = m.linkname
            info.mtime = 1_560_000_000
            info.mode = 0o644
            if m.type == tarfile.CHRTYPE:
                info.devmajor, info.devminor = 1, 3
            if m.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(m.data)
                tf.addfile(info, io.BytesIO(m.data))
            else:
                tf.addfile(info)


def binary_blob(n: int = 4096, seed: int = 0) -> bytes:
    """Bytes that look like a compiled file: NULs and arbitrary bytes."""
    rng = random.Random(seed)
    return b"\x7fELF\x02\x01\x01\x00" + bytes(rng.randrange(256) for _ in range(n))
