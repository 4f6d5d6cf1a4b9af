"""extract + clean stage: downloaded files -> cleaned, deduplicated, split parquet parts.

Two passes, datatrove-style, each with committed units so a kill loses one unit at most:

1. :func:`clean_unit` (parallel, one task per unit = one input file or a group of small files):
   stream documents out of the file (``pipeline.readers``), decode/normalise/filter them
   (``pipeline.clean``), and write the survivors to ``units/<unit>.parquet`` with a 128-bit
   content hash; with near-dup removal on, also each survivor's MinHash signature and LSH band
   hashes to ``units/<unit>.minhash`` (``pipeline.neardup.SignatureWriter``); then
   ``units/<unit>.json`` holding the counted outcome (written last: the unit is done iff it
   exists).
2. :func:`finalize` (sequential, cheap): exact deduplication over the whole corpus (first
   occurrence in unit order wins, using the hashes only), near-duplicates if on (band by band
   over the units' signature files, ``pipeline.neardup.near_duplicates``: a few bytes per
   document, not a signature), a deterministic train/val split by a second hash of the text,
   and repacking of the kept documents into ``train/part-NNNNN.parquet`` and
   ``val/part-NNNNN.parquet`` of about ``part_bytes`` each (zstd-compressed; columns ``id``,
   ``text``). Its ``manifest.json`` is written last and marks the stage complete.

Cleaned text is kept once: when the manifest is written, the units' parquet files (the same text
again) and signature files are removed, and only their small ``.json`` outcomes stay. A kill
between the manifest and that removal leaves them behind until the stage is next asked for
(:meth:`CleanStage.ensure` removes them); a unit whose parquet is gone is cleaned again if it is
ever needed (a part deleted by hand). Peak disk is therefore units + parts during ``finalize``
and parts alone after it; the manifest records both (``disk_bytes``, ``disk_bytes_peak``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pydantic import Field

from llmforge.config import Config
from llmforge.errors import DataError
from llmforge.pipeline.clean import CleanConfig, clean_document
from llmforge.pipeline.config import CorpusSpec, SplitConfig
from llmforge.pipeline.download import scan_directory
from llmforge.pipeline.neardup import NearDupConfig, SignatureFile, SignatureWriter, near_duplicates
from llmforge.pipeline.fsutil import (FORMAT_VERSION, DirLock, atomic_path, atomic_write_json, clean_temp, read_json,
                                     serial_map)
from llmforge.pipeline.readers import ReadLimits, ReadStats, SkippedEntry, iter_documents
from llmforge.stage import Stage

log = logging.getLogger(__name__)

UNIT_BYTES = 8_000_000  # small files of a directory source are grouped into units of at least this size
UNIT_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("h", pa.uint64()), ("s", pa.uint64())])
PART_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])
ROW_GROUP_BYTES = 16_000_000


class NoUsableDocuments(DataError):
    """Nothing survived reading and cleaning: the message lists why documents were dropped."""


class CleanStageConfig(Config):
    """What decides the cleaned text: the reading caps, the cleaning rules, near-duplicate
    removal and the split."""

    read: ReadLimits = Field(default_factory=ReadLimits)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    neardup: NearDupConfig = Field(default_factory=NearDupConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)


class CleanStage(Stage):
    """extract+clean: downloaded sources -> ``clean-<key>/{train,val}/part-*.parquet``.

    The key covers the cleaning and split config and the identity of every input file (size and
    mtime, or sha256), so changing a rule or an input makes a new directory. Units are committed
    one by one (``units/<unit>.json`` written last); ``manifest.json`` completes the stage."""

    name = "clean"

    def __init__(self, spec: CorpusSpec, downloads: list[dict], root: str | os.PathLike):
        self.spec = spec
        self.config = CleanStageConfig(read=spec.read, clean=spec.clean, neardup=spec.neardup, split=spec.split)
        self.units = plan_units(downloads, spec)
        self.root = Path(root)

    def inputs(self) -> Any:
        return [(u["label"], u["format"], u["text_key"], u.get("separator"), u["files"], u.get("skipped", []))
                for u in self.units]

    @property
    def out_dir(self) -> Path:
        return self.root / f"clean-{self.key}"

    def completed(self) -> dict | None:
        m = load_manifest(self.out_dir)
        if m is None or not all(p.is_file() for split in m["splits"] for p in part_paths(self.out_dir, m, split)):
            return None
        return m

    def clean_unit(self, unit: dict) -> dict:
        return clean_unit(unit, self.spec.clean, self.out_dir, self.spec.neardup)

    def run(self, map_units: Any = None) -> dict:
        """Clean every unit (``map_units(fn, items)`` runs them, in parallel where the caller
        can), then deduplicate, split and write the parts and the manifest. One process at a
        time per output directory (:class:`~llmforge.pipeline.fsutil.DirLock`)."""
        with DirLock(self.out_dir):
            if (done := self.completed()) is not None:  # finished by another run meanwhile
                remove_units(self.out_dir)
                return done
            clean_temp(self.out_dir / "units")
            (map_units or serial_map)(self.clean_unit, self.units)
            return finalize(self.out_dir, self.units, self.spec.split, fp=self.key, neardup=self.spec.neardup,
                            config=self.config.model_dump(mode="json"))

    def ensure(self, *args: Any, **kwargs: Any) -> tuple[dict, bool]:
        done = self.completed()
        if done is not None:
            remove_units(self.out_dir)  # left behind by a kill right after the manifest was written
            return done, True
        return self.run(*args, **kwargs), False

    def texts(self, manifest: dict, split: str = "train") -> Iterator[str]:
        return iter_texts(self.out_dir, manifest, split)

    def parts(self, manifest: dict) -> dict[str, list[Path]]:
        return {split: part_paths(self.out_dir, manifest, split) for split in ("train", "val")}


def plan_units(downloads: list[dict], spec: CorpusSpec) -> list[dict]:
    """Split the downloaded sources into units of work, in a fixed order.

    ``downloads`` are the download stage's entries (``path``, ``url``, ...), aligned with
    ``spec.sources``. Each unit records what identifies its input (size + mtime or sha256), so
    the stage fingerprint changes when an input changes.
    """
    units: list[dict] = []
    for src, dl in zip(spec.sources, downloads):
        path = Path(dl["path"])
        fmt = src.format or spec.format
        label = src.name or path.name
        text_key = src.text_key or spec.text_key
        extra = {"text_key": text_key, "separator": src.separator}
        if path.is_dir():
            scan = scan_directory(path, src.include, src.exclude, follow_symlinks=src.follow_symlinks)
            files = scan.files
            first = len(units)
            group: list = []
            size = 0
            for f in files:
                group.append(f)
                size += f[1]
                if size >= UNIT_BYTES:
                    units.append({"root": str(path), "files": group, "format": None, "label": label, **extra})
                    group, size = [], 0
            if group or len(units) == first:
                units.append({"root": str(path), "files": group, "format": None, "label": label, **extra})
            units[first]["skipped"] = [asdict(e) for e in scan.skipped]  # named once, by the first unit
        else:
            st = path.stat()
            ident = dl.get("sha256") or st.st_mtime_ns
            units.append({"root": str(path.parent), "files": [(path.name, st.st_size, ident)],
                          "format": None if fmt == "dir" else fmt, "label": label, **extra})
    for i, u in enumerate(units):
        u["name"] = f"unit-{i:05d}"
        u["bytes"] = sum(f[1] for f in u["files"])
        u["read"] = spec.read.model_dump()
    return units


def _hashes(text: str) -> tuple[int, int]:
    d = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


def _unit_documents(unit: dict, stats: ReadStats) -> Iterator:
    root = Path(unit["root"])
    limits = ReadLimits(**unit["read"]) if unit.get("read") else None
    stats.record_skipped(root, [SkippedEntry(**e) for e in unit.get("skipped", [])])
    for rel, _size, _ident in unit["files"]:
        path = root / rel
        label = f"{unit['label']}/{rel}" if len(unit["files"]) > 1 or rel != unit["label"] else unit["label"]
        yield from iter_documents(path, unit["format"], text_key=unit["text_key"], label=label, stats=stats,
                                  separator=unit["separator"], limits=limits)


def clean_unit(unit: dict, cfg: CleanConfig, out_dir: str | os.PathLike, neardup: NearDupConfig | None = None) -> dict:
    """Pass 1 for one unit; returns its stats (and skips the work if the unit is already done).
    With ``neardup`` enabled, also writes the unit's signature file."""
    out_dir = Path(out_dir) / "units"
    stats_path = out_dir / f"{unit['name']}.json"
    signed = neardup is not None and neardup.enabled
    if (stats_path.is_file() and (out_dir / f"{unit['name']}.parquet").is_file()
            and (not signed or (out_dir / f"{unit['name']}.minhash").is_file())):
        return {**read_json(stats_path), "skipped": True}
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    counts: Counter = Counter()
    rstats = ReadStats()
    rows: dict[str, list] = {"id": [], "text": [], "h": [], "s": []}
    buffered = 0
    bytes_out = 0
    docs_out = 0
    sign_seconds = 0.0
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(out_dir / f"{unit['name']}.parquet"))
        signatures = None
        if signed:  # committed just before the parquet file (the exit order), both before the .json
            sig_tmp = stack.enter_context(atomic_path(out_dir / f"{unit['name']}.minhash"))
            signatures = SignatureWriter(stack.enter_context(open(sig_tmp, "wb")), neardup, spool_dir=out_dir)
            stack.callback(signatures.close)
        with pq.ParquetWriter(tmp, UNIT_SCHEMA, compression="zstd") as writer:
            def flush() -> None:
                nonlocal buffered
                if rows["id"]:
                    writer.write_table(pa.table(rows, schema=UNIT_SCHEMA))
                    for v in rows.values():
                        v.clear()
                buffered = 0

            bar = tqdm(unit=" docs", desc=f"clean {unit['name']}", leave=False, disable=None)
            for doc in _unit_documents(unit, rstats):
                bar.update()
                counts["docs_in"] += 1
                text = clean_document(doc.data, cfg, counts)
                if text is None:
                    continue
                h, s = _hashes(text)
                rows["id"].append(doc.id)
                rows["text"].append(text)
                rows["h"].append(h)
                rows["s"].append(s)
                if signatures is not None:
                    t1 = time.perf_counter()
                    signatures.add(text)
                    sign_seconds += time.perf_counter() - t1
                n = len(text)
                buffered += n
                bytes_out += len(text.encode("utf-8", "surrogatepass")) if not text.isascii() else n
                docs_out += 1
                if buffered >= ROW_GROUP_BYTES:
                    flush()
            flush()
            bar.close()
        shape = signatures.finish() if signatures is not None else None
    result = {
        "unit": unit["name"],
        "bytes_in": unit["bytes"],
        "docs_out": docs_out,
        "bytes_out": bytes_out,
        "counts": dict(counts),
        "read_errors": dict(rstats.counts),
        "errors": list(rstats.errors)[:100],
        "seconds": round(time.time() - t0, 3),
    }
    if shape is not None:  # the signature file's shape, and what signing cost (shingles + MinHash)
        result["minhash"] = {**shape, "seconds": round(sign_seconds, 3)}
    atomic_write_json(stats_path, result)
    return result


