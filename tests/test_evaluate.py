"""Evaluate stage: bits per byte against a hand computation, multiple choice, results + MLflow.

The helpers at the top build real inputs (a SentencePiece tokenizer, token shards with a
manifest, checkpoints) and are shared with ``test_finetune.py``.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmforge.model.checkpoint import capture_rng_state, save_checkpoint
from llmforge.model.data import ShardBatcher
from llmforge.model.evaluate import (
    EvalConfig,
    EvalStage,
    evaluate,
    load_mc_jsonl,
    score_multiple_choice,
    score_split,
    split_stream,
    windows,
)
from llmforge.model.gpt import GPT, GPTConfig
from llmforge.pipeline.fsutil import fingerprint
from llmforge.pipeline.shards import Dataset, split_summary, token_dtype, write_manifest, write_shard
from llmforge.pipeline.tokenizer import TOKENIZER_FILE, Tokenizer, TokenizerConfig, train_sentencepiece

torch.set_num_threads(1)
DATA = Path(__file__).parent / "data"

# a tiny world with fixed facts: a trained model learns which ending follows which context
FACTS = [
    ("the cat chased the", "mouse"),
    ("the dog fetched the", "ball"),
    ("the bird sang a", "song"),
    ("the fish swam in the", "river"),
    ("the child read a", "book"),
]


def make_texts(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = [f"{c} {e}." for c, e in (rng.choice(FACTS) for _ in range(rng.randint(2, 6)))]
        docs.append(" ".join(sents) + ("\n" if rng.random() < 0.5 else ""))
    return docs


def make_tokenizer(extra_text: str = "", vocab_size: int = 300) -> Tokenizer:
    sample = make_texts(200, seed=99) + [extra_text] * 20
    return Tokenizer(train_sentencepiece(sample, TokenizerConfig(vocab_size=vocab_size, threads=1)))


def make_dataset(root: Path, tok: Tokenizer, splits: dict[str, list[list[str]]]) -> Dataset:
    """A token dataset like the tokenize stage writes: ``splits[name]`` is a list of shards, each
    a list of document texts."""
    root.mkdir(parents=True, exist_ok=True)
    (root / TOKENIZER_FILE).write_bytes(tok.proto)
    dtype = token_dtype(tok.vocab_size)
    entries = {}
    for split, shards in splits.items():
        entries[split] = []
        for i, docs in enumerate(shards):
            ids = [tok.encode(d) + [tok.eos_id] for d in docs]
            tokens = np.array([t for doc in ids for t in doc], dtype=dtype)
            entries[split].append(
                write_shard(root / split / f"shard-{i:05d}.arrow", [f"{split}-{i}-{j}" for j in range(len(docs))],
                            [len(d.encode()) for d in docs], tokens, [len(x) for x in ids], eos_id=tok.eos_id)
            )
    write_manifest(root, {
        "fingerprint": fingerprint(splits, tok.fingerprint),
        "tokenizer": {"file": TOKENIZER_FILE, "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                      "eos_id": tok.eos_id},
        "token_dtype": np.dtype(dtype).name,
        "splits": {s: split_summary(e) for s, e in entries.items()},
    })
    return Dataset.open(root)


def tiny_config(vocab_size: int, block_size: int = 16) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32)


def save_model(path: Path, model: GPT, tok: Tokenizer, *, run_id: str | None = None, step: int = 0,
               train: dict | None = None) -> Path:
    return save_checkpoint(
        path, model_state=model.state_dict(), optimizer_state=None, scheduler_state=None, step=step,
        data_state={}, rng_state=capture_rng_state(), config={"model": model.config.to_dict(), "train": train or {}},
        lineage={"dataset_fingerprint": None, "tokenizer_fingerprint": tok.fingerprint, "mlflow_run_id": run_id,
                 "base_checkpoint": None},
        tokenizer=tok.proto,
    )


def fit(model: GPT, dataset: Dataset, steps: int, *, lr: float = 3e-3, batch_size: int = 16) -> GPT:
    """A few steps of plain next-token training on the dataset's train split."""
    batcher = ShardBatcher(dataset, "train", model.config.block_size, batch_size, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        x, y = batcher.get_batch(step, 0)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tokenizer()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tok) -> Dataset:
    root = tmp_path_factory.mktemp("ds") / "data"
    return make_dataset(root, tok, {
        "train": [make_texts(300, seed=1)],
        "val": [make_texts(4, seed=2), make_texts(3, seed=3) + ["ünïcode — bytes ≠ chars\n"]],
    })


