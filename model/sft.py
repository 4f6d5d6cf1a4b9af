"""Prompt/response data for instruction tuning: the chat template, the JSONL reader and a batcher.

The chat template is plain text that any of our SentencePiece tokenizers (byte fallback,
lossless) encodes without loss, so no special tokens are added to the base vocabulary::

    ### Instruction:
    {prompt}

    ### Response:
    {response}<EOS>

and, for Alpaca-style records with a non-empty ``input``::

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:
    {response}<EOS>

The prompt part (everything up to and including ``"### Response:\\n"``) and the response are
encoded separately and concatenated, so at inference ``encode(format_prompt(...))`` is exactly
the context the model was trained on. Loss is taken only on the response tokens and the EOS
that ends them: every other label is ``-100`` (``ignore_index``), as is every padding position.

The same layout for chat is :data:`CHAT_TEMPLATE`, a Hugging Face ``chat_template`` that fine-tuning
stores in the checkpoint (``extra["chat_template"]``). A conversation is laid out as training packs
examples: an optional system message and a blank line, then each past turn as its instruction
block followed by ``### Response:\n{reply}<EOS>``, then the new instruction block and the response
header. For one user message it renders ``format_prompt(message)`` byte for byte.

A JSONL line is ``{"prompt": ..., "response": ...}`` or Alpaca's ``{"instruction": ...,
"input": ..., "output": ...}``. Lines that are not JSON objects with non-empty string fields
are counted and named (file:line and why) and skipped; the load fails only when none remain.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from llmforge.errors import DataError, NotFound
from llmforge.model.data import IGNORE_INDEX, to_device

INSTRUCTION_HEADER = "### Instruction:\n"
INPUT_HEADER = "### Input:\n"
RESPONSE_HEADER = "### Response:\n"


# The same layout as a Hugging Face chat template (fine-tuning stores it in the checkpoint as
# extra["chat_template"]; model/chat.py renders it): an optional system message, then each turn as
# the instruction block and the response + EOS that training packs back to back, and for the
# generation prompt the response header. One user turn renders format_prompt(user) byte for byte.
# (The '\n' inside the Jinja string literals are Jinja's escapes.)
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] + '\\n\\n' }}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('conversation roles must alternate user/assistant/user/... after an optional "
    "system message') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '### Response:\\n' + message['content'] + eos_token }}"
    "{%- else -%}"
    "{{ raise_exception('unknown role ' + message['role'] + ' (roles: system, user, assistant)') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}"
)


def format_prompt(prompt: str, input: str = "") -> str:
    """The chat template up to where the model should start answering."""
    text = f"{INSTRUCTION_HEADER}{prompt}\n\n"
    if input:
        text += f"{INPUT_HEADER}{input}\n\n"
    return text + RESPONSE_HEADER


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str
    input: str = ""

    def prompt_text(self) -> str:
        return format_prompt(self.prompt, self.input)

    def key(self) -> str:
        """A stable hash of the example, used for the deterministic train/val split."""
        return hashlib.sha1(f"{self.prompt}\x00{self.input}\x00{self.response}".encode()).hexdigest()


@dataclass
class BadLine:
    line: int
    reason: str


def _parse_record(obj: Any) -> SFTExample:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "prompt" in obj or "response" in obj:
        prompt, response, inp = obj.get("prompt"), obj.get("response"), ""
        pk, rk = "prompt", "response"
    elif "instruction" in obj or "output" in obj:
        prompt, response, inp = obj.get("instruction"), obj.get("output"), obj.get("input") or ""
        pk, rk = "instruction", "output"
    else:
        raise ValueError(f"no prompt/response (or instruction/output) keys; keys are {sorted(obj)[:6]}")
    for k, v in ((pk, prompt), (rk, response), ("input", inp)):
        if not isinstance(v, str):
            raise ValueError(f"{k!r} must be a string, got {type(v).__name__}")
    if not prompt.strip():
        raise ValueError(f"empty {pk!r}")
    if not response.strip():
        raise ValueError(f"empty {rk!r}")
    return SFTExample(prompt=prompt, response=response, input=inp)


def load_sft_jsonl(path: str | os.PathLike) -> tuple[list[SFTExample], list[BadLine]]:
    """Read a prompt/response JSONL. Returns (examples, bad lines); raises when nothing is usable.
    Lines are decoded one at a time, so a line that is not UTF-8 costs that line only."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{path}: no such SFT file" + (" (it is a directory)" if path.is_dir() else ""))
    examples: list[SFTExample] = []
    bad: list[BadLine] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append(BadLine(lineno, f"not UTF-8 text (byte {e.start})"))
                continue
            if not line.strip():
                continue
            try:
                examples.append(_parse_record(json.loads(line)))
            except json.JSONDecodeError as e:
                bad.append(BadLine(lineno, f"invalid JSON ({e.msg} at column {e.colno})"))
            except ValueError as e:
                bad.append(BadLine(lineno, str(e)))
    if not examples:
        detail = "; ".join(f"line {b.line}: {b.reason}" for b in bad[:5]) or "the file is empty"
        raise DataError(f"{path}: no usable prompt/response records ({len(bad)} bad lines: {detail})")
    return examples, bad


