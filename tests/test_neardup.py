"""Near-duplicate detection: planted near-copies are found, distinct documents are not, the
result is reproducible, memory holds signatures, not texts; the corpus-scale pass (signature
files written by the clean workers, then band by band) drops exactly what the sequential index
drops, in a few bytes per document, and the clean stage using it resumes after a kill anywhere."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydantic
import pytest
import zstandard

from llmforge.pipeline.neardup import (NearDupConfig, NearDupIndex, Signer, SignatureFile, SignatureWriter,
                                       find_near_duplicates, near_duplicates)

try:
    from support.corpora import stdlib_paragraphs, write_jsonl
    from support.kills import count_commits, killed_at
except ImportError:  # tests/ imported as a package
    from tests.support.corpora import stdlib_paragraphs, write_jsonl
    from tests.support.kills import count_commits, killed_at


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



# ---------------------------------------------------------------------------------------------
# the corpus-scale pass: signature files, then band by band


def write_signature_files(directory: Path, texts: list[str], cfg: NearDupConfig, cuts: tuple[int, ...]) -> list:
    """The texts' signature files as the clean workers write them, one per slice between cuts."""
    directory.mkdir(parents=True, exist_ok=True)
    bounds = [0, *cuts, len(texts)]
    files = []
    for u, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        path = directory / f"unit-{u}.minhash"
        with open(path, "wb") as f:
            writer = SignatureWriter(f, cfg, spool_dir=directory)
            for text in texts[lo:hi]:
                writer.add(text)
            shape = writer.finish()
        files.append(SignatureFile.open(path, shape))
    return files


def chained_corpus(seed: int) -> list[str]:
    """Documents edited a few words at a time, each version kept: chains in which a version can be
    near the previous one but not the first, where "first kept occurrence wins" matters."""
    rng = random.Random(seed)
    docs = []
    for doc in distinct_docs(40, seed=3):
        for _ in range(rng.randint(1, 6)):
            docs.append(doc)
            doc = change_words(doc, rng.randint(1, 6), rng)
    rng.shuffle(docs)
    return docs


@pytest.mark.parametrize("shingle, size", [("word", 5), ("char", 9)])
def test_signatures_are_datasketchs_minhash_values(shingle, size):
    cfg = NearDupConfig(enabled=True, shingle=shingle, shingle_size=size)
    stream, _ = planted_corpus()
    book = "\n\n".join(distinct_docs(40, seed=8))  # more shingles than one numpy block holds
    index, signer = NearDupIndex(cfg), Signer(cfg)
    for text in [t for _, t in stream[::7]] + [book, "one", "x y"]:
        assert np.array_equal(signer.sign(text), index.minhash(text).hashvalues)
    assert signer.sign("") is None and index.minhash("") is None


@pytest.mark.parametrize("corpus, shingle, threshold", [("planted", "word", 0.8), ("planted", "char", 0.8),
                                                        ("chained", "word", 0.8), ("chained", "word", 0.7)])
def test_band_pass_drops_what_the_sequential_index_drops(tmp_path, corpus, shingle, threshold):
    cfg = NearDupConfig(enabled=True, shingle=shingle, shingle_size=5 if shingle == "word" else 9,
                        threshold=threshold)
    texts = [t for _, t in planted_corpus()[0]] if corpus == "planted" else chained_corpus(seed=2)
    texts = texts[:40] + ["", "!!!"] + texts[40:]  # documents without a shingle take no part
    rng = random.Random(4)
    eligible = np.array([rng.random() > 0.1 for _ in texts])  # as if exact dedup had dropped these
    expected = find_near_duplicates([(k, t) for k, t in enumerate(texts) if eligible[k]], cfg)
    files = write_signature_files(tmp_path, texts, cfg, cuts=(50, 51, 120))  # one file of one document
    counts = Counter()
    found = near_duplicates(files, cfg, eligible=eligible, counts=counts)
    print(f"{corpus} {shingle} at {threshold}: {len(found)} dropped of {len(texts)}; {dict(counts)}")
    assert len(expected) > 20 and found.tolist() == sorted(expected)
    assert counts["neardup.dropped"] == len(found) and counts["neardup.docs"] == eligible.sum()
    assert counts["neardup.similar_pairs"] >= len(found) and counts["neardup.candidate_pairs"] >= len(found)
    assert counts["neardup.capped_buckets"] == 0


