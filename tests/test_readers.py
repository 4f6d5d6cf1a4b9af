"""Streaming corpus readers: every layout round-trips, every bad input is counted and named."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import lzma
import os
import tarfile
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from llmforge.pipeline.readers import RawDoc, ReadLimits, ReadStats, detect_format, iter_documents

try:
    from support.corpora import (
        TarMember, binary_blob, owt_doc_name, sample_texts, truncate, unsafe_members, write_jsonl,
        write_openwebtext_tar, write_parquet, write_tar_members, write_text_dir, write_text_tar,
    )
except ImportError:  # tests/ imported as a package
    from tests.support.corpora import (
        TarMember, binary_blob, owt_doc_name, sample_texts, truncate, unsafe_members, write_jsonl,
        write_openwebtext_tar, write_parquet, write_tar_members, write_text_dir, write_text_tar,
    )


def read(path: Path, **kw) -> tuple[list[RawDoc], ReadStats]:
    stats = ReadStats()
    return list(iter_documents(path, stats=stats, **kw)), stats


def texts(docs: list[RawDoc]) -> list[str]:
    return [d.data.decode("utf-8") if isinstance(d.data, bytes) else d.data for d in docs]


def errors(stats: ReadStats) -> dict[str, int]:
    return {k: v for k, v in stats.counts.items() if k.startswith("read_error.")}


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return sample_texts(60, seed=3)


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name", ["openwebtext.tar.xz", "urlsf_subset00.tar"])
def test_reads_openwebtext_layout(tmp_path, docs, name):
    path = tmp_path / name
    member_paths = write_openwebtext_tar(path, docs, docs_per_subarchive=25)
    assert detect_format(path) == "openwebtext"
    out, stats = read(path, label="owt")
    assert texts(out) == docs
    assert [d.id for d in out] == [f"owt:{p}" for p in member_paths]
    assert out[0].id == f"owt:openwebtext/urlsf_subset00-1_data.xz/{owt_doc_name(0, docs[0])}"
    assert all(isinstance(d.data, bytes) for d in out)
    assert errors(stats) == {} and stats.counts["docs"] == len(docs)


@pytest.mark.parametrize("name", ["a.tar", "a.tar.gz", "a.tgz", "a.tar.xz", "a.tar.bz2", "a.tar.zst"])
def test_reads_tar_of_text_files(tmp_path, docs, name):
    path = tmp_path / name
    members = write_text_tar(path, docs)
    assert detect_format(path) == "tar"
    out, stats = read(path)
    assert texts(out) == docs
    assert [d.id for d in out] == [f"{name}:{m}" for m in members]
    assert errors(stats) == {}


@pytest.mark.parametrize(
    "name, compression",
    [("a.jsonl", None), ("a.jsonl.gz", "gz"), ("a.jsonl.zst", "zst"), ("a.jsonl.xz", "xz"), ("c4-0001.json.gz", "gz")],
)
def test_reads_jsonl(tmp_path, docs, name, compression):
    path = write_jsonl(tmp_path / name, docs, compression=compression)
    assert detect_format(path) == "jsonl"
    out, stats = read(path, label="pile")
    assert texts(out) == docs
    assert [d.id for d in out] == [f"pile:{i}" for i in range(1, len(docs) + 1)]
    assert all(isinstance(d.data, str) for d in out)
    assert errors(stats) == {}


def test_reads_jsonl_with_custom_text_key(tmp_path, docs):
    path = write_jsonl(tmp_path / "a.jsonl", docs, text_key="content")
    out, stats = read(path, text_key="content")
    assert texts(out) == docs and errors(stats) == {}


def test_reads_parquet_across_row_groups_with_custom_column(tmp_path, docs):
    path = write_parquet(tmp_path / "fineweb.parquet", docs, column="content", row_group_size=7)
    assert detect_format(path) == "parquet"
    out, stats = read(path, text_key="content", label="fw")
    assert texts(out) == docs
    assert [d.id for d in out] == [f"fw:{i}" for i in range(len(docs))]
    assert errors(stats) == {}


def test_reads_text_directory_recursively_in_sorted_order(tmp_path, docs):
    rels = write_text_dir(tmp_path / "books", docs, per_subdir=7)
    (tmp_path / "books" / ".git").mkdir()
    (tmp_path / "books" / ".git" / "HEAD").write_text("ref: refs/heads/main\n" * 20)
    (tmp_path / "books" / ".DS_Store").write_bytes(b"hidden")
    assert detect_format(tmp_path / "books") == "dir"
    out, stats = read(tmp_path / "books")
    assert texts(out) == docs
    assert [d.id for d in out] == [f"books:{r}" for r in rels]
    assert stats.counts["files"] == len(docs) and errors(stats) == {}


def test_directory_include_and_exclude_globs(tmp_path, docs):
    root = tmp_path / "mixed"
    write_text_dir(root / "text", docs[:10])
    write_jsonl(root / "json" / "part-0.jsonl.zst", docs[10:20], compression="zst")
    write_parquet(root / "pq" / "part-0.parquet", docs[20:30])
    (root / "notes.md").write_text(docs[30])

    out, stats = read(root, label="m")
    # sorted by relative path: json/, notes.md, pq/, text/
    assert texts(out) == docs[10:20] + [docs[30]] + docs[20:30] + docs[:10]
    assert out[0].id == "m:json/part-0.jsonl.zst:1"
    assert out[10].id == "m:notes.md"
    assert out[11].id == "m:pq/part-0.parquet:0"
    assert out[21].id == "m:text/000/00000.txt"
    assert errors(stats) == {}

    only_text, _ = read(root, include=["*.txt"])
    assert texts(only_text) == docs[:10]
    no_json, _ = read(root, exclude=["json/*", "*.md"])
    assert texts(no_json) == docs[20:30] + docs[:10]


def test_reads_single_text_files_plain_and_compressed(tmp_path, docs):
    plain = tmp_path / "book.txt"
    plain.write_text(docs[0])
    gz = tmp_path / "book.md.gz"
    gz.write_bytes(gzip.compress(docs[1].encode()))
    zst = tmp_path / "module.py.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(docs[2].encode()))
    for path, text in ((plain, docs[0]), (gz, docs[1]), (zst, docs[2])):
        assert detect_format(path) == "text"
        out, stats = read(path)
        assert texts(out) == [text] and out[0].id == f"{path.name}:{path.name}"
        assert errors(stats) == {}


def test_splits_text_files_at_a_separator_streaming(tmp_path, docs):
    big = "once upon a time " * 80_000  # 1.4 MB: spans several read chunks
    stories = [docs[0], big, docs[1], docs[2]]
    body = "\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n\n<|endoftext|>\n"
    plain = tmp_path / "TinyStories-valid.txt"
    plain.write_text(body)
    gz = tmp_path / "TinyStories-valid.txt.gz"
    gz.write_bytes(gzip.compress(body.encode()))
    for path in (plain, gz):
        out, stats = read(path, fmt="text", separator="<|endoftext|>", label="ts")
        assert texts(out) == [s.strip() for s in stories]
        assert [d.id for d in out] == ["ts:1", "ts:2", "ts:3", "ts:4"]
        assert stats.counts["blank_documents"] == 1 and errors(stats) == {}
    # a separator cut by the chunk boundary is still found
    cut = tmp_path / "cut.txt"
    first = "x" * ((1 << 20) + 8192 - 5)
    cut.write_text(first + "<|endoftext|>" + docs[3])
    out, _ = read(cut, separator="<|endoftext|>")
    assert texts(out) == [first, docs[3]]


def test_detects_formats_by_magic_bytes_without_extensions(tmp_path, docs):
    write_jsonl(tmp_path / "j", docs[:3], compression="zst")
    write_text_tar(tmp_path / "t.tar.gz", docs[:3])
    os.rename(tmp_path / "t.tar.gz", tmp_path / "t")
    write_openwebtext_tar(tmp_path / "o.tar.xz", docs[:3])
    os.rename(tmp_path / "o.tar.xz", tmp_path / "o")
    write_parquet(tmp_path / "p", docs[:3])
    (tmp_path / "README").write_text(docs[0])
    # one OpenWebText sub-archive on its own: an xz tar named only *.xz
    outer = tarfile.open(tmp_path / "o")
    sub = outer.extractfile("openwebtext/urlsf_subset00-1_data.xz").read()
    (tmp_path / "urlsf_subset00-1_data.xz").write_bytes(sub)

    assert detect_format(tmp_path / "j") == "jsonl"
    assert detect_format(tmp_path / "t") == "tar"
    assert detect_format(tmp_path / "o") == "openwebtext"
    assert detect_format(tmp_path / "p") == "parquet"
    assert detect_format(tmp_path / "README") == "text"
    assert detect_format(tmp_path / "urlsf_subset00-1_data.xz") == "tar"
    for name in ("j", "t", "o", "p", "urlsf_subset00-1_data.xz"):
        out, stats = read(tmp_path / name)
        assert texts(out) == docs[:3], name
        assert errors(stats) == {}


def test_text_that_starts_like_a_magic_number_is_still_text(tmp_path, docs):
    path = tmp_path / "notes"
    path.write_text("BZh is how bzip2 files begin, but this is a note. " + docs[0])
    bz = tmp_path / "doc"
    bz.write_bytes(bz2.compress(docs[1].encode()))
    assert detect_format(path) == "text" and detect_format(bz) == "text"
    assert texts(read(path)[0]) == [path.read_text()]
    assert texts(read(bz)[0]) == [docs[1]]


def test_ids_are_stable_across_reads(tmp_path, docs):
    path = tmp_path / "owt.tar.xz"
    write_openwebtext_tar(path, docs, docs_per_subarchive=10)
    first, _ = read(path)
    second, _ = read(path)
    assert [d.id for d in first] == [d.id for d in second]
    assert len({d.id for d in first}) == len(docs)


def test_reads_jsonl_and_text_members_inside_a_tar(tmp_path, docs):
    write_jsonl(tmp_path / "part.jsonl.gz", docs[:5], compression="gz")
    write_tar_members(
        tmp_path / "bundle.tar",
        [TarMember("data/part.jsonl.gz", (tmp_path / "part.jsonl.gz").read_bytes()),
         TarMember("data/readme.txt", docs[5].encode())],
    )
    out, stats = read(tmp_path / "bundle.tar", label="b")
    assert texts(out) == docs[:6]
    assert [d.id for d in out[:2]] == ["b:data/part.jsonl.gz:1", "b:data/part.jsonl.gz:2"]
    assert out[5].id == "b:data/readme.txt"
    assert errors(stats) == {}


# ---------------------------------------------------------------------------------------------
# Bad input: counted, named, never fatal, never costs good documents


def assert_prefix_then_truncated(path: Path, out: list[RawDoc], stats: ReadStats, docs: list[str]) -> None:
    got = texts(out)
    assert got == docs[: len(got)], "documents before the cut must come through intact and in order"
    assert errors(stats) == {"read_error.truncated": 1}
    assert str(path) in stats.errors[0] and "truncated" in stats.errors[0]


@pytest.mark.parametrize(
    "name, compression", [("c.jsonl.gz", "gz"), ("c.jsonl.zst", "zst"), ("c.jsonl.xz", "xz")]
)
def test_keeps_documents_before_truncation_of_compressed_jsonl(tmp_path, name, compression):
    docs = sample_texts(600, seed=5)
    path = write_jsonl(tmp_path / name, docs, compression=compression)
    truncate(path, 0.6)
    out, stats = read(path)
    assert 0.2 * len(docs) < len(out) < len(docs)
    assert_prefix_then_truncated(path, out, stats, docs)


@pytest.mark.parametrize("name", ["owt.tar.xz", "owt.tar"])
def test_keeps_documents_before_truncation_of_openwebtext_tar(tmp_path, name):
    docs = sample_texts(600, seed=6)
    path = tmp_path / name
    write_openwebtext_tar(path, docs, docs_per_subarchive=50)
    truncate(path, 0.6)
    out, stats = read(path)
    assert 0.2 * len(docs) < len(out) < len(docs)
    assert_prefix_then_truncated(path, out, stats, docs)


@pytest.mark.parametrize("name", ["t.tar.gz", "t.tar.zst", "t.tar"])
def test_keeps_documents_before_truncation_of_text_tar(tmp_path, name):
    docs = sample_texts(600, seed=7)
    path = tmp_path / name
    write_text_tar(path, docs)
    truncate(path, 0.6)
    out, stats = read(path)
    assert 0.2 * len(docs) < len(out) < len(docs)
    assert_prefix_then_truncated(path, out, stats, docs)


def test_detects_tar_cut_inside_a_member_header(tmp_path, docs):
    path = tmp_path / "cut.tar"
    write_text_tar(path, docs[:3])
    with tarfile.open(path) as tf:
        third = tf.getmembers()[2]
    truncate(path, (third.offset + 100) / path.stat().st_size)  # inside the third header
    out, stats = read(path)
    assert texts(out) == docs[:2]
    assert errors(stats) == {"read_error.truncated": 1}
    assert str(path) in stats.errors[0]


def test_truncated_single_text_file_yields_nothing_partial(tmp_path, docs):
    path = tmp_path / "book.txt.xz"
    path.write_bytes(lzma.compress("\n\n".join(docs).encode()))
    truncate(path, 0.5)
    out, stats = read(path)
    assert out == []
    assert errors(stats) == {"read_error.truncated": 1} and str(path) in stats.errors[0]


def test_skips_corrupt_openwebtext_subarchive_and_keeps_the_rest(tmp_path, docs):
    good = tmp_path / "good.tar"
    paths = write_openwebtext_tar(good, docs, docs_per_subarchive=20)
    with tarfile.open(good) as tf:
        subs = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    broken = subs[1][1][: len(subs[1][1]) // 2]
    bad = tmp_path / "bad.tar"
    write_tar_members(bad, [TarMember(subs[0][0], subs[0][1]), TarMember(subs[1][0], broken),
                            TarMember(subs[2][0], subs[2][1])])
    out, stats = read(bad)
    got = texts(out)
    assert got[:20] == docs[:20] and got[-20:] == docs[40:]
    assert set(got[20:-20]) <= set(docs[20:40])  # whatever of the cut sub-archive was complete
    assert errors(stats) == {"read_error.truncated": 1}
    assert f"{bad}:{subs[1][0]}" in stats.errors[0]
    assert [d.id for d in out[-20:]] == [f"bad.tar:{p}" for p in paths[40:]]


def test_counts_bad_json_lines_with_line_numbers(tmp_path, docs):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": docs[0]}), "{not json", json.dumps({"text": docs[1]}), "",
             json.dumps({"text": docs[2]})[:-1], json.dumps({"text": docs[3]})]
    path.write_text("\n".join(lines) + "\n")
    out, stats = read(path, label="m")
    assert texts(out) == [docs[0], docs[1], docs[3]]
    assert [d.id for d in out] == ["m:1", "m:3", "m:6"]
    assert errors(stats) == {"read_error.bad_json": 2}
    assert stats.counts["blank_lines"] == 1
    assert stats.errors[0].startswith(f"{path}: line 2: not valid JSON")
    assert stats.errors[1].startswith(f"{path}: line 5: not valid JSON")


def test_counts_missing_or_non_string_text(tmp_path, docs):
    path = tmp_path / "keys.jsonl"
    lines = [{"text": docs[0]}, {"content": docs[1]}, {"text": 42}, {"text": None}, ["a list"], {"text": docs[2]}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out, stats = read(path)
    assert texts(out) == [docs[0], docs[2]]
    assert errors(stats) == {"read_error.missing_text_key": 4}
    assert f"{path}: line 2: no 'text' key" in stats.errors
    assert f"{path}: line 3: 'text' is int, not a string" in stats.errors
    assert f"{path}: line 5: not a JSON object" in stats.errors


def test_replaces_invalid_utf8_in_a_jsonl_line(tmp_path, docs):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"text": docs[0]}).encode()
    bad = json.dumps({"text": "caf\u00e9 au lait"}, ensure_ascii=False).encode("latin-1")
    path.write_bytes(good + b"\n" + bad + b"\n")
    out, stats = read(path)
    assert texts(out) == [docs[0], "caf\ufffd au lait"]
    assert errors(stats) == {"read_error.jsonl_bad_utf8": 1}
    assert stats.errors[0].startswith(f"{path}: line 2: invalid UTF-8")


def test_reads_jsonl_with_byte_order_mark(tmp_path, docs):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": docs[0]}).encode() + b"\n")
    out, stats = read(path)
    assert texts(out) == [docs[0]] and errors(stats) == {}


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "empty.jsonl.gz", "empty.tar", "empty.parquet"])
def test_counts_empty_files(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(b""))
    else:
        path.write_bytes(b"")
    out, stats = read(path)
    assert out == []
    assert errors(stats) == {"read_error.empty_file": 1}
    assert len(stats.errors) == 1 and stats.errors[0].startswith(f"{path}: empty")


def test_counts_empty_file_in_directory_and_keeps_others(tmp_path, docs):
    write_text_dir(tmp_path / "d", docs[:3])
    (tmp_path / "d" / "000" / "00001.txt").write_bytes(b"")
    out, stats = read(tmp_path / "d")
    assert texts(out) == [docs[0], docs[2]]
    assert errors(stats) == {"read_error.empty_file": 1}
    assert str(tmp_path / "d" / "000" / "00001.txt") in stats.errors[0]


def test_streams_a_50mb_document_without_newlines(tmp_path):
    big = "lorem ipsum dolor sit amet " * 2_000_000  # 54 MB, one line
    jl = tmp_path / "big.jsonl.zst"
    jl.write_bytes(zstandard.ZstdCompressor(level=1).compress(
        (json.dumps({"text": "small"}) + "\n" + json.dumps({"text": big}) + "\n").encode()))
    out, stats = read(jl)
    assert [len(t) for t in texts(out)] == [5, len(big)] and texts(out)[1] == big
    txt = tmp_path / "big.txt"
    txt.write_text(big)
    out, stats = read(txt)
    assert len(out) == 1 and out[0].data == big.encode()
    assert errors(stats) == {}


def test_document_over_the_cap_is_skipped_and_counted_in_every_format(tmp_path):
    """The 50 MB document above passes the default cap (64 MiB); a smaller configured cap
    skips longer documents, names them, and keeps reading the lines/members after them."""
    short = sample_texts(2, seed=12)
    long = "too long to keep " * 300  # 5,100 bytes
    limits = ReadLimits(max_document_bytes=4000)
    three = [short[0], long, short[1]]

    jl = write_jsonl(tmp_path / "a.jsonl.gz", three, compression="gz")
    d = tmp_path / "d"
    write_text_dir(d, three)
    tar = tmp_path / "t.tar.zst"
    write_text_tar(tar, three)
    sep = tmp_path / "s.txt"
    sep.write_text("\n<|endoftext|>\n".join(three))
    sep_last = tmp_path / "s2.txt"
    sep_last.write_text("\n<|endoftext|>\n".join([short[0], long]))
    pq_path = write_parquet(tmp_path / "p.parquet", three)
    cases = [
        (jl, {}, ["a.jsonl.gz:1", "a.jsonl.gz:3"], f"{jl}: line 2 is longer"),
        (d, {}, ["d:000/00000.txt", "d:000/00002.txt"], f"{d / '000' / '00001.txt'}: document is longer"),
        (tar, {}, ["t.tar.zst:docs/00000.txt", "t.tar.zst:docs/00002.txt"], f"{tar}:docs/00001.txt: document is longer"),
        (sep, {"separator": "<|endoftext|>"}, ["s.txt:1", "s.txt:3"], f"{sep}: document 2 is longer"),
        (sep_last, {"separator": "<|endoftext|>"}, ["s2.txt:1"], f"{sep_last}: document 2 is longer"),
        (pq_path, {}, ["p.parquet:0", "p.parquet:2"], f"{pq_path}: row 1 is longer"),
    ]
    for path, kw, ids, message in cases:
        out, stats = read(path, limits=limits, **kw)
        assert [d.id for d in out] == ids, path
        assert texts(out) == [short[0], short[1]][: len(ids)]
        assert errors(stats) == {"read_error.too_long": 1}, path
        assert stats.errors[0].startswith(message), stats.errors
        assert "read.max_document_bytes (3.9 KiB)" in stats.errors[0]
        assert read(path, **kw)[0][1].data in (long, long.encode(), long.strip().encode())  # default cap: kept


def test_corpus_spec_has_a_read_section_with_strict_keys(tmp_path):
    from llmforge.pipeline.config import load_corpus

    spec = load_corpus(None, sources=[str(tmp_path)], overrides={"read": {"max_document_bytes": 1000}})
    assert spec.read == ReadLimits(max_document_bytes=1000)
    assert load_corpus("quickstart").read == ReadLimits()
    with pytest.raises(ValueError, match="max_document_byte"):
        load_corpus(None, sources=[str(tmp_path)], overrides={"read": {"max_document_byte": 1000}})
    assert all(f.description for f in ReadLimits.model_fields.values())


def test_streams_large_inputs_in_bounded_memory(tmp_path):
    docs = sample_texts(200, seed=9)
    jl = tmp_path / "big.jsonl.zst"
    with open(jl, "wb") as f, zstandard.ZstdCompressor(level=1).stream_writer(f) as w:
        for _ in range(100):
            for d in docs:
                w.write((json.dumps({"text": d}) + "\n").encode())
    tar = tmp_path / "big.tar.gz"
    with tarfile.open(tar, "w:gz", compresslevel=1) as tf:
        for i in range(2_000):
            data = "\n\n".join(docs[(i + j) % len(docs)] for j in range(10)).encode()
            info = tarfile.TarInfo(f"docs/{i:06d}.txt")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    for path, n_docs in ((jl, 20_000), (tar, 2_000)):
        stats = ReadStats()
        tracemalloc.start()
        try:
            n = sum(1 for _ in iter_documents(path, stats=stats))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert n == n_docs and errors(stats) == {}
        assert stats.counts["bytes"] > 10 * 2**20
        assert peak < 8 * 2**20, f"{path.name}: peak {peak / 2**20:.1f} MiB for {stats.counts['bytes'] / 2**20:.0f} MiB read"


def test_skips_binary_files_among_text(tmp_path, docs):
    root = tmp_path / "d"
    write_text_dir(root, docs[:3])
    (root / "000" / "00001.bin").write_bytes(binary_blob())
    (root / "000" / "00001b.txt").write_bytes(b"\x00\x01\x02\x03" * 100)
    out, stats = read(root)
    assert texts(out) == docs[:3]
    assert errors(stats) == {"read_error.binary_file": 2}
    assert any(str(root / "000" / "00001.bin") in e for e in stats.errors)

    tar = tmp_path / "t.tar.gz"
    write_tar_members(tar, [TarMember("a.txt", docs[0].encode()), TarMember("lib.so", binary_blob()),
                            TarMember("b.txt", docs[1].encode())])
    out, stats = read(tar)
    assert texts(out) == docs[:2]
    assert errors(stats) == {"read_error.binary_file": 1}
    assert f"{tar}:lib.so" in stats.errors[0]


def test_keeps_non_utf8_text_files_as_bytes_for_the_cleaner(tmp_path, docs):
    path = tmp_path / "latin1.txt"
    data = ("Caf\u00e9 na\u00efve r\u00e9sum\u00e9. " * 50).encode("latin-1")
    path.write_bytes(data)
    out, stats = read(path)
    assert [d.data for d in out] == [data] and errors(stats) == {}


@pytest.mark.parametrize("compression", ["", ".gz", ".xz"])
def test_rejects_tar_path_traversal_absolute_paths_and_links(tmp_path, docs, compression):
    bad = unsafe_members()
    path = tmp_path / f"evil.tar{compression}"
    good = [TarMember(f"docs/{i:05d}.txt", d.encode()) for i, d in enumerate(docs[:3])]
    write_tar_members(path, [good[0], *bad[:4], good[1], *bad[4:], good[2]])
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        out, stats = read(path)
    finally:
        os.chdir(cwd)
    assert texts(out) == docs[:3]
    assert errors(stats) == {"read_error.unsafe_tar_member": len(bad)}
    for m, msg in zip(bad, stats.errors):
        assert msg.startswith(f"{path}: member {m.name!r}: unsafe tar member")
    assert "path escapes the archive" in stats.errors[0]
    assert "absolute path" in stats.errors[2]
    assert "symlink to '/etc/passwd'" in stats.errors[3]
    assert "hardlink" in stats.errors[4] and "device" in stats.errors[5] and "fifo" in stats.errors[6]
    # nothing was written anywhere: we never extract
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("name, payload", [
    ("garbage.tar.gz", b"this is not gzip at all " * 100),
    ("garbage.tar", b"neither a tar header nor anything else " * 100),
    ("garbage.jsonl.zst", b"\x28\xb5\x2f\xfd" + b"\xff" * 300),
    ("garbage.parquet", b"PAR1 but then nothing useful " * 10),
])
def test_counts_unreadable_archives(tmp_path, name, payload):
    path = tmp_path / name
    path.write_bytes(payload)
    out, stats = read(path)
    assert out == []
    assert errors(stats) == {"read_error.unreadable": 1}
    assert stats.errors[0].startswith(f"{path}: unreadable")


def test_unreadable_file_in_directory_does_not_stop_the_others(tmp_path, docs):
    root = tmp_path / "d"
    write_jsonl(root / "a.jsonl.gz", docs[:2], compression="gz")
    (root / "b.jsonl.gz").write_bytes(b"garbage" * 50)
    write_jsonl(root / "c.jsonl.gz", docs[2:4], compression="gz")
    out, stats = read(root)
    assert texts(out) == docs[:4]
    assert errors(stats) == {"read_error.unreadable": 1}
    assert str(root / "b.jsonl.gz") in stats.errors[0]


def test_parquet_missing_column_and_nulls_are_counted(tmp_path, docs):
    path = write_parquet(tmp_path / "a.parquet", [docs[0], None, docs[1]])
    out, stats = read(path)
    assert texts(out) == [docs[0], docs[1]] and [d.id for d in out] == ["a.parquet:0", "a.parquet:2"]
    assert errors(stats) == {"read_error.missing_text_key": 1}
    assert stats.errors[0] == f"{path}: row 1: 'text' is null"
    out, stats = read(path, text_key="content")
    assert out == [] and errors(stats) == {"read_error.missing_text_key": 1}
    assert stats.errors[0] == f"{path}: no column 'content' (columns: id, text)"


def test_parquet_inside_a_tar_is_reported_not_crashed(tmp_path, docs):
    write_parquet(tmp_path / "p.parquet", docs[:2])
    path = tmp_path / "t.tar"
    write_tar_members(path, [TarMember("p.parquet", (tmp_path / "p.parquet").read_bytes()),
                             TarMember("a.txt", docs[2].encode())])
    out, stats = read(path)
    assert texts(out) == [docs[2]]
    assert errors(stats) == {"read_error.unreadable": 1} and f"{path}:p.parquet" in stats.errors[0]


def test_missing_path_is_a_configuration_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        read(tmp_path / "does-not-exist.jsonl")
    with pytest.raises(ValueError, match="unknown format"):
        read(tmp_path, fmt="csv")


def test_read_errors_are_logged_and_bounded(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_text("{oops\n" * 250)
    with caplog.at_level(logging.INFO, logger="llmforge.pipeline.readers"):
        out, stats = read(path)
    assert out == [] and stats.counts["read_error.bad_json"] == 250
    assert len(stats.errors) == 100 and stats.n_errors == 250
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert warnings[0] == f"{path}: line 1: not valid JSON (Expecting property name enclosed in double quotes at column 2)"
    assert len(warnings) == 101  # 100 errors + one "further errors are not logged"

    other = ReadStats()
    other.error(tmp_path / "x", "boom", "read_error.unreadable")
    merged = ReadStats(max_errors=101)
    merged.update(stats)
    merged.update(other)
    assert merged.counts["read_error.bad_json"] == 250 and merged.counts["read_error.unreadable"] == 1
    assert merged.errors[-1] == f"{tmp_path / 'x'}: boom"
