"""Nothing damaged is trusted, nothing good is lost: damaged shards, non-finite weights, a full
disk, two processes on one output directory, streaming decode cost and cleaned text stored once.

Real files throughout: shards are damaged by writing bytes into them, a full disk is a real tmpfs
(skipped where it cannot be mounted), concurrent writers are real processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from llmforge.errors import CheckpointError, DataError, UserError
from llmforge.flows.cli import main as cli_main
from llmforge.model.checkpoint import CheckpointManager, load_checkpoint, save_checkpoint
from llmforge.model.data import IGNORE_INDEX, ShardBatcher
from llmforge.model.gpt import GPT, GPTConfig, ModelSpec
from llmforge.model.train import TrainConfig, TrainingDiverged, TrainRecipe, TrainStage, train
from llmforge.pipeline.fsutil import sha256_file
from llmforge.pipeline.shards import Dataset

try:
    from support.corpora import sample_texts, write_jsonl
    from support.kills import count_commits, killed_at
    from support.tinydata import tiny_dataset
except ImportError:  # tests/ is a package
    from tests.support.corpora import sample_texts, write_jsonl
    from tests.support.kills import count_commits, killed_at
    from tests.support.tinydata import tiny_dataset

SMALL = {"n_layer": 2, "n_head": 2, "n_embd": 64}


@pytest.fixture(scope="module", autouse=True)
def mlruns(tmp_path_factory: pytest.TempPathFactory):
    """One MLflow store for the module (a new SQLite store costs seconds of migrations); tests
    look their runs up by id."""
    path = tmp_path_factory.mktemp("mlruns")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMFORGE_MLRUNS", str(path))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("LLMFORGE_PARENT_RUN_ID", raising=False)
        torch.set_num_threads(1)
        yield path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def data(tiny: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset, free to damage."""
    return Path(shutil.copytree(tiny, tmp_path / "dataset"))


def small_recipe(**kw) -> TrainRecipe:
    base = dict(block_size=32, batch_size=4, max_steps=20, lr=3e-3, warmup_steps=5, eval_every=0,
                eval_tokens=2048, log_every=1, ckpt_every=0, sample_tokens=0, sample_prompts=[],
                log_checkpoints=False)
    base.update(kw)
    return TrainRecipe(model=ModelSpec(**SMALL), train=TrainConfig(**base))


# ---------------------------------------------------------------------------------------------
# damaged shards


def token_buffers(path: Path) -> dict[str, int]:
    """File offsets of the ``tokens`` column's offsets and values buffers in a shard."""
    mm = pa.memory_map(str(path))
    whole = mm.read_buffer()
    mm.seek(0)
    col = pa.ipc.open_file(mm).get_batch(0).column("tokens")
    _, offsets, _, values = col.buffers()
    return {"offsets": offsets.address - whole.address, "values": values.address - whole.address}


def poke(path: Path, at: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def damage(path: Path, kind: str) -> str:
    """Damage a shard in place the way a disk, a copy or a stray write does; return a word the
    error must say."""
    buf = token_buffers(path)
    if kind == "valid_id":  # two tokens changed into other ids the model knows: only sha256 sees it
        at = buf["values"] + 2 * 1000
        old = int.from_bytes(path.read_bytes()[at : at + 2], "little")
        poke(path, at, ((old + 7) % 200 + 3).to_bytes(2, "little") * 2)
        return "sha256"
    if kind == "beyond_vocab":
        poke(path, buf["values"] + 2 * 500, (65535).to_bytes(2, "little"))
        return "65535"
    if kind == "offsets":
        poke(path, buf["offsets"] + 4, (2**31 - 5).to_bytes(4, "little"))
        return "offsets"
    if kind == "truncated":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 100)
        return "size"
    raise ValueError(kind)


