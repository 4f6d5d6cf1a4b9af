"""The download stage against a real HTTP server on 127.0.0.1 (tests/support/http.py)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pydantic
import pytest

from llmforge.pipeline.download import DownloadError, SourceSpec, fetch, fetch_all

try:
    from support.http import Fault, TestHTTPServer
except ImportError:  # tests/ is a package
    from tests.support.http import Fault, TestHTTPServer

FAST = {"backoff": 0.01, "progress": False, "timeout": 10}


def make_text(size: int, seed: str = "") -> bytes:
    """``size`` bytes of real-ish text: stdlib source lines, numbered so no two MBs are equal."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = (stdlib / "argparse.py").read_text(encoding="utf-8").splitlines()
    out, n, i = [], 0, 0
    while n < size:
        line = f"{seed}{i:07d} {lines[i % len(lines)]}\n".encode()
        out.append(line)
        n += len(line)
        i += 1
    return b"".join(out)[:size]


def put(server: TestHTTPServer, name: str, size: int = 3_000_000, seed: str = "") -> tuple[bytes, str]:
    """Publish a file on the server; return its bytes and sha256."""
    data = make_text(size, seed)
    (server.root / name).write_bytes(data)
    return data, hashlib.sha256(data).hexdigest()


# --- http(s) ------------------------------------------------------------------------------------


def test_downloads_file_and_verifies_size_and_sha256(http_server, tmp_path):
    data, digest = put(http_server, "corpus.txt")
    dest = tmp_path / "dl"
    spec = SourceSpec(url=http_server.url("corpus.txt"), sha256=digest, size=len(data), format="text")

    entry = fetch(spec, dest, **FAST)

    final = dest / "corpus.txt"
    assert final.read_bytes() == data
    assert entry["path"] == str(final.absolute())
    assert (entry["size"], entry["sha256"]) == (len(data), digest)
    assert (entry["skipped"], entry["resumed_from"], entry["attempts"]) == (False, 0, 1)
    assert entry["format"] == "text"
    assert not (dest / "corpus.txt.part").exists()
    assert json.loads((dest / "corpus.txt.sha256").read_text())["sha256"] == digest


def test_computes_sha256_when_spec_gives_none(http_server, tmp_path):
    data, digest = put(http_server, "nohash.txt", 1_234_567)
    entry = fetch(SourceSpec(url=http_server.url("nohash.txt")), tmp_path / "dl", **FAST)
    assert entry["sha256"] == digest and entry["size"] == len(data)


def test_skips_finished_file_without_network(http_server, tmp_path):
    data, digest = put(http_server, "a.txt")
    spec = SourceSpec(url=http_server.url("a.txt"), sha256=digest, size=len(data))
    fetch(spec, tmp_path / "dl", **FAST)
    assert http_server.count("/a.txt") == 1

    again = fetch(spec, tmp_path / "dl", **FAST)

    assert http_server.count("/a.txt") == 1  # no new request
    assert again["skipped"] is True and again["attempts"] == 0
    assert again["sha256"] == digest


