"""Checkpoints: safe loading, atomic writes, RNG capture, bit-identical resume, retention."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llmforge.model.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    checkpoint_tokenizer,
)
from llmforge.model.gpt import GPT, GPTConfig

torch.set_num_threads(1)

CFG = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1)
LINEAGE = {"dataset_fingerprint": "d" * 16, "tokenizer_fingerprint": "t" * 16, "mlflow_run_id": "abc",
           "base_checkpoint": None}


def state(model: GPT, opt: torch.optim.Optimizer, step: int, **kw) -> dict:
    return dict(model_state=model.state_dict(), optimizer_state=opt.state_dict(), scheduler_state=None,
                data_state={"shard": 0, "offset": step * 64, "seed": 7}, rng_state=capture_rng_state(),
                config={"model": CFG.to_dict(), "train": {"lr": 1e-3}}, lineage=LINEAGE, **kw)


def fresh() -> tuple[GPT, torch.optim.Optimizer]:
    m = GPT(CFG)
    return m, m.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")


def train_steps(m: GPT, opt: torch.optim.Optimizer, n: int) -> None:
    """Steps whose outcome depends on the torch RNG (dropout, batch draw) and python/numpy RNG."""
    for _ in range(n):
        x = torch.randint(0, 61, (2, 9))
        x[0, 0] = random.randrange(61)
        x[1, 0] = int(np.random.randint(61))
        _, loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


class Exploit:
    """Unpickling this runs a shell command: what a malicious checkpoint looks like."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Custom:
    pass


def test_refuses_checkpoint_with_pickled_os_system_without_running_it(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model_state": {}, "payload": Exploit(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "evil.pt" in msg and "system" in msg and "weights_only" in msg
    assert not marker.exists()


def test_refuses_checkpoint_with_pickled_custom_class_naming_it(tmp_path: Path):
    path = tmp_path / "custom.pt"
    torch.save({"model_state": {"w": torch.zeros(2)}, "extra": Custom()}, path)
    with pytest.raises(CheckpointError, match=r"custom\.pt.*Custom"):
        load_checkpoint(path)


def test_missing_truncated_and_foreign_files_are_clear_errors(tmp_path: Path):
    with pytest.raises(CheckpointError, match="nope.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    m, opt = fresh()
    good = save_checkpoint(tmp_path / "good.pt", step=1, **state(m, opt, 1))
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt.*empty"):
        load_checkpoint(tmp_path / "empty.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not an llmforge checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    # files of another kind are named as such before anything unpickles them
    (tmp_path / "w.safetensors").write_bytes(len(b'{"a":1}').to_bytes(8, "little") + b'{"a":1}')
    with pytest.raises(CheckpointError, match=r"w\.safetensors: a safetensors file .*not an llmforge checkpoint"):
        load_checkpoint(tmp_path / "w.safetensors")
    (tmp_path / "manifest.json").write_text('{"format": "llmforge.tokens"}')
    with pytest.raises(CheckpointError, match=r"manifest\.json: a dataset manifest, not an llmforge checkpoint"):
        load_checkpoint(tmp_path / "manifest.json")


def test_rng_state_restores_identical_draws():
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    random.gauss(0, 1)  # leave a cached gaussian in python's state
    saved = capture_rng_state()
    first = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4))
    restore_rng_state(saved)
    second = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4))
    assert first[:4] == second[:4]
    assert torch.equal(first[4], second[4])


