"""The training loop on real shards, a real MLflow store and real processes (kill, torchrun)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from llmforge.model.checkpoint import CheckpointManager, load_checkpoint
from llmforge.model.data import IGNORE_INDEX, ShardBatcher
from llmforge.errors import ConfigError
from llmforge.model.gpt import ModelSpec
from llmforge.model.launch import launch
from llmforge.model.train import (TrainConfig, TrainingDiverged, TrainRecipe, build_recipe, lr_factor, recipe_names,
                                  train)
from llmforge.pipeline.shards import Dataset

try:
    from support.tinydata import tiny_dataset
except ImportError:  # tests/ is a package
    from tests.support.tinydata import tiny_dataset

REPO = Path(__file__).resolve().parents[1]
SMALL = {"n_layer": 2, "n_head": 2, "n_embd": 64}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def mlruns(new_mlruns: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMFORGE_MLRUNS", str(new_mlruns))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LLMFORGE_PARENT_RUN_ID", raising=False)
    torch.set_num_threads(1)
    return new_mlruns


def small_cfg(model: dict | None = None, **kw) -> TrainRecipe:
    base = dict(block_size=32, batch_size=4, max_steps=20, lr=3e-3, warmup_steps=5,
                eval_every=0, eval_tokens=2048, log_every=1, ckpt_every=0, sample_tokens=8,
                sample_prompts=["def "], log_checkpoints=False)
    base.update(kw)
    return TrainRecipe(model=ModelSpec(**(model or SMALL)), train=TrainConfig(**base))


def client():
    from llmforge import tracking

    return tracking.client()


def loss_curve(run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in client().get_metric_history(run_id, "train/loss")}


# ---------------------------------------------------------------------------------- resume

DRIVER = textwrap.dedent("""
    import os, signal, sys, json
    import torch
    torch.set_num_threads(1)
    from llmforge.model.data import ShardBatcher
    from llmforge.model.train import TrainRecipe, train
    from llmforge.pipeline.shards import Dataset

    data, out, kill_step, cfg_json = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    cfg = TrainRecipe.load(json.loads(cfg_json))

    class KillBeforeStep:
        # the real loader; SIGKILLs this process when the batch of `kill_step` is requested,
        # i.e. right after the checkpoint written at the end of step `kill_step`
        def __init__(self, inner):
            self.inner = inner
        def get_batch(self, step, micro):
            if step == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return self.inner.get_batch(step, micro)
        def state_dict(self):
            return self.inner.state_dict()
        def load_state_dict(self, s):
            self.inner.load_state_dict(s)

    ds = Dataset.open(data)
    batcher = KillBeforeStep(ShardBatcher(ds, "train", cfg.train.block_size, cfg.train.batch_size, seed=cfg.train.seed))
    summary = train(cfg, data, out, batcher=batcher)
    print("SUMMARY " + json.dumps(summary))
