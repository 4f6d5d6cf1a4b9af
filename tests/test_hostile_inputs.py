"""Hostile inputs: decompression bombs stay in bounded memory, directory sources never read
outside their root, and every refusal is counted and named while good documents survive."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
from pathlib import Path

import pytest
import zstandard

from llmforge.pipeline.download import fetch, scan_directory, select_files
from llmforge.pipeline.readers import ReadLimits, ReadStats, iter_documents

try:
    from support.corpora import TarMember, gutenberg_shards, sample_texts, write_tar_members
except ImportError:  # tests/ imported as a package
    from tests.support.corpora import TarMember, gutenberg_shards, sample_texts, write_tar_members

RSS_CAP_MB = 400
CHUNK = 64 << 20  # one compressed frame/member/stream of the bombs


def _compress_one(comp: str, data: bytes) -> bytes:
    if comp == "zst":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if comp == "gz":
        return gzip.compress(data, compresslevel=9, mtime=0)
    if comp == "xz":
        return lzma.compress(data, preset=0)
    if comp == "bz2":
        return bz2.compress(data, 9)
    raise ValueError(comp)


def write_bomb(path: Path, comp: str, prefix: bytes = b"", gib: int = 4, fill: bytes = b"\0") -> Path:
    """``prefix`` then ``gib`` GiB of ``fill`` bytes, compressed with ``comp``.

    Every one of these formats decodes a concatenation of independently compressed streams as
    the concatenation of their contents, so one 64 MiB chunk is compressed once and repeated:
    building a 4 GiB bomb takes well under a second and a few MB of disk.
    """
    chunk = _compress_one(comp, fill * CHUNK)
    with open(path, "wb") as f:
        if prefix:
            f.write(_compress_one(comp, prefix))
        for _ in range(gib * (1 << 30) // CHUNK):
            f.write(chunk)
    return path


_CHILD = textwrap.dedent("""
    import json, resource, sys
    # a safety net so that a regression fails this test instead of swapping the machine
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    from llmforge.pipeline.readers import ReadStats, iter_documents
    path, kwargs = sys.argv[1], json.loads(sys.argv[2])
    stats = ReadStats()
    ids = []
    try:
        for doc in iter_documents(path, stats=stats, **kwargs):
            ids.append(doc.id)
        crashed = None
    except BaseException as e:  # MemoryError and friends: reported, the test asserts on it
        crashed = repr(e)[:300]
    # VmHWM: this process's own peak. ru_maxrss is no good here: Linux carries the parent's
    # peak over exec (the pytest process, hundreds of MB), so it measures the wrong process.
    with open("/proc/self/status") as f:
        rss_mb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    print(json.dumps({"ids": ids, "counts": dict(stats.counts), "errors": stats.errors,
                      "rss_mb": rss_mb, "crashed": crashed}))
""")


def read_in_child(path: Path, **kwargs) -> dict:
    """Read ``path`` in a fresh interpreter; its documents' ids, stats and peak RSS."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), json.dumps(kwargs)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _line(text: str) -> bytes:
    return (json.dumps({"text": text}) + "\n").encode()


# ---------------------------------------------------------------------------------------------
# Decompression bombs


@pytest.mark.parametrize("comp", ["zst", "gz", "xz", "bz2"])
def test_jsonl_bomb_stays_under_memory_cap_and_keeps_the_good_line(tmp_path, comp):
    good = sample_texts(1, seed=21)[0]
    # a good document, then the start of a JSON line that never ends: 4 GiB of zeros
    path = write_bomb(tmp_path / f"bomb.jsonl.{comp}", comp, prefix=_line(good) + b'{"text": "')
    out = read_in_child(path)
    print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB compressed, peak RSS {out['rss_mb']:.0f} MB")
    assert out["crashed"] is None
    assert out["rss_mb"] < RSS_CAP_MB
    assert out["ids"] == ["bomb.jsonl." + comp + ":1"]
    assert out["counts"]["read_error.too_long"] == 1
    assert out["counts"]["read_error.decompression_limit"] == 1
    assert any(e.startswith(f"{path}: line 2 is longer than read.max_document_bytes") for e in out["errors"])
    assert any(e.startswith(f"{path}: decompressed past") for e in out["errors"]), out["errors"]


