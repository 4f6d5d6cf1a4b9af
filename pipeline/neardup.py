"""Near-duplicate detection: MinHash signatures + LSH banding (``datasketch``).

Exact deduplication (extract's content hash) misses the copies that differ by a few words: the
same article syndicated with another byline, a book in two transcriptions, a page with a
paragraph of boilerplate appended. Here every document becomes a set of shingles (word
``n``-grams of its lower-cased words, or character ``n``-grams), the set a MinHash signature of
``num_perm`` 32-bit values, and an LSH index over the signatures finds earlier documents whose
estimated Jaccard similarity is at least ``threshold``; the candidate is confirmed on the
signatures themselves (LSH banding alone lets through pairs somewhat below the threshold).

The first occurrence is kept and later ones are reported. Everything is deterministic: the
shingle hash is built from CRC-32 (not Python's salted ``hash``), and the permutations come
from a fixed ``seed``. Memory grows with the documents kept, never with their texts, which are streamed:
a signature (``4 * num_perm`` bytes) plus datasketch's LSH buckets, measured at ~5.5 KB per
kept document with the defaults (so ~1M documents per 5.5 GB: run large corpora per shard, or
lower ``num_perm``).

    from llmforge.pipeline.neardup import NearDupConfig, find_near_duplicates
    drop = find_near_duplicates(enumerate(texts), NearDupConfig(enabled=True))
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from typing import Iterable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

_WORD = re.compile(r"\w+")
_CHUNK = 8192  # shingles hashed per MinHash.update_batch call: bounds its (n x num_perm) temporary
_CANDIDATE_MARGIN = 0.1


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


_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio) for combining n-grams


def _token_codes(text: str, cfg: NearDupConfig) -> np.ndarray:
    """One uint64 per token: CRC-32 of each lower-cased word, or each character's code point."""
    if cfg.shingle == "char":
        flat = " ".join(text.lower().split())
        return np.frombuffer(flat.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    tokens = _WORD.findall(text.lower())
    # hash each distinct word once (a book has ~20k distinct words among ~200k)
    codes = {w: zlib.crc32(w.encode()) for w in set(tokens)}
    return np.fromiter(map(codes.__getitem__, tokens), dtype=np.uint64, count=len(tokens))


def shingle_hashes(text: str, cfg: NearDupConfig) -> list[int]:
    """The distinct 32-bit hashes of ``text``'s shingles ([] when it has no word or character).

    An n-gram's hash is a polynomial of its tokens' codes (wrapping uint64 arithmetic, folded
    to 32 bits), computed for all n-grams at once with numpy. A text shorter than one shingle
    is a single shingle, so short documents still compare.
    """
    codes = _token_codes(text, cfg)
    if len(codes) == 0:
        return []
    n = min(cfg.shingle_size, len(codes))
    count = len(codes) - n + 1
    h = codes[:count].copy()
    for j in range(1, n):
        h *= _MIX
        h += codes[j : j + count]
    h ^= h >> np.uint64(32)
    return np.unique(h.astype(np.uint32)).tolist()


class NearDupIndex:
    """Signatures of the documents kept so far, and an LSH index over them."""

    def __init__(self, cfg: NearDupConfig):
        self.cfg = cfg
        from datasketch import MinHash, MinHashLSH  # imported when used: it pulls in scipy

        # hashfunc=int: the values given are already CRC-32 hashes; int is a C call per value
        self._template = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=int)
        # LSH banding only proposes candidates, so it runs at a lower threshold: at the threshold
        # itself its S-curve lets pairs just above it slip through (planted test set: recall
        # 0.95, 0.98 with the margin); the signature check in add() keeps the threshold exact.
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
    ``neardup.docs`` (documents seen) and ``neardup.dropped``.
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