""")


def run_driver(tmp_path: Path, data: Path, out: Path, kill_step: int, cfg: TrainRecipe) -> subprocess.CompletedProcess:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), str(data), str(out), str(kill_step),
                           json.dumps(cfg.to_dict())], capture_output=True, text=True, env=env, timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,extra", [("adamw", {}), ("muon", {}),
                                             ("adamw", dict(sampled_softmax=0.7, sampled_softmax_top=4)),
                                             ("muon", dict(dtype="bfloat16"))])
def test_resume_after_sigkill_is_bit_identical(tmp_path: Path, data: Path, optimizer: str, extra: dict) -> None:
    # dropout > 0 so that the restored RNG state matters, eval + checkpoints mid-run; Muon (the CPU
    # recipe's optimizer for the block matrices) restores its momentum as AdamW its moments; the
    # sampled softmax (steps 0-13 here) is resumed inside it and switches to the whole softmax after;
    # bfloat16 autocast (the CPU recipe's: its attention by matmuls, with dropout, and Muon's
    # iteration in bf16) resumes exactly too
    cfg = small_cfg(model={**SMALL, "dropout": 0.1}, max_steps=20, ckpt_every=4, eval_every=5, optimizer=optimizer,
                    **extra)
    straight = run_driver(tmp_path, data, tmp_path / "straight", -1, cfg)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = run_driver(tmp_path, data, tmp_path / "resumed", 12, cfg)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    mgr = CheckpointManager(tmp_path / "resumed")
    assert mgr.latest().name == "ckpt-00000012.pt"
    first_run_id = load_checkpoint(mgr.latest())["lineage"]["mlflow_run_id"]

    resumed = run_driver(tmp_path, data, tmp_path / "resumed", -1, cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s1 = json.loads(straight.stdout.split("SUMMARY ")[-1])
    s2 = json.loads(resumed.stdout.split("SUMMARY ")[-1])
    assert s2["step"] == s1["step"] == 20
    assert s2["train_loss"] == s1["train_loss"] and s2["val_loss"] == s1["val_loss"]
    a = load_checkpoint(tmp_path / "straight" / "ckpt-00000020.pt")
    b = load_checkpoint(tmp_path / "resumed" / "ckpt-00000020.pt")
    for k, v in a["model_state"].items():
        assert torch.equal(v, b["model_state"][k]), k
    assert torch.equal(a["rng_state"]["torch"], b["rng_state"]["torch"])
    # the resumed process kept logging into the same MLflow run, and its curve matches
    assert s2["mlflow_run_id"] == first_run_id != s1["mlflow_run_id"]
    c1, c2 = loss_curve(s1["mlflow_run_id"]), loss_curve(s2["mlflow_run_id"])
    assert sorted(c2) == list(range(1, 21)) and c1 == c2


# ---------------------------------------------------------------------------------- DDP

@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_global_batch(tmp_path: Path, data: Path) -> None:
    steps = 8
    one = train(small_cfg(batch_size=8, max_steps=steps, sample_prompts=[]), data, tmp_path / "one")
    two = launch(small_cfg(batch_size=4, max_steps=steps, sample_prompts=[]), data, tmp_path / "two", 2,
                 extra_env={"OMP_NUM_THREADS": "1"})
    assert two["tokens_per_step"] == one["tokens_per_step"] == 8 * 32
    c1, c2 = loss_curve(one["mlflow_run_id"]), loss_curve(two["mlflow_run_id"])
    assert sorted(c1) == sorted(c2) == list(range(1, steps + 1))
    for s in c1:
        assert abs(c1[s] - c2[s]) < 1e-5, (s, c1[s], c2[s])
    assert c1[steps] < c1[1] - 0.5  # and it actually trained
    params = client().get_run(two["mlflow_run_id"]).data.params
    assert params["data.world_size"] == "2"


# ---------------------------------------------------------------------------------- learning + MLflow

def test_loss_falls_well_below_uniform_and_run_is_recorded(tmp_path: Path, data: Path) -> None:
    vocab = Dataset.open(data).vocab_size
    cfg = small_cfg(block_size=64, batch_size=8, max_steps=200, warmup_steps=20, eval_every=100,
                    log_every=20, ckpt_every=100, log_checkpoints=True)
    s = train(cfg, data, tmp_path / "run")
    assert s["status"] == "completed" and s["step"] == 200 and s["bad_steps"] == 0
    uniform = math.log(vocab)
    assert s["val_loss"] < 0.7 * uniform, (s["val_loss"], uniform)
    assert s["train_loss"] < 0.7 * uniform

    c = client()
    run = c.get_run(s["mlflow_run_id"])
    p = run.data.params
    assert p["model.n_layer"] == "2" and p["train.optimizer"] == "adamw" and p["train.lr"] == "0.003"
    ds = Dataset.open(data)
    tags = run.data.tags
    assert tags["llmforge.dataset_fingerprint"] == ds.fingerprint  # ids are tags, not params to plot
    assert tags["llmforge.tokenizer_fingerprint"] == ds.manifest["tokenizer"]["fingerprint"]
    assert not any(k.startswith("lineage.") for k in p)
    for key in ("train/loss", "val/loss", "val/bpb", "lr", "grad_norm", "tokens_per_s"):
        assert key in run.data.metrics, key
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val/loss")] == [100, 200]
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"model", "plots", "samples", "summary.json"} <= arts
    # one weights-only model per run (an MLflow pyfunc model), never the resumable checkpoints
    assert [a.path for a in c.list_artifacts(run.info.run_id, "model/artifacts")] == ["model/artifacts/model.pt"]
    png = Path(c.download_artifacts(run.info.run_id, "plots/loss_curve.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sample = c.download_artifacts(run.info.run_id, "samples", str(tmp_path))
    assert Path(sample, "step-00000200.txt").read_text().startswith("=== 'def '")
    assert run.data.tags["llmforge.status"] == "completed"

    ckpt = load_checkpoint(s["checkpoint"])
    assert ckpt["lineage"]["mlflow_run_id"] == run.info.run_id
    assert ckpt["lineage"]["dataset_fingerprint"] == ds.fingerprint
    assert bytes(ckpt["tokenizer"].numpy()) == ds.tokenizer_path.read_bytes()
    assert ckpt["config"]["model"]["n_embd"] == 64 and ckpt["config"]["train"]["max_steps"] == 200

    again = train(cfg, data, tmp_path / "run")  # a finished run is not trained again
    assert again["step"] == 200 and again["mlflow_run_id"] == s["mlflow_run_id"]


def test_training_val_loss_equals_llmforge_evaluate_on_the_same_budget(tmp_path: Path, data: Path) -> None:
    from llmforge.model.evaluate import EvalConfig, EvalStage

    s = train(small_cfg(max_steps=8, eval_every=4, eval_tokens=3000, sample_prompts=[]), data, tmp_path / "run")
    ckpt = Path(s["checkpoint"])
    r = EvalStage(ckpt, data, EvalConfig(max_tokens=3000, prompts=[], device="cpu")).run(progress=False)
    assert abs(r["val"]["loss"] - s["val_loss"]) < 1e-6, (r["val"]["loss"], s["val_loss"])
    history = client().get_metric_history(s["mlflow_run_id"], "val/loss")
    assert abs([m.value for m in history if m.step == 8][0] - r["val"]["loss"]) < 1e-6


# ---------------------------------------------------------------------------------- non-finite

class MaskedAt:
    """Real shard batches, except that every target of step ``bad`` is masked (-100), as a
    fine-tuning batch of prompts only would be: its mean loss is 0/0 = NaN."""

    def __init__(self, inner: ShardBatcher, bad: set[int]):
        self.inner, self.bad = inner, bad

    def get_batch(self, step: int, micro: int):
        x, y = self.inner.get_batch(step, micro)
        if step in self.bad:
            y = torch.full_like(y, IGNORE_INDEX)
        return x, y

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, s):
        self.inner.load_state_dict(s)


def test_non_finite_step_is_skipped_and_counted(tmp_path: Path, data: Path) -> None:
    cfg = small_cfg(max_steps=6, ckpt_every=1, keep_last=10)
    ds = Dataset.open(data)
    batcher = MaskedAt(ShardBatcher(ds, "train", 32, 4, seed=cfg.train.seed), {3})
    s = train(cfg, data, tmp_path / "run", batcher=batcher)
    assert s["status"] == "completed" and s["step"] == 6 and s["bad_steps"] == 1
    assert not (tmp_path / "run" / "ckpt-00000004.pt").exists()  # no checkpoint from inside a non-finite streak
    w3 = load_checkpoint(tmp_path / "run" / "ckpt-00000003.pt")
    w5 = load_checkpoint(tmp_path / "run" / "ckpt-00000005.pt")
    adam_steps = {int(v["step"]) for v in w5["optimizer_state"]["state"].values()}
    assert adam_steps == {4}  # five steps, one of them skipped: the optimizer took four
    assert not all(torch.equal(w3["model_state"][k], w5["model_state"][k]) for k in w3["model_state"])
    assert all(torch.isfinite(v).all() for v in w5["model_state"].values())


def test_diverging_run_stops_and_keeps_last_good_checkpoint(tmp_path: Path, data: Path) -> None:
    cfg = small_cfg(lr=1e30, warmup_steps=0, max_steps=50, max_bad_steps=3, ckpt_every=1, grad_clip=0)
    with pytest.raises(TrainingDiverged, match="3 consecutive steps with non-finite loss") as e:
        train(cfg, data, tmp_path / "run")
    latest = CheckpointManager(tmp_path / "run").latest()
    assert str(latest) in str(e.value)
    ckpt = load_checkpoint(latest)
    assert ckpt["step"] < 50
    assert not (tmp_path / "run" / f"ckpt-{ckpt['step'] + 1:08d}.pt").exists()
    runs = client().search_runs([client().get_experiment_by_name("llmforge").experiment_id])
    assert runs[0].data.tags["llmforge.status"] == "diverged"


# ---------------------------------------------------------------------------------- stopping early

@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_exits_cleanly(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmforge", "train", "--data", str(data), "--out", str(out), "--no-prefect",
         "--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.n_head=2", "--block-size", "32",
         "--batch-size", "4", "--max-steps", "100000", "--log-every", "1", "--eval-every", "0",
         "--ckpt-every", "0", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step") and "/100000" in line and "step      3/" in line:
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 0, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 3 <= summary["step"] < 100000
    assert CheckpointManager(out).latest().name == f"ckpt-{summary['step']:08d}.pt"
    assert "resume with the same command" in text and "MLflow run" in text


@pytest.mark.slow
def test_ctrl_c_under_prefect_checkpoints_and_exits_within_5_seconds(tmp_path: Path, data: Path) -> None:
    """As in a terminal: the command runs as a Prefect flow on its own temporary server, and
    Ctrl-C (SIGINT to the foreground process group) reaches the command, not the server."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmforge", "train", "--data", str(data), "--out", str(out), "--set", "model.n_layer=2",
         "--set", "model.n_embd=64", "--set", "model.n_head=2", "--block-size", "32", "--batch-size", "4",
         "--max-steps", "100000", "--log-every", "1", "--eval-every", "0", "--ckpt-every", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step      3/"):
                t0 = time.monotonic()
                os.killpg(proc.pid, signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines) + rest
    assert proc.returncode == 0, text[-3000:]
    assert elapsed < 5, f"exited {elapsed:.1f}s after Ctrl-C\n{text[-2000:]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["step"] >= 3
    assert CheckpointManager(out).latest().name == f"ckpt-{summary['step']:08d}.pt"
    assert "ERROR" not in text and "Traceback" not in text, text[-3000:]