DAMAGE = ["valid_id", "beyond_vocab", "offsets", "truncated"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_training_refuses_a_damaged_shard_before_its_first_step(data: Path, tmp_path: Path, kind: str) -> None:
    shard = data / "train" / "train-00001.arrow"
    word = damage(shard, kind)
    with pytest.raises(DataError) as e:
        stage = TrainStage(small_recipe(max_steps=3), data, runs_root=tmp_path / "runs")
        stage.run()
    msg = str(e.value)
    assert "train-00001.arrow" in msg and word in msg, msg
    assert "\n" not in msg
    assert not (tmp_path / "runs").exists()  # refused before any run directory was made


def _checkpoint_for(data: Path, path: Path, **tensors: torch.Tensor) -> Path:
    ds = Dataset.open(data)
    cfg = GPTConfig(vocab_size=ds.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    state = GPT(cfg).state_dict()
    for name, t in tensors.items():
        state[name] = t
    ck = {"format": "llmforge.checkpoint", "format_version": 1, "model_state": state, "optimizer_state": None,
          "scheduler_state": None, "step": 5, "data_state": {}, "rng_state": {},
          "config": {"model": cfg.to_dict(), "train": {}},
          "lineage": {"tokenizer_fingerprint": ds.manifest["tokenizer"]["fingerprint"]},
          "tokenizer": torch.frombuffer(bytearray(ds.tokenizer_path.read_bytes()), dtype=torch.uint8),
          "val_loss": None, "extra": {}}
    torch.save(ck, path)  # written the way any file gets written: no checks on the way
    return path


def test_evaluate_names_a_token_id_beyond_the_vocabulary(data: Path, tmp_path: Path, capsys) -> None:
    ckpt = _checkpoint_for(data, tmp_path / "model.pt")
    damage(data / "val" / "val-00000.arrow", "beyond_vocab")
    rc = cli_main(["evaluate", str(ckpt), "--data", str(data), "--device", "cpu", "--no-prefect"])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "val-00000.arrow" in lines[0] and "65535" in lines[0], err[-3000:]


def test_verify_names_every_damaged_file_and_exits_2(data: Path, capsys) -> None:
    assert cli_main(["verify", str(data)]) == 0
    assert "3 shards" in capsys.readouterr().out
    damage(data / "train" / "train-00000.arrow", "valid_id")
    damage(data / "val" / "val-00000.arrow", "truncated")
    rc = cli_main(["verify", str(data)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "train-00000.arrow" in out + err and "val-00000.arrow" in out + err
    assert "train-00001.arrow" not in err  # the good shard is not blamed
    assert len(err.strip().splitlines()) == 1


def test_verify_record_does_not_outlive_a_change_to_the_file(data: Path) -> None:
    ds = Dataset.open(data)  # records are fresh: cheap
    assert ds.verify() == []
    shard = data / "train" / "train-00000.arrow"
    before = shard.stat()
    damage(shard, "valid_id")
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # even with its old mtime put back
    problems = Dataset.open(data, check=False).verify()
    assert len(problems) == 1 and "train-00000.arrow" in problems[0] and "sha256" in problems[0]


# a small prepare without Prefect: the same stage objects the flow runs, units run in this process

def prepare_stages(spec, out: Path, tokenizer_model: str | None = None):
    from llmforge.pipeline.prepare import Prepare

    plan = Prepare(spec, out, tokenizer_model)
    downloads = [d.completed() or d.run(progress=False) for d in plan.downloads]
    clean = plan.clean(downloads)
    cm, _ = clean.ensure()
    tok_stage = plan.tokenizer(clean)
    tok = plan.reused_tokenizer if tok_stage is None else \
        tok_stage.ensure(clean.texts(cm), cm["splits"]["train"]["text_bytes"])[0]
    tokenize = plan.tokenize(clean, tok)
    tokenize.ensure(clean.parts(cm), cm, spec.model_dump(mode="json"))
    return clean, tokenize


def small_spec(tmp_path: Path, n_docs: int = 240, name: str = "small", **sections):
    from llmforge.pipeline.config import CorpusSpec

    src = write_jsonl(tmp_path / "src" / "docs.jsonl", sample_texts(n_docs, seed=4))
    spec = {"name": name, "sources": [{"url": str(src)}], "clean": {"quality": False, "min_chars": 20},
            "split": {"val_fraction": 0.1, "part_bytes": 40_000},
            "tokenizer": {"vocab_size": 400, "sample_bytes": 1_000_000, "threads": 1},
            "tokenize": {"threads": 1}}
    for k, v in sections.items():
        spec[k] = {**spec.get(k, {}), **v}
    return CorpusSpec.load(spec)


def test_a_tiny_val_fraction_still_gives_a_val_split_and_too_few_documents_are_refused(tmp_path: Path) -> None:
    from llmforge.pipeline.shards import Dataset

    # 0.5% of 60 documents rounds to none: the split takes the minimum instead of an empty val
    spec = small_spec(tmp_path / "a", n_docs=60, split={"val_fraction": 0.005})
    _, tokenize = prepare_stages(spec, tmp_path / "a" / "out")
    ds = Dataset.open(tokenize.out_dir)
    assert ds.num_tokens("val") > 0 and ds.num_tokens("train") > ds.num_tokens("val")
    # a corpus too small for a val split and training data is one clear error, not "val loss nan"
    few = small_spec(tmp_path / "b", n_docs=2, split={"val_fraction": 0.005})
    with pytest.raises(UserError, match=r"too few for a val split.*val_fraction: 0"):
        prepare_stages(few, tmp_path / "b" / "out")


def shard_hashes(ds_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(ds_dir)): sha256_file(p) for p in sorted(ds_dir.glob("*/shard-*.arrow"))}


def test_prepare_rerun_remakes_a_damaged_shard_byte_identically(tmp_path: Path) -> None:
    spec = small_spec(tmp_path)
    _, tokenize = prepare_stages(spec, tmp_path / "out")
    ds_dir = tokenize.out_dir
    ref = shard_hashes(ds_dir)
    assert len(ref) >= 3
    victim = sorted(ds_dir.glob("train/shard-*.arrow"))[1]
    damage(victim, "valid_id")
    assert tokenize.completed() is None  # a changed shard is never reported complete
    prepare_stages(spec, tmp_path / "out")
    assert shard_hashes(ds_dir) == ref
    assert Dataset.open(ds_dir).verify(full=True) == []


# ---------------------------------------------------------------------------------------------
# non-finite weights


def all_finite(path: Path) -> bool:
    state = torch.load(path, weights_only=True)["model_state"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def poison(path: Path, value: float = float("nan")) -> str:
    """Write a non-finite value into a checkpoint's weights (bypassing every check); return the
    tensor's name."""
    ck = torch.load(path, weights_only=True)
    name = sorted(k for k, v in ck["model_state"].items() if v.is_floating_point())[3]
    ck["model_state"][name].view(-1)[1] = value
    torch.save(ck, path)
    return name


class MaskedFrom:
    """Real shard batches, but from (0-based) step ``bad`` on (to ``until``) every target is
    masked: the loss is 0/0 = NaN (a streak of non-finite steps, as a diverging run has)."""

    def __init__(self, inner: ShardBatcher, bad: int, until: int = 10**9):
        self.inner, self.bad, self.until = inner, bad, until

    def get_batch(self, step: int, micro: int):
        x, y = self.inner.get_batch(step, micro)
        return (x, torch.full_like(y, IGNORE_INDEX)) if self.bad <= step < self.until else (x, y)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, s):
        self.inner.load_state_dict(s)


def test_resume_refuses_a_nan_checkpoint_and_continues_from_the_newest_finite(data: Path, tmp_path: Path,
                                                                             capfd) -> None:
    run = tmp_path / "run"
    train(small_recipe(max_steps=4, ckpt_every=1, keep_last=2), data, run)
    tensor = poison(run / "ckpt-00000004.pt")
    s = train(small_recipe(max_steps=8, ckpt_every=1, keep_last=2), data, run)
    err = capfd.readouterr().err
    assert "ckpt-00000004.pt" in err and tensor in err  # said why it was skipped
    assert s["status"] == "completed" and s["step"] == 8 and math.isfinite(s["train_loss"])
    from llmforge import tracking

    tags = tracking.client().get_run(s["mlflow_run_id"]).data.tags
    assert tags["llmforge.resumed_from_step"] == "3"
    for _, p in CheckpointManager.list(run):
        assert all_finite(p), p
    assert all_finite(run / "best.pt")


def test_divergence_writes_nothing_during_the_streak_and_names_a_finite_checkpoint(data: Path,
                                                                                 tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = small_recipe(max_steps=30, ckpt_every=1, keep_last=2, max_bad_steps=4)
    batcher = MaskedFrom(ShardBatcher(Dataset.open(data), "train", 32, 4, seed=cfg.train.seed), bad=3)
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, data, run, batcher=batcher)
    steps = [s for s, _ in CheckpointManager.list(run)]
    assert steps == [2, 3]  # nothing written during steps 4-7, and rotation kept the good ones
    assert str(run / "ckpt-00000003.pt") in str(e.value)
    assert all_finite(run / "ckpt-00000003.pt")


def test_a_checkpoint_due_inside_a_streak_is_written_at_the_next_finite_step(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = small_recipe(max_steps=8, ckpt_every=4, keep_last=5)
    batcher = MaskedFrom(ShardBatcher(Dataset.open(data), "train", 32, 4, seed=cfg.train.seed), bad=3, until=5)
    s = train(cfg, data, run, batcher=batcher)
    assert s["status"] == "completed" and s["bad_steps"] == 2
    assert [step for step, _ in CheckpointManager.list(run)] == [6, 8]  # step 4's save waited for step 6


def test_a_non_finite_checkpoint_is_refused_by_generate_and_evaluate(data: Path, tmp_path: Path, capsys) -> None:
    good = _checkpoint_for(data, tmp_path / "good.pt")
    assert cli_main(["generate", str(good), "--prompt", "def", "--max-new-tokens", "3", "--temperature", "0",
                     "--device", "cpu"]) == 0
    capsys.readouterr()
    name = "transformer.h.0.attn.c_attn.weight" if "transformer.h.0.attn.c_attn.weight" in \
        torch.load(good, weights_only=True)["model_state"] else \
        sorted(torch.load(good, weights_only=True)["model_state"])[2]
    for value in (float("nan"), float("inf")):
        bad = Path(shutil.copyfile(good, tmp_path / f"bad-{value}.pt"))
        ck = torch.load(bad, weights_only=True)
        ck["model_state"][name].view(-1)[0] = value
        torch.save(ck, bad)
        with pytest.raises(CheckpointError, match=rf"bad-{value}\.pt.*{name}"):
            load_checkpoint(bad)
        for argv in (["generate", str(bad), "--prompt", "def", "--temperature", "0", "--device", "cpu"],
                     ["evaluate", str(bad), "--data", str(data), "--device", "cpu", "--no-prefect"]):
            rc = cli_main(argv)
            err = capsys.readouterr().err
            assert rc == 2, (argv, err[-2000:])
            assert len(err.strip().splitlines()) == 1 and name in err and bad.name in err, err


def test_best_is_its_own_weights_only_file(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(small_recipe(max_steps=4, ckpt_every=2, eval_every=2), data, run)
    best, newest = run / "best.pt", run / "ckpt-00000004.pt"
    assert best.stat().st_nlink == 1 and newest.stat().st_nlink == 1
    b = load_checkpoint(best)
    assert b.get("optimizer_state") is None and b.get("rng_state") is None
    assert b["config"]["model"] and b["lineage"]["dataset_fingerprint"] and b["tokenizer"] is not None
    full = load_checkpoint(newest)
    assert full["optimizer_state"] and best.stat().st_size < newest.stat().st_size
    before = sha256_file(best)
    poison(run / f"ckpt-{b['step']:08d}.pt")  # rewriting a ckpt in place leaves best.pt alone
    assert sha256_file(best) == before and all_finite(best)


# ---------------------------------------------------------------------------------------------
# a full disk


@contextlib.contextmanager
def small_disk(where: Path, size: str):
    """A real, small filesystem (tmpfs) at ``where``; skips where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_checkpoint_on_a_full_disk_names_the_file_and_the_space(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "1m") as disk:
        small = {"w": torch.ones(1000)}
        kw = dict(optimizer_state=None, scheduler_state=None, data_state={}, rng_state={}, config={}, lineage={})
        save_checkpoint(disk / "ckpt.pt", model_state=small, step=1, **kw)
        before = (disk / "ckpt.pt").read_bytes()
        with pytest.raises(UserError) as e:
            save_checkpoint(disk / "ckpt.pt", model_state={"w": torch.ones(600_000)}, step=2, **kw)
        msg = str(e.value)
        assert str(disk / "ckpt.pt") in msg and "free" in msg and "MB" in msg and "\n" not in msg, msg
        assert (disk / "ckpt.pt").read_bytes() == before  # the old file is intact
        assert not list(disk.glob(".*.tmp"))  # and nothing half-written stays


def test_download_on_a_full_disk_names_the_file_and_keeps_what_it_has_for_the_next_run(tmp_path, http_server):
    from llmforge.pipeline.download import fetch

    (http_server.root / "big.bin").write_bytes(os.urandom(3_000_000))
    with small_disk(tmp_path / "disk", "1m") as disk:
        with pytest.raises(UserError) as e:
            fetch(http_server.url("big.bin"), disk / "downloads", progress=False, retries=0)
        msg = str(e.value)
        assert "big.bin.part" in msg and "no space left" in msg and "\n" not in msg, msg
        assert not (disk / "downloads" / "big.bin").exists()  # only a verified file ever gets the final name


@pytest.mark.slow
def test_prepare_on_a_full_disk_fails_in_one_line_naming_the_file(tmp_path: Path, prefect_server) -> None:
    import yaml

    src = write_jsonl(tmp_path / "src" / "docs.jsonl", sample_texts(1500, seed=5))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "full", "sources": [{"url": str(src)}],
                                    "clean": {"quality": False, "min_chars": 20},
                                    "split": {"val_fraction": 0.1, "part_bytes": 100_000},
                                    "tokenizer": {"vocab_size": 400}}))
    env = {**os.environ, **prefect_server.env, "LLMFORGE_MLRUNS": str(tmp_path / "mlruns")}
    with small_disk(tmp_path / "disk", "600k") as disk:
        r = subprocess.run([str(Path(sys.executable).parent / "llmforge"), "prepare", "--corpus", str(spec), "--out",
                            str(disk), "--no-progress", "--task-runner", "thread", "--workers", "2"],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr[-4000:]
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-4000:]
        assert str(disk) in errors[0] and "free" in errors[0] and "space" in errors[0], errors[0]
        assert not list(disk.rglob(".*.tmp")) and not list(disk.rglob("tokens-*/manifest.json"))


# ---------------------------------------------------------------------------------------------
# one writer per output directory

HOLD_TEMP = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from llmforge.pipeline.fsutil import atomic_path
    with atomic_path(Path(sys.argv[1]) / "big.bin") as tmp:
        tmp.write_bytes(b"x" * 1000)
        print(tmp, flush=True)
        time.sleep(600)
""")


def test_temp_sweep_spares_a_live_writer_and_removes_a_dead_ones(tmp_path: Path) -> None:
    from llmforge.pipeline.fsutil import clean_temp

    d = tmp_path / "out"
    d.mkdir()
    p = subprocess.Popen([sys.executable, "-c", HOLD_TEMP, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        tmp = Path(p.stdout.readline().strip())
        assert tmp.exists()
        clean_temp(d)  # another process starting up in the same directory
        assert tmp.exists(), "swept the temp file of a writer that is still running"
    finally:
        p.kill()
        p.wait()
    assert clean_temp(d) == 1 and not tmp.exists()


def test_threads_of_one_process_share_its_lock_and_the_last_one_out_releases_it(tmp_path: Path) -> None:
    import threading

    from llmforge.pipeline.fsutil import DirLock, lock_holder

    d, start, errors = tmp_path / "downloads", threading.Barrier(16), []
    inside = threading.Barrier(16)

    def task() -> None:
        start.wait()  # all threads race for the lock at once, as download tasks on a thread runner do
        try:
            with DirLock(d):
                inside.wait(timeout=30)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)
            inside.abort()

    threads = [threading.Thread(target=task) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    probe = f"from llmforge.pipeline.fsutil import lock_holder; print(lock_holder({str(d)!r}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "None" and lock_holder(d) is None  # released: another process may take it


def test_tokenize_stage_refuses_a_directory_another_process_writes(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, n_docs=60)
    clean, tokenize = prepare_stages(spec, tmp_path / "out")
    shutil.rmtree(tokenize.out_dir)
    hold = textwrap.dedent(f"""
        import time
        from llmforge.pipeline.fsutil import DirLock
        with DirLock({str(tokenize.out_dir)!r}):
            print("held", flush=True)
            time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        cm = clean.completed()
        with pytest.raises(UserError, match=rf"{tokenize.out_dir}.*process {p.pid}"):
            tokenize.run(clean.parts(cm), cm, {})
    finally:
        p.kill()
        p.wait()
    tokenize.run(clean.parts(cm), cm, {})  # the holder died: its lock is gone with it
    assert tokenize.completed() is not None


@pytest.mark.slow
def test_second_train_on_a_run_directory_exits_2_naming_the_first_then_resumes_after_it_dies(
        data: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    common = ["--data", str(data), "--out", str(run), "--no-prefect", "--preset", "tiny", "--device", "cpu",
              "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2",
              "--set", "train.block_size=32", "--set", "train.batch_size=2", "--set", "train.eval_every=0",
              "--set", "train.log_every=1", "--set", "train.sample_tokens=0", "--set", "train.ckpt_every=5",
              "--set", "train.log_checkpoints=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([str(Path(sys.executable).parent / "llmforge"), "train", *common,
                              "--max-steps", "100000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = first.stdout.readline()
            if line.startswith("step") and " 6/" in line or not line:
                break
        assert first.poll() is None, "the first training process ended early"
        rc = cli_main(["train", *common, "--max-steps", "12"])
        err = capsys.readouterr().err
        assert rc == 2 and str(run) in err and f"process {first.pid}" in err, err[-3000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert cli_main(["train", *common, "--max-steps", "12"]) == 0  # a dead holder's lock is taken over
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 12


# ---------------------------------------------------------------------------------------------
# streaming decode


@pytest.fixture(scope="module")
def stream_tok():
    from llmforge.pipeline.tokenizer import Tokenizer, TokenizerConfig, train_sentencepiece

    text = ("The quick brown fox jumps over the lazy dog. Café au lait, déjà vu — naïve façade.\n"
            "日本語のテキストも少し。Emoji too: 🦊🐶.\n\tTabs and  double  spaces.\n")
    proto = train_sentencepiece([text] * 40, TokenizerConfig(vocab_size=400, character_coverage=0.98, threads=1))
    return Tokenizer(proto), text


def _long_ids(tok, text: str, n: int) -> list[int]:
    ids: list[int] = []
    i = 0
    while len(ids) < n:
        ids += tok.encode(f"{i} " + text)
        i += 1
    return ids[:n]


def test_streaming_decoder_does_a_bounded_amount_of_work_per_token(stream_tok) -> None:
    from llmforge.model.generate import IncrementalDecoder

    tok, text = stream_tok
    ids = _long_ids(tok, text, 4000)
    decoded = [0]

    def counting_decode(x):
        decoded[0] += len(x)
        return tok.decode(x)

    dec = IncrementalDecoder(counting_decode)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert decoded[0] <= 16 * len(ids), decoded[0] / len(ids)


def test_streaming_16k_tokens_costs_about_8_times_2k(stream_tok) -> None:
    from llmforge.model.generate import IncrementalDecoder

    tok, text = stream_tok

    def cost(n: int) -> float:
        ids = _long_ids(tok, text, n)
        best = float("inf")
        for _ in range(3):
            dec = IncrementalDecoder(tok.decode)
            t0 = time.perf_counter()
            for i in ids:
                dec.push(i)
            dec.flush()
            best = min(best, time.perf_counter() - t0)
        return best

    ratio = cost(16_000) / cost(2_000)
    assert ratio < 16, f"16k tokens cost {ratio:.1f}x 2k tokens (linear: 8x, quadratic: 64x)"


# ---------------------------------------------------------------------------------------------
# cleaned text stored once, resumable at every write


def test_cleaned_text_is_stored_once_and_bytes_on_disk_are_recorded(tmp_path: Path) -> None:
    clean, tokenize = prepare_stages(small_spec(tmp_path), tmp_path / "out")
    assert not list(clean.out_dir.glob("units/*.parquet"))  # the parts hold the cleaned text now
    cm = clean.completed()
    parts = sum(p.stat().st_size for s in ("train", "val") for p in clean.parts(cm)[s])
    assert cm["disk_bytes"] == sum(p.stat().st_size for p in clean.out_dir.rglob("*") if p.is_file()
                                   and p.name not in ("manifest.json", ".lock")) and cm["disk_bytes"] >= parts
    tm = Dataset.open(tokenize.out_dir).manifest
    shards = sum(s["size"] for split in tm["splits"].values() for s in split["shards"])
    assert tm["disk_bytes"] >= shards + (tokenize.out_dir / "tokenizer.model").stat().st_size


def test_a_kill_at_any_commit_then_a_rerun_gives_identical_shards(tmp_path: Path, monkeypatch) -> None:
    """Every file a prepare commits is renamed into place by ``os.replace``; stop the run just
    before and just after each of them (as a kill -9 would), run it again, and compare."""
    spec = small_spec(tmp_path, n_docs=120, split={"part_bytes": 30_000})
    _, first = prepare_stages(spec, tmp_path / "first")  # trains the tokenizer the runs below reuse
    tok_model = str(first.out_dir / "tokenizer.model")
    with count_commits(monkeypatch) as commits:
        _, ref = prepare_stages(spec, tmp_path / "ref", tok_model)
    ref_hashes, ref_manifest = shard_hashes(ref.out_dir), json.loads((ref.out_dir / "manifest.json").read_text())
    assert commits[0] > 10 and len(ref_hashes) >= 3
    for k in range(1, commits[0] + 1):
        for after in (False, True):
            out = tmp_path / f"kill-{k}-{'after' if after else 'before'}"
            killed_at(monkeypatch, k, after, lambda: prepare_stages(spec, out, tok_model))
            _, tokenize = prepare_stages(spec, out, tok_model)
            assert tokenize.out_dir.name == ref.out_dir.name
            assert shard_hashes(tokenize.out_dir) == ref_hashes, (k, after)
            assert json.loads((tokenize.out_dir / "manifest.json").read_text()) == ref_manifest, (k, after)
            assert not list(out.rglob("units/*.parquet")), (k, after)
            shutil.rmtree(out)