def test_a_bucket_beyond_the_cap_is_counted_and_its_first_document_kept(tmp_path):
    cfg = NearDupConfig(enabled=True)
    rng = random.Random(5)
    original = distinct_docs(1, min_words=400, seed=9)[0]
    texts = [original] + [change_words(original, 1, rng) for _ in range(30)]  # one bucket of 31 in most bands
    files = write_signature_files(tmp_path, texts, cfg, cuts=(10,))
    counts = Counter()
    assert near_duplicates(files, cfg, counts=counts, max_partners=4).tolist() == list(range(1, 31))
    assert counts["neardup.capped_buckets"] > 0 and counts["neardup.capped_pairs"] > 0
    uncapped = Counter()
    assert near_duplicates(files, cfg, counts=uncapped).tolist() == list(range(1, 31))
    assert uncapped["neardup.capped_buckets"] == 0
    assert counts["neardup.candidate_pairs"] < uncapped["neardup.candidate_pairs"]


_MEMORY_CHILD = """
import json, sys, tracemalloc
from collections import Counter
from pathlib import Path
from llmforge.pipeline.neardup import NearDupConfig, SignatureFile, near_duplicates
cfg = NearDupConfig(enabled=True)
files = [SignatureFile.open(Path(p), shape) for p, shape in json.loads(sys.argv[1])]
def status(field):  # kB in /proc/self/status
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
near_duplicates(files[:1], cfg)  # imports and first-call allocations before the baseline
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS, so the peak below is the pass's
except OSError:
    pass  # then the peak since start: imports included, so an upper bound of the pass's
before = status("VmRSS")
tracemalloc.start()
counts = Counter()
dropped = near_duplicates(files, cfg, counts=counts)
traced = tracemalloc.get_traced_memory()[1]
grown = status("VmHWM") - before
print(json.dumps({"grown": grown, "traced": traced, "dropped": len(dropped), "counts": counts}))
"""


def test_band_pass_memory_is_a_few_bytes_per_document_not_a_signature(tmp_path):
    """20k short documents, 4% of them near copies: the pass's peak RSS (a fresh process) grows by
    a few MB, where the sequential index holds ~5.5 KB a document (~110 MB here)."""
    rng = random.Random(3)
    vocab = sorted({w for p in stdlib_paragraphs() for w in p.split()})
    texts = []
    for _ in range(20_000):
        if texts and rng.random() < 0.04:
            words = texts[-1].split()
            words[rng.randrange(len(words))] = "zebra"
            texts.append(" ".join(words))
        else:
            texts.append(" ".join(rng.choices(vocab, k=80)))
    cfg = NearDupConfig(enabled=True)
    files = write_signature_files(tmp_path, texts, cfg, cuts=(5000, 10000, 15000))
    arg = json.dumps([[str(f.path), {"documents": f.documents, "num_perm": f.num_perm, "bands": f.bands}]
                      for f in files])
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, arg], capture_output=True, text=True,
                         timeout=120, check=True)
    r = json.loads(out.stdout)
    n = len(texts)
    print(f"{n} documents, {r['dropped']} dropped: peak RSS +{r['grown'] / 1e6:.1f} MB, numpy peak "
          f"{r['traced'] / 1e6:.2f} MB ({r['traced'] / n:.0f} B per document); {r['counts']}")
    assert r["dropped"] > 600 and r["counts"]["neardup.capped_buckets"] == 0
    # measured: +~3 MB, numpy peak ~35 B per document (a band's hashes, their sort order, the ids)
    assert r["traced"] < 64 * n + 2_000_000
    assert r["grown"] < 8_000_000 + 100 * n


