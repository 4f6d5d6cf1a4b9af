"""Near-duplicate detection: MinHash signatures + LSH banding (``datasketch``), at corpus scale.

Exact deduplication (extract's content hash) misses the copies that differ by a few words: the
same article syndicated with another byline, a book in two transcriptions, a page with a
paragraph of boilerplate appended. Here every document becomes a set of shingles (word
``n``-grams of its lower-cased words, or character ``n``-grams), the set a MinHash signature of
``num_perm`` 32-bit values, and documents whose signatures agree on a whole LSH band become
candidates; a candidate pair is confirmed on the signatures themselves (the estimated Jaccard
similarity is at least ``threshold``), and the later document of a confirmed pair is dropped
when the earlier one is itself kept: the first occurrence wins.

Two ways to run it, with the same result:

- :func:`find_near_duplicates` streams ``(key, text)`` pairs through :class:`NearDupIndex`, a
  datasketch ``MinHashLSH`` of the documents kept so far: simple and sequential, and it holds
  ~5.5 KB per kept document, so it is for small inputs (and is the reference the other is
  tested against).
- At corpus scale the work is split in two. The parallel clean workers compute each document's
  signature and band hashes (:class:`Signer`, :class:`SignatureWriter`) into one compact file
  per unit (:class:`SignatureFile`: ``4 * num_perm + 8 * bands`` bytes per document); then
  :func:`near_duplicates` goes through the corpus one band at a time: it loads that band's hash
  for every document (8 bytes each), sorts, pairs the documents of each bucket, verifies the
  pairs on the signatures (memory-mapped, a few thousand rows at a time) and finally settles the
  confirmed pairs in document order. Its memory is a few tens of bytes per document during a
  band pass plus 8 bytes per confirmed pair, never a signature per document.

Everything is deterministic: the shingle hash is built from CRC-32 (not Python's salted
``hash``), the permutations come from a fixed ``seed``, and the band hashes from a fixed mix.

    from llmforge.pipeline.neardup import NearDupConfig, find_near_duplicates
    drop = find_near_duplicates(enumerate(texts), NearDupConfig(enabled=True))
"""

from __future__ import annotations

import re
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

_WORD = re.compile(r"\w+")
_CHUNK = 8192  # shingles permuted per step: bounds the (n x num_perm) temporary to 4 MB at 128
_CANDIDATE_MARGIN = 0.1
_SCHEME = "affine32"  # datasketch's permutation scheme (its default since 2.0): uint32 signatures
_EMPTY = np.uint32(0xFFFFFFFF)  # every value of the signature of a document without shingles
MAX_PARTNERS = 256  # in a bucket, a document is compared with at most this many earlier members
_PAIR_CHUNK = 8192  # candidate pairs verified at once: 2 x 8192 signature rows (8 MB at 128)
_WRITE_BATCH = 4096  # documents whose band hashes a SignatureWriter computes at once


