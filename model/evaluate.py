"""The evaluate stage: validation loss, perplexity and bits per byte, multiple choice, samples.

**Which tokens count.** A split is scored as one stream: an EOS (standing in for "start of
text", exactly as the EOS of the previous document does for every later document), then every
document of the split in shard order, each as its tokens followed by its EOS. Every token of
every document, its EOS included, is predicted exactly once, so ``tokens`` equals the split's
token count and the NLL covers all of them. Conditioning: the stream is cut into windows of at
most ``block_size`` inputs. With the default ``stride == block_size`` the windows do not
overlap (a window's first token is predicted from the previous window's last token only, so
each window restarts its context); a smaller ``stride`` slides windows by ``stride`` tokens and
scores only the last ``stride`` targets of each window (after the first), so every prediction
after the first window sees at least ``block_size - stride`` tokens of context: closer to the
model's true ability, at ``block_size / stride`` times the cost.

**Bits per byte** = ``sum NLL (nats) / (ln 2 * bytes)`` where ``bytes`` is the UTF-8 length of
the cleaned text of exactly the documents scored (the shards' ``n_bytes`` column; the EOS
tokens stand for no bytes, but predicting them is part of modelling the text). Unlike loss per
token it does not depend on the tokenizer, so models with different vocabularies compare.
``max_tokens`` scores only the first documents of the split whose tokens fit in that budget
(always at least one whole document), so the byte count stays exact.

**Multiple choice** reads a JSONL in the HellaSwag layout, ``{"ctx": str, "endings": [str, ...],
"label": int}`` (``"context"`` is accepted for ``"ctx"``). Each ending is scored by the
log-likelihood of its tokens given EOS + context; ``acc_norm`` picks the ending with the best
mean log-likelihood per ending token, ``acc`` the best sum.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from llmforge.model.data import IGNORE_INDEX
from llmforge.pipeline.fsutil import atomic_write_json, fingerprint, sha256_file
from llmforge.pipeline.shards import Dataset

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "The",
    "Once upon a time",
    "It was a dark and stormy night",
    "In the beginning",
    "The meaning of life is",
)


@dataclass
class EvalConfig:
    """Everything that changes the numbers an evaluation produces (part of its cache key)."""

    split: str = "val"
    batch_size: int = 8
    max_tokens: int | None = None  # score only the first documents fitting in this many tokens
    stride: int | None = None  # None: non-overlapping windows of block_size
    block_size: int | None = None  # None: the model's block_size
    mc_file: str | None = None
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = 50
    seed: int = 1337

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompts"] = list(self.prompts)
        return d


# ---------------------------------------------------------------------------------------------
# loss / perplexity / bits per byte


class _Stream:
    """A read-only concatenation of token arrays (zero-copy pieces of mapped shards)."""

    def __init__(self, pieces: Sequence[np.ndarray]):
        self.pieces = [p for p in pieces if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.pieces])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def slice(self, a: int, b: int) -> np.ndarray:
        out = []
        i = int(np.searchsorted(self.starts, a, side="right")) - 1
        while a < b:
            lo = a - int(self.starts[i])
            hi = min(b - int(self.starts[i]), len(self.pieces[i]))
            out.append(self.pieces[i][lo:hi])
            a += hi - lo
            i += 1
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def split_stream(dataset: Dataset, split: str, max_tokens: int | None = None) -> tuple[_Stream, dict]:
    """The scored stream of a split (see module docstring) and its document/token/byte counts."""
    eos = np.array([dataset.eos_id], dtype=dataset.dtype)
    pieces: list[np.ndarray] = [eos]
    tokens = documents = text_bytes = 0
    for shard in dataset.shards(split):
        offsets = shard.offsets.astype(np.int64) - int(shard.offsets[0])
        n_docs = len(offsets) - 1
        if max_tokens is not None:
            # documents 0..k-1 fit when offsets[k] <= budget left; always take at least one overall
            k = int(np.searchsorted(offsets, max_tokens - tokens, side="right")) - 1
            if documents == 0:
                k = max(k, 1)
            n_docs = min(n_docs, max(k, 0))
        if n_docs <= 0:
            if max_tokens is not None:
                break
            continue
        end = int(offsets[n_docs])
        pieces.append(shard.tokens[:end])
        tokens += end
        documents += n_docs
        text_bytes += int(shard.n_bytes[:n_docs].sum())
    if tokens == 0:
        raise ValueError(f"{dataset.root}: split {split!r} has no tokens to evaluate")
    return _Stream(pieces), {"tokens": tokens, "documents": documents, "bytes": text_bytes}


def windows(n_targets: int, block_size: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, n_scored): inputs ``stream[begin:end]``, targets ``stream[begin+1:end+1]``,
    of which the last ``n_scored`` are scored. Every target 1..n_targets is scored exactly once."""
    if not 0 < stride <= block_size:
        raise ValueError(f"stride must be in (0, block_size={block_size}], got {stride}")
    prev_end = 0
    begin = 0
    while prev_end < n_targets:
        end = min(begin + block_size, n_targets)
        yield begin, end, end - prev_end
        prev_end = end
        begin += stride


