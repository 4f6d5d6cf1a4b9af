"""The evaluate stage and the one held-out scorer: loss, perplexity and bits per byte, multiple
choice, samples.

:func:`score_split` is the only code that scores held-out text: training-time validation calls it
with ``train.eval_tokens`` and ``llmforge evaluate --max-tokens`` calls it the same way, so one
checkpoint, split and token budget give one number everywhere. It runs under
``torch.inference_mode`` and takes the NLL from the model's hidden states through its head a few
hundred positions at a time (``model/loss.py``'s ``token_nll``): each chunk's logits stay in cache
and give their log-sum-exp and their targets' logits, and the batch's logits never exist whole.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from pydantic import Field
from tqdm import tqdm

from llmforge import tracking
from llmforge.config import Config, control
from llmforge.errors import ConfigError, DataError, NotFound
from llmforge.model.checkpoint import find_checkpoint
from llmforge.model.data import IGNORE_INDEX
from llmforge.model.generate import DEFAULT_PROMPTS, SamplingConfig, format_samples, sample_texts
from llmforge.model.loss import token_nll
from llmforge.model.runtime import DistInfo, all_reduce, autocast, resolve_dtype
from llmforge.pipeline.fsutil import atomic_write_json, sha256_file
from llmforge.pipeline.shards import Dataset
from llmforge.stage import Stage

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 8  # windows per forward pass, for training-time validation and `llmforge evaluate` alike


class EvalConfig(Config):
    """What an evaluation computes (all but the control fields are part of its key)."""

    split: str = Field("val", description="split of the dataset to score")
    max_tokens: int | None = Field(None, gt=0, description="score only the first documents that fit in N tokens (default: all)")
    stride: int | None = Field(None, gt=0, description="slide windows by S tokens, scoring the last S of each (default: no overlap)")
    block_size: int | None = Field(None, gt=0, description="window length (default: the model's context)")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), description="prompts for sample generations")
    max_new_tokens: int = Field(64, ge=0, description="tokens per sample; 0 = no samples")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.8, top_k=50, seed=1337))
    mc_file: str | None = control(None, "multiple-choice JSONL (HellaSwag layout); its bytes are part of the key")
    batch_size: int = control(EVAL_BATCH_SIZE, "windows per forward pass", gt=0)
    device: str = control("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N")
    dtype: str = control("auto", "auto = bf16 autocast on CUDA, and on a CPU for a model trained in bf16; fp32 elsewhere")


class EvalOptions(Config):
    """``llmforge evaluate``'s settings tree (``--set eval.max_tokens=100000``)."""

    eval: EvalConfig = Field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# the held-out scorer


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
        raise DataError(f"{dataset.root}: split {split!r} has no tokens to evaluate")
    return _Stream(pieces), {"tokens": tokens, "documents": documents, "bytes": text_bytes}


def windows(n_targets: int, block_size: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, n_scored): inputs ``stream[begin:end]``, targets ``stream[begin+1:end+1]``,
    of which the last ``n_scored`` are scored. Every target 1..n_targets is scored exactly once."""
    if not 0 < stride <= block_size:
        raise ConfigError(f"stride must be in (0, block_size={block_size}], got {stride}")
    prev_end = 0
    begin = 0
    while prev_end < n_targets:
        end = min(begin + block_size, n_targets)
        yield begin, end, end - prev_end
        prev_end = end
        begin += stride


@torch.inference_mode()
def score_batches(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                  device: torch.device, dtype: torch.dtype = torch.float32,
                  progress: tqdm | None = None) -> tuple[float, int]:
    """(summed NLL in nats, number of scored targets) over ``(x, y)`` batches, ``y == -100``
    where a position is not scored. Summed across DDP ranks (each rank scores its own batches)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        n = (y != IGNORE_INDEX).sum()
        total[0] += _nll(model, x, y, dtype).double().sum()
        total[1] += n
        if progress is not None:
            progress.update(int(n))
    model.train(was_training)
    all_reduce(total, "sum")
    return float(total[0]), int(total[1])