class NearDupConfig(BaseModel):
    """Near-duplicate detection settings (used by the dedup pass of extract+clean)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="drop documents that nearly duplicate an earlier one")
    threshold: float = Field(
        0.8, gt=0, le=1, description="estimated Jaccard similarity of shingle sets at or above which a "
        "later document is a near duplicate of an earlier one"
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations: signature length, "
                          "accuracy (error ~ 1/sqrt(num_perm)) and memory (4 bytes each per document)")
    shingle: Literal["word", "char"] = Field(
        "word", description="shingles are n-grams of lower-cased words (punctuation ignored) or of "
        "characters (whitespace collapsed)"
    )
    shingle_size: int = Field(5, ge=1, le=64, description="n of the n-gram shingles")
    seed: int = Field(1, ge=0, description="seed of the MinHash permutations (fixed: results are reproducible)")


# ---------------------------------------------------------------------------------------------
# shingles and signatures

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio) for combining n-grams


def _token_codes(text: str, cfg: NearDupConfig) -> np.ndarray:
    """One uint64 per token: CRC-32 of each lower-cased word, or each character's code point."""
    if cfg.shingle == "char":
        flat = " ".join(text.lower().split())
        return np.frombuffer(flat.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    tokens = _WORD.findall(text.lower())
    # one C call per token (measured faster than hashing each distinct word once through a dict)
    return np.fromiter(map(zlib.crc32, map(str.encode, tokens)), dtype=np.uint64, count=len(tokens))


def shingle_array(text: str, cfg: NearDupConfig) -> np.ndarray:
    """The 32-bit hashes of ``text``'s shingles, in text order, repeats included (uint32).

    An n-gram's hash is a polynomial of its tokens' codes (wrapping uint64 arithmetic, folded
    to 32 bits), computed for all n-grams at once with numpy. A text shorter than one shingle
    is a single shingle, so short documents still compare; a text without a word (or a
    character) has none.
    """
    codes = _token_codes(text, cfg)
    if len(codes) == 0:
        return np.zeros(0, dtype=np.uint32)
    n = min(cfg.shingle_size, len(codes))
    count = len(codes) - n + 1
    h = codes[:count].copy()
    for j in range(1, n):
        h *= _MIX
        h += codes[j : j + count]
    h ^= h >> np.uint64(32)
    return h.astype(np.uint32)


def shingle_hashes(text: str, cfg: NearDupConfig) -> list[int]:
    """The distinct shingle hashes of ``text``, sorted ([] when it has no word or character)."""
    return np.unique(shingle_array(text, cfg)).tolist()


@lru_cache(maxsize=16)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)`` of the LSH banding, as datasketch's ``MinHashLSH`` chooses them.

    Banding only proposes candidates, so it runs at a lower threshold: at the threshold itself
    its S-curve lets pairs just above it slip through (planted test set: recall 0.95, 0.98 with
    the margin); the signature check keeps the threshold exact. 128 permutations at 0.8: 14 bands
    of 9 rows."""
    from datasketch import MinHashLSH  # imported when used: it pulls in scipy

    lsh = MinHashLSH(threshold=max(0.05, threshold - _CANDIDATE_MARGIN), num_perm=num_perm)
    return lsh.b, lsh.r


class Signer:
    """MinHash signatures of texts: datasketch's permutations and input mix (scheme ``affine32``)
    applied to a document's shingles in numpy blocks, which gives exactly the hash values of
    ``datasketch.MinHash.update_batch`` (tested) without its Python call per shingle: 1.8x the
    documents per second on 5 KB pages, shingling included (~3,000/s on one core)."""

    def __init__(self, cfg: NearDupConfig):
        from datasketch import MinHash
        from datasketch.minhash import _fmix  # the MurmurHash3 finalizer MinHash applies first

        self.cfg = cfg
        self._fmix = _fmix
        a, b = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=_SCHEME).permutations
        self._a, self._b = a.astype(np.uint32), b.astype(np.uint32)

    def sign(self, text: str) -> np.ndarray | None:
        """``text``'s signature (``num_perm`` uint32), or None when it has no shingle."""
        hashes = shingle_array(text, self.cfg)
        if len(hashes) == 0:
            return None
        mixed = self._fmix(hashes, 32)
        sig = np.full(self.cfg.num_perm, _EMPTY, dtype=np.uint32)
        for i in range(0, len(mixed), _CHUNK):
            block = mixed[i : i + _CHUNK, None] * self._a + self._b  # uint32: wraps, as datasketch's does
            np.minimum(sig, block.min(axis=0), out=sig)
        return sig


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``(n, bands)`` uint64: a 64-bit hash of each band (``rows`` consecutive values) of each
    signature. Equal bands give equal hashes, as datasketch's LSH keys (the band's bytes) do;
    distinct ones collide with probability ~2^-64, and a collision only adds a candidate that
    the signature check then judges."""
    from datasketch.minhash import _fmix

    sigs = np.atleast_2d(np.asarray(signatures, dtype=np.uint32)).astype(np.uint64)
    out = np.empty((len(sigs), bands), dtype=np.uint64)
    for j in range(bands):
        h = np.zeros(len(sigs), dtype=np.uint64)
        for v in sigs[:, j * rows : (j + 1) * rows].T:
            h = _fmix(h ^ v, 64)  # a bijection per step: a chain of them mixes the whole band
        out[:, j] = h
    return out


# ---------------------------------------------------------------------------------------------
# the reference: sequential, in memory


class NearDupIndex:
    """Signatures of the documents kept so far, and a datasketch LSH index over them."""

    def __init__(self, cfg: NearDupConfig):
        self.cfg = cfg
        from datasketch import MinHash, MinHashLSH

        # hashfunc=int: the values given are already CRC-32 hashes; int is a C call per value
        self._template = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=int, scheme=_SCHEME)
        self._lsh = MinHashLSH(threshold=max(0.05, cfg.threshold - _CANDIDATE_MARGIN), num_perm=cfg.num_perm)
        self._signatures: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._signatures)

    def minhash(self, text: str):
        """The MinHash of ``text``, or None when it has no shingle."""
        hashes = shingle_hashes(text, self.cfg)
        if not hashes:
            return None
        m = self._template.copy()
        for i in range(0, len(hashes), _CHUNK):
            m.update_batch(hashes[i : i + _CHUNK])
        return m

    def add(self, key: int, text: str) -> int | None:
        """Index ``text`` under ``key`` and return None, or return the (smallest) key of a kept
        document it nearly duplicates; then it is not indexed, so the first occurrence wins."""
        m = self.minhash(text)
        if m is None:
            return None
        sig = m.hashvalues
        matches = [k for k in self._lsh.query(m) if np.mean(self._signatures[k] == sig) >= self.cfg.threshold]
        if matches:
            return min(matches)
        self._lsh.insert(key, m)
        self._signatures[key] = sig
        return None


def find_near_duplicates(docs: Iterable[tuple[int, str]], cfg: NearDupConfig,
                         counts: Counter | None = None) -> set[int]:
    """The keys of the documents that nearly duplicate an earlier one (first occurrence kept).

    ``docs`` is streamed once, in order, as ``(key, text)`` pairs with distinct keys (e.g. row
    numbers). Returns an empty set when ``cfg.enabled`` is false. With ``counts``, adds
    ``neardup.docs`` (documents seen) and ``neardup.dropped``. Holds ~5.5 KB per kept document:
    for corpora, see :func:`near_duplicates`.
    """
    if not cfg.enabled:
        return set()
    index = NearDupIndex(cfg)
    drop: set[int] = set()
    seen = 0
    for key, text in docs:
        seen += 1
        if index.add(key, text) is not None:
            drop.add(key)
    if counts is not None:
        counts["neardup.docs"] += seen
        counts["neardup.dropped"] += len(drop)
    return drop


# ---------------------------------------------------------------------------------------------
# the signature file of a unit
#
# Little-endian, no header (its shape is in the unit's JSON outcome, see SignatureWriter.finish):
#   documents x num_perm uint32   the signatures, one row per document in the unit's order
#   bands x documents uint64      the band hashes, band by band (a band pass reads one run)
# A document without shingles has the all-0xFFFFFFFF signature (datasketch's empty MinHash).


class SignatureWriter:
    """Streams the signatures of a unit's documents to ``f`` as they come; :meth:`finish`
    appends the band hashes. Band hashes are computed per batch of documents and spooled to an
    unnamed temp file (nothing is left behind by a kill), then transposed so that each band is
    one contiguous run: the worker holds a batch, never the unit."""

    def __init__(self, f: BinaryIO, cfg: NearDupConfig, spool_dir: str | Path | None = None):
        self.cfg = cfg
        self.signer = Signer(cfg)
        self.bands, self.rows = lsh_params(cfg.threshold, cfg.num_perm)
        self._f = f
        self._spool = tempfile.TemporaryFile(dir=spool_dir)
        self._batch: list[np.ndarray] = []
        self._empty = np.full(cfg.num_perm, _EMPTY, dtype=np.uint32)
        self.documents = 0
        self.without_shingles = 0

    def add(self, text: str) -> None:
        sig = self.signer.sign(text)
        if sig is None:
            self.without_shingles += 1
            sig = self._empty
        self._batch.append(sig)
        if len(self._batch) >= _WRITE_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            sigs = np.stack(self._batch)
            self._f.write(sigs.tobytes())
            self._spool.write(band_hashes(sigs, self.bands, self.rows).tobytes())
            self.documents += len(sigs)
            self._batch = []

    def close(self) -> None:
        """Drop the spool (finish does; call it when the unit is abandoned)."""
        self._spool.close()

    def finish(self) -> dict:
        """Write the band hashes; return the file's shape (for the unit's JSON outcome)."""
        self._flush()
        n, b = self.documents, self.bands
        base = self._f.tell()
        self._spool.seek(0)
        for lo in range(0, n, _WRITE_BATCH * 16):  # (rows x bands) blocks into (bands x n) runs
            block = np.frombuffer(self._spool.read(min(_WRITE_BATCH * 16, n - lo) * b * 8), dtype=np.uint64)
            block = block.reshape(-1, b)
            for j in range(b):
                self._f.seek(base + (j * n + lo) * 8)
                self._f.write(np.ascontiguousarray(block[:, j]).tobytes())
        self._f.seek(base + b * n * 8)
        self.close()
        return {"documents": n, "num_perm": self.cfg.num_perm, "bands": b, "rows": self.rows,
                "without_shingles": self.without_shingles}


@dataclass(frozen=True)
class SignatureFile:
    """A unit's signature file (see above), read band by band and row by row."""

    path: Path
    documents: int
    num_perm: int
    bands: int

    @classmethod
    def open(cls, path: str | Path, shape: dict) -> "SignatureFile":
        f = cls(Path(path), shape["documents"], shape["num_perm"], shape["bands"])
        want = f.documents * (4 * f.num_perm + 8 * f.bands)
        if f.path.stat().st_size != want:
            from llmforge.errors import DataError

            raise DataError(f"{f.path}: {f.path.stat().st_size} bytes, expected {want} for {f.documents} "
                            f"signatures of {f.num_perm} values and {f.bands} bands: remove it and its .json "
                            f"and run again")
        return f

    def band(self, j: int) -> np.ndarray:
        """Band ``j``'s hash of every document (read, not mapped: 8 bytes a document)."""
        offset = self.documents * 4 * self.num_perm + j * self.documents * 8
        return np.fromfile(self.path, dtype=np.uint64, count=self.documents, offset=offset)

    def signatures(self) -> np.ndarray:
        """Every signature, memory-mapped (``documents x num_perm``): rows are read when indexed."""
        return np.memmap(self.path, dtype=np.uint32, mode="r", shape=(self.documents, self.num_perm))