def test_round_trip_resume_is_bit_identical(tmp_path: Path):
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    m, opt = fresh()
    init = {k: v.clone() for k, v in m.state_dict().items()}
    # run A: 6 steps straight through
    train_steps(m, opt, 6)
    final_a = m.state_dict()

    # run B: 3 steps, checkpoint, then a new process-like start from the file for 3 more
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    m_b, opt_b = fresh()
    m_b.load_state_dict(init)
    train_steps(m_b, opt_b, 3)
    path = save_checkpoint(tmp_path / "mid.pt", step=3, **state(m_b, opt_b, 3))
    torch.manual_seed(999)  # the resumed process starts from unrelated RNG states
    random.seed(999)
    np.random.seed(999)
    ck = load_checkpoint(path)
    assert ck["step"] == 3 and ck["lineage"] == LINEAGE and ck["data_state"]["offset"] == 192
    assert GPTConfig.load(ck["config"]["model"]) == CFG
    m_c, opt_c = fresh()
    m_c.load_state_dict(ck["model_state"])
    opt_c.load_state_dict(ck["optimizer_state"])
    restore_rng_state(ck["rng_state"])
    train_steps(m_c, opt_c, 3)
    for k, v in final_a.items():
        assert torch.equal(v, m_c.state_dict()[k]), k


def test_save_refuses_objects_weights_only_could_not_load(tmp_path: Path):
    m, opt = fresh()
    with pytest.raises(CheckpointError, match=r"extra\.note.*Custom"):
        save_checkpoint(tmp_path / "x.pt", step=1, extra={"note": Custom()}, **state(m, opt, 1))
    assert not (tmp_path / "x.pt").exists()
    assert not list(tmp_path.glob(".*.tmp"))


class ExplodingTensor(torch.Tensor):
    """A tensor that fails to serialize, as a full disk or a kill would fail a save mid-way."""

    def __reduce_ex__(self, proto):
        raise OSError("simulated crash in the middle of torch.save")


def test_crash_during_save_leaves_previous_checkpoint_intact(tmp_path: Path):
    m, opt = fresh()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, step=1, **state(m, opt, 1))
    before = path.read_bytes()
    st = state(m, opt, 2)
    boom = torch.Tensor._make_subclass(ExplodingTensor, torch.zeros(4))
    st["model_state"] = {**st["model_state"], "zzz_last": boom}  # fails after the real weights
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, step=2, **st)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_manager_keeps_last_k_plus_best_and_points_latest(tmp_path: Path):
    mgr = CheckpointManager(tmp_path / "ckpts", keep_last=2)
    m, opt = fresh()
    losses = {100: 5.0, 200: 4.0, 300: 3.0, 400: 3.5, 500: 3.2, 600: 3.9}
    for step, vl in losses.items():
        mgr.save(step, val_loss=vl, **state(m, opt, step))
    names = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert names == ["best.pt", "ckpt-00000500.pt", "ckpt-00000600.pt", "latest.json"]
    assert mgr.latest() == tmp_path / "ckpts" / "ckpt-00000600.pt"
    index = json.loads((tmp_path / "ckpts" / "latest.json").read_text())
    assert index["latest"] == "ckpt-00000600.pt" and index["best"]["step"] == 300
    best = load_checkpoint(mgr.best())
    assert best["step"] == 300 and best["val_loss"] == 3.0
    assert mgr.load_latest()["step"] == 600 and mgr.best_val_loss == 3.0

    # a new manager on the same dir (a resumed run) remembers the best even without the index
    (tmp_path / "ckpts" / "latest.json").unlink()
    mgr2 = CheckpointManager(tmp_path / "ckpts", keep_last=2)
    mgr2.save(700, val_loss=3.1, **state(m, opt, 700))  # worse than 3.0: best.pt unchanged
    assert load_checkpoint(mgr2.best())["step"] == 300
    mgr2.save(800, val_loss=2.0, **state(m, opt, 800))
    assert load_checkpoint(mgr2.best())["step"] == 800