@pytest.mark.parametrize("comp", ["zst", "gz", "xz"])
def test_text_bomb_in_a_directory_is_skipped_and_the_other_files_are_read(tmp_path, comp):
    docs = sample_texts(2, seed=22)
    root = tmp_path / "books"
    root.mkdir()
    (root / "a.txt").write_text(docs[0])
    write_bomb(root / f"b.txt.{comp}", comp, fill=b"a")  # text-looking, so it is not binary-skipped
    (root / "c.txt").write_text(docs[1])
    out = read_in_child(root)
    print(f"b.txt.{comp}: peak RSS {out['rss_mb']:.0f} MB")
    assert out["crashed"] is None
    assert out["rss_mb"] < RSS_CAP_MB
    assert out["ids"] == ["books:a.txt", "books:c.txt"]
    assert out["counts"]["read_error.too_long"] == 1
    assert out["errors"] == [f"{root / f'b.txt.{comp}'}: document is longer than read.max_document_bytes "
                             "(64.0 MiB); skipped"]


def test_tinystories_style_bomb_skips_the_long_piece_and_stops_at_the_decompression_cap(tmp_path):
    stories = sample_texts(2, seed=23)
    head = ("\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n").encode()
    path = write_bomb(tmp_path / "stories.txt.zst", "zst", prefix=head, gib=10, fill=b"a")
    out = read_in_child(path, separator="<|endoftext|>", label="ts")
    print(f"{path.name}: {path.stat().st_size / 1e3:.0f} KB -> 10 GiB, peak RSS {out['rss_mb']:.0f} MB")
    assert out["crashed"] is None and out["rss_mb"] < RSS_CAP_MB
    assert out["ids"] == ["ts:1", "ts:2"]
    assert out["counts"]["read_error.too_long"] == 1
    assert out["counts"]["read_error.decompression_limit"] == 1


def test_bomb_member_of_an_openwebtext_tar_is_cut_and_the_next_members_are_read(tmp_path):
    docs = sample_texts(4, seed=24)

    def subarchive(names_docs) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tf:
            for name, d in names_docs:
                info = tarfile.TarInfo(name)
                info.size = len(d)
                tf.addfile(info, io.BytesIO(d))
        return buf.getvalue()

    # the bomb: an xz "sub-archive" holding a tar header for a 4 GiB member of 'a's
    header = tarfile.TarInfo("0000001-bomb.txt")
    header.size = 4 << 30
    bomb = tmp_path / "bomb.xz"
    write_bomb(bomb, "xz", prefix=header.tobuf(tarfile.USTAR_FORMAT), fill=b"a")
    owt = tmp_path / "urlsf_subset00.tar"
    write_tar_members(owt, [
        TarMember("openwebtext/urlsf_subset00-1_data.xz", subarchive([("0000000-a.txt", docs[0].encode())])),
        TarMember("openwebtext/urlsf_subset00-2_data.xz", bomb.read_bytes()),
        TarMember("openwebtext/urlsf_subset00-3_data.xz", subarchive([("0000002-c.txt", docs[1].encode()),
                                                                       ("0000003-d.txt", docs[2].encode())])),
    ])
    out = read_in_child(owt, fmt="openwebtext", label="owt")
    assert out["crashed"] is None and out["rss_mb"] < RSS_CAP_MB
    assert out["ids"] == ["owt:openwebtext/urlsf_subset00-1_data.xz/0000000-a.txt",
                          "owt:openwebtext/urlsf_subset00-3_data.xz/0000002-c.txt",
                          "owt:openwebtext/urlsf_subset00-3_data.xz/0000003-d.txt"]
    assert out["counts"]["read_error.too_long"] == 1
    assert out["counts"]["read_error.decompression_limit"] == 1
    limit = [e for e in out["errors"] if "decompressed past" in e]
    assert limit[0].startswith(f"{owt}:openwebtext/urlsf_subset00-2_data.xz: decompressed past")