# ---------------------------------------------------------------------------------------------
# the corpus pass: band by band


def near_duplicates(files: list[SignatureFile], cfg: NearDupConfig, eligible: np.ndarray | None = None,
                    counts: Counter | None = None, max_partners: int = MAX_PARTNERS) -> np.ndarray:
    """The (sorted) indices of the documents that nearly duplicate an earlier kept one.

    Documents are numbered across ``files`` in order; only those where ``eligible`` is true
    take part (e.g. the survivors of exact dedup). The result is what :func:`find_near_duplicates`
    gives on the eligible documents in the same order, as long as no bucket holds more than
    ``max_partners + 1`` documents: in a bigger one (a template shared by thousands of pages)
    each document is compared with the first ``max_partners`` members only, which keeps the
    work linear; such buckets are counted. ``counts`` gets ``neardup.docs``, ``neardup.dropped``,
    ``neardup.candidate_pairs`` (pairs compared, over all bands), ``neardup.similar_pairs``
    (distinct pairs at or above the threshold), ``neardup.capped_buckets`` and
    ``neardup.capped_pairs`` (pairs not compared because of the cap).
    """
    counts = Counter() if counts is None else counts
    starts = np.cumsum([0] + [f.documents for f in files])
    total = int(starts[-1])
    eligible = np.ones(total, dtype=bool) if eligible is None else eligible
    if len(eligible) != total:
        raise ValueError(f"eligible has {len(eligible)} entries for {total} documents")
    if not cfg.enabled:
        return np.zeros(0, dtype=np.int64)
    if total >= 2**32:
        raise ValueError("near_duplicates numbers documents with 32 bits: split the corpus")
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
    if any((f.num_perm, f.bands) != (cfg.num_perm, bands) for f in files):
        raise ValueError(f"signature files were written for another num_perm or threshold than {cfg}")
    counts["neardup.docs"] += int(eligible.sum())
    empty = band_hashes(np.full((1, cfg.num_perm), _EMPTY, dtype=np.uint32), bands, rows)[0, 0]
    local = _participants(files, starts, eligible, empty)
    ids = np.concatenate([(s + idx).astype(np.uint32) for s, idx in zip(starts, local)] or [np.zeros(0, np.uint32)])
    similar = np.zeros(0, dtype=np.uint64)  # confirmed pairs as (later << 32 | earlier), sorted
    for j in range(bands):
        found = [np.zeros(0, dtype=np.uint64)]
        # the band column is built in the call so that only the generator holds it (it sorts a copy)
        for earlier, later in _bucket_pairs(_band_column(files, local, j), ids, max_partners, counts):
            key = (later.astype(np.uint64) << np.uint64(32)) | earlier.astype(np.uint64)
            new = ~np.isin(key, similar, assume_unique=True)  # confirmed in an earlier band already
            earlier, later, key = earlier[new], later[new], key[new]
            counts["neardup.candidate_pairs"] += len(key)
            found.append(key[_similar(files, starts, earlier, later, cfg.threshold)])
        similar = np.union1d(similar, np.concatenate(found))
    counts["neardup.similar_pairs"] += len(similar)
    dropped = _first_occurrence_wins(similar, total)
    counts["neardup.dropped"] += len(dropped)
    return dropped