def test_max_minutes_stops_with_a_checkpoint(tmp_path: Path, data: Path) -> None:
    s = train(small_cfg(max_steps=100000, max_minutes=0.05, sample_prompts=[]), data, tmp_path / "run")
    assert s["status"] == "time_limit" and 0 < s["step"] < 100000
    assert Path(s["checkpoint"]).name == f"ckpt-{s['step']:08d}.pt"


# ---------------------------------------------------------------------------------- schedule, init_from

def test_schedule_warms_up_linearly_then_decays_to_min_lr() -> None:
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)  # noqa: the loop's own config
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1) and lr_factor(500, cfg) == pytest.approx(0.1)
    factors = [lr_factor(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_schedule_on_a_budget_warms_up_holds_then_decays_to_the_floor(schedule) -> None:
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, time="10m", schedule=schedule, cooldown=0.25)
    assert [lr_factor(s, cfg, 0.0) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # warm-up by steps
    if schedule == "wsd":
        assert lr_factor(50, cfg, 0.30) == lr_factor(80, cfg, 0.75) == 1.0  # stable until the last 25%
        assert lr_factor(90, cfg, 0.875) == pytest.approx(0.55)  # halfway down the linear cool-down
    else:
        assert lr_factor(50, cfg, 0.5) == pytest.approx(0.55)  # cosine on the share of the budget spent
    assert lr_factor(99, cfg, 1.0) == pytest.approx(0.1)  # the last step runs at the floor
    factors = [lr_factor(20, cfg, p / 100) for p in range(0, 101)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    assert TrainConfig(time="1h30m").time == 5400 and TrainConfig(tokens="2.5M").tokens == 2_500_000
    assert TrainConfig(time="10m").budget == "10m" and TrainConfig(tokens="200M").budget == "200M tokens"
    with pytest.raises(ConfigError, match="one budget"):
        TrainConfig.load({"time": "1m", "tokens": 1000})


def test_compile_steps_do_not_end_a_time_budget_early() -> None:
    from llmforge.model.train import Budget

    # torch.compile on a CPU: the first step took 20 s, the second (a recompile) 8 s, then 0.2 s each.
    # With 50 s of a 60 s budget spent, the next step is not the last: 0.2 s fit in what is left.
    budget = Budget(TrainConfig(time="60s"), tokens_per_step=128, spent_s=50.0)
    for seconds in (20.0, 8.0, 0.2, 0.2):
        budget.record(seconds)
    assert budget.step_time == pytest.approx(0.2)
    assert not budget.is_last(4)
    budget.spent_before = 59.9
    assert budget.is_last(5)  # and one that would not finish in time is


def test_compiling_leaves_the_weights_gradients_and_random_state_as_they_were() -> None:
    from llmforge.model.gpt import GPT, GPTConfig
    from llmforge.model.train import _compiled

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    compiled, seconds = _compiled(model, 3, 16, torch.device("cpu"), torch.float32)
    assert seconds is not None and seconds > 0 and compiled is not model
    assert torch.equal(torch.get_rng_state(), rng)  # the warm-up's dropout draws are put back
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    x = torch.randint(0, 96, (3, 16))
    with torch.no_grad():
        assert torch.allclose(compiled(x, hidden=True)[0], model(x, hidden=True)[0], atol=1e-5)


def test_a_compiled_run_compiles_before_its_budget_starts(tmp_path: Path, data: Path) -> None:
    s = train(small_cfg(time="3s", compile=True, sample_prompts=[], log_every=5), data, tmp_path / "run")
    assert s["status"] == "completed" and s["compile_s"] > 0
    assert s["budget_spent_s"] < 3 + 1  # compiling is start-up: the budget's clock starts after it
    assert s["elapsed_s"] > s["compile_s"] + 0.8 * 3
    assert s["step"] > 5  # the budget went on steps (a compile inside it would leave a handful)


@pytest.mark.slow
def test_a_compile_that_fails_trains_eagerly_after_one_line(tmp_path: Path, data: Path) -> None:
    # inductor on a CPU needs a C++ compiler: without one (and no cached kernels) the run goes on eagerly
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CXX": str(tmp_path / "no-such-g++"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}
    cmd = [sys.executable, "-m", "llmforge", "train", "--data", str(data), "--out", str(tmp_path / "run"),
           "--max-steps", "4", "--compile", *TIME_ARGS]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    failed = [line for line in done.stdout.splitlines() if line.startswith("torch.compile failed")]
    assert len(failed) == 1 and "no-such-g++" in failed[0] and failed[0].endswith("training without it"), done.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 4 and summary["compile_s"] is None


def test_token_budget_is_an_exact_step_count(tmp_path: Path, data: Path) -> None:
    s = train(small_cfg(tokens=20 * 4 * 32 - 5, sample_prompts=[], log_every=5), data, tmp_path / "run")
    assert s["status"] == "completed" and s["step"] == 20 and s["max_steps"] == 20
    assert s["final_lr"] == pytest.approx(3e-4)  # min_lr defaults to lr / 10


TIME_ARGS = ["--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.n_head=2", "--block-size", "32",
             "--batch-size", "4", "--log-every", "1", "--eval-every", "0", "--eval-tokens", "2048", "--ckpt-every", "1",
             "--keep-last", "2", "--sample-tokens", "0", "--no-prefect", "--device", "cpu", "--warmup-steps", "2"]


@pytest.mark.slow
def test_time_budget_ends_decayed_and_a_kill_at_half_finishes_the_same_schedule(tmp_path: Path, data: Path) -> None:
    budget = 12.0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "llmforge", "train", "--data", str(data), "--out", str(tmp_path / "run"),
           "--time", f"{budget:g}s", *TIME_ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    lines = []
    for line in proc.stdout:  # kill it (no checkpoint on the way out) once half the budget is spent
        lines.append(line)
        if " of 12s)" in line and int(line.split("(")[1].split("%")[0]) >= 50:
            proc.kill()
            break
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-2000:]
    ckpt = load_checkpoint(CheckpointManager(tmp_path / "run").latest())
    spent = ckpt["scheduler_state"]["budget_spent"]
    assert 0.3 * budget < spent < budget
    lr_at_kill = ckpt["scheduler_state"]["lr_factor"]

    t0 = time.monotonic()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["budget_done"]
    assert summary["final_lr"] == pytest.approx(1e-4)  # the floor: min_lr = lr / 10 (lr 1e-3)
    assert 0.8 * budget <= summary["budget_spent_s"] < budget + 5  # the rest of the budget, not a new one
    assert time.monotonic() - t0 < (budget - spent) + 60  # start-up and one final evaluation on top
    last_write = {m.step: m.value for m in sorted(client().get_metric_history(summary["mlflow_run_id"], "lr"),
                                                  key=lambda m: (m.step, m.timestamp))}  # the resumed run's
    lrs = [v for step, v in sorted(last_write.items()) if step > ckpt["step"]]
    assert lrs and lrs[0] <= 1e-3 * lr_at_kill + 1e-9  # continued the decay: no new warm-up
    assert all(a >= b - 1e-12 for a, b in zip(lrs, lrs[1:]))


def test_init_from_starts_from_its_weights_with_a_fresh_optimizer(tmp_path: Path, data: Path) -> None:
    base = train(small_cfg(max_steps=10, sample_prompts=[]), data, tmp_path / "base")
    lora_like = []

    def freeze_embeddings(model) -> None:  # only parameters that still require grad train
        model.transformer.wte.weight.requires_grad_(False)
        lora_like.append(model.transformer.wte.weight.detach().clone())

    s = train(small_cfg(max_steps=3, sample_prompts=[]), data, tmp_path / "ft", init_from=tmp_path / "base",
              prepare_model=freeze_embeddings)
    assert s["step"] == 3
    b = load_checkpoint(base["checkpoint"])
    f = load_checkpoint(s["checkpoint"])
    assert torch.equal(lora_like[0], b["model_state"]["transformer.wte.weight"])  # started from base
    assert torch.equal(f["model_state"]["transformer.wte.weight"], b["model_state"]["transformer.wte.weight"])
    key = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(f["model_state"][key], b["model_state"][key])
    assert f["lineage"]["base_checkpoint"].endswith("best.pt")
    assert f["optimizer_state"]["state"][next(iter(f["optimizer_state"]["state"]))]["step"] == 3  # fresh


def test_rejects_unknown_options_and_bad_values() -> None:
    with pytest.raises(ConfigError, match="unknown key learning_rate; .*known:"):
        TrainConfig.load({"learning_rate": 1e-3}, source="recipe.yaml")
    with pytest.raises(ConfigError, match="recipe.yaml: train.optimizer: .*'adamw' or 'muon'"):
        TrainRecipe.load({"train": {"optimizer": "sgd"}}, source="recipe.yaml")
    with pytest.raises(ConfigError, match="unknown key train.lrr; did you mean lr"):
        TrainRecipe.load({"train": {"lrr": 1e-3}}, source="x")


# ---------------------------------------------------------------------------------- CLI and flow

def test_cli_help_explains_every_option() -> None:
    out = subprocess.run([sys.executable, "-m", "llmforge", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for opt in ("--data", "--preset", "--max-steps", "--out", "--nproc", "--max-minutes", "--batch-size", "--lr",
                "--device", "--compile", "--optimizer", "--no-prefect", "--set", "--init-from", "--grad-accum"):
        assert opt in out, opt
    assert "resumes" in out or "resume" in out


def test_cli_reports_a_missing_dataset_clearly(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "llmforge", "train", "--data", str(tmp_path / "nope"), "--no-prefect"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such directory" in r.stderr and str(tmp_path / "nope") in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


FLOW = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from llmforge.flows.train import train_flow
    cfg = json.loads(sys.argv[2])
    # a run cut short (as a crash or a time limit would), then the same flow run again
    first = train_flow(data_dir=sys.argv[1], model=cfg["model"], train={**cfg["train"], "max_minutes": 0.01})
    second = train_flow(data_dir=sys.argv[1], model=cfg["model"], train=cfg["train"])
    print("SUMMARY " + json.dumps([first, second]))
""")


@pytest.mark.slow
def test_flow_rerun_resumes_in_the_same_run_directory(tmp_path: Path, data: Path, prefect_server) -> None:
    script = tmp_path / "flow.py"
    script.write_text(FLOW)
    # the flows called from Python, against the session's server (an ephemeral one costs ~30 s to start)
    env = {**os.environ, **prefect_server.env, "OMP_NUM_THREADS": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}
    cfg = small_cfg(max_steps=100, sample_prompts=[], log_every=50).model_dump(exclude_none=True)
    r = subprocess.run([sys.executable, str(script), str(data), json.dumps(cfg)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    first, second = json.loads(r.stdout.split("SUMMARY ")[-1])
    assert first["status"] == "time_limit" and first["step"] < 100
    assert Path(first["out_dir"]).parent == tmp_path / "runs"
    # same config and data (max_minutes only bounds the run): same directory, resumed, same MLflow run
    assert second["status"] == "completed" and second["step"] == 100
    assert second["out_dir"] == first["out_dir"] and second["mlflow_run_id"] == first["mlflow_run_id"]
    assert client().get_run(second["mlflow_run_id"]).data.tags["llmforge.resumed_from_step"] == str(first["step"])


def test_muon_optimizer_trains_and_resumes(tmp_path: Path, data: Path) -> None:
    cfg = small_cfg(optimizer="muon", lr=2e-2, max_steps=30, ckpt_every=15, sample_prompts=[], log_every=5)
    s = train(cfg, data, tmp_path / "run")
    curve = loss_curve(s["mlflow_run_id"])
    assert curve[30] < curve[1] - 1.0
    cont = train(small_cfg(optimizer="muon", lr=2e-2, max_steps=40, ckpt_every=15, sample_prompts=[], log_every=5),
                 data, tmp_path / "run")  # a longer horizon continues from step 30 with Muon's state
    assert cont["step"] == 40 and cont["mlflow_run_id"] == s["mlflow_run_id"]
    assert set(load_checkpoint(cont["checkpoint"])["optimizer_state"]) == {"muon", "adamw"}


def test_z_loss_shrinks_the_softmax_normaliser_and_the_logged_loss_stays_cross_entropy(tmp_path: Path,
                                                                                         data: Path) -> None:
    from llmforge.model.generate import load_for_inference

    runs, lse2 = {}, {}
    x, y = ShardBatcher(Dataset.open(data), "train", 32, 8, seed=0).get_batch(0)
    for weight in (0.0, 0.1):
        s = train(small_cfg(z_loss=weight, sample_prompts=[], log_every=1), data, tmp_path / f"z{weight}")
        runs[weight] = loss_curve(s["mlflow_run_id"])
        model, _, _ = load_for_inference(s["checkpoint"], device="cpu")
        with torch.no_grad():
            logits, _ = model(x, y)
        lse2[weight] = logits.logsumexp(-1).square().mean().item()  # every target of the batch is scored
    # the same weights before the first update: the logged loss has no z term in it
    assert runs[0.1][1] == pytest.approx(runs[0.0][1], rel=1e-6)
    assert lse2[0.1] < 0.9 * lse2[0.0]  # the normaliser is pulled towards 1 (33 -> 29 here)
    assert runs[0.1][20] < runs[0.1][1] - 0.5  # and the model still learns (6.2 -> 5.3 here)


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path: Path, data: Path) -> None:
    cfg = small_cfg(max_steps=6, ckpt_every=3, sample_prompts=[])
    train(cfg, data, tmp_path / "run")
    newest = tmp_path / "run" / "ckpt-00000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # torn by a disk fault, say
    s = train(small_cfg(max_steps=8, ckpt_every=3, sample_prompts=[]), data, tmp_path / "run")
    assert s["status"] == "completed" and s["step"] == 8
    history = client().get_run(s["mlflow_run_id"]).data.tags
    assert history["llmforge.resumed_from_step"] == "3"


@pytest.mark.parametrize("name", recipe_names())
def test_every_shipped_recipe_builds_a_model(name: str) -> None:
    from llmforge.model.gpt import resolve_model

    recipe = build_recipe(name)
    cfg = resolve_model(recipe.model, vocab_size=8192, block_size=recipe.train.block_size)
    assert cfg.block_size >= recipe.train.block_size, name


def test_the_cpu_recipe_is_llama_shaped_with_a_wsd_schedule() -> None:
    from llmforge.model.gpt import resolve_model

    recipe = build_recipe("cpu-10min")
    cfg = resolve_model(recipe.model, vocab_size=8192, block_size=recipe.train.block_size)
    assert cfg.mlp == "swiglu" and recipe.train.schedule == "wsd"  # exports to transformers / llama.cpp


def test_learning_rates_added_later_enter_the_run_key_only_when_set() -> None:
    # runs trained before embedding_lr/head_lr existed keep their key, so they still resume
    plain = TrainConfig(lr=2e-3).key_dict()
    assert "embedding_lr" not in plain and "head_lr" not in plain
    assert TrainConfig(lr=2e-3, embedding_lr=None).key_dict() == plain
    tuned = TrainConfig(lr=2e-3, embedding_lr=0.1).key_dict()
    assert tuned["embedding_lr"] == 0.1 and tuned != plain


# ---------------------------------------------------------------------------------- n-gram teacher

def test_the_teacher_weight_moves_linearly_to_its_final_share_at_its_share_of_the_budget() -> None:
    from llmforge.model.train import Budget

    cfg = TrainConfig(max_steps=100, teacher_order=3, teacher_weight=0.8, teacher_until=0.5)
    budget = Budget(cfg, tokens_per_step=128)
    weights = []
    for step in (0, 25, 50, 99):
        budget.lr_factor(step, step == 99)
        weights.append(budget.teacher_weight())
    assert weights == pytest.approx([0.8, 0.4, 0.0, 0.0])
    off = Budget(TrainConfig(max_steps=100), tokens_per_step=128)
    off.lr_factor(0, False)
    assert off.teacher_weight() == 0.0
    # on a time budget the weight follows the share of the clock, like the learning rate
    timed = Budget(TrainConfig(time="10m", teacher_order=2), tokens_per_step=128, spent_s=150.0)
    timed.lr_factor(400, False)
    assert timed.teacher_weight() == pytest.approx(0.5 * 0.75, abs=1e-3)
    # with a final share it moves to that share (here up, 0.5 to 0.6) and stays there
    held = Budget(TrainConfig(max_steps=100, teacher_order=3, teacher_until=0.5, teacher_final=0.6),
                  tokens_per_step=128)
    finals = []
    for step in (0, 25, 50, 99):
        held.lr_factor(step, step == 99)
        finals.append(held.teacher_weight())
    assert finals == pytest.approx([0.5, 0.55, 0.6, 0.6])
    keys = TrainConfig().key_dict()
    assert not {"teacher_order", "teacher_final"} & set(keys)  # earlier runs keep their key


def test_an_ngram_teacher_changes_the_updates_and_the_logged_loss_stays_the_cross_entropy(tmp_path: Path,
                                                                                            data: Path) -> None:
    runs, states = {}, {}
    for order in (0, 3):
        s = train(small_cfg(teacher_order=order, teacher_weight=0.7, sample_prompts=[], log_every=1), data,
                  tmp_path / f"t{order}")
        runs[order] = loss_curve(s["mlflow_run_id"])
        states[order] = load_checkpoint(s["checkpoint"])["model_state"]
    # the same weights before the first update: the logged loss is the data's cross-entropy
    assert runs[3][1] == pytest.approx(runs[0][1], rel=1e-5)
    assert not torch.equal(states[3]["lm_head.weight"], states[0]["lm_head.weight"])
    assert runs[3][20] < runs[3][1] - 1.0  # and it learns (6.4 -> 4.6 here)


def test_the_sampled_softmax_runs_for_its_share_of_the_budget_and_the_model_learns(tmp_path: Path,
                                                                                  data: Path) -> None:
    from llmforge.model.train import Budget

    budget = Budget(TrainConfig(max_steps=100, sampled_softmax=0.6), tokens_per_step=128)
    on = []
    for step in (0, 59, 60, 99):
        budget.lr_factor(step, step == 99)
        on.append(budget.sampled())
    assert on == [True, True, False, False]
    whole = Budget(TrainConfig(tokens=12_800, sampled_softmax=1.0), tokens_per_step=128)
    whole.lr_factor(99, True)  # the last step of a budget has spent all of it (share 1.0): still sampled
    assert whole.share == 1.0 and whole.sampled()
    assert not {"sampled_softmax", "sampled_softmax_top", "sampled_softmax_min_q"} & set(TrainConfig().key_dict())

    runs, states = {}, {}
    for share in (0.0, 0.5):
        s = train(small_cfg(sampled_softmax=share, sampled_softmax_top=4, teacher_order=2, teacher_weight=0.5,
                            sample_prompts=[], log_every=1), data, tmp_path / f"s{share}")
        runs[share] = loss_curve(s["mlflow_run_id"])
        states[share] = load_checkpoint(s["checkpoint"])["model_state"]
    assert not torch.equal(states[0.5]["lm_head.weight"], states[0.0]["lm_head.weight"])
    # it learns (here 6.2 -> 5.5; 5.1 without it: 128 targets a step sample a small vocabulary's columns
    # poorly), and the first step's loss is the sample's estimate, not the whole softmax's
    assert runs[0.5][20] < runs[0.0][1] - 0.5
    assert runs[0.5][1] != pytest.approx(runs[0.0][1], rel=1e-3)
    assert set(states[0.5]) == set(states[0.0])  # the same plain model


def test_a_teacher_needs_the_token_dataset_batches(tmp_path: Path, data: Path) -> None:
    # fine-tuning batches (masked targets, another source) have no n-gram statistics to count
    batcher = MaskedAt(ShardBatcher(Dataset.open(data), "train", 32, 4, seed=0), set())
    with pytest.raises(ConfigError, match="teacher needs a token dataset"):
        train(small_cfg(teacher_order=2, sample_prompts=[]), data, tmp_path / "run", batcher=batcher)