class _PartWriter:
    """Writes rolling ``part-NNNNN.parquet`` files of about ``part_bytes`` text each."""

    def __init__(self, directory: Path, part_bytes: int):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.part_bytes = part_bytes
        self.parts: list[dict] = []
        self.ids: list[str] = []
        self.texts: list[str] = []
        self.size = 0

    def add(self, doc_id: str, text: str) -> None:
        self.ids.append(doc_id)
        self.texts.append(text)
        self.size += len(text.encode("utf-8", "surrogatepass"))
        if self.size >= self.part_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        name = f"part-{len(self.parts):05d}.parquet"
        table = pa.table({"id": self.ids, "text": self.texts}, schema=PART_SCHEMA)
        with atomic_path(self.dir / name) as tmp:
            pq.write_table(table, tmp, compression="zstd", row_group_size=max(1, min(len(self.ids), 4096)))
        self.parts.append({"file": name, "documents": len(self.ids), "text_bytes": self.size})
        self.ids, self.texts, self.size = [], [], 0

    def summary(self) -> dict:
        return {
            "parts": self.parts,
            "documents": sum(p["documents"] for p in self.parts),
            "text_bytes": sum(p["text_bytes"] for p in self.parts),
        }


def finalize(out_dir: str | os.PathLike, units: list[dict], split: SplitConfig, *, fp: str,
             neardup: NearDupConfig | None = None, config: dict | None = None) -> dict:
    """Pass 2: dedup (exact, then near-duplicates if enabled), split, repack; write the stage
    manifest. Idempotent."""
    out_dir = Path(out_dir)
    t0 = time.time()
    unit_dir = out_dir / "units"
    stats = [read_json(unit_dir / f"{u['name']}.json") for u in units]
    counts: Counter = Counter()
    read_errors: Counter = Counter()
    errors: list[str] = []
    for st in stats:
        counts.update(st["counts"])
        read_errors.update(st["read_errors"])
        errors.extend(st["errors"])
    paths = [unit_dir / f"{u['name']}.parquet" for u in units]
    cols = [pq.read_table(p, columns=["h", "s"]) for p in paths]
    all_h = np.concatenate([c.column("h").to_numpy() for c in cols]) if cols else np.zeros(0, dtype=np.uint64)
    all_s = np.concatenate([c.column("s").to_numpy() for c in cols]) if cols else np.zeros(0, dtype=np.uint64)
    keep = np.zeros(len(all_h), dtype=bool)
    if len(all_h):
        _, first = np.unique(all_h, return_index=True)
        keep[first] = True
    dups = int(len(all_h) - keep.sum())
    near = 0
    sig_paths = [unit_dir / f"{u['name']}.minhash" for u in units]
    t_near = time.time()
    if neardup is not None and neardup.enabled and keep.any():
        files = [_signature_file(p, st) for p, st in zip(sig_paths, stats)]
        drop = near_duplicates(files, neardup, eligible=keep, counts=counts)
        keep[drop] = False
        near = len(drop)
    near_seconds = time.time() - t_near
    if len(all_h) == 0 or keep.sum() == 0:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted((counts + read_errors).items()) if k.startswith(("read_error.", "dropped.", "decode.")))
        raise NoUsableDocuments(
            f"extract+clean: no usable document remains out of {counts.get('docs_in', 0)} read "
            f"({reasons or 'no documents found in the sources'})"
        )
    threshold = _val_threshold(all_s[keep], split)
    writers = {"train": _PartWriter(out_dir / "train", split.part_bytes),
               "val": _PartWriter(out_dir / "val", split.part_bytes)}
    for d in ("train", "val"):
        clean_temp(out_dir / d)
    offset = 0
    for p in paths:
        pf = pq.ParquetFile(p)
        for rg in range(pf.num_row_groups):
            t = pf.read_row_group(rg, columns=["id", "text", "s"])
            n = t.num_rows
            k = keep[offset : offset + n]
            offset += n
            s = t.column("s").to_numpy()
            for i, (doc_id, text) in enumerate(zip(t.column("id").to_pylist(), t.column("text").to_pylist())):
                if k[i]:
                    writers["val" if s[i] < threshold else "train"].add(doc_id, text)
    for w in writers.values():
        w.flush()
    # a previous (killed) attempt can't leave extra parts: part names are deterministic, but be sure
    for split_name, w in writers.items():
        names = {p["file"] for p in w.parts}
        for extra in (out_dir / split_name).glob("part-*.parquet"):
            if extra.name not in names:
                extra.unlink()
    counts["dropped.duplicate"] = dups
    if near:
        counts["dropped.near_duplicate"] = near
    part_bytes = sum((out_dir / k / p["file"]).stat().st_size for k, w in writers.items() for p in w.parts)
    kept_bytes = part_bytes + sum((unit_dir / f"{u['name']}.json").stat().st_size for u in units)
    manifest = {
        "fingerprint": fp,
        "format_version": FORMAT_VERSION,
        "splits": {k: w.summary() for k, w in writers.items()},
        "disk_bytes": kept_bytes,  # what the stage keeps: the parts and the units' outcomes
        # + the units (text and signatures), during finalize
        "disk_bytes_peak": kept_bytes + sum(p.stat().st_size for p in paths + sig_paths if p.is_file()),
        "stats": {
            "units": len(units),
            "bytes_in": sum(u["bytes"] for u in units),
            "docs_in": int(counts.get("docs_in", 0)),
            "docs_kept": int(keep.sum()),
            "counts": dict(sorted(counts.items())),
            "read": {k: v for k, v in sorted(read_errors.items()) if not k.startswith("read_error.")},
            "read_errors": {k: v for k, v in sorted(read_errors.items()) if k.startswith("read_error.")},
            "clean_seconds": round(sum(st["seconds"] for st in stats), 3),
            "finalize_seconds": round(time.time() - t0, 3),
            "neardup_seconds": round(near_seconds, 3),  # of finalize: the band passes
        },
        "errors": errors[:200],
        "config": config or {},
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    remove_units(out_dir)
    return manifest


def _signature_file(path: Path, stats: dict) -> SignatureFile:
    """A unit's signature file, checked against the unit's outcome."""
    shape = stats.get("minhash")
    if shape is None or not path.is_file():
        raise DataError(f"{path}: missing: the unit was cleaned without near-duplicate signatures; remove "
                        f"{path.with_suffix('.json')} and run again")
    if shape["documents"] != stats["docs_out"]:
        raise DataError(f"{path}: {shape['documents']} signatures for {stats['docs_out']} documents; remove it "
                        f"and {path.with_suffix('.json')} and run again")
    return SignatureFile.open(path, shape)


def remove_units(clean_dir: str | os.PathLike) -> int:
    """Remove the units' parquet and signature files of a completed stage (the parts hold the
    same text); returns the bytes freed. Their ``.json`` outcomes stay: they are small and name
    what each unit read and dropped."""
    freed = 0
    units = Path(clean_dir) / "units"
    for p in [*units.glob("unit-*.parquet"), *units.glob("unit-*.minhash")]:
        with contextlib.suppress(FileNotFoundError):
            size = p.stat().st_size
            p.unlink()
            freed += size
    return freed


def _val_threshold(s: np.ndarray, split: SplitConfig) -> np.uint64:
    """Documents whose split hash is below the threshold go to val: ``val_fraction`` of them, but
    at least ``min_val_documents`` (the ones with the smallest hashes, so still deterministic),
    and never all of them. A corpus too small for that is an error now, not "val loss nan" later."""
    want = np.uint64(min(int(split.val_fraction * 2**64), 2**64 - 1))  # val_fraction < 1 by config
    n_val = int((s < want).sum())
    if split.val_fraction > 0 and n_val < split.min_val_documents:
        if len(s) <= split.min_val_documents:
            raise DataError(
                f"extract+clean: only {len(s)} document(s) survive cleaning, too few for a val split of at least "
                f"{split.min_val_documents} plus training data; add text, or lower split.min_val_documents "
                f"(or set split.val_fraction: 0 for no val split)")
        return np.sort(s)[split.min_val_documents - 1] + np.uint64(1)
    return want


def load_manifest(clean_dir: str | os.PathLike) -> dict | None:
    p = Path(clean_dir) / "manifest.json"
    return read_json(p) if p.is_file() else None


def part_paths(clean_dir: str | os.PathLike, manifest: dict, split: str) -> list[Path]:
    return [Path(clean_dir) / split / p["file"] for p in manifest["splits"][split]["parts"]]


def iter_texts(clean_dir: str | os.PathLike, manifest: dict, split: str = "train") -> Iterator[str]:
    """The cleaned texts of a split, in their stored order."""
    for p in part_paths(clean_dir, manifest, split):
        pf = pq.ParquetFile(p)
        for rg in range(pf.num_row_groups):
            yield from pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
