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

Nothing damaged is trusted. Every open checks a shard's structure (its size against the
manifest, Arrow's own validation, document offsets increasing and inside the token buffer, each
document ending in EOS, the counts the manifest records): O(documents), well under a millisecond
for a 64 MB shard. Its content (sha256 against the manifest, every token id below the vocabulary)
is checked by one read of the file, once: the result is recorded next to the shard
(``.<shard>.verified.json``) under the file's :func:`~llmforge.pipeline.fsutil.stat_key`, which any
change to the file invalidates, so later opens cost a ``stat``. (Measured on a 32 MB shard: the
content pass runs at ~1.7 GB/s, sha256-bound, i.e. ~10 s per 18 GB dataset from the page cache and
disk-bound when cold; the structural checks take 2 ms; a recorded check 50 us.)
:meth:`Dataset.open` checks every shard of every split (so training, evaluation and fine-tuning
refuse damaged data with one :class:`~llmforge.errors.DataError` naming each bad file, before the
first step); :meth:`Dataset.verify` lists the problems instead, and ``llmforge verify`` re-reads
everything.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from llmforge.errors import DataError, NotFound
from llmforge.pipeline.fsutil import (FORMAT_VERSION, DiskFull, atomic_path, atomic_write_json, human_bytes,
                                     read_json, sha256_file, stat_key)

log = logging.getLogger(__name__)

SHARD_FORMAT = "llmforge.tokens"
MANIFEST_NAME = "manifest.json"
REMAKE = "re-run the `llmforge prepare` command that made it: it remakes damaged shards"


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
    with atomic_path(path, size_hint=tokens.nbytes + offsets.nbytes) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(batch)
    sha, max_id = Shard(path).content()  # read back: what is recorded is what is on disk
    entry = {
        "file": path.name,
        "tokens": int(len(tokens)),
        "documents": int(len(lengths)),
        "text_bytes": int(np.asarray(n_bytes, dtype=np.int64).sum()),
        "size": path.stat().st_size,
        "sha256": sha,
    }
    _write_record(path, sha, max_id)
    return entry


def _record_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified.json")


def _write_record(path: Path, sha: str, max_id: int) -> None:
    """Remember that ``path`` as it is now (its stat key) has this content; best effort (a
    read-only dataset is simply re-read at each open)."""
    try:
        atomic_write_json(_record_path(path), {"sha256": sha, "max_id": max_id, "stat": stat_key(path.stat())})
    except (OSError, DiskFull) as e:  # a read-only or full disk: nothing is lost but this shortcut
        log.debug("cannot record the verification of %s: %s", path, e)