@pytest.fixture(scope="module")
def trained(dataset) -> GPT:
    torch.manual_seed(0)
    return fit(GPT(tiny_config(dataset.vocab_size, block_size=32)), dataset, steps=150)


# ---------------------------------------------------------------------------------------------
# bits per byte


def val_texts() -> list[str]:
    return make_texts(4, seed=2) + make_texts(3, seed=3) + ["ünïcode — bytes ≠ chars\n"]


def hand_nll(model: GPT, stream: list[int], block: int, stride: int) -> float:
    """Target t (1..N-1) is predicted from stream[start:t], start per the documented windows:
    0 for t <= block, else k*stride with k = ceil((t - block) / stride)."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(stream)):
            start = 0 if t <= block else math.ceil((t - block) / stride) * stride
            logits, _ = model(torch.tensor([stream[start:t]]))
            total -= torch.log_softmax(logits[0, -1].double(), -1)[stream[t]].item()
    return total


@pytest.mark.parametrize("stride", [16, 5])
def test_bits_per_byte_matches_hand_computation(dataset, tok, stride):
    torch.manual_seed(1)
    model = GPT(tiny_config(dataset.vocab_size, block_size=16)).eval()
    texts = val_texts()
    stream = [tok.eos_id] + [t for d in texts for t in tok.encode(d) + [tok.eos_id]]
    n_bytes = sum(len(d.encode("utf-8")) for d in texts)
    assert n_bytes > sum(len(d) for d in texts)  # the multi-byte characters are counted as bytes

    r = score_split(model, dataset, "val", block_size=16, batch_size=3, stride=stride, progress=False)

    expected = hand_nll(model, stream, 16, stride)
    assert r["tokens"] == len(stream) - 1 == dataset.num_tokens("val")
    assert r["bytes"] == n_bytes == dataset.text_bytes("val")
    assert r["documents"] == len(texts)
    assert r["nll_sum"] == pytest.approx(expected, rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(expected / (math.log(2) * n_bytes), rel=1e-5)
    assert r["loss"] == pytest.approx(expected / (len(stream) - 1), rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-6)


def test_windows_score_every_target_exactly_once():
    for n, block, stride in [(1, 4, 4), (37, 8, 8), (37, 8, 3), (40, 8, 1), (8, 8, 2)]:
        scored = []
        for begin, end, k in windows(n, block, stride):
            assert 0 < end - begin <= block and 0 < k <= end - begin
            scored.extend(range(end - k + 1, end + 1))
        assert scored == list(range(1, n + 1)), (n, block, stride)


def test_max_tokens_scores_whole_documents_with_their_exact_bytes(dataset, tok):
    texts = val_texts()
    lengths = [len(tok.encode(d)) + 1 for d in texts]
    budget = lengths[0] + lengths[1] + lengths[2] // 2  # two documents fit, the third does not
    stream, counts = split_stream(dataset, "val", max_tokens=budget)
    assert counts == {"tokens": lengths[0] + lengths[1], "documents": 2,
                      "bytes": len(texts[0].encode()) + len(texts[1].encode())}
    # a budget reaching into the second shard takes documents from it too
    budget = sum(lengths[:5])
    _, counts = split_stream(dataset, "val", max_tokens=budget)
    assert counts["documents"] == 5 and counts["tokens"] == budget
    # a budget smaller than the first document still scores that one document
    _, counts = split_stream(dataset, "val", max_tokens=1)
    assert counts["documents"] == 1 and counts["tokens"] == lengths[0]


def test_trained_model_has_lower_bits_per_byte_than_untrained(dataset, trained):
    torch.manual_seed(0)
    untrained = GPT(tiny_config(dataset.vocab_size, block_size=32)).eval()
    kw = dict(block_size=32, batch_size=4, progress=False)
    good = score_split(trained, dataset, "val", **kw)["bits_per_byte"]
    bad = score_split(untrained, dataset, "val", **kw)["bits_per_byte"]
    assert good < 0.5 * bad


# ---------------------------------------------------------------------------------------------
# multiple choice


def test_multiple_choice_picks_the_ending_the_model_learned(dataset, tok, trained):
    items, bad = load_mc_jsonl(DATA / "mc_facts.jsonl")
    assert len(items) == 5 and bad == []
    r = score_multiple_choice(trained, tok, items, block_size=32, eos_id=tok.eos_id, progress=False)
    assert r["acc_norm"] == 1.0 and r["acc"] == 1.0

    torch.manual_seed(0)
    untrained = GPT(tiny_config(dataset.vocab_size, block_size=32)).eval()
    r0 = score_multiple_choice(untrained, tok, items, block_size=32, eos_id=tok.eos_id, progress=False)
    assert r0["acc_norm"] < 1.0  # the score measures the model, not the file


def test_multiple_choice_scores_are_ending_log_likelihoods(tok, trained):
    items, _ = load_mc_jsonl(DATA / "mc_facts.jsonl")
    item = items[0]
    r = score_multiple_choice(trained, tok, [item], block_size=32, eos_id=tok.eos_id, progress=False)
    res = r["per_item"][0]
    ctx = [tok.eos_id] + tok.encode(item.context)
    with torch.no_grad():
        for j, ending in enumerate(item.endings):
            end = tok.encode(" " + ending)
            seq = torch.tensor([ctx + end])
            logits, _ = trained(seq[:, :-1], seq[:, 1:])
            lp = torch.log_softmax(logits[0].double(), -1)
            expected = sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(end))
            assert res["logprob"][j] == pytest.approx(expected, rel=1e-5)
    lens = [len(tok.encode(" " + e)) for e in item.endings]
    assert res["pred"] == int(np.argmax(res["logprob"]))
    assert res["pred_norm"] == int(np.argmax([lp / n for lp, n in zip(res["logprob"], lens)]))


def test_mc_loader_accepts_context_key_and_names_bad_lines(tmp_path):
    p = tmp_path / "mc.jsonl"
    p.write_text(
        json.dumps({"context": "a b", "endings": ["c", "d"], "label": 1}) + "\n"
        + "{not json\n"
        + json.dumps({"ctx": "x", "endings": ["y", "z"], "label": 5}) + "\n"
        + json.dumps({"ctx": "x", "endings": ["y"], "label": 0}) + "\n"
    )
    items, bad = load_mc_jsonl(p)
    assert [(i.context, i.label) for i in items] == [("a b", 1)]
    assert [b.split(": ", 1)[0] for b in bad] == [f"{p}:2", f"{p}:3", f"{p}:4"]
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"mc\.jsonl: no usable multiple-choice items"):
        load_mc_jsonl(p)


# ---------------------------------------------------------------------------------------------
# the stage: checkpoint in, JSON + MLflow out


def test_evaluate_writes_results_json_and_mlflow_run(tmp_path, monkeypatch, dataset, tok, trained):
    monkeypatch.setenv("LLMFORGE_MLRUNS", str(tmp_path / "mlruns"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ckpt = save_model(tmp_path / "ckpt.pt", trained, tok, step=150)
    out = tmp_path / "eval.json"
    cfg = EvalConfig(batch_size=4, mc_file=str(DATA / "mc_facts.jsonl"), prompts=["the cat"], max_new_tokens=8,
                     device="cpu")
    result = EvalStage(ckpt, dataset.root, cfg, out=out).run(progress=False)

    saved = json.loads(out.read_text())
    assert saved["val"]["bits_per_byte"] == pytest.approx(result["val"]["bits_per_byte"])
    assert saved["val"]["tokens"] == dataset.num_tokens("val")
    assert saved["multiple_choice"]["acc_norm"] == 1.0
    assert saved["samples"][0]["prompt"] == "the cat" and saved["samples"][0]["completion"]
    assert saved["data_fingerprint"] == dataset.fingerprint

    from llmforge import tracking

    client = tracking.client()
    run = client.get_run(saved["mlflow_run_id"])
    assert run.data.metrics["val/bpb"] == pytest.approx(saved["val"]["bits_per_byte"])
    assert run.data.metrics["mc/acc_norm"] == 1.0
    assert run.data.tags["llmforge.stage"] == "evaluate"
    assert run.data.tags["llmforge.checkpoint"] == str(ckpt.resolve())  # a path: a tag, not a param
    assert (run.info.end_time - run.info.start_time) / 1000 >= saved["seconds"]  # the run spans the work
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval.json", "samples.txt"} <= artifacts


@pytest.mark.parametrize("trained_in,auto", [("bfloat16", torch.bfloat16), ("float32", torch.float32),
                                              ("auto", torch.float32)])
def test_evaluate_scores_in_the_precision_the_model_trained_in(tmp_path, monkeypatch, dataset, tok, trained,
                                                               trained_in, auto):
    """On a CPU ``--dtype auto`` scores a model trained in bf16 autocast in bf16 (as its training-time
    validation did), any other in float32; ``--dtype float32`` is float32 whatever it trained in."""
    monkeypatch.setenv("LLMFORGE_MLRUNS", str(tmp_path / "mlruns"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ckpt = save_model(tmp_path / "ckpt.pt", trained, tok, train={"dtype": trained_in})
    expect = {d: score_split(trained, dataset, "val", block_size=32, batch_size=4, dtype=d)["loss"]
              for d in (torch.float32, torch.bfloat16)}
    assert expect[torch.float32] != expect[torch.bfloat16]  # the two precisions are told apart below
    for name, dtype in (("auto", auto), ("float32", torch.float32)):
        cfg = EvalConfig(batch_size=4, max_new_tokens=0, device="cpu", dtype=name)
        result = EvalStage(ckpt, dataset.root, cfg, out=tmp_path / f"eval-{name}.json").run(progress=False)
        assert result["dtype"] == str(dtype).removeprefix("torch.")
        assert result["val"]["loss"] == pytest.approx(expect[dtype], rel=1e-12, abs=0)


def test_evaluate_refuses_data_from_another_tokenizer(tmp_path, dataset, tok, trained):
    ckpt = save_model(tmp_path / "ckpt.pt", trained, tok)
    other = make_tokenizer(extra_text="zebra quagga okapi " * 50)
    assert other.fingerprint != tok.fingerprint
    ds = make_dataset(tmp_path / "other", other, {"val": [make_texts(2, seed=5)]})
    with pytest.raises(ValueError, match="not the one .* was tokenized with"):
        evaluate(EvalStage(ckpt, ds.root, EvalConfig(prompts=[], device="cpu")), track=False, progress=False)


# ---------------------------------------------------------------------------------------------
# the command and the Prefect flow

LLMFORGE = str(Path(sys.executable).parent / "llmforge")


def cli(args: list[str], env: dict, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([LLMFORGE, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"llmforge {args} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


def cli_env(prefect_server, tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, **prefect_server.env, "LLMFORGE_MLRUNS": str(tmp_path / "mlruns"), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("LLMFORGE_PARENT_RUN_ID", None)
    return env


@pytest.mark.slow
def test_evaluate_command_then_flow_skips_the_same_evaluation(tmp_path, prefect_server, dataset, tok, trained):
    ckpt = save_model(tmp_path / "ckpt.pt", trained, tok)
    env = cli_env(prefect_server, tmp_path)
    args = ["evaluate", str(ckpt), "--data", str(dataset.root), "--mc", str(DATA / "mc_facts.jsonl"),
            "--prompt", "the dog", "--max-new-tokens", "8", "--device", "cpu"]
    first = cli([*args, "--no-prefect"], env, tmp_path)
    assert "acc_norm 1.0000" in first.stdout and "bits/byte" in first.stdout
    results = list((tmp_path / "eval").glob("ckpt-*.json"))
    assert len(results) == 1
    stored = json.loads(results[0].read_text())

    second = cli(args, env, tmp_path)  # as a Prefect flow: finds the same key and skips
    assert "already evaluated" in second.stdout
    assert json.loads(results[0].read_text()) == stored

    # another setting is another evaluation
    cli([*args, "--max-tokens", "50"], env, tmp_path)
    assert len(list((tmp_path / "eval").glob("ckpt-*.json"))) == 2


def test_evaluate_command_names_a_missing_checkpoint(tmp_path):
    p = subprocess.run([LLMFORGE, "evaluate", str(tmp_path / "nope.pt"), "--mc", str(DATA / "mc_facts.jsonl"),
                        "--no-prefect"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and "nope.pt: no such checkpoint file" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
