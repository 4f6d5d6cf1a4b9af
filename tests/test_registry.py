"""The model registry on a real MLflow store: weights-only models logged to their runs, versions
with lineage, `models:/NAME/VERSION` for `llmforge generate`, and `mlflow.pyfunc` loading them back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmforge import tracking
from llmforge.flows.cli import main as cli_main
from llmforge.model.checkpoint import capture_rng_state, load_checkpoint, save_checkpoint
from llmforge.model.generate import generate, load_model
from llmforge.model.gpt import GPT, GPTConfig
from llmforge.model.sft import format_prompt
from test_evaluate import make_tokenizer

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (making a SQLite store costs seconds); tests use their own names."""
    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMFORGE_MLRUNS", str(root / "mlruns"))
        mp.delenv("LLMFORGE_PARENT_RUN_ID", raising=False)
        # mlflow.pyfunc.load_model reads the same store
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
        yield root / "mlruns"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def training_checkpoint(path: Path, tok) -> Path:
    """A checkpoint as training leaves it: with optimizer state, RNG state and lineage."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32,
                          tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    model(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]))[1].backward()
    opt.step()
    return save_checkpoint(path, model_state=model.state_dict(), optimizer_state=opt.state_dict(), scheduler_state=None,
                           step=5, data_state={"pos": 3}, rng_state=capture_rng_state(),
                           config={"model": model.config.to_dict(), "train": {"lr": 1e-3}},
                           lineage={"dataset_fingerprint": "ds-123", "tokenizer_fingerprint": tok.fingerprint},
                           tokenizer=tok.proto, val_loss=2.5)


def logged_run(checkpoint: Path, **metrics: float) -> str:
    with tracking.stage_run("train · test", stage="train", tags={tracking.TAG_DATASET: "ds-123",
                                                                 tracking.TAG_TOKENIZER: "tok-456"}) as run:
        run.metrics({k.replace("_", "/"): v for k, v in metrics.items()})
        run.model(checkpoint)
    return run.run_id


def artifact_files(run_id: str, path: str = "") -> list[str]:
    c = tracking.client()
    out = []
    for a in c.list_artifacts(run_id, path or None):
        out += artifact_files(run_id, a.path) if a.is_dir else [a.path]
    return out


def test_logged_model_is_one_weights_only_file_that_loads_back_and_generates(tmp_path, store, tok):
    import mlflow.pyfunc

    ckpt = training_checkpoint(tmp_path / "ckpt-00000005.pt", tok)
    run_id = logged_run(ckpt, val_bpb=3.25)
    files = artifact_files(run_id)
    assert [f for f in files if f.endswith(".pt")] == ["model/artifacts/model.pt"]
    assert "model/MLmodel" in files

    version = tracking.register_model(run_id, "loads-back")
    assert version["uri"] == "models:/loads-back/1" and version["created"]
    tags = tracking.client().get_model_version("loads-back", "1").tags
    assert tags["llmforge.dataset_fingerprint"] == "ds-123" and tags["llmforge.tokenizer_fingerprint"] == "tok-456"
    assert tags["llmforge.val_bpb"] == "3.25" and tags["llmforge.source_run"] == run_id

    local = tracking.download_model("models:/loads-back/1")
    logged, original = load_checkpoint(local), load_checkpoint(ckpt)
    assert logged["optimizer_state"] is None and logged["data_state"] == {}
    assert logged["config"] == original["config"] and logged["lineage"] == original["lineage"]
    assert all(torch.equal(logged["model_state"][k], v) for k, v in original["model_state"].items())
    assert tracking.download_model("models:/loads-back/1") == local  # cached, verified, not fetched again
    by_run = load_checkpoint(tracking.download_model(f"runs:/{run_id}/model"))
    assert all(torch.equal(by_run["model_state"][k], v) for k, v in original["model_state"].items())

    model, _, _ = load_model(ckpt, "cpu")
    expected = []
    for prompt in ("the cat chased the", "the dog"):
        ids = tok.encode(prompt)
        out = generate(model, torch.tensor([ids]), 64, temperature=0, eos_id=tok.eos_id, vocab_limit=tok.vocab_size)
        expected.append(tok.decode([t for t in out[0, len(ids):].tolist() if t != tok.eos_id]))
    pyfunc = mlflow.pyfunc.load_model("models:/loads-back/1")
    assert pyfunc.predict(["the cat chased the", "the dog"]) == expected
    assert len(expected[0]) > 10


def test_the_same_weights_are_logged_once_and_registered_once(tmp_path, store, tok):
    ckpt = training_checkpoint(tmp_path / "best.pt", tok)
    run_id = logged_run(ckpt)
    before = artifact_files(run_id)
    again = tracking.log_model(ckpt, run_id=run_id, register="once")  # a re-run pipeline registers again
    assert again["logged"] is False and artifact_files(run_id) == before
    assert again["version"] == "1"
    assert tracking.register_model(run_id, "once")["version"] == "1"
    assert len(tracking.client().search_model_versions("name = 'once'")) == 1
    other = training_checkpoint(tmp_path / "other.pt", tok)
    with torch.no_grad():
        state = load_checkpoint(other)
        state["model_state"]["lm_head.weight"] += 1
        save_checkpoint(other, **{k: state[k] for k in ("model_state", "optimizer_state", "scheduler_state", "step",
                                                         "data_state", "rng_state", "config", "lineage", "extra",
                                                         "val_loss")}, tokenizer=state["tokenizer"])
    with pytest.raises(ValueError, match="already holds a different model"):
        tracking.log_model(other, run_id=run_id)


def test_generate_takes_a_registered_model_and_prints_what_its_checkpoint_prints(tmp_path, store, tok, capsys):
    ckpt = training_checkpoint(tmp_path / "ckpt.pt", tok)
    tracking.register_model(logged_run(ckpt), "tiny-gpt")
    args = ["--prompt", "the cat chased the", "--max-new-tokens", "20", "--temperature", "0", "--device", "cpu"]
    assert cli_main(["generate", str(ckpt), *args]) == 0
    from_file = capsys.readouterr().out
    assert cli_main(["generate", "models:/tiny-gpt/1", *args]) == 0
    assert capsys.readouterr().out == from_file and len(from_file) > 25

    assert cli_main(["generate", "models:/tiny-gpt/2", *args]) == 2
    err = capsys.readouterr().err
    assert "models:/tiny-gpt/2: model 'tiny-gpt' has no version 2 (versions: 1)" in err
    assert cli_main(["generate", "models:/tiny-gtp/1", *args]) == 2
    err = capsys.readouterr().err
    assert "no registered model 'tiny-gtp'" in err and "did you mean tiny-gpt?" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_pipeline_register_creates_a_version_with_lineage_that_generates_like_the_checkpoint(tmp_path,
                                                                                              prefect_server):
    corpus = tmp_path / "registry-tiny.yaml"
    corpus.write_text(
        "name: registry-tiny\n"
        "sources:\n  - url: file://${python_stdlib}\n    format: dir\n    include: ['*.py']\n"
        "    exclude: ['site-packages/*', 'test/*', '*/test/*', '*/tests/*', 'idlelib/*', 'lib2to3/*']\n"
        "max_documents: 150\nclean:\n  profile: code\nsplit:\n  val_fraction: 0.1\n"
        "tokenizer:\n  vocab_size: 512\n  sample_bytes: 1500000\n")
    env = {**os.environ, **prefect_server.env, "LLMFORGE_MLRUNS": str(tmp_path / "mlruns"), "OMP_NUM_THREADS": "1",
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("LLMFORGE_PARENT_RUN_ID", None)
    sft = REPO / "tests" / "data" / "sft_facts.jsonl"
    args = ["pipeline", "--corpus", str(corpus), "--preset", "tiny", "--set", "model.n_layer=2", "--set",
            "model.n_embd=64", "--set", "model.n_head=2", "--set", "model.block_size=128", "--max-steps", "20",
            "--batch-size", "8", "--eval-every", "0", "--eval-tokens", "8192", "--set", "eval.max_tokens=8192",
            "--sft", str(sft), "--set", "finetune.train.max_steps=5", "--set", "finetune.train.eval_every=0",
            "--task-runner", "thread", "--workers", "1", "--register", "tiny-gpt"]
    r = subprocess.run([sys.executable, "-m", "llmforge", *args], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "registered: models:/tiny-gpt/1" in r.stdout

    from llmforge.pipeline.shards import Dataset

    c = tracking.client(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    version = c.get_model_version("tiny-gpt", "1")
    (data_dir,) = (tmp_path / "shards" / "registry-tiny").glob("tokens-*")
    (ft_dir,) = (tmp_path / "runs").glob("finetune-full-*")
    ds = Dataset.open(data_dir)
    ft_run = c.get_run(version.run_id)
    parent = c.get_run(ft_run.data.tags["mlflow.parentRunId"])
    assert ft_run.data.tags["llmforge.stage"] == "finetune"
    assert version.tags["llmforge.source_run"] == version.run_id
    assert version.tags["llmforge.dataset_fingerprint"] == ds.fingerprint
    assert version.tags["llmforge.tokenizer_fingerprint"] == ds.manifest["tokenizer"]["fingerprint"]
    assert float(version.tags["llmforge.val_bpb"]) == pytest.approx(parent.data.metrics["ft/val/bpb"])
    assert parent.data.tags["llmforge.registered_model"] == "models:/tiny-gpt/1"
    # every run holds one weights-only model and no other checkpoint file
    for run in c.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"):
        pts = [f for f in _files(c, run.info.run_id) if f.endswith(".pt")]
        assert pts == (["model/artifacts/model.pt"] if run.data.tags["llmforge.stage"] in ("train", "finetune")
                       else []), (run.data.tags["llmforge.stage"], pts)

    prompt = format_prompt("What did the cat do?")
    gen = ["generate", "--prompt", prompt, "--max-new-tokens", "24", "--temperature", "0", "--device", "cpu"]
    from_registry = subprocess.run([sys.executable, "-m", "llmforge", gen[0], "models:/tiny-gpt/1", *gen[1:]], env=env,
                                   cwd=tmp_path, capture_output=True, text=True, timeout=120)
    from_file = subprocess.run([sys.executable, "-m", "llmforge", gen[0], str(ft_dir / "model.pt"), *gen[1:]], env=env,
                               cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert from_registry.returncode == 0, from_registry.stderr
    assert from_registry.stdout == from_file.stdout and from_file.stdout.startswith(prompt)


def _files(c, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for a in c.list_artifacts(run_id, path):
        out += _files(c, run_id, a.path) if a.is_dir else [a.path]
    return out
