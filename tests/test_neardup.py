"""Near-duplicate detection: planted near-copies are found, distinct documents are not, the
result is reproducible, and memory holds signatures, not texts."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import time
import tracemalloc
from collections import Counter

import pydantic
import pytest
import zstandard

from llmforge.pipeline.neardup import NearDupConfig, NearDupIndex, find_near_duplicates

try:
    from support.corpora import stdlib_paragraphs
except ImportError:  # tests/ imported as a package
    from tests.support.corpora import stdlib_paragraphs


def distinct_docs(n: int, min_words: int = 250, seed: int = 0) -> list[str]:
    """``n`` documents of real prose that share no paragraph (stdlib docstrings: ~28k words in
    all, so about 100 documents of web-page length)."""
    pars = [p for p in dict.fromkeys(stdlib_paragraphs()) if len(p.split()) >= 12]
    random.Random(seed).shuffle(pars)
    docs, cur, words = [], [], 0
    for p in pars:
        cur.append(p)
        words += len(p.split())
        if words >= min_words:
            docs.append("\n\n".join(cur))
            cur, words = [], 0
            if len(docs) == n:
                return docs
    raise AssertionError(f"only {len(docs)} documents of {min_words} words in the stdlib")


def change_words(doc: str, k: int, rng: random.Random) -> str:
    words = doc.split(" ")
    for i in rng.sample(range(len(words)), k):
        words[i] = rng.choice(["quantum", "zebra", "marmalade", "lighthouse", "origami"])
    return " ".join(words)


def planted_corpus(seed: int = 1) -> tuple[list[tuple[int, str]], set[int]]:
    """90 distinct documents, then 60 planted near copies of some of them interleaved with 10
    more distinct ones; returns the stream and the keys that should be dropped."""
    rng = random.Random(seed)
    base = distinct_docs(100, seed=seed)
    originals, extra = base[:90], base[90:]
    stream = list(enumerate(originals))
    planted: set[int] = set()
    tail: list[tuple[str, bool]] = [(d, False) for d in extra]
    appendix = extra[-1].split("\n\n")[0]  # a paragraph from elsewhere
    for i, doc in enumerate(originals[:60]):
        kind = i % 3
        if kind == 0:
            copy = change_words(doc, 3, rng)  # a few words changed
        elif kind == 1:
            copy = doc + "\n\n" + appendix  # a paragraph appended
        else:
            copy = doc.upper().replace("\n\n", "\n").replace(". ", ".\n")  # case and layout
        tail.append((copy, True))
    rng.shuffle(tail)
    for text, is_copy in tail:
        key = len(stream)
        stream.append((key, text))
        if is_copy:
            planted.add(key)
    return stream, planted


def precision_recall(found: set[int], planted: set[int]) -> tuple[float, float]:
    hits = len(found & planted)
    return hits / max(1, len(found)), hits / len(planted)


# Measured true Jaccard of the planted copies: 0.88-1.0 with word 5-grams, 0.93-1.0 with
# character 9-grams; of the distinct documents at most 0.08 and 0.11.
@pytest.mark.parametrize("shingle, size, threshold", [("word", 5, 0.8), ("char", 9, 0.8)])
def test_planted_near_duplicates_are_found_and_distinct_documents_are_not(shingle, size, threshold):
    stream, planted = planted_corpus()
    counts = Counter()
    cfg = NearDupConfig(enabled=True, shingle=shingle, shingle_size=size, threshold=threshold)
    found = find_near_duplicates(iter(stream), cfg, counts)
    precision, recall = precision_recall(found, planted)
    print(f"{shingle} {size}-grams at {threshold}: {len(planted)} planted among {len(stream)}: found {len(found)}, "
          f"precision {precision:.3f}, recall {recall:.3f}")
    assert found <= {k for k, _ in stream[90:]}, "an original (first occurrence) was dropped"
    assert precision >= 0.98 and recall >= 0.95
    assert counts == Counter({"neardup.docs": len(stream), "neardup.dropped": len(found)})


def test_threshold_separates_half_overlapping_documents():
    a, b, c = distinct_docs(3, min_words=300, seed=5)
    half = a.split("\n\n")
    mixed = "\n\n".join(half[: len(half) // 2] + b.split("\n\n")[: len(half) // 2])  # ~half of a
    docs = [(0, a), (1, b), (2, c), (3, mixed)]
    assert find_near_duplicates(docs, NearDupConfig(enabled=True)) == set()
    assert find_near_duplicates(docs, NearDupConfig(enabled=True, threshold=0.2)) == {3}


def test_index_reports_the_earliest_original():
    a, b = distinct_docs(2, seed=6)
    index = NearDupIndex(NearDupConfig(enabled=True))
    assert [index.add(k, t) for k, t in [(10, a), (11, b), (12, a + " fin"), (13, b.upper()), (14, "")]] == \
        [None, None, 10, 11, None]
    assert len(index) == 2  # duplicates and empty texts are not indexed


_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_neardup import planted_corpus
from llmforge.pipeline.neardup import NearDupConfig, find_near_duplicates
stream, _ = planted_corpus()
print(json.dumps(sorted(find_near_duplicates(stream, NearDupConfig(enabled=True, num_perm=64)))))
"""