def test_manager_cleans_temp_leftovers_and_skips_a_damaged_newest(tmp_path: Path):
    d = tmp_path / "ckpts"
    mgr = CheckpointManager(d, keep_last=3)
    m, opt = fresh()
    mgr.save(1, **state(m, opt, 1))
    mgr.save(2, **state(m, opt, 2))
    (d / ".ckpt-00000003.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # a killed writer
    newest = d / "ckpt-00000002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # damaged after the fact
    mgr = CheckpointManager(d, keep_last=3)
    assert not list(d.glob(".*.tmp"))
    assert mgr.load_latest()["step"] == 1
    assert newest.exists()  # never deleted: a person may want to look at it


def test_empty_directory_has_no_latest(tmp_path: Path):
    mgr = CheckpointManager(tmp_path / "none")
    assert mgr.latest() is None and mgr.load_latest() is None and mgr.best() is None


def test_checkpoint_carries_its_tokenizer(tmp_path: Path):
    from llmforge.pipeline.tokenizer import TokenizerConfig, train_sentencepiece

    text = ["the quick brown fox jumps over the lazy dog. café déjà vu, 日本語のテキスト\n"] * 50
    proto = train_sentencepiece(text, TokenizerConfig(vocab_size=300, threads=1))
    (tmp_path / "tokenizer.model").write_bytes(proto)
    mgr = CheckpointManager(tmp_path / "ckpts", tokenizer=tmp_path / "tokenizer.model")
    m, opt = fresh()
    path = mgr.save(5, **state(m, opt, 5))
    tok = checkpoint_tokenizer(load_checkpoint(path))
    assert tok.proto == proto
    assert tok.decode(tok.encode("the lazy fox café")) == "the lazy fox café"
    bare = save_checkpoint(tmp_path / "bare.pt", step=1, **state(m, opt, 1))
    with pytest.raises(CheckpointError, match="no tokenizer"):
        checkpoint_tokenizer(load_checkpoint(bare))


def test_non_finite_weights_are_never_written_and_rotation_keeps_the_newest_finite(tmp_path: Path):
    d = tmp_path / "ckpts"
    m, opt = fresh()
    bad = state(m, opt, 0)
    bad["model_state"] = {**bad["model_state"], "lm_head.weight": torch.full((61, 16), float("nan"))}
    with pytest.raises(CheckpointError, match=r"x\.pt: not written.*lm_head\.weight \(976 NaN of 976"):
        save_checkpoint(tmp_path / "x.pt", step=1, **bad)
    assert not (tmp_path / "x.pt").exists()
    # a directory that already holds non-finite checkpoints of later steps (written by older code)
    d.mkdir()
    for step in (8, 9):
        torch.save({"format": "llmforge.checkpoint", "format_version": 1, "step": step, **bad}, d / f"ckpt-{step:08d}.pt")
    mgr = CheckpointManager(d, keep_last=2)
    assert mgr.last_good() is None
    for step in (1, 2, 3):
        mgr.save(step, **state(m, opt, step))
    assert [s for s, _ in mgr.checkpoints()] == [3, 8, 9]  # the newest finite one is never rotated away
    assert mgr.last_good() == d / "ckpt-00000003.pt"
    assert mgr.save(4, **{**state(m, opt, 4), "model_state": bad["model_state"]}) is None
    assert not (d / "ckpt-00000004.pt").exists()
    assert json.loads((d / "latest.json").read_text())["latest"] == "ckpt-00000003.pt"
    assert CheckpointManager(d, keep_last=2).last_good() == d / "ckpt-00000003.pt"  # found again by loading


def test_best_is_a_weights_only_copy_that_survives_rewrites(tmp_path: Path):
    d = tmp_path / "ckpts"
    mgr = CheckpointManager(d, keep_last=1)
    m, opt = fresh()
    mgr.save(10, val_loss=2.0, **state(m, opt, 10))
    best = load_checkpoint(d / "best.pt")
    assert best["step"] == 10 and best["val_loss"] == 2.0 and best["optimizer_state"] is None
    assert best["config"]["model"] == CFG.to_dict() and best["lineage"] == LINEAGE
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in best["model_state"].items())
    assert os.stat(d / "best.pt").st_ino != os.stat(d / "ckpt-00000010.pt").st_ino
    before = (d / "best.pt").read_bytes()
    train_steps(m, opt, 1)
    mgr.save(20, val_loss=2.5, **state(m, opt, 20))  # worse: best.pt stays, ckpt-10 is rotated away
    assert not (d / "ckpt-00000010.pt").exists() and (d / "best.pt").read_bytes() == before