def _autocast(device: torch.device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _token_nll(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-position NLL in nats (float32), 0 where ``y == -100``."""
    with _autocast(x.device):
        logits, _ = model(x, y)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.view_as(y)


@torch.no_grad()
def split_nll(
    model: nn.Module,
    dataset: Dataset,
    split: str = "val",
    *,
    block_size: int,
    batch_size: int = 8,
    max_tokens: int | None = None,
    stride: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """Sum of NLL over the whole split and the derived loss, perplexity and bits per byte."""
    device = torch.device(device)
    stride = stride or block_size
    stream, counts = split_stream(dataset, split, max_tokens)
    n_targets = len(stream) - 1
    assert n_targets == counts["tokens"]
    was_training = model.training
    model.eval()
    total = 0.0
    scored = 0
    pad = dataset.eos_id
    wins = list(windows(n_targets, block_size, stride))
    bar = tqdm(total=n_targets, desc=f"eval {split}", unit="tok", disable=not progress, leave=False)
    for i in range(0, len(wins), batch_size):
        chunk = wins[i : i + batch_size]
        x = np.full((len(chunk), block_size), pad, dtype=np.int64)
        y = np.full((len(chunk), block_size), IGNORE_INDEX, dtype=np.int64)
        for r, (begin, end, n_scored) in enumerate(chunk):
            n = end - begin
            x[r, :n] = stream.slice(begin, end)
            y[r, n - n_scored : n] = stream.slice(end - n_scored + 1, end + 1)
        xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        total += float(_token_nll(model, xt, yt).double().sum())
        done = int((yt != IGNORE_INDEX).sum())
        scored += done
        bar.update(done)
    bar.close()
    model.train(was_training)
    assert scored == n_targets, (scored, n_targets)
    loss = total / scored
    return {
        "nll_sum": total,
        "tokens": scored,
        "documents": counts["documents"],
        "bytes": counts["bytes"],
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": total / (math.log(2) * counts["bytes"]) if counts["bytes"] else float("nan"),
        "tokens_per_byte": scored / counts["bytes"] if counts["bytes"] else float("nan"),
    }


# ---------------------------------------------------------------------------------------------
# multiple choice


@dataclass
class MCItem:
    context: str
    endings: list[str]
    label: int


def load_mc_jsonl(path: str | os.PathLike) -> tuple[list[MCItem], list[str]]:
    """Read a HellaSwag-layout JSONL; returns (items, problems). Raises if no item is usable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such multiple-choice file")
    items: list[MCItem] = []
    bad: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
                ctx = obj.get("ctx", obj.get("context"))
                endings, label = obj.get("endings"), obj.get("label")
                if not isinstance(ctx, str):
                    raise ValueError("missing string 'ctx' (or 'context')")
                if not (isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) and e for e in endings)):
                    raise ValueError("'endings' must be a list of at least 2 non-empty strings")
                if isinstance(label, str) and label.strip().isdigit():
                    label = int(label)
                if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
                    raise ValueError(f"'label' must be an int index into endings, got {label!r}")
                items.append(MCItem(ctx, endings, label))
            except json.JSONDecodeError as e:
                bad.append(f"{path}:{lineno}: invalid JSON ({e.msg})")
            except ValueError as e:
                bad.append(f"{path}:{lineno}: {e}")
    if not items:
        raise ValueError(f"{path}: no usable multiple-choice items ({'; '.join(bad[:5]) or 'empty file'})")
    return items, bad


def _join(context: str, ending: str) -> str:
    """The text of the ending as it follows the context (HellaSwag endings need a space)."""
    if context and not context[-1].isspace() and not ending[:1].isspace():
        return " " + ending
    return ending