def test_rerun_trusts_sha256_sidecar_until_file_changes(http_server, tmp_path):
    data, digest = put(http_server, "b.txt", 500_000)
    spec = SourceSpec(url=http_server.url("b.txt"))  # no hash in the spec: the sidecar is the memory
    dest = tmp_path / "dl"
    fetch(spec, dest, **FAST)
    sidecar = dest / "b.txt.sha256"
    rec = json.loads(sidecar.read_text())
    rec["sha256"] = "0" * 64  # if the re-run re-hashed, it would not report this
    sidecar.write_text(json.dumps(rec))

    assert fetch(spec, dest, **FAST)["sha256"] == "0" * 64

    st = (dest / "b.txt").stat()
    os.utime(dest / "b.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert fetch(spec, dest, **FAST)["sha256"] == digest  # mtime changed: hashed again
    assert http_server.count("/b.txt") == 1


def test_404_fails_at_once_naming_url_and_leaves_no_file(http_server, tmp_path):
    url = http_server.url("missing.txt")
    dest = tmp_path / "dl"
    with pytest.raises(DownloadError) as err:
        fetch(SourceSpec(url=url), dest, **FAST)
    assert url in str(err.value) and "404" in str(err.value)
    assert http_server.count("/missing.txt") == 1  # not retried
    assert not (dest / "missing.txt").exists() and not (dest / "missing.txt.part").exists()


def test_403_is_not_retried(http_server, tmp_path):
    put(http_server, "secret.txt", 1000)
    http_server.faults["/secret.txt"] = Fault(status=403, times=None)
    with pytest.raises(DownloadError, match="403"):
        fetch(SourceSpec(url=http_server.url("secret.txt")), tmp_path / "dl", **FAST)
    assert http_server.count("/secret.txt") == 1


def test_retries_server_errors_then_succeeds(http_server, tmp_path):
    data, digest = put(http_server, "flaky.txt")
    http_server.faults["/flaky.txt"] = Fault(status=500, times=2)

    entry = fetch(SourceSpec(url=http_server.url("flaky.txt"), sha256=digest), tmp_path / "dl", **FAST)

    assert [r.status for r in http_server.requests["/flaky.txt"]] == [500, 500, 200]
    assert entry["attempts"] == 3 and entry["sha256"] == digest
    assert (tmp_path / "dl" / "flaky.txt").read_bytes() == data


def test_retries_429_with_retry_after(http_server, tmp_path):
    _, digest = put(http_server, "busy.txt", 10_000)
    http_server.faults["/busy.txt"] = Fault(status=429, times=1, retry_after="0")
    entry = fetch(SourceSpec(url=http_server.url("busy.txt"), sha256=digest), tmp_path / "dl", **FAST)
    assert entry["attempts"] == 2 and entry["sha256"] == digest


def test_gives_up_after_retries_naming_url_and_status(http_server, tmp_path):
    put(http_server, "down.txt", 1000)
    http_server.faults["/down.txt"] = Fault(status=503, times=None)
    url = http_server.url("down.txt")
    with pytest.raises(DownloadError) as err:
        fetch(SourceSpec(url=url), tmp_path / "dl", retries=2, **FAST)
    assert url in str(err.value) and "503" in str(err.value) and "3 attempts" in str(err.value)
    assert http_server.count("/down.txt") == 3
    assert not (tmp_path / "dl" / "down.txt").exists()


def test_resumes_with_range_after_dropped_connection(http_server, tmp_path):
    data, digest = put(http_server, "big.txt", 4_000_000)
    http_server.faults["/big.txt"] = Fault(drop_after=1_500_000, times=1)

    entry = fetch(SourceSpec(url=http_server.url("big.txt"), sha256=digest, size=len(data)),
                  tmp_path / "dl", **FAST)

    reqs = http_server.requests["/big.txt"]
    assert len(reqs) == 2
    assert reqs[0].range is None and reqs[0].status == 200
    assert reqs[1].status == 206 and reqs[1].range == f"bytes={entry['resumed_from']}-"
    assert 0 < entry["resumed_from"] <= 1_500_000
    assert entry["attempts"] == 2 and entry["sha256"] == digest
    assert (tmp_path / "dl" / "big.txt").read_bytes() == data


def test_dropped_connections_exhaust_retries_but_keep_part(http_server, tmp_path):
    data, _ = put(http_server, "drop.txt", 2_000_000)
    http_server.faults["/drop.txt"] = Fault(drop_after=300_000, times=None)
    dest = tmp_path / "dl"
    with pytest.raises(DownloadError, match="giving up"):
        fetch(SourceSpec(url=http_server.url("drop.txt")), dest, retries=1, **FAST)
    part = dest / "drop.txt.part"
    assert part.read_bytes() == data[: part.stat().st_size]  # the good bytes are kept ...
    kept = part.stat().st_size
    assert kept >= 300_000
    del http_server.faults["/drop.txt"]
    entry = fetch(SourceSpec(url=http_server.url("drop.txt")), dest, **FAST)  # ... and reused
    assert entry["resumed_from"] == kept and entry["attempts"] == 1
    assert (dest / "drop.txt").read_bytes() == data


def test_retries_after_read_timeout(http_server, tmp_path):
    data, digest = put(http_server, "slow.txt", 100_000)
    http_server.faults["/slow.txt"] = Fault(stall=1.0, times=1)
    entry = fetch(SourceSpec(url=http_server.url("slow.txt"), sha256=digest), tmp_path / "dl",
                  **{**FAST, "timeout": 0.2})
    assert entry["attempts"] == 2 and entry["sha256"] == digest
    deadline = time.monotonic() + 10  # the stalled request is only recorded once its sleep ends
    while http_server.count("/slow.txt") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http_server.count("/slow.txt") == 2


def test_resumes_after_kill(http_server, tmp_path):
    data, digest = put(http_server, "killme.txt", 3_000_000)
    http_server.faults["/killme.txt"] = Fault(rate=2_000_000)  # ~1.5 s for the whole file
    dest = tmp_path / "dl"
    part = dest / "killme.txt.part"
    code = (
        "import sys; from pathlib import Path; from pipeline.download import SourceSpec, fetch; "
        "fetch(SourceSpec(url=sys.argv[1]), Path(sys.argv[2]), progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, http_server.url("killme.txt"), str(dest)])
    try:
        deadline = time.monotonic() + 30
        while not (part.exists() and part.stat().st_size > 300_000):
            assert proc.poll() is None and time.monotonic() < deadline, "download never got going"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    kept = part.stat().st_size
    assert 0 < kept < len(data) and not (dest / "killme.txt").exists()
    assert part.read_bytes() == data[:kept]
    del http_server.faults["/killme.txt"]

    entry = fetch(SourceSpec(url=http_server.url("killme.txt"), sha256=digest), dest, **FAST)

    assert http_server.requests["/killme.txt"][-1].range == f"bytes={kept}-"
    assert entry["resumed_from"] == kept and entry["sha256"] == digest
    assert (dest / "killme.txt").read_bytes() == data


def test_restarts_cleanly_when_server_ignores_range(http_server, tmp_path):
    data, digest = put(http_server, "norange.txt")
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "norange.txt.part").write_bytes(b"garbage from somewhere else" * 1000)
    http_server.faults["/norange.txt"] = Fault(ignore_range=True)

    entry = fetch(SourceSpec(url=http_server.url("norange.txt"), sha256=digest), dest, **FAST)

    reqs = http_server.requests["/norange.txt"]
    assert reqs[0].range == "bytes=27000-" and reqs[0].status == 200  # asked to resume, got it all
    assert entry["resumed_from"] == 0 and entry["sha256"] == digest
    assert (dest / "norange.txt").read_bytes() == data


def test_dropped_connection_on_server_ignoring_range_restarts_from_zero(http_server, tmp_path):
    data, digest = put(http_server, "nr2.txt")
    http_server.faults["/nr2.txt"] = Fault(drop_after=1_000_000, times=1, ignore_range=True)
    entry = fetch(SourceSpec(url=http_server.url("nr2.txt"), sha256=digest), tmp_path / "dl", **FAST)
    reqs = http_server.requests["/nr2.txt"]
    assert len(reqs) == 2 and reqs[1].range is not None and reqs[1].status == 200
    assert entry["resumed_from"] == 0 and entry["sha256"] == digest
    assert (tmp_path / "dl" / "nr2.txt").read_bytes() == data


def test_resumes_partial_file_left_by_killed_run(http_server, tmp_path):
    data, digest = put(http_server, "killed.txt")
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "killed.txt.part").write_bytes(data[:1_750_000])

    entry = fetch(SourceSpec(url=http_server.url("killed.txt"), sha256=digest), dest, **FAST)

    reqs = http_server.requests["/killed.txt"]
    assert [(r.range, r.status) for r in reqs] == [("bytes=1750000-", 206)]
    assert entry["resumed_from"] == 1_750_000 and entry["attempts"] == 1
    assert entry["sha256"] == digest and (dest / "killed.txt").read_bytes() == data