def test_results_are_identical_across_processes_and_hash_seeds():
    here = os.path.dirname(__file__)
    runs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", _CHILD, here, os.path.join(here, "support")],
                             capture_output=True, text=True, env=env, timeout=120, check=True)
        runs.append(json.loads(out.stdout))
    assert runs[0] == runs[1] and runs[0]


def test_memory_holds_signatures_not_texts():
    rng = random.Random(7)
    vocab = sorted({w for p in stdlib_paragraphs() for w in p.split()})
    docs = (" ".join(rng.choices(vocab, k=5000)) for _ in range(120))  # streamed, ~5 MB in all
    text_bytes = 0
    tracemalloc.start()
    try:
        index = NearDupIndex(NearDupConfig(enabled=True))
        for k, d in enumerate(docs):
            text_bytes += len(d)
            assert index.add(k, d) is None
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_doc = retained / len(index)
    print(f"{len(index)} docs, {text_bytes / 1e6:.1f} MB of text: index holds {retained / 1e6:.2f} MB "
          f"({per_doc:.0f} B per document)")
    # measured ~5.4 KB per document: the signature (512 B) and datasketch's LSH buckets (14 bands)
    assert per_doc < 8000 and retained < text_bytes / 4


def test_config_is_strict_and_disabled_by_default():
    assert find_near_duplicates([(0, "a b c"), (1, "a b c")], NearDupConfig()) == set()
    assert find_near_duplicates([(0, "a b c"), (1, "a b c")], NearDupConfig(enabled=True)) == {1}
    with pytest.raises(pydantic.ValidationError):
        NearDupConfig(treshold=0.5)
    with pytest.raises(pydantic.ValidationError):
        NearDupConfig(threshold=1.5)
    assert all(f.description for f in NearDupConfig.model_fields.values())


@pytest.mark.needs_shared
def test_finds_the_repeated_books_of_the_shared_gutenberg_corpus(shared_corpus):
    """Speed on real books, and every book it drops has the same title as the one it keeps."""
    titles, texts, size = [], [], 0
    for shard in sorted(shared_corpus.glob("*.jsonl.zst"))[2:4]:
        with open(shard, "rb") as f:
            for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
                obj = json.loads(line)
                titles.append(obj["meta"]["title"])
                texts.append(obj["text"])
                size += len(obj["text"].encode())
                if size > 12e6:
                    break
        if size > 12e6:
            break
    index = NearDupIndex(NearDupConfig(enabled=True))
    t0 = time.perf_counter()
    pairs = {k: index.add(k, t) for k, t in enumerate(texts)}
    secs = time.perf_counter() - t0
    dups = {k: orig for k, orig in pairs.items() if orig is not None}
    print(f"{len(texts)} books, {size / 1e6:.1f} MB: {len(texts) / secs:.1f} docs/s, {size / 1e6 / secs:.2f} MB/s; "
          f"dropped {[titles[k] for k in dups]}")
    assert dups and all(titles[k] == titles[orig] for k, orig in dups.items())