def _participants(files: list[SignatureFile], starts: np.ndarray, eligible: np.ndarray,
                  empty_hash: np.uint64) -> list[np.ndarray]:
    """Per file, the local indices of its eligible documents that have shingles (uint32)."""
    out = []
    for f, s in zip(files, starts):
        ok = eligible[s : s + f.documents] & (f.band(0) != empty_hash)
        out.append(np.flatnonzero(ok).astype(np.uint32))
    return out


def _band_column(files: list[SignatureFile], local: list[np.ndarray], j: int) -> np.ndarray:
    """Band ``j``'s hash of each participating document, in document order (8 bytes each)."""
    return np.concatenate([f.band(j)[idx] for f, idx in zip(files, local)] or [np.zeros(0, np.uint64)])


def _bucket_pairs(h: np.ndarray, ids: np.ndarray, max_partners: int,
                  counts: Counter) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(earlier, later)`` document pairs with equal band hashes, at most ``_PAIR_CHUNK`` at a
    time: each document with the earlier members of its bucket (at most ``max_partners``)."""
    order = np.argsort(h, kind="stable")  # stable: ids stay ascending within a bucket
    h = h[order]
    same = h[1:] == h[:-1]
    del h
    # only documents in buckets of two or more matter: usually a small share of the corpus
    member = np.zeros(len(order), dtype=bool)
    member[1:] |= same
    member[:-1] |= same
    pos = np.flatnonzero(member)
    ids = ids[order[pos]]
    del order, member
    first = np.r_[True, ~same[pos[1:] - 1]] if len(pos) else np.zeros(0, dtype=bool)
    bucket_start = np.flatnonzero(first)
    sizes = np.diff(np.r_[bucket_start, len(pos)])
    offset = np.arange(len(pos)) - np.repeat(bucket_start, sizes)  # place within the bucket
    capped = sizes > max_partners + 1
    counts["neardup.capped_buckets"] += int(capped.sum())
    m = sizes[capped].astype(np.int64)
    counts["neardup.capped_pairs"] += int((m * (m - 1) // 2 - (max_partners * (max_partners + 1) // 2
                                                              + max_partners * (m - max_partners - 1))).sum())
    partners = np.minimum(offset, max_partners)
    starts_of = np.repeat(bucket_start, sizes)
    later = np.flatnonzero(partners)
    cum = np.cumsum(partners[later])
    cuts = np.searchsorted(cum, np.arange(_PAIR_CHUNK, cum[-1] if len(cum) else 0, _PAIR_CHUNK), side="right")
    for chunk in np.split(later, cuts):
        if len(chunk) == 0:
            continue
        n = partners[chunk]
        k = np.repeat(chunk, n)
        i = np.repeat(starts_of[chunk], n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
        yield ids[i].astype(np.int64), ids[k].astype(np.int64)


def _signature_rows(files: list[SignatureFile], starts: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The signatures of documents ``idx``, gathered file by file from memory maps that are
    dropped again at once (so the pages read never pile up in the process)."""
    out = np.empty((len(idx), files[0].num_perm), dtype=np.uint32)
    which = np.searchsorted(starts, idx, side="right") - 1
    order = np.argsort(which, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(which[order])) + 1)
    for g in groups:
        if len(g):
            u = int(which[g[0]])
            sigs = files[u].signatures()
            out[g] = sigs[idx[g] - starts[u]]
            del sigs
    return out


