"""The data flow end to end: `llmforge prepare` against a real HTTP server and a real Prefect server."""

from __future__ import annotations

import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from llmforge.pipeline.fsutil import sha256_file
from llmforge.pipeline.shards import Dataset
from llmforge.pipeline.tokenizer import Tokenizer
from support.corpora import sample_texts, write_jsonl, write_openwebtext_tar, write_parquet

LLMFORGE = str(Path(sys.executable).parent / "llmforge")


def _env(prefect_server, tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, **prefect_server.env, "LLMFORGE_MLRUNS": str(tmp_path / "mlruns"),
           "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _prepare(spec: Path, out: Path, env: dict, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [LLMFORGE, "prepare", "--corpus", str(spec), "--out", str(out), "--no-progress", *extra]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


def _dataset_dir(out: Path, name: str) -> Path:
    dirs = sorted((out / name).glob("tokens-*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def _shard_hashes(ds_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(ds_dir)): sha256_file(p) for p in sorted(ds_dir.glob("*/shard-*.arrow"))}


def _write_spec(path: Path, name: str, sources: list[dict], **sections) -> Path:
    spec = {"name": name, "sources": sources,
            "clean": {"quality": False, "min_chars": 20},
            "split": {"val_fraction": 0.1, "part_bytes": 60_000},
            "tokenizer": {"vocab_size": 600, "sample_bytes": 2_000_000}}
    for k, v in sections.items():
        spec[k] = {**spec.get(k, {}), **v}
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def web_corpus(http_server, tmp_path: Path):
    """An OpenWebText-layout tarball, a jsonl.zst and a parquet file served over HTTP."""
    www = http_server.root
    www.mkdir(parents=True, exist_ok=True)
    texts = sample_texts(360, seed=1)
    write_openwebtext_tar(www / "owt.tar.xz", texts[:120])
    write_jsonl(www / "pile.jsonl.zst", texts[120:240], compression="zst")
    write_parquet(www / "fineweb.parquet", texts[240:] + texts[:10])  # 10 exact duplicates
    sources = [{"url": http_server.url("owt.tar.xz"), "format": "openwebtext"},
               {"url": http_server.url("pile.jsonl.zst")},
               {"url": http_server.url("fineweb.parquet")}]
    return texts, sources


@pytest.mark.slow
def test_prepare_from_http_is_lossless_tracked_and_idempotent(web_corpus, prefect_server, tmp_path):
    texts, sources = web_corpus
    spec = _write_spec(tmp_path / "web.yaml", "web", sources)
    env = _env(prefect_server, tmp_path)
    out = tmp_path / "shards"
    p = _prepare(spec, out, env, "--workers", "2")
    ds_dir = _dataset_dir(out, "web")
    assert f"{ds_dir}/manifest.json" in p.stdout

    ds = Dataset.open(ds_dir)
    assert ds.verify(full=True) == []
    assert ds.dtype.name == "uint16"
    clean_dir = next((out / "web").glob("clean-*"))
    cm = json.loads((clean_dir / "manifest.json").read_text())
    assert cm["stats"]["counts"]["dropped.duplicate"] == 10
    assert cm["stats"]["docs_kept"] == sum(ds.manifest["splits"][s]["documents"] for s in ds.splits())
    assert len(ds.shard_paths("train")) >= 2 and ds.num_tokens("val") > 0

    # every document decodes from the shards to exactly its cleaned text
    tok = Tokenizer.load(ds.tokenizer_path)
    cleaned = {}
    for part in sorted(clean_dir.glob("*/part-*.parquet")):
        t = pq.read_table(part)
        cleaned.update(zip(t.column("id").to_pylist(), t.column("text").to_pylist()))
    n = 0
    for split in ds.splits():
        for shard in ds.shards(split):
            assert shard.tokens[shard.offsets[1:] - 1].tolist() == [ds.eos_id] * len(shard)
            for i, doc_id in enumerate(shard.ids):
                assert tok.decode(shard.document(i)) == cleaned[doc_id], doc_id
                assert shard.n_bytes[i] == len(cleaned[doc_id].encode())
                n += 1
    assert n == len(cleaned) == cm["stats"]["docs_kept"]

    # the run is in MLflow with params, metrics and artifacts
    from llmforge import tracking

    client = tracking.client(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("llmforge")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["corpus.tokenizer.vocab_size"] == "600"
    assert run.data.metrics["clean.dropped.duplicate"] == 10
    assert run.data.metrics["tokens.train"] == ds.num_tokens("train")
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "dataset")}
    assert "dataset/manifest.json" in arts

    # a re-run of the finished flow does no work and changes nothing
    before = {p: p.stat().st_mtime_ns for p in ds_dir.rglob("*") if p.is_file()}
    p2 = _prepare(spec, out, env)
    assert "every stage was done before" in p2.stdout and f"{ds_dir}/manifest.json" in p2.stdout
    assert "Prefect" not in p2.stderr  # nothing to run: no server started, no flow run, no new MLflow run
    assert len(client.search_runs([exp.experiment_id])) == 1
    assert {p: p.stat().st_mtime_ns for p in ds_dir.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_prepare_resumes_after_sigkill_during_tokenize_with_identical_shards(web_corpus, prefect_server, tmp_path):
    texts, sources = web_corpus
    spec = _write_spec(tmp_path / "web.yaml", "web", sources, split={"part_bytes": 20_000})
    env = _env(prefect_server, tmp_path)
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    _prepare(spec, ref_out, env, "--task-runner", "thread", "--workers", "1")
    ref = _shard_hashes(_dataset_dir(ref_out, "web"))
    assert len(ref) >= 6

    # same run, killed with SIGKILL as soon as the first shard is committed
    cmd = [LLMFORGE, "prepare", "--corpus", str(spec), "--out", str(out), "--no-progress",
           "--task-runner", "thread", "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("web/tokens-*/train/shard-*.json")):
        assert proc.poll() is None, "prepare finished before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ds_dir = _dataset_dir(out, "web")
    assert not (ds_dir / "manifest.json").exists(), "killed run must not look complete"
    done_before = set(p.name for p in ds_dir.glob("*/shard-*.json"))
    assert 0 < len(done_before) < len(ref)

    _prepare(spec, out, env, "--task-runner", "thread", "--workers", "1")
    assert _shard_hashes(ds_dir) == ref
    assert Dataset.open(ds_dir).verify(full=True) == []


@pytest.mark.slow
def test_tokenize_on_dask_local_cluster_gives_byte_identical_shards(web_corpus, prefect_server, tmp_path):
    pytest.importorskip("prefect_dask")
    texts, sources = web_corpus
    spec = _write_spec(tmp_path / "web.yaml", "web", sources)
    env = _env(prefect_server, tmp_path)
    _prepare(spec, tmp_path / "a", env, "--task-runner", "thread", "--workers", "1")
    _prepare(spec, tmp_path / "b", env, "--task-runner", "dask", "--workers", "2")
    a, b = _dataset_dir(tmp_path / "a", "web"), _dataset_dir(tmp_path / "b", "web")
    assert a.name == b.name
    assert _shard_hashes(a) == _shard_hashes(b)
    assert json.loads((a / "manifest.json").read_text()) == json.loads((b / "manifest.json").read_text())


@pytest.mark.slow
def test_bad_files_are_counted_and_named_while_good_data_is_kept(http_server, prefect_server, tmp_path):
    www = http_server.root
    www.mkdir(parents=True, exist_ok=True)
    texts = sample_texts(80, seed=2)
    write_jsonl(www / "good.jsonl.zst", texts[:60], compression="zst")
    write_jsonl(www / "cut.jsonl.zst", texts[60:], compression="zst")
    data = (www / "cut.jsonl.zst").read_bytes()
    (www / "cut.jsonl.zst").write_bytes(data[: len(data) // 2])  # truncated mid-stream
    (www / "bad.jsonl").write_text('{"text": "' + texts[0][:300].replace('"', "'").replace("\n", " ") + ' unique"}\n'
                                   "this line is not json\n" '{"no_text_key": 1}\n')
    sources = [{"url": http_server.url(n)} for n in ("good.jsonl.zst", "cut.jsonl.zst", "bad.jsonl")]
    spec = _write_spec(tmp_path / "bad.yaml", "bad", sources)
    env = _env(prefect_server, tmp_path)
    _prepare(spec, tmp_path / "out", env, "--task-runner", "thread")
    cm = json.loads(next((tmp_path / "out" / "bad").glob("clean-*/manifest.json")).read_text())
    errs = cm["stats"]["read_errors"]
    assert errs.get("read_error.truncated", 0) == 1
    assert errs.get("read_error.bad_json", 0) == 1
    assert errs.get("read_error.missing_text_key", 0) == 1
    assert any("cut.jsonl.zst" in e for e in cm["errors"])
    assert any("bad.jsonl: line 2: not valid JSON" in e for e in cm["errors"]), cm["errors"]
    assert cm["stats"]["docs_kept"] >= 61


@pytest.mark.slow
def test_stage_fails_saying_why_when_no_usable_document_remains(http_server, prefect_server, tmp_path):
    www = http_server.root
    www.mkdir(parents=True, exist_ok=True)
    (www / "junk.jsonl").write_text("not json\n{\"text\": \"short\"}\n")
    spec = _write_spec(tmp_path / "junk.yaml", "junk", [{"url": http_server.url("junk.jsonl")}],
                       clean={"min_chars": 100})
    p = _prepare(spec, tmp_path / "out", _env(prefect_server, tmp_path), "--task-runner", "thread", check=False)
    assert p.returncode != 0
    msg = p.stdout + p.stderr
    assert "no usable document remains" in msg
    assert "bad_json=1" in msg and "too_short=1" in msg


@pytest.mark.slow
def test_every_gutenberg_document_decodes_from_the_shards_to_its_cleaned_text(shared_corpus, tmp_path):
    """The stages without Prefect, on a real corpus sample (one shard of ../shared books)."""
    from llmforge.pipeline import extract, tokenize, tokenizer
    from llmforge.pipeline.config import load_corpus

    src = tmp_path / "books"
    src.mkdir()
    shutil.copyfile(sorted(shared_corpus.glob("*.jsonl.zst"))[0], src / "g0.jsonl.zst")  # (links are not read)
    spec = load_corpus("gutenberg", sources=[str(src)],
                       overrides={"tokenizer": {"vocab_size": 2000, "sample_bytes": 5_000_000},
                                  "split": {"part_bytes": 8_000_000, "val_fraction": 0.05}})
    units = extract.plan_units([{"path": str(src), "sha256": None}], spec)
    out = tmp_path / "clean"
    for u in units:
        extract.clean_unit(u, spec.clean, out)
    cm = extract.finalize(out, units, spec.split, fp="t")
    tm = tokenizer.train_tokenizer(extract.iter_texts(out, cm, "train"), cm["splits"]["train"]["text_bytes"],
                                   spec.tokenizer, tmp_path / "tok")
    tok = Tokenizer.load(tmp_path / "tok")
    n = 0
    for split in ("train", "val"):
        for part in extract.part_paths(out, cm, split):
            entry = tokenize.tokenize_part(part, tmp_path / "ds" / split, tmp_path / "tok" / "tokenizer.model")
            shard = __import__("llmforge.pipeline.shards", fromlist=["Shard"]).Shard(tmp_path / "ds" / split / entry["file"])
            t = pq.read_table(part)
            assert shard.ids == t.column("id").to_pylist()
            for i, text in enumerate(t.column("text").to_pylist()):
                assert tok.decode(shard.document(i)) == text, shard.ids[i]
                n += 1
    assert n == cm["stats"]["docs_kept"] > 50
    assert tm["vocab_size"] == 2000
