"""tokenize stage: cleaned parquet parts -> memory-mappable Arrow token shards.

One unit of work = one cleaned part -> one shard (``train/part-00003.parquet`` ->
``train/shard-00003.arrow``), so shards are independent tasks that a Prefect task runner (or a
Dask cluster) can run anywhere, and a killed stage redoes only the shard in flight. Within a
shard, documents are cut at line ends into pieces of at most ``piece_chars`` and encoded in
batches on all cores by SentencePiece's native thread pool (cutting after a newline gives the
same ids as encoding the whole document, because ``\\n`` is a user-defined symbol no merge
crosses). A finished shard has a ``.json`` sidecar holding its manifest entry; it is written
after the shard, so the sidecar's existence means the shard is complete, and a re-run skips a shard
only when it still verifies against its sidecar (size, structure, sha256, token ids: see
``pipeline/shards.py``), so a damaged shard is made again, never trusted. One process writes a
dataset directory at a time (:class:`~llmforge.pipeline.fsutil.DirLock`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from itertools import chain
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from llmforge.config import Config, control
from llmforge.pipeline.fsutil import DirLock, atomic_path, atomic_write_json, clean_temp, read_json
from llmforge.pipeline.shards import (MANIFEST_NAME, Dataset, shard_problems, split_summary, token_dtype,
                                      write_manifest, write_shard)
from llmforge.pipeline.tokenizer import TOKENIZER_FILE, Tokenizer, _chunks
from llmforge.stage import Stage

log = logging.getLogger(__name__)


class TokenizeConfig(Config):
    """How shards are encoded; none of it changes the token ids (so none of it is in the key)."""

    batch_bytes: int = control(4_000_000, "text bytes handed to the encoder at once", gt=0)
    piece_chars: int = control(16384, "long documents are cut into pieces this long", ge=256)
    threads: int | None = control(None, "encoder threads per shard (default: all cores)")


class TokenizeStage(Stage):
    """Cleaned parts -> token shards (``tokens-<key>/``, the dataset ``llmforge train`` reads).
    Complete when its ``manifest.json`` exists and every shard it lists verifies (size, structure,
    sha256 and token ids; cheap once recorded, see ``pipeline/shards.py``)."""

    name = "tokenize"

    def __init__(self, config: TokenizeConfig, clean_key: str, tokenizer: dict, root: str | os.PathLike):
        self.config, self.clean_key, self.tokenizer, self.root = config, clean_key, tokenizer, Path(root)

    def inputs(self) -> Any:
        return [self.clean_key, self.tokenizer["fingerprint"]]

    @property
    def out_dir(self) -> Path:
        return self.root / f"tokens-{self.key}"

    def completed(self) -> dict | None:
        if not (self.out_dir / MANIFEST_NAME).is_file():
            return None
        ds = Dataset.open(self.out_dir, check=False)
        return None if ds.verify() else ds.manifest

    def jobs(self, parts: dict[str, list[Path]]) -> list[tuple[str, Path]]:
        """(split, part) of every shard to encode; sweeps temp files of killed writers first."""
        out = []
        for split, paths in parts.items():
            (self.out_dir / split).mkdir(parents=True, exist_ok=True)
            clean_temp(self.out_dir / split)
            out += [(split, p) for p in paths]
        return out

    def encode(self, job: tuple[str, Path]) -> dict:
        split, part = job
        return tokenize_part(part, self.out_dir / split, self.tokenizer["path"], self.config)

    def run(self, parts: dict[str, list[Path]], clean_manifest: dict, corpus: dict,
            map_units: Any = None) -> dict:
        """Encode every part (``map_units(fn, items)`` runs them, in parallel where the caller
        can), then write the manifest that completes the stage."""
        from llmforge.pipeline.fsutil import serial_map

        with DirLock(self.out_dir):
            if (done := self.completed()) is not None:  # finished by another run meanwhile
                return done
            jobs = self.jobs(parts)
            results = (map_units or serial_map)(self.encode, jobs)
            entries: dict[str, list[dict]] = {split: [] for split in parts}
            for (split, _), entry in zip(jobs, results):
                entries[split].append(entry)
            return finalize(self.out_dir, entries, fingerprint=self.key, tokenizer=self.tokenizer,
                            clean_manifest=clean_manifest, config={"corpus": corpus})


def shard_name(part: Path) -> str:
    return part.name.replace("part-", "shard-").replace(".parquet", ".arrow")


def _batches(part: Path, batch_bytes: int) -> Iterator[tuple[list[str], list[str]]]:
    pf = pq.ParquetFile(part)
    ids: list[str] = []
    texts: list[str] = []
    size = 0
    for rg in range(pf.num_row_groups):
        t = pf.read_row_group(rg, columns=["id", "text"])
        for i, text in zip(t.column("id").to_pylist(), t.column("text").to_pylist()):
            ids.append(i)
            texts.append(text)
            size += len(text)
            if size >= batch_bytes:
                yield ids, texts
                ids, texts, size = [], [], 0
    if ids:
        yield ids, texts


def tokenize_part(part: str | os.PathLike, out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike,
                  cfg: TokenizeConfig | None = None) -> dict:
    """Encode one cleaned part into ``out_dir/<shard>.arrow``; skip if already complete."""
    cfg = cfg or TokenizeConfig()
    part, out_dir = Path(part), Path(out_dir)
    out = out_dir / shard_name(part)
    sidecar = out.with_suffix(".json")
    tok = Tokenizer.load(tokenizer_path)
    if sidecar.is_file() and out.is_file():
        entry = read_json(sidecar)
        problems = shard_problems(out, entry, tok.vocab_size)
        if not problems:
            return {**entry, "skipped": True}
        log.warning("making %s again: %s", out, "; ".join(problems))
    t0 = time.time()
    dtype = token_dtype(tok.vocab_size)
    all_ids: list[str] = []
    n_bytes: list[int] = []
    lengths: list[int] = []
    arrays: list[np.ndarray] = []
    n_docs = pq.ParquetFile(part).metadata.num_rows
    bar = tqdm(total=n_docs, unit="doc", desc=f"tokenize {part.parent.name}/{part.name}", leave=False,
               disable=None)
    for ids, texts in _batches(part, cfg.batch_bytes):
        bar.update(len(ids))
        pieces: list[str] = []
        counts: list[int] = []
        for text in texts:
            chunks = list(_chunks(text, cfg.piece_chars)) if len(text) > cfg.piece_chars else [text]
            pieces.extend(chunks)
            counts.append(len(chunks))
        encoded = tok.encode_batch(pieces, cfg.threads)
        pos = 0
        flat: list[list[int]] = []
        eos = [tok.eos_id]
        for text, c in zip(texts, counts):
            doc = encoded[pos : pos + c]
            pos += c
            lengths.append(sum(map(len, doc)) + 1)
            flat.extend(doc)
            flat.append(eos)
            n_bytes.append(len(text.encode("utf-8")))
        total = sum(map(len, flat))
        arrays.append(np.fromiter(chain.from_iterable(flat), dtype=dtype, count=total))
        all_ids.extend(ids)
    bar.close()
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
    entry = write_shard(out, all_ids, n_bytes, tokens, lengths, eos_id=tok.eos_id)
    entry["seconds"] = round(time.time() - t0, 3)
    atomic_write_json(sidecar, entry)
    log.info("%s: %d docs, %d tokens in %.1fs", out.name, entry["documents"], entry["tokens"], entry["seconds"])
    return entry


def finalize(out_dir: str | os.PathLike, entries: dict[str, list[dict]], *, fingerprint: str,
             tokenizer: dict, clean_manifest: dict, config: dict) -> dict:
    """Write the dataset manifest once every shard is done (this marks the stage complete)."""
    out_dir = Path(out_dir)
    tok_dst = out_dir / TOKENIZER_FILE
    if not tok_dst.is_file():
        with atomic_path(tok_dst) as tmp:
            shutil.copyfile(tokenizer["path"], tmp)
    splits = {}
    for split, es in entries.items():
        es = sorted(({k: v for k, v in e.items() if k not in ("skipped", "seconds")} for e in es),
                    key=lambda e: e["file"])
        splits[split] = split_summary(es)
    vocab = int(tokenizer["vocab_size"])
    # what the dataset occupies: shards + tokenizer (the per-shard sidecars and verification
    # records, ~0.5 KB each, are left out so the manifest is the same bytes on every run)
    disk_bytes = sum(e["size"] for es in splits.values() for e in es["shards"]) + tok_dst.stat().st_size
    manifest = {
        "fingerprint": fingerprint,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "fingerprint": tokenizer["fingerprint"],
            "vocab_size": vocab,
            "eos_id": int(tokenizer["eos_id"]),
        },
        "token_dtype": np.dtype(token_dtype(vocab)).name,
        "splits": splits,
        "disk_bytes": disk_bytes,
        # counts only (no timings): the manifest of a given dataset is the same bytes on every run
        "clean": {"fingerprint": clean_manifest["fingerprint"],
                  "stats": {k: v for k, v in clean_manifest.get("stats", {}).items() if not k.endswith("seconds")}},
        "config": config,
    }
    write_manifest(out_dir, manifest)
    return manifest