@torch.no_grad()
def score_multiple_choice(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[MCItem],
    *,
    block_size: int,
    device: str | torch.device = "cpu",
    eos_id: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy (sum log-likelihood) and acc_norm (per-token mean) over ``items``."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = correct_norm = 0
    per_item = []
    for item in tqdm(items, desc="multiple choice", disable=not progress, leave=False):
        ctx = [eos_id] + list(tokenizer.encode(item.context))
        ends = [list(tokenizer.encode(_join(item.context, e))) for e in item.endings]
        seqs, n_end = [], []
        for e in ends:
            if not e:
                raise ValueError(f"ending encodes to no tokens: {item.endings}")
            s = (ctx + e)[-(block_size + 1) :]  # keep the ending; cut the context from the left
            seqs.append(s)
            n_end.append(min(len(e), len(s) - 1))
        T = max(len(s) for s in seqs) - 1
        x = np.full((len(seqs), T), eos_id, dtype=np.int64)
        y = np.full((len(seqs), T), IGNORE_INDEX, dtype=np.int64)
        for r, (s, k) in enumerate(zip(seqs, n_end)):
            n = len(s) - 1
            x[r, :n] = s[:-1]
            y[r, n - k : n] = s[n - k + 1 :]
        nll = _token_nll(model, torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)).double().sum(1).cpu()
        logprob = (-nll).tolist()
        mean = [lp / k for lp, k in zip(logprob, n_end)]
        pred, pred_norm = int(np.argmax(logprob)), int(np.argmax(mean))
        correct += pred == item.label
        correct_norm += pred_norm == item.label
        per_item.append({"label": item.label, "pred": pred, "pred_norm": pred_norm, "logprob": logprob})
    model.train(was_training)
    n = len(items)
    return {"items": n, "acc": correct / n, "acc_norm": correct_norm / n, "per_item": per_item}


# ---------------------------------------------------------------------------------------------
# the stage


def result_key(checkpoint: str | os.PathLike, data_dir: str | os.PathLike | None, cfg: EvalConfig) -> str:
    """:func:`eval_key` of the files themselves (hashes the checkpoint)."""
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
    data_fp = Dataset.open(data_dir).fingerprint if data_dir is not None else None
    return eval_key(sha256_file(checkpoint), data_fp, cfg)


def default_result_path(checkpoint: str | os.PathLike, key: str) -> Path:
    """``<checkpoint dir>/eval/<checkpoint stem>-<key>.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent / "eval" / f"{checkpoint.stem}-{key}.json"


def stored_result(path: str | os.PathLike, key: str) -> dict[str, Any] | None:
    """The result at ``path`` if it exists and was computed for ``key`` (else None)."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("key") == key else None


def eval_key(checkpoint_sha256: str, data_fingerprint: str | None, cfg: EvalConfig) -> str:
    """What makes two evaluations the same: the checkpoint bytes, the data, the config and the
    multiple-choice file's bytes."""
    mc_sha = sha256_file(cfg.mc_file) if cfg.mc_file else None
    config = {k: v for k, v in cfg.to_dict().items() if k != "mc_file"}  # its bytes count, not its path
    return fingerprint("evaluate", checkpoint_sha256, data_fingerprint, config, mc_sha)


def sample_generations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    eos_id: int,
    device: str | torch.device = "cpu",
) -> list[dict[str, str]]:
    """One completion per prompt, each seeded by ``seed + i`` so results are reproducible."""
    from llmforge.model.generate import generate

    out = []
    for i, prompt in enumerate(prompts):
        ids = [eos_id] + list(tokenizer.encode(prompt))  # EOS = start of a document, as in training
        idx = torch.tensor([ids[-model.config.block_size :]], dtype=torch.long, device=device)
        res = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed + i, eos_id=eos_id)
        new = [t for t in res[0, idx.size(1) :].tolist() if t != eos_id]
        out.append({"prompt": prompt, "completion": tokenizer.decode(new)})
    return out


def _check_tokenizers(ckpt_tok_fp: str, dataset: Dataset, checkpoint: Path) -> None:
    data_fp = dataset.manifest["tokenizer"].get("fingerprint")
    if data_fp and data_fp != ckpt_tok_fp:
        raise ValueError(
            f"{checkpoint}: the model's tokenizer (fingerprint {ckpt_tok_fp}) is not the one {dataset.root} was "
            f"tokenized with ({data_fp}); loss and bits per byte would be meaningless. Re-run prepare with "
            f"--tokenizer from this checkpoint, or evaluate on data made with its tokenizer."
        )