def test_complete_part_answered_416_is_finished(http_server, tmp_path):
    data, digest = put(http_server, "done.txt", 200_000)
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "done.txt.part").write_bytes(data)  # killed after the last byte, before the rename

    entry = fetch(SourceSpec(url=http_server.url("done.txt")), dest, **FAST)

    assert [r.status for r in http_server.requests["/done.txt"]] == [416]
    assert entry["sha256"] == digest and (dest / "done.txt").read_bytes() == data


def test_oversized_part_is_discarded_and_redownloaded(http_server, tmp_path):
    data, digest = put(http_server, "shrunk.txt", 100_000)
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "shrunk.txt.part").write_bytes(b"x" * 150_000)  # longer than the real file
    entry = fetch(SourceSpec(url=http_server.url("shrunk.txt"), sha256=digest), dest, **FAST)
    assert [r.status for r in http_server.requests["/shrunk.txt"]] == [416, 200]
    assert entry["sha256"] == digest and (dest / "shrunk.txt").read_bytes() == data


def test_rejects_sha256_mismatch_into_rejected_dir(http_server, tmp_path):
    data, digest = put(http_server, "bad.txt")
    wrong = hashlib.sha256(b"something else").hexdigest()
    url = http_server.url("bad.txt")
    dest = tmp_path / "dl"

    with pytest.raises(DownloadError) as err:
        fetch(SourceSpec(url=url, sha256=wrong), dest, **FAST)

    msg = str(err.value)
    assert url in msg and wrong in msg and digest in msg
    assert (dest / ".rejected" / "bad.txt").read_bytes() == data
    assert not (dest / "bad.txt").exists() and not (dest / "bad.txt.part").exists()