def split_examples(examples: Sequence[SFTExample], val_fraction: float) -> tuple[list[SFTExample], list[SFTExample]]:
    """Deterministic train/val split by example hash (independent of file order)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for ex in examples:
        (val if int(ex.key()[:8], 16) / 0xFFFFFFFF < val_fraction else train).append(ex)
    if not train:  # tiny files: never leave training empty
        train, val = val, []
    return train, val


def encode_example(sp: Any, ex: SFTExample, eos_id: int) -> tuple[list[int], int]:
    """Token ids of prompt + response + EOS, and how many of them belong to the prompt."""
    prompt_ids = list(sp.encode(ex.prompt_text()))
    response_ids = list(sp.encode(ex.response))
    return prompt_ids + response_ids + [eos_id], len(prompt_ids)


def example_arrays(ids: Sequence[int], n_prompt: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``ids[:-1]`` and targets ``ids[1:]`` with targets inside the prompt set to -100:
    the model predicts every response token and the final EOS, and nothing of the prompt."""
    ids_arr = np.asarray(ids, dtype=np.int64)
    x = ids_arr[:-1]
    y = ids_arr[1:].copy()
    y[: max(n_prompt - 1, 0)] = IGNORE_INDEX  # y[i] is token i+1: tokens 1..n_prompt-1 are prompt
    return x, y


@dataclass
class SFTRows:
    """Fixed-length training rows: ``x`` and ``y`` are (rows, block_size) int64 arrays."""

    x: np.ndarray
    y: np.ndarray
    stats: dict


def build_rows(
    examples: Sequence[SFTExample], sp: Any, block_size: int, eos_id: int, *, pack: bool = False
) -> SFTRows:
    """Encode examples into rows of ``block_size`` inputs/targets, padded with label -100.

    An example whose prompt alone fills the block is dropped (counted as ``too_long``); one whose
    response does not fit is cut at the block end (counted as ``truncated``, it then has no EOS).
    With ``pack`` whole examples are packed greedily into rows (earlier examples in a row are
    visible to later ones through causal attention, which costs little and saves padding);
    without it each row holds one example.
    """
    stats = {"examples": len(examples), "too_long": 0, "truncated": 0, "rows": 0, "loss_tokens": 0, "tokens": 0}
    pieces: list[tuple[np.ndarray, np.ndarray]] = []
    for ex in examples:
        ids, n_prompt = encode_example(sp, ex, eos_id)
        if n_prompt >= block_size:
            stats["too_long"] += 1
            continue
        if len(ids) - 1 > block_size:
            ids = ids[: block_size + 1]
            stats["truncated"] += 1
        pieces.append(example_arrays(ids, n_prompt))
    if not pieces:
        raise DataError(
            f"all {len(examples)} examples have prompts of {block_size} tokens or more, the model's context "
            f"(block_size={block_size}); nothing is left to learn from"
        )
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    used = block_size + 1  # force a new row on the first piece
    for piece in pieces:
        if not pack or used + len(piece[0]) > block_size:
            rows.append([])
            used = 0
        rows[-1].append(piece)
        used += len(piece[0])
    X = np.full((len(rows), block_size), eos_id, dtype=np.int64)
    Y = np.full((len(rows), block_size), IGNORE_INDEX, dtype=np.int64)
    for i, row in enumerate(rows):
        at = 0
        for x, y in row:
            X[i, at : at + len(x)] = x
            Y[i, at : at + len(y)] = y
            at += len(x)
        stats["tokens"] += at
    stats["rows"] = len(rows)
    stats["loss_tokens"] = int((Y != IGNORE_INDEX).sum())
    return SFTRows(X, Y, stats)


class SFTBatcher:
    """Batches of SFT rows for ``model.train.train(..., batcher=...)``.

    ``get_batch(step, micro)`` draws ``batch_size`` distinct rows from a generator seeded by
    (seed, step, micro, rank), so a batch depends only on its coordinates: resuming at any step
    reproduces the exact batches, and the state dict only has to pin the data it was built on.
    """

    def __init__(
        self,
        rows: SFTRows,
        batch_size: int,
        *,
        seed: int = 1337,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ):
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.x, self.y = rows.x, rows.y
        self.batch_size = batch_size
        self.block_size = rows.x.shape[1]
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.stats = rows.stats
        self._digest = hashlib.sha1(rows.x.tobytes() + rows.y.tobytes()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.x)

    def indices(self, step: int, micro: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, micro, self.rank])
        n = len(self.x)
        return rng.choice(n, size=self.batch_size, replace=self.batch_size > n)

    def get_batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices(step, micro)
        return to_device(self.x[idx], self.device), to_device(self.y[idx], self.device)

    def state_dict(self) -> dict:
        return {"kind": "sft", "seed": self.seed, "rows": len(self.x), "digest": self._digest}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "sft" or state.get("digest") != self._digest:
            raise DataError(
                f"resuming an SFT run on different data: checkpoint has {state.get('rows')} rows "
                f"(digest {state.get('digest')}), this file gives {len(self.x)} rows (digest {self._digest})"
            )
        self.seed = int(state["seed"])


class SFTScorer:
    """Validation loss over SFT rows (response tokens + EOS only), through the one held-out
    scorer; under DDP rank r scores batches r, r + W, ... and the sums add up to the whole."""

    def __init__(self, rows: SFTRows, batch_size: int = 8):
        self.x, self.y, self.batch_size = rows.x, rows.y, batch_size

    def batches(self, dist: Any = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        for b, i in enumerate(range(0, len(self.x), self.batch_size)):
            if b % world == rank:
                yield torch.from_numpy(self.x[i : i + self.batch_size]), torch.from_numpy(self.y[i : i + self.batch_size])

    def score(self, model: nn.Module, *, device: torch.device, dtype: torch.dtype = torch.float32,
              dist: Any = None) -> dict[str, float]:
        from llmforge.model.evaluate import score_batches

        total, count = score_batches(model, self.batches(dist), device=device, dtype=dtype)
        return {"loss": total / max(count, 1), "tokens": count}


def response_loss(model: nn.Module, rows: SFTRows, *, batch_size: int = 8, device: str | torch.device = "cpu") -> float:
    """Mean cross-entropy (nats) over the response tokens (+ EOS) of all rows."""
    return SFTScorer(rows, batch_size).score(model, device=torch.device(device))["loss"]