def evaluate(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike | None,
    *,
    cfg: EvalConfig | None = None,
    out: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    parent_run_id: str | None = None,
    experiment: str = "llmforge",
    track: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate one checkpoint; write the results JSON (atomically) to ``out`` and log to MLflow.

    ``data_dir`` (a token dataset) gives loss / perplexity / bits per byte on ``cfg.split``;
    ``cfg.mc_file`` adds multiple-choice accuracy; ``cfg.prompts`` sample generations. Any of
    them may be skipped (``data_dir=None``, ``mc_file=None``, ``prompts=()``).
    """
    from llmforge.model.generate import load_for_inference
    from llmforge.pipeline.tokenizer import Tokenizer

    cfg = cfg or EvalConfig()
    checkpoint = Path(checkpoint)
    t0 = time.time()
    model, sp, meta = load_for_inference(checkpoint, device)
    dev = next(model.parameters()).device
    tok = Tokenizer(sp.serialized_model_proto())
    block_size = min(cfg.block_size or model.config.block_size, model.config.block_size)
    dataset = Dataset.open(data_dir) if data_dir is not None else None
    if dataset is not None:
        _check_tokenizers(tok.fingerprint, dataset, checkpoint)
    mc_items: list[MCItem] = []
    mc_problems: list[str] = []
    if cfg.mc_file:
        mc_items, mc_problems = load_mc_jsonl(cfg.mc_file)
        for p in mc_problems[:20]:
            log.warning("skipping %s", p)
    ckpt_sha = sha256_file(checkpoint)
    lineage = meta.get("lineage") or {}
    result: dict[str, Any] = {
        "key": eval_key(ckpt_sha, dataset.fingerprint if dataset else None, cfg),
        "checkpoint": str(checkpoint.resolve()),
        "checkpoint_sha256": ckpt_sha,
        "step": meta.get("step"),
        "model_run_id": lineage.get("mlflow_run_id"),
        "tokenizer_fingerprint": tok.fingerprint,
        "data_dir": str(Path(data_dir).resolve()) if data_dir is not None else None,
        "data_fingerprint": dataset.fingerprint if dataset else None,
        "config": cfg.to_dict(),
        "device": str(dev),
    }
    if dataset is not None:
        result[cfg.split] = split_nll(
            model, dataset, cfg.split, block_size=block_size, batch_size=cfg.batch_size,
            max_tokens=cfg.max_tokens, stride=cfg.stride, device=dev, progress=progress,
        )
        r = result[cfg.split]
        log.info("%s: loss %.4f  ppl %.2f  bpb %.4f over %d tokens / %d bytes",
                 cfg.split, r["loss"], r["perplexity"], r["bits_per_byte"], r["tokens"], r["bytes"])
    if mc_items:
        mc = score_multiple_choice(model, tok, mc_items, block_size=block_size, device=dev, eos_id=tok.eos_id,
                                   progress=progress)
        mc["file"] = str(Path(cfg.mc_file).resolve())
        mc["skipped_lines"] = mc_problems
        result["multiple_choice"] = mc
    if cfg.prompts and cfg.max_new_tokens > 0:
        result["samples"] = sample_generations(
            model, tok, cfg.prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            top_k=cfg.top_k, seed=cfg.seed, eos_id=tok.eos_id, device=dev,
        )
    result["seconds"] = round(time.time() - t0, 3)
    result["metrics"] = _metrics(result, cfg.split)
    result["out"] = str(out) if out is not None else None
    if track:
        _track(result, out, parent_run_id=parent_run_id, experiment=experiment)
    elif out is not None:
        atomic_write_json(out, result)
    return result


def _metrics(result: dict[str, Any], split: str) -> dict[str, float]:
    m: dict[str, float] = {}
    if split in result:
        r = result[split]
        m.update({f"{split}_loss": r["loss"], f"{split}_perplexity": r["perplexity"], f"{split}_bpb": r["bits_per_byte"]})
    if "multiple_choice" in result:
        m.update({"mc_acc": result["multiple_choice"]["acc"], "mc_acc_norm": result["multiple_choice"]["acc_norm"]})
    return m


def format_samples(samples: Sequence[dict[str, str]]) -> str:
    return "\n\n".join(f"=== {s['prompt']!r}\n{s['prompt']}{s['completion']}" for s in samples) + "\n"


def _track(result: dict, out: str | os.PathLike | None, *, parent_run_id: str | None, experiment: str) -> None:
    """One MLflow run per evaluation: params, metrics, the results JSON and the samples."""
    import mlflow

    from llmforge.pipeline import tracking

    tags = {"llmforge.stage": "evaluate", "llmforge.checkpoint": result["checkpoint"]}
    if result.get("model_run_id"):
        tags["llmforge.model_run_id"] = result["model_run_id"]
    with tracking.run("evaluate", experiment=experiment, parent_run_id=parent_run_id, tags=tags) as run:
        result["mlflow_run_id"] = run.info.run_id
        tracking.log_params({"eval": result["config"], "checkpoint": result["checkpoint"],
                             "checkpoint_sha256": result["checkpoint_sha256"],
                             "data_fingerprint": result["data_fingerprint"]})
        if result["metrics"]:
            mlflow.log_metrics(result["metrics"], step=result.get("step") or 0)
        if out is not None:
            atomic_write_json(out, result)
            mlflow.log_artifact(str(out))
        else:
            mlflow.log_dict(result, "eval.json")
        if result.get("samples"):
            mlflow.log_text(format_samples(result["samples"]), "samples.txt")