def _nll(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each target's NLL (float32, ``(B, T)``, 0 where not scored): the model's hidden states, then
    its head (plain, LoRA-wrapped, under torch.compile or DDP) chunk by chunk."""
    with autocast(x.device, dtype):
        hidden, _ = model(x, hidden=True)
        return token_nll(hidden, getattr(model, "module", model).lm_head, y)


def _row_nll(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-row summed NLL (float64, on the CPU) of the scored targets."""
    return _nll(model, x, y, dtype).double().sum(1).cpu()


def window_batches(stream: _Stream, block_size: int, stride: int, batch_size: int, pad: int, *,
                   dist: DistInfo | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The scored windows of a stream as ``(x, y)`` batches (this rank's share under DDP)."""
    dist = dist or DistInfo()
    wins = list(windows(len(stream) - 1, block_size, stride))
    for b, i in enumerate(range(0, len(wins), batch_size)):
        if b % dist.world_size != dist.rank:
            continue
        chunk = wins[i : i + batch_size]
        x = np.full((len(chunk), block_size), pad, dtype=np.int64)
        y = np.full((len(chunk), block_size), IGNORE_INDEX, dtype=np.int64)
        for r, (begin, end, n_scored) in enumerate(chunk):
            n = end - begin
            x[r, :n] = stream.slice(begin, end)
            y[r, n - n_scored : n] = stream.slice(end - n_scored + 1, end + 1)
        yield torch.from_numpy(x), torch.from_numpy(y)


def score_split(model: nn.Module, dataset: Dataset, split: str = "val", *, block_size: int,
                batch_size: int = EVAL_BATCH_SIZE, max_tokens: int | None = None, stride: int | None = None,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                dist: DistInfo | None = None, progress: bool = False) -> dict[str, float]:
    """Loss, perplexity and bits per byte of ``split`` (see the module docstring for which
    tokens count): the one scorer of held-out text."""
    device = torch.device(device)
    stride = stride or block_size
    stream, counts = split_stream(dataset, split, max_tokens)
    bar = tqdm(total=counts["tokens"], desc=f"eval {split}", unit="tok", disable=not progress, leave=False)
    total, scored = score_batches(model, window_batches(stream, block_size, stride, batch_size, dataset.eos_id,
                                                        dist=dist),
                                  device=device, dtype=dtype, progress=bar)
    bar.close()
    if scored != counts["tokens"]:
        raise RuntimeError(f"scored {scored} targets, expected {counts['tokens']}")
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


class SplitScorer:
    """Training-time validation over a dataset split: ``score(model, ...)`` is :func:`score_split`
    with the run's token budget, so the number equals ``llmforge evaluate --max-tokens``'s."""

    def __init__(self, dataset: Dataset, split: str, block_size: int, max_tokens: int | None):
        if split not in dataset.splits():
            raise DataError(f"{dataset.root}: no split {split!r} (have {', '.join(dataset.splits())})")
        self.dataset, self.split, self.block_size, self.max_tokens = dataset, split, block_size, max_tokens

    def score(self, model: nn.Module, *, device: torch.device, dtype: torch.dtype,
              dist: DistInfo | None = None) -> dict[str, float]:
        return score_split(model, self.dataset, self.split, block_size=self.block_size, max_tokens=self.max_tokens,
                           device=device, dtype=dtype, dist=dist)


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
        raise NotFound(f"{path}: no such multiple-choice file")
    items: list[MCItem] = []
    bad: list[str] = []
    with open(path, "rb") as f:  # decoded line by line: one bad line costs that line only
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append(f"{path}:{lineno}: not UTF-8 text (byte {e.start})")
                continue
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
        raise DataError(f"{path}: no usable multiple-choice items ({'; '.join(bad[:5]) or 'empty file'})")
    return items, bad


def _join(context: str, ending: str) -> str:
    """The text of the ending as it follows the context (HellaSwag endings need a space)."""
    if context and not context[-1].isspace() and not ending[:1].isspace():
        return " " + ending
    return ending


@torch.inference_mode()
def score_multiple_choice(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[MCItem],
    *,
    block_size: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
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
        nll = _row_nll(model, torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), dtype)
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


def _check_tokenizers(ckpt_tok_fp: str, dataset: Dataset, checkpoint: Path) -> None:
    data_fp = dataset.manifest["tokenizer"].get("fingerprint")
    if data_fp and data_fp != ckpt_tok_fp:
        raise DataError(
            f"{checkpoint}: the model's tokenizer ({ckpt_tok_fp}) is not the one {dataset.root} was tokenized with "
            f"({data_fp}); loss and bits per byte would be meaningless. Evaluate on data prepared with this "
            f"model's tokenizer (llmforge prepare --tokenizer)."
        )


class EvalStage(Stage):
    """Evaluate one checkpoint on a token dataset (and/or a multiple-choice file).

    Output: one JSON file, ``<checkpoint dir>/eval/<checkpoint stem>-<key>.json`` unless ``out``
    names another; it holds its key, so a finished evaluation is found again and not redone."""

    name = "evaluate"

    def __init__(self, checkpoint: str | os.PathLike, data_dir: str | os.PathLike | None,
                 config: EvalConfig | None = None, *, out: str | os.PathLike | None = None):
        self.config = config or EvalConfig()
        self.checkpoint = find_checkpoint(checkpoint)
        self.dataset = Dataset.open(data_dir) if data_dir is not None else None
        if self.dataset is None and self.config.mc_file is None:
            raise ConfigError("give --data DATASET_DIR and/or --mc FILE.jsonl: there is nothing to evaluate on")
        if self.dataset is not None and self.config.split not in self.dataset.splits():
            raise ConfigError(f"--split {self.config.split}: {self.dataset.root} has splits "
                              f"{', '.join(self.dataset.splits())}")
        if self.config.mc_file is not None and not Path(self.config.mc_file).is_file():
            raise NotFound(f"{self.config.mc_file}: no such multiple-choice file")
        self._out = Path(out) if out is not None else None

    def inputs(self) -> Any:
        return [sha256_file(self.checkpoint), self.dataset.fingerprint if self.dataset else None,
                sha256_file(self.config.mc_file) if self.config.mc_file else None]

    @property
    def out_dir(self) -> Path:
        return self.result_path.parent

    @property
    def result_path(self) -> Path:
        return self._out or self.checkpoint.parent / "eval" / f"{self.checkpoint.stem}-{self.key}.json"

    def completed(self) -> dict[str, Any] | None:
        result = self.read_result(self.result_path)
        return result if result is not None and result.get("key") == self.key else None

    def run(self, *, experiment: str = tracking.EXPERIMENT, parent_run_id: str | None = None,
            progress: bool = True) -> dict[str, Any]:
        return evaluate(self, experiment=experiment, parent_run_id=parent_run_id, progress=progress)


def evaluate(stage: EvalStage, *, experiment: str = tracking.EXPERIMENT, parent_run_id: str | None = None,
             progress: bool = True, track: bool = True) -> dict[str, Any]:
    """Run an evaluation; write its results JSON (atomically) and record an MLflow run that spans
    the whole of it (loading the model included)."""
    cfg, dataset = stage.config, stage.dataset
    corpus = ((dataset.manifest.get("config") or {}).get("corpus") or {}).get("name") if dataset else None
    name = tracking.run_name("evaluate", corpus, stage.checkpoint.parent.name, stage.checkpoint.stem)
    tags = {tracking.TAG_CHECKPOINT: str(stage.checkpoint.resolve()), tracking.TAG_CORPUS: corpus,
            tracking.TAG_DATASET: dataset.fingerprint if dataset else None}
    run_ctx = tracking.stage_run(name, stage="evaluate", experiment=experiment, parent_run_id=parent_run_id,
                                 tags=tags) if track else _no_run()
    with run_ctx as run:
        result = _evaluate(stage, progress)
        if run is not None:
            result["mlflow_run_id"] = run.run_id
            run.tags({tracking.TAG_MODEL_RUN: result["model_run_id"]})
            run.params({"eval": cfg.key_dict()})
            run.metrics(result["metrics"], step=result.get("step") or 0)
        atomic_write_json(stage.result_path, result)
        if run is not None:
            run.artifact(stage.result_path)
            if result.get("samples"):
                run.text(format_samples(result["samples"]), "samples.txt")
    return result


def scoring_dtype(name: str, device: torch.device, trained: str | None) -> torch.dtype:
    """The precision that scores a checkpoint: ``auto`` is bf16 autocast on CUDA, and on a CPU for
    a model that trained in bf16 autocast (its training-time validation scored it so, and the same
    setting gives the same number; the CPU recipe's held-out score takes half float32's time and
    moves by 0.00004 bits/byte); float32 otherwise. ``trained``: the run's ``train.dtype``."""
    if name == "auto" and device.type == "cpu" and trained == "bfloat16":
        return torch.bfloat16
    return resolve_dtype(name, device)


def _evaluate(stage: EvalStage, progress: bool) -> dict[str, Any]:
    from llmforge.model.generate import load_for_inference

    cfg, dataset = stage.config, stage.dataset
    t0 = time.time()
    model, tok, meta = load_for_inference(stage.checkpoint, cfg.device)
    dev = next(model.parameters()).device
    dtype = scoring_dtype(cfg.dtype, dev, ((meta.get("config") or {}).get("train") or {}).get("dtype"))
    block_size = min(cfg.block_size or model.config.block_size, model.config.block_size)
    if dataset is not None:
        _check_tokenizers(tok.fingerprint, dataset, stage.checkpoint)
    mc_items, mc_problems = load_mc_jsonl(cfg.mc_file) if cfg.mc_file else ([], [])
    result: dict[str, Any] = {
        "key": stage.key,
        "checkpoint": str(stage.checkpoint.resolve()),
        "checkpoint_sha256": stage.inputs()[0],
        "step": meta.get("step"),
        "model_run_id": (meta.get("lineage") or {}).get("mlflow_run_id"),
        "tokenizer_fingerprint": tok.fingerprint,
        "data_dir": str(dataset.root.resolve()) if dataset else None,
        "data_fingerprint": dataset.fingerprint if dataset else None,
        "config": cfg.to_dict(),
        "device": str(dev),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if dataset is not None:
        result[cfg.split] = score_split(model, dataset, cfg.split, block_size=block_size, batch_size=cfg.batch_size,
                                        max_tokens=cfg.max_tokens, stride=cfg.stride, device=dev, dtype=dtype,
                                        progress=progress)
    if mc_items:
        mc = score_multiple_choice(model, tok, mc_items, block_size=block_size, device=dev, dtype=dtype,
                                   eos_id=tok.eos_id, progress=progress)
        result["multiple_choice"] = {**mc, "file": str(Path(cfg.mc_file).resolve()), "skipped_lines": mc_problems}
    if cfg.prompts and cfg.max_new_tokens > 0:
        result["samples"] = sample_texts(model, tok, cfg.prompts, max_new_tokens=cfg.max_new_tokens,
                                         sampling=cfg.sampling, device=dev)
    result["seconds"] = round(time.time() - t0, 3)
    result["metrics"] = eval_metrics(result, cfg.split)
    result["out"] = str(stage.result_path)
    return result


class _no_run:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def eval_metrics(result: dict[str, Any], split: str, prefix: str = "") -> dict[str, float]:
    """The numbers people compare, under the names every run uses (``val/loss``, ``val/bpb``)."""
    m: dict[str, float] = {}
    if split in result:
        r = result[split]
        m.update({f"{prefix}{split}/loss": r["loss"], f"{prefix}{split}/ppl": r["perplexity"],
                  f"{prefix}{split}/bpb": r["bits_per_byte"]})
    if "multiple_choice" in result:
        mc = result["multiple_choice"]
        m.update({f"{prefix}mc/acc": mc["acc"], f"{prefix}mc/acc_norm": mc["acc_norm"]})
    return m