# ---------------------------------------------------------------------------------------------
# the clean stage with near-dup removal on


def _clean_stage(tmp_path: Path, out: Path, texts: list[str]):
    from llmforge.pipeline.config import CorpusSpec
    from llmforge.pipeline.prepare import Prepare

    sources = []
    for i, part in enumerate((texts[:60], texts[60:110], texts[110:])):  # three sources: three units
        path = tmp_path / "src" / f"s{i}.jsonl"
        if not path.exists():
            write_jsonl(path, part)
        sources.append({"url": str(path)})
    spec = CorpusSpec.load({"name": "nd", "sources": sources, "clean": {"quality": False, "min_chars": 20},
                            "neardup": {"enabled": True}, "split": {"val_fraction": 0.1, "part_bytes": 30_000}})
    plan = Prepare(spec, out)
    return plan.clean([d.completed() or d.run(progress=False) for d in plan.downloads])


def _kept_texts(stage, manifest) -> list[str]:
    return [t for split in ("train", "val") for p in stage.parts(manifest)[split]
            for t in pq.read_table(p, columns=["text"]).column("text").to_pylist()]


def test_clean_stage_drops_the_planted_copies_and_keeps_only_parts(tmp_path):
    stream, _ = planted_corpus()
    texts = [t for _, t in stream] + [stream[3][1]]  # and one exact duplicate
    stage = _clean_stage(tmp_path, tmp_path / "out", texts)
    manifest, _ = stage.ensure()
    expected = find_near_duplicates(stream, NearDupConfig(enabled=True))
    kept = _kept_texts(stage, manifest)
    assert sorted(kept) == sorted(t for k, t in stream if k not in expected)
    c = manifest["stats"]["counts"]
    assert c["dropped.near_duplicate"] == c["neardup.dropped"] == len(expected) > 50
    assert c["dropped.duplicate"] == 1 and c["neardup.docs"] == len(stream)
    assert c["neardup.candidate_pairs"] >= len(expected) and c["neardup.capped_buckets"] == 0
    units = sorted((stage.out_dir / "units").iterdir())
    assert [p.suffix for p in units] == [".json"] * 3  # text and signatures removed with the manifest
    shapes = [json.loads(p.read_text())["minhash"] for p in units]
    assert sum(s["documents"] for s in shapes) == len(texts) and all(s["bands"] == 14 for s in shapes)
    assert manifest["disk_bytes_peak"] > manifest["disk_bytes"] + 624 * len(texts)  # the signatures counted


@pytest.mark.slow
def test_a_kill_at_any_commit_of_the_clean_stage_then_a_rerun_gives_the_same_parts(tmp_path, monkeypatch):
    """Stop the stage just before and just after each file it renames into place (as a kill -9
    would), run it again, and compare the parts with an uninterrupted run."""
    texts = [t for _, t in planted_corpus()[0]]

    def digest(stage, manifest) -> dict:
        return {f"{s}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
                for s in ("train", "val") for p in stage.parts(manifest)[s]}

    ref_stage = _clean_stage(tmp_path, tmp_path / "ref", texts)
    with count_commits(monkeypatch) as commits:
        ref_manifest = ref_stage.run()
    ref = digest(ref_stage, ref_manifest)
    assert commits[0] >= 12 and len(ref) >= 3
    for k in range(1, commits[0] + 1):
        for after in (False, True):
            stage = _clean_stage(tmp_path, tmp_path / f"kill-{k}-{after}", texts)
            killed_at(monkeypatch, k, after, stage.run)
            done = {p: p.stat().st_mtime_ns for p in stage.out_dir.glob("units/*.json")}
            manifest, _ = stage.ensure()
            assert {p: p.stat().st_mtime_ns for p in done} == done, (k, after)  # finished units are not redone
            assert digest(stage, manifest) == ref, (k, after)
            assert manifest["stats"]["counts"] == ref_manifest["stats"]["counts"], (k, after)
            assert not list(stage.out_dir.glob("units/*.minhash")) and not list(stage.out_dir.glob("units/.*"))
