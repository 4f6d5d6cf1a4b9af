"""The token shard format: writer and reader side by side, the one way code opens shards.

A shard is one uncompressed Arrow IPC *file* holding a single record batch with one row per
document::

    id       string          the cleaned document's id (stable across runs)
    n_bytes  int64           UTF-8 byte length of the cleaned text (for bits per byte)
    tokens   list<uint16>    the document's token ids followed by EOS (uint32 if vocab > 65535)

Because a list column stores its values contiguously, ``tokens.values`` *is* the flat token
stream of the shard (documents separated by EOS) and ``tokens.offsets`` gives each document's
offset; lengths are the offsets' differences. :class:`Shard` memory-maps the file and exposes
both as zero-copy numpy views, so the trainer samples windows without reading the file into
memory. A dataset directory has a ``manifest.json`` (see :func:`write_manifest`) listing the
shards of each split with token/document counts and sha256, the tokenizer and the clean stats.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from llmforge.errors import DataError, NotFound
from llmforge.pipeline.fsutil import FORMAT_VERSION, atomic_path, atomic_write_json, read_json, sha256_file

SHARD_FORMAT = "llmforge.tokens"
MANIFEST_NAME = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_schema(dtype: np.dtype, eos_id: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("n_bytes", pa.int64(), nullable=False),
            pa.field("tokens", pa.list_(pa.field("item", pa.from_numpy_dtype(dtype), nullable=False)), nullable=False),
        ],
        metadata={
            "format": SHARD_FORMAT,
            "format_version": str(FORMAT_VERSION),
            "eos_id": str(eos_id),
        },
    )


def write_shard(
    path: str | os.PathLike,
    ids: Sequence[str],
    n_bytes: Sequence[int] | np.ndarray,
    tokens: np.ndarray,
    lengths: Sequence[int] | np.ndarray,
    *,
    eos_id: int,
) -> dict:
    """Write one shard atomically. ``tokens`` is the flat stream (EOS already appended to each
    document), ``lengths`` the per-document token counts. Returns the shard's manifest entry."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(ids) != len(lengths) or len(n_bytes) != len(lengths):
        raise ValueError("ids, n_bytes and lengths must have one entry per document")
    if int(lengths.sum()) != len(tokens):
        raise ValueError(f"lengths sum to {int(lengths.sum())} but there are {len(tokens)} tokens")
    if len(tokens) >= 2**31:
        raise ValueError("a shard holds at most 2**31-1 tokens; use smaller shards")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    dtype = tokens.dtype
    schema = shard_schema(dtype, eos_id)
    values = pa.array(tokens, type=pa.from_numpy_dtype(dtype))
    token_col = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values).cast(schema.field("tokens").type)
    batch = pa.record_batch(
        [pa.array(list(ids), type=pa.string()), pa.array(np.asarray(n_bytes, dtype=np.int64)), token_col],
        schema=schema,
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(batch)
    return {
        "file": path.name,
        "tokens": int(len(tokens)),
        "documents": int(len(lengths)),
        "text_bytes": int(np.asarray(n_bytes, dtype=np.int64).sum()),
        "size": path.stat().st_size,
        "sha256": sha256_file(path),
    }


class Shard:
    """A memory-mapped shard. ``tokens`` and ``offsets`` are zero-copy numpy views."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._mmap = pa.memory_map(str(self.path), "r")
            reader = pa.ipc.open_file(self._mmap)
        except (OSError, pa.ArrowInvalid) as e:
            raise ValueError(f"{self.path}: not a readable token shard ({e})") from e
        meta = reader.schema.metadata or {}
        if meta.get(b"format") != SHARD_FORMAT.encode():
            raise ValueError(f"{self.path}: not a token shard (format={meta.get(b'format')!r})")
        if reader.num_record_batches != 1:
            raise ValueError(f"{self.path}: expected 1 record batch, found {reader.num_record_batches}")
        self.eos_id = int(meta[b"eos_id"])
        self._batch = reader.get_batch(0)

    @cached_property
    def _token_list(self) -> pa.ListArray:
        return self._batch.column("tokens")

    @cached_property
    def tokens(self) -> np.ndarray:
        """Flat token stream of the shard (documents separated by EOS), zero-copy."""
        col = self._token_list
        return col.values.to_numpy(zero_copy_only=True)[col.offsets[0].as_py():]

    @cached_property
    def offsets(self) -> np.ndarray:
        """``offsets[i]:offsets[i+1]`` are document i's tokens (EOS included), zero-copy."""
        return self._token_list.offsets.to_numpy(zero_copy_only=True)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @cached_property
    def ids(self) -> list[str]:
        return self._batch.column("id").to_pylist()

    @cached_property
    def n_bytes(self) -> np.ndarray:
        return self._batch.column("n_bytes").to_numpy(zero_copy_only=True)

    def __len__(self) -> int:
        return self._batch.num_rows

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` *without* its trailing EOS."""
        return self.tokens[self.offsets[i] : self.offsets[i + 1] - 1]


@dataclass
class Dataset:
    """A tokenized dataset directory (the output of the tokenize stage)."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | os.PathLike) -> "Dataset":
        root = Path(root)
        mpath = root / MANIFEST_NAME
        if not mpath.is_file():
            raise NotFound(_not_a_dataset(root))
        try:
            manifest = read_json(mpath)
        except ValueError as e:
            raise DataError(f"{mpath}: not valid JSON ({e}); re-run `llmforge prepare` to remake the dataset") from None
        if not isinstance(manifest, dict) or manifest.get("format") != SHARD_FORMAT:
            got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise DataError(f"{mpath}: not a token dataset manifest (format={got!r}); pass the dataset directory "
                            f"(tokens-*) that `llmforge prepare` printed")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{mpath}: format version {manifest.get('format_version')} but this code reads {FORMAT_VERSION}; "
                f"re-run `llmforge prepare`")
        return cls(root, manifest)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.manifest["tokenizer"]["file"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["token_dtype"])

    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def shard_paths(self, split: str) -> list[Path]:
        if split not in self.manifest["splits"]:
            raise KeyError(f"{self.root}: no split {split!r} (have {self.splits()})")
        return [self.root / split / s["file"] for s in self.manifest["splits"][split]["shards"]]

    def shards(self, split: str) -> list[Shard]:
        return [Shard(p) for p in self.shard_paths(split)]

    def num_tokens(self, split: str) -> int:
        return int(self.manifest["splits"][split]["tokens"])

    def text_bytes(self, split: str) -> int:
        return int(self.manifest["splits"][split]["text_bytes"])

    def verify(self, *, full: bool = False) -> list[str]:
        """Problems found (empty when good): missing files or wrong sizes; with ``full``, sha256."""
        problems = []
        for split, info in self.manifest["splits"].items():
            for s in info["shards"]:
                p = self.root / split / s["file"]
                if not p.is_file():
                    problems.append(f"{p}: missing")
                elif p.stat().st_size != s["size"]:
                    problems.append(f"{p}: size {p.stat().st_size} != {s['size']}")
                elif full and sha256_file(p) != s["sha256"]:
                    problems.append(f"{p}: sha256 mismatch")
        if not self.tokenizer_path.is_file():
            problems.append(f"{self.tokenizer_path}: missing")
        return problems


def _is_dataset_manifest(path: Path) -> bool:
    try:
        return read_json(path).get("format") == SHARD_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _not_a_dataset(root: Path) -> str:
    """Why ``root`` is not a dataset, and which directory the user probably meant."""
    if not root.exists():
        return f"{root}: no such directory; pass the dataset directory (tokens-*) that `llmforge prepare` printed"
    if not root.is_dir():
        return f"{root}: a file, not a dataset directory; pass the directory (tokens-*) that `llmforge prepare` printed"
    found = sorted(p.parent for p in list(root.glob(f"*/{MANIFEST_NAME}")) + list(root.glob(f"*/*/{MANIFEST_NAME}"))
                   if _is_dataset_manifest(p))
    if found:
        more = f" (or one of {len(found) - 1} more)" if len(found) > 1 else ""
        return f"{root}: not a dataset, but it holds one: did you mean --data {found[-1]}{more}?"
    return f"{root}: no {MANIFEST_NAME} here; pass the dataset directory (tokens-*) that `llmforge prepare` printed"


def write_manifest(root: str | os.PathLike, manifest: dict) -> None:
    manifest = {"format": SHARD_FORMAT, "format_version": FORMAT_VERSION, **manifest}
    atomic_write_json(Path(root) / MANIFEST_NAME, manifest)


def split_summary(entries: Iterable[dict]) -> dict:
    entries = list(entries)
    return {
        "shards": entries,
        "tokens": sum(e["tokens"] for e in entries),
        "documents": sum(e["documents"] for e in entries),
        "text_bytes": sum(e["text_bytes"] for e in entries),
    }