def _recorded(path: Path) -> tuple[str, int] | None:
    """(sha256, max id) recorded for ``path`` if the file has not changed since, else None."""
    try:
        rec = read_json(_record_path(path))
        if rec["stat"] == stat_key(path.stat()):
            return str(rec["sha256"]), int(rec["max_id"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


class Shard:
    """A memory-mapped shard. ``tokens`` and ``offsets`` are zero-copy numpy views.

    Opening checks the structure (see the module docstring) and raises :class:`DataError` naming
    the file; ``entry`` (the shard's manifest entry) adds the checks of its size and counts."""

    def __init__(self, path: str | os.PathLike, entry: dict | None = None):
        self.path = Path(path)
        if entry is not None:
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                raise DataError(f"{self.path}: missing; {REMAKE}") from None
            if size != entry["size"]:
                raise DataError(f"{self.path}: size {size} bytes but the manifest says {entry['size']} (truncated "
                                f"or overwritten); {REMAKE}")
        try:
            self._mmap = pa.memory_map(str(self.path), "r")
            reader = pa.ipc.open_file(self._mmap)
            meta = reader.schema.metadata or {}
            if meta.get(b"format") != SHARD_FORMAT.encode():
                raise DataError(f"{self.path}: not a token shard (format={meta.get(b'format')!r})")
            if reader.num_record_batches != 1:
                raise DataError(f"{self.path}: expected 1 record batch, found {reader.num_record_batches}")
            self.eos_id = int(meta[b"eos_id"])
            self._batch = reader.get_batch(0)
        except DataError:
            raise
        except (OSError, pa.ArrowException, KeyError, ValueError) as e:
            raise DataError(f"{self.path}: not a readable token shard ({e}); {REMAKE}") from None
        if (problem := self._structure_problem(entry)) is not None:
            raise DataError(f"{self.path}: {problem}; {REMAKE}")

    def _structure_problem(self, entry: dict | None) -> str | None:
        """What is wrong with the batch's layout, or None. O(documents): never reads the tokens
        except each document's last one."""
        b = self._batch
        if b.schema.names != ["id", "n_bytes", "tokens"] or not pa.types.is_list(b.schema.field("tokens").type):
            return f"unexpected columns {b.schema}"
        col = b.column("tokens")
        offsets = col.offsets.to_numpy(zero_copy_only=True)
        n_values = len(col.values)
        if len(offsets) != b.num_rows + 1 or offsets[0] != 0 or offsets[-1] != n_values:
            return (f"document offsets span [{offsets[0] if len(offsets) else '-'}, "
                    f"{offsets[-1] if len(offsets) else '-'}) but the token buffer holds {n_values} tokens")
        lengths = np.diff(offsets)
        if len(lengths) and lengths.min() < 1:
            i = int(np.argmax(lengths < 1))
            return f"document offsets are not increasing (document {i}: {offsets[i]} -> {offsets[i + 1]})"
        try:
            b.validate(full=True)
        except pa.ArrowException as e:
            return f"Arrow validation failed: {e}"
        tokens = col.values.to_numpy(zero_copy_only=True)
        if len(lengths) and not (ends := tokens[offsets[1:] - 1] == self.eos_id).all():
            i = int(np.argmin(ends))
            return f"document {i} does not end with EOS ({self.eos_id}): its last token is {tokens[offsets[i + 1] - 1]}"
        if entry is not None and (b.num_rows, n_values) != (entry["documents"], entry["tokens"]):
            return (f"{b.num_rows} documents / {n_values} tokens but the manifest says {entry['documents']} / "
                    f"{entry['tokens']}")
        return None

    def content(self) -> tuple[str, int]:
        """(sha256 of the file, largest token id): one read of the whole file."""
        return sha256_file(self.path), int(self.tokens.max()) if len(self.tokens) else -1

    def content_problems(self, entry: dict, vocab_size: int, *, reread: bool = False) -> list[str]:
        """What is wrong with the content (sha256 vs the manifest, token ids >= ``vocab_size``),
        from the verification record when the file has not changed since it was made, else by
        reading the file (and recording a good result)."""
        found = None if reread else _recorded(self.path)
        if found is None:
            found = self.content()
            fresh = True
        else:
            fresh = False
        sha, max_id = found
        problems = []
        if sha != entry["sha256"]:
            problems.append("sha256 differs from the manifest's (the file changed after it was written)")
        if max_id >= vocab_size:
            bad = self.tokens >= vocab_size
            at = int(np.argmax(bad))
            problems.append(f"token id {int(self.tokens[at])} at position {at} is not below the vocabulary size "
                            f"{vocab_size} ({int(bad.sum())} such tokens)")
        if fresh and not problems:
            _write_record(self.path, sha, max_id)
        return problems

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


def shard_problems(path: Path, entry: dict, vocab_size: int, *, reread: bool = False) -> list[str]:
    """Every problem of one shard (structure, then content), as ``"<path>: <problem>"`` lines."""
    try:
        shard = Shard(path, entry)
    except DataError as e:
        return [str(e).replace(f"; {REMAKE}", "")]
    return [f"{path}: {p}" for p in shard.content_problems(entry, vocab_size, reread=reread)]


@dataclass
class Dataset:
    """A tokenized dataset directory (the output of the tokenize stage)."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | os.PathLike, *, check: bool = True) -> "Dataset":
        """Read the manifest; with ``check`` (the default) also check every shard (see the module
        docstring) and raise one :class:`DataError` naming each damaged file."""
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
        ds = cls(root, manifest)
        if check:
            ds.check()
        return ds

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
        entries = self.manifest["splits"][split]["shards"] if split in self.manifest["splits"] else []
        return [Shard(p, e) for p, e in zip(self.shard_paths(split), entries)]

    def first_tokens(self, split: str, max_tokens: int) -> np.ndarray:
        """The first ``max_tokens`` tokens of ``split`` (fewer if it has fewer), shard by shard in order."""
        parts, n = [], 0
        for shard in self.shards(split):
            part = np.asarray(shard.tokens[: max_tokens - n])
            parts.append(part)
            n += len(part)
            if n >= max_tokens:
                break
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def num_tokens(self, split: str) -> int:
        return int(self.manifest["splits"][split]["tokens"])

    def text_bytes(self, split: str) -> int:
        return int(self.manifest["splits"][split]["text_bytes"])

    def verify(self, *, full: bool = False) -> list[str]:
        """Problems found, one ``"<file>: <problem>"`` line each (empty when good): missing files,
        and every shard's structure and content (sha256, token ids). Content checks use the
        verification records; ``full`` re-reads every shard regardless."""
        problems = []
        todo = [(self.root / split / s["file"], s) for split, info in self.manifest["splits"].items()
                for s in info["shards"]]
        unrecorded = sum(s["size"] for p, s in todo if full or _recorded(p) is None)
        if unrecorded > 1 << 30:
            from llmforge.console import say

            say(f"verifying {human_bytes(unrecorded)} of shards in {self.root} (sha256 and token ids; "
                f"recorded, so only once)")
        for p, s in todo:
            problems += shard_problems(p, s, self.vocab_size, reread=full)
        if not self.tokenizer_path.is_file():
            problems.append(f"{self.tokenizer_path}: missing")
        return problems

    def check(self) -> None:
        """Raise one :class:`DataError` naming every damaged file (see :meth:`verify`)."""
        problems = self.verify()
        if problems:
            n = len(problems)
            raise DataError(f"{self.root}: damaged dataset, not used ({n} problem{'s' if n > 1 else ''}): "
                            + "; ".join(problems) + f". {REMAKE[0].upper()}{REMAKE[1:]}")


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