def test_rejects_size_mismatch(http_server, tmp_path):
    data, _ = put(http_server, "short.txt", 50_000)
    with pytest.raises(DownloadError, match=r"expected 60000 bytes, got 50000"):
        fetch(SourceSpec(url=http_server.url("short.txt"), size=60_000), tmp_path / "dl", **FAST)
    assert (tmp_path / "dl" / ".rejected" / "short.txt").read_bytes() == data
    assert not (tmp_path / "dl" / "short.txt").exists()


def test_finished_file_not_matching_new_spec_is_set_aside_and_refetched(http_server, tmp_path):
    old, _ = put(http_server, "v.txt", 100_000, seed="old")
    dest = tmp_path / "dl"
    fetch(SourceSpec(url=http_server.url("v.txt")), dest, **FAST)
    new, new_digest = put(http_server, "v.txt", 120_000, seed="new")  # upstream published a new version

    entry = fetch(SourceSpec(url=http_server.url("v.txt"), sha256=new_digest), dest, **FAST)

    assert entry["skipped"] is False and entry["sha256"] == new_digest
    assert (dest / "v.txt").read_bytes() == new
    assert (dest / ".rejected" / "v.txt").read_bytes() == old  # the old file is kept, not deleted


# --- file:// and plain paths --------------------------------------------------------------------


def test_local_file_is_verified_in_place_not_copied(tmp_path):
    data = make_text(800_000)
    src = tmp_path / "corpus" / "local.txt"
    src.parent.mkdir()
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    dest = tmp_path / "dl"

    for url in (src.as_uri(), str(src)):
        entry = fetch(SourceSpec(url=url, sha256=digest, size=len(data)), dest, **FAST)
        assert entry["path"] == str(src) and entry["url"] == src.as_uri()
        assert (entry["size"], entry["sha256"]) == (len(data), digest)
    assert not (dest / "local.txt").exists()


def test_local_file_hash_mismatch_is_reported_and_file_left_alone(tmp_path):
    src = tmp_path / "mine.txt"
    src.write_bytes(make_text(10_000))
    with pytest.raises(DownloadError) as err:
        fetch(SourceSpec(url=str(src), sha256="ab" * 32), tmp_path / "dl", **FAST)
    assert str(src) in str(err.value) and "ab" * 32 in str(err.value)
    assert src.exists()
    with pytest.raises(DownloadError, match="expected 5 bytes, got 10000"):
        fetch(SourceSpec(url=str(src), size=5), tmp_path / "dl", **FAST)