def _similar(files: list[SignatureFile], starts: np.ndarray, earlier: np.ndarray, later: np.ndarray,
             threshold: float) -> np.ndarray:
    """Whether each pair's estimated Jaccard similarity (the share of equal signature values)
    reaches ``threshold``; computed as the sequential index does, so the two agree exactly."""
    if len(earlier) == 0:
        return np.zeros(0, dtype=bool)
    a = _signature_rows(files, starts, earlier)
    b = _signature_rows(files, starts, later)
    return np.count_nonzero(a == b, axis=1) / a.shape[1] >= threshold


def _first_occurrence_wins(similar: np.ndarray, total: int) -> np.ndarray:
    """Settle the confirmed pairs (``later << 32 | earlier``, sorted: by later document, then
    earlier) in document order: a document is dropped when an earlier document it is similar
    to is kept. When document k comes up, every earlier one is already settled, so this is the
    sequential index's rule exactly."""
    dropped = bytearray(total)
    mask = np.uint64(0xFFFFFFFF)
    for later, earlier in zip((similar >> np.uint64(32)).tolist(), (similar & mask).tolist()):
        if not dropped[earlier]:
            dropped[later] = 1
    return np.flatnonzero(np.frombuffer(bytes(dropped), dtype=np.uint8)).astype(np.int64)