def test_huge_pax_header_is_refused_before_tarfile_reads_it(tmp_path):
    good = sample_texts(1, seed=25)[0].encode()
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type = tarfile.XHDTYPE
    pax.size = 4 << 30  # tarfile would read all of it into one bytes object
    first = io.BytesIO()
    with tarfile.open(fileobj=first, mode="w") as tf:
        info = tarfile.TarInfo("a.txt")
        info.size = len(good)
        tf.addfile(info, io.BytesIO(good))
    head = first.getvalue()[: 512 + (len(good) + 511) // 512 * 512]  # member a.txt, no end blocks
    path = write_bomb(tmp_path / "pax.tar.zst", "zst", prefix=head + pax.tobuf(tarfile.USTAR_FORMAT))
    out = read_in_child(path)
    assert out["crashed"] is None and out["rss_mb"] < RSS_CAP_MB
    assert out["ids"] == ["pax.tar.zst:a.txt"]
    assert out["counts"]["read_error.too_long"] == 1
    assert "tar metadata header of 4.0 GiB" in out["errors"][0]


def test_limits_are_configurable_and_real_compression_ratios_pass(tmp_path):
    docs = sample_texts(200, seed=26)
    path = tmp_path / "web.jsonl.xz"
    path.write_bytes(lzma.compress(b"".join(_line(d) for d in docs)))
    stats = ReadStats()
    assert len(list(iter_documents(path, stats=stats))) == 200 and stats.n_errors == 0
    tight = ReadLimits(max_expansion_ratio=2.0, ratio_floor_bytes=0)
    stats = ReadStats()
    got = list(iter_documents(path, stats=stats, limits=tight))
    assert 0 < len(got) < 200  # the documents before the cap are kept
    assert dict(stats.counts)["read_error.decompression_limit"] == 1
    assert stats.errors[0].startswith(f"{path}: decompressed past")
    with pytest.raises(ValueError):
        ReadLimits(max_document_byte=10)


@pytest.mark.needs_shared
def test_default_limits_never_trip_on_the_shared_gutenberg_corpus(shared_corpus):
    stats = ReadStats()
    n = sum(1 for _ in iter_documents(shared_corpus, include=["*.jsonl.zst"], stats=stats))
    manifest = json.loads((shared_corpus / "MANIFEST.json").read_text())
    assert n == manifest["documents"]
    assert stats.n_errors == 0, stats.errors


# ---------------------------------------------------------------------------------------------
# Directory sources stay inside their root


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    docs = sample_texts(2, seed=27)
    (root / "a.txt").write_text(docs[0])
    (root / "sub" / "b.txt").write_text(docs[1])
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret " * 100)
    os.symlink("/etc/passwd", root / "passwd.txt")
    os.symlink(outside, root / "linked_dir")
    os.symlink(outside / "secret.txt", root / "sub" / "secret.txt")
    return root


def test_symlink_outside_root_is_skipped_and_named(corpus_dir):
    stats = ReadStats()
    docs = list(iter_documents(corpus_dir, stats=stats))
    assert [d.id for d in docs] == ["corpus:a.txt", "corpus:sub/b.txt"]
    assert not any(b"root:" in d.data or b"secret" in d.data for d in docs)
    assert stats.counts["read_error.symlink"] == 3
    assert f"{corpus_dir / 'passwd.txt'}: symlink to '/etc/passwd'; not followed" in "\n".join(stats.errors)
    assert any(e.startswith(f"{corpus_dir / 'linked_dir'}: symlink to directory") for e in stats.errors)


def test_stage_file_selection_excludes_links_and_reports_them(corpus_dir, tmp_path):
    assert [f[0] for f in select_files(corpus_dir, [], [])] == ["a.txt", "sub/b.txt"]
    scan = scan_directory(corpus_dir, ["*.txt", "sub/*"], [])
    assert [f[0] for f in scan.files] == ["a.txt", "sub/b.txt"]
    assert [(e.rel, e.key) for e in scan.skipped] == [("linked_dir", "read_error.symlink"),
                                                      ("passwd.txt", "read_error.symlink"),
                                                      ("sub/secret.txt", "read_error.symlink")]
    stats = ReadStats()
    stats.record_skipped(corpus_dir, scan.skipped)  # how extract gets them into the clean manifest
    assert stats.counts["read_error.symlink"] == 3 and str(corpus_dir / "passwd.txt") in stats.errors[1]
    entry = fetch(str(corpus_dir), tmp_path / "dl", progress=False)
    assert entry["size"] == sum(f[1] for f in scan.files)

    # through the clean stage: skipped, counted and named in its manifest, never in the text
    from llmforge.pipeline.config import CorpusSpec
    from llmforge.pipeline.extract import CleanStage, iter_texts

    spec = CorpusSpec.load({"name": "c", "sources": [{"url": str(corpus_dir)}], "clean": "none",
                            "split": {"val_fraction": 0}})
    stage = CleanStage(spec, [entry], tmp_path / "out")
    manifest = stage.run()
    assert manifest["stats"]["read_errors"]["read_error.symlink"] == 3
    assert any("passwd.txt: symlink to '/etc/passwd'" in e for e in manifest["errors"])
    assert not any("root:" in t for t in iter_texts(stage.out_dir, manifest, "train"))


def test_follow_symlinks_opt_in_reads_links_without_looping(corpus_dir):
    os.symlink(corpus_dir, corpus_dir / "sub" / "loop")  # a directory link back to the root
    stats = ReadStats()
    docs = list(iter_documents(corpus_dir, stats=stats, follow_symlinks=True))
    assert [d.id for d in docs] == ["corpus:a.txt", "corpus:linked_dir/secret.txt", "corpus:passwd.txt",
                                    "corpus:sub/b.txt", "corpus:sub/secret.txt"]
    assert stats.counts["read_error.symlink"] == 1 and "a loop" in stats.errors[0]
    scan = scan_directory(corpus_dir, [], [], follow_symlinks=True)
    assert [f[0] for f in scan.files] == [d.id.split(":", 1)[1] for d in docs]


def _within(seconds: float, fn):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it blocks."""
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked: something opened a FIFO"
    return result["value"]


def test_fifo_socket_and_device_are_never_opened_and_are_counted(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    good = sample_texts(1, seed=28)[0]
    (root / "a.txt").write_text(good)
    os.mkfifo(root / "pipe.txt")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.txt"))
    os.symlink("/dev/zero", root / "zero.txt")
    try:
        stats = ReadStats()
        docs = _within(10, lambda: list(iter_documents(root, stats=stats, follow_symlinks=True)))
        assert [d.id for d in docs] == ["d:a.txt"]
        assert stats.counts["read_error.special_file"] == 3
        text = "\n".join(stats.errors)
        assert f"{root / 'pipe.txt'}: fifo, not a regular file" in text
        assert f"{root / 'sock.txt'}: socket, not a regular file" in text
        assert f"{root / 'zero.txt'}: device file (via symlink to '/dev/zero')" in text
        scan = _within(10, lambda: scan_directory(root, [], []))
        assert [f[0] for f in scan.files] == ["a.txt"]
        assert {e.rel: e.key for e in scan.skipped} == {"pipe.txt": "read_error.special_file",
                                                        "sock.txt": "read_error.special_file",
                                                        "zero.txt": "read_error.symlink"}
        # a FIFO named directly as the source: refused, not opened
        stats = ReadStats()
        assert _within(10, lambda: list(iter_documents(root / "pipe.txt", stats=stats))) == []
        assert stats.counts["read_error.special_file"] == 1
    finally:
        sock.close()
