"""bench/quality_per_minute.py scores held-out AUTHORS: every book of an author lands on one side of
the split, so the quality benchmark never scores text whose author the model was trained on."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from quality_per_minute import split_by_author  # noqa: E402


def _write_shard(path: Path, docs: list[dict]) -> None:
    path.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(d) + "\n" for d in docs).encode()))


def _read(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f))]


def test_every_book_of_an_author_lands_on_one_side(tmp_path):
    corpus = tmp_path / "gutenberg"
    corpus.mkdir()
    (corpus / "MANIFEST.json").write_text("{}")
    authors = ["Austen, Jane", "Kafka, Franz", "Twain, Mark", "Lockhart, Caroline", "Poe, Edgar Allan"]
    books = [{"id": f"{a}-{i}", "text": f"book {i} by {a}", "meta": {"author": a}}
             for i in range(7) for a in authors]
    # an author's books are spread over several shards, as in the real corpus
    for s in range(3):
        _write_shard(corpus / f"part-{s:03d}.jsonl.zst", books[s::3])
    heldout = ("Kafka, Franz", "Lockhart, Caroline")

    train, held = split_by_author(tmp_path / "cache", corpus, heldout)

    train_docs, held_docs = _read(train), _read(held)
    assert {d["meta"]["author"] for d in held_docs} == set(heldout)
    assert not {d["meta"]["author"] for d in train_docs} & set(heldout)
    # nothing lost, nothing duplicated: every book is on exactly one side
    assert sorted(d["id"] for d in train_docs + held_docs) == sorted(b["id"] for b in books)
    assert len(held_docs) == 14


def test_a_heldout_author_missing_from_the_corpus_is_an_error(tmp_path):
    corpus = tmp_path / "gutenberg"
    corpus.mkdir()
    (corpus / "MANIFEST.json").write_text("{}")
    _write_shard(corpus / "part-000.jsonl.zst", [{"id": "1", "text": "x", "meta": {"author": "Austen, Jane"}}])
    try:
        split_by_author(tmp_path / "cache", corpus, ("Kafka, Franz",))
    except SystemExit as e:
        assert "Kafka, Franz" in str(e)
    else:
        raise AssertionError("a missing held-out author was not reported")
    assert not list((tmp_path / "cache" / "corpus").iterdir())