def test_missing_local_source_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "corpus.jsonl"
    with pytest.raises(DownloadError, match=str(missing)):
        fetch(SourceSpec(url=missing.as_uri()), tmp_path / "dl", **FAST)


def test_local_directory_reports_total_size(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    sizes = {"a.txt": 1000, "b.txt": 2500, "sub/c.txt": 777}
    for rel, n in sizes.items():
        (d / rel).write_bytes(make_text(n))

    entry = fetch(SourceSpec(url=d.as_uri(), include=["*.txt"]), tmp_path / "dl", **FAST)

    assert entry["path"] == str(d) and entry["size"] == sum(sizes.values())
    assert entry["sha256"] is None and entry["include"] == ["*.txt"]


# --- many at once -------------------------------------------------------------------------------


def test_fetch_all_downloads_several_in_source_order(http_server, tmp_path):
    files = {f"part{i}.txt": put(http_server, f"part{i}.txt", 600_000 + i * 1000, seed=str(i)) for i in range(5)}
    http_server.faults["/part2.txt"] = Fault(drop_after=100_000, times=1)
    specs = [SourceSpec(url=http_server.url(n), sha256=d) for n, (_, d) in files.items()]

    entries = fetch_all(specs, tmp_path / "dl", workers=3, **FAST)

    assert [Path(e["path"]).name for e in entries] == list(files)
    for e, (data, digest) in zip(entries, files.values()):
        assert e["sha256"] == digest and Path(e["path"]).read_bytes() == data
    assert entries[2]["resumed_from"] > 0


def test_fetch_all_finishes_good_files_then_raises_first_error(http_server, tmp_path):
    good, digest = put(http_server, "good.txt", 300_000)
    specs = [
        {"url": http_server.url("gone.txt")},
        {"url": http_server.url("good.txt"), "sha256": digest},
        {"url": http_server.url("also-gone.txt")},
    ]
    with pytest.raises(DownloadError) as err:
        fetch_all(specs, tmp_path / "dl", workers=2, **FAST)
    assert http_server.url("gone.txt") in str(err.value)
    assert any("also-gone.txt" in n for n in err.value.__notes__)
    assert (tmp_path / "dl" / "good.txt").read_bytes() == good


def test_fetch_all_refuses_two_sources_with_one_name(http_server, tmp_path):
    with pytest.raises(DownloadError, match="x.txt"):
        fetch_all([http_server.url("a/x.txt"), http_server.url("b/x.txt")], tmp_path / "dl", **FAST)


# --- the spec -----------------------------------------------------------------------------------


def test_spec_rejects_unknown_field_naming_it():
    with pytest.raises(pydantic.ValidationError, match="sha265"):
        SourceSpec.model_validate({"url": "https://example.org/a.txt", "sha265": "00"})


def test_spec_defaults_name_and_normalises_paths(tmp_path):
    assert SourceSpec(url="https://example.org/data/owt%20v1.tar?x=1").name == "owt v1.tar"
    spec = SourceSpec(url=str(tmp_path / "c.jsonl"))
    assert spec.url == (tmp_path / "c.jsonl").as_uri() and spec.local_path == tmp_path / "c.jsonl"
    assert SourceSpec(url="https://example.org/x", sha256="AB" * 32).sha256 == "ab" * 32


@pytest.mark.parametrize("bad", [
    {"url": "ftp://example.org/a.txt"},
    {"url": "https://example.org/"},
    {"url": "https://example.org/a.txt", "sha256": "123"},
    {"url": "https://example.org/a.txt", "name": "../evil"},
    {"url": "https://example.org/a.txt", "size": -1},
])
def test_spec_rejects_bad_values(bad):
    with pytest.raises(pydantic.ValidationError):
        SourceSpec.model_validate(bad)
