"""Wrong usages as a newcomer makes them: each is one line on stderr naming the thing and the fix,
exit code 2, before any server starts, with no traceback and nothing created on disk. (How many
seconds that takes is measured by bench/cli_latency.py, not asserted here: CI machines vary 3x.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmforge.model.checkpoint import capture_rng_state, save_checkpoint
from llmforge.model.gpt import GPT, GPTConfig
from llmforge.pipeline.shards import Dataset

try:
    from support.tinydata import tiny_dataset
except ImportError:  # tests/ is a package
    from tests.support.tinydata import tiny_dataset

SFT = Path(__file__).parent / "data" / "sft_facts.jsonl"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    data = tiny_dataset(root / "shards")
    ds = Dataset.open(data)
    model = GPT(GPTConfig(vocab_size=ds.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32))
    ckpt = save_checkpoint(root / "best.pt", model_state=model.state_dict(), optimizer_state=None,
                           scheduler_state=None, step=1, data_state={}, rng_state=capture_rng_state(),
                           config={"model": model.config.to_dict(), "train": {}}, lineage={},
                           tokenizer=ds.tokenizer_path.read_bytes())
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    weights = root / "model.safetensors"
    weights.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\0\0")
    notes = root / "notes.txt"
    notes.write_text("not a checkpoint\n")
    recipe = root / "typo.yaml"
    recipe.write_text("model:\n  preset: tiny\ntrain:\n  lrr: 3.0e-4\n")
    return {"data": data, "parent": data.parent, "ckpt": ckpt, "safetensors": weights, "notes": notes,
            "recipe": recipe}


# (argv, what the one line must say) -- {name} is replaced by the inputs above
CASES = [
    (["train", "--data", "{data}", "--preset", "tny"], ["'tny'", "did you mean tiny"]),
    (["prepare", "--corpus", "quickstrat"], ["quickstrat", "did you mean quickstart"]),
    (["train", "--data", "{parent}/nope"], ["nope", "no such directory", "llmforge prepare"]),
    (["train", "--data", "{parent}"], ["not a dataset", "did you mean --data {data}"]),
    (["generate", "{notes}", "--prompt", "x"], ["notes.txt", "not an llmforge checkpoint", "best.pt"]),
    (["evaluate", "{notes}", "--data", "{data}"], ["notes.txt", "not an llmforge checkpoint"]),
    (["finetune", "{data}/manifest.json", "--sft", str(SFT)], ["manifest.json", "a dataset manifest"]),
    (["generate", "{safetensors}"], ["model.safetensors", "a safetensors file", "not an llmforge checkpoint"]),
    (["train", "--data", "{data}", "--set", "train.lrr=3e-4"], ["--set train.lrr=3e-4", "did you mean lr"]),
    (["generate", "{ckpt}", "--device", "cuda"], ["--device cuda", "--device cpu"]),
    (["generate", "{ckpt}", "--temperature", "-1"], ["--temperature -1", "greater than or equal to 0"]),
    (["generate", "{ckpt}", "--top-p", "2"], ["--top-p 2", "less than or equal to 1"]),
    (["finetune", "{ckpt}", "--sft", "{parent}/missing.jsonl"], ["missing.jsonl", "no such SFT file"]),
    (["train", "--data", "{data}", "--config", "{recipe}"], ["typo.yaml", "unknown key train.lrr", "did you mean lr"]),
]


@pytest.mark.parametrize("argv,expected", CASES, ids=[" ".join(c[0][:2]) + f" #{i}" for i, c in enumerate(CASES)])
def test_wrong_usage_is_one_line_exit_2_and_creates_nothing(argv, expected, inputs, tmp_path):
    if "--device" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda is not a wrong usage here")
    fill = {k: str(v) for k, v in inputs.items()}
    cmd = [a.format(**fill) for a in argv]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run([sys.executable, "-m", "llmforge", *cmd], cwd=cwd, capture_output=True, text=True,
                       timeout=60, env={**__import__("os").environ, "LLMFORGE_MLRUNS": str(cwd / "mlruns")})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for piece in expected:
        assert piece.format(**fill) in lines[0], (piece, lines[0])
    assert "Prefect server" not in r.stdout + r.stderr  # refused before any server was started
    assert list(cwd.iterdir()) == [], f"created {sorted(p.name for p in cwd.iterdir())}"


def test_debug_shows_the_traceback_of_a_user_error(inputs, tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmforge", "--debug", "train", "--data", str(inputs["data"]),
                        "--preset", "tny"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error:")


def test_bad_usage_of_argparse_itself_is_one_line_too(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmforge", "train", "--max-steps", "many"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--max-steps" in r.stderr and "llmforge train --help" in r.stderr
