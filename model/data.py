"""Batches for training, read straight from the memory-mapped token shards.

Training batches are random ``block_size + 1`` token windows drawn uniformly over every token
position of a split (a window never crosses a shard boundary). The loader is *stateless by
design*: the batch for ``(seed, step, micro_step)`` is drawn from its own numpy generator
``default_rng([seed, step, micro_step])``, so a resumed run sees exactly the batches an
uninterrupted run would have seen, with nothing to save but the seed and the step. Under DDP
the *global* batch (``world_size * batch_size`` windows) is drawn once from that generator and
each rank gathers only its slice: W processes with batch B see exactly what one process with
batch W*B sees.

Nothing of the dataset is copied into memory: windows are gathered with numpy indexing on a
zero-copy sliding-window view of each shard's mapped token array, and cast to int64 once per
batch. On CUDA the batch goes through pinned memory with a non-blocking copy.

Any other batch source (fine-tuning with loss masks, say) plugs into the trainer through the
tiny :class:`BatchSource` protocol: ``get_batch(step, micro) -> (x, y)`` where ``y`` holds
``-100`` at positions that carry no loss, plus ``state_dict()`` / ``load_state_dict()``.
Validation is scored by :mod:`llmforge.model.evaluate` (the one held-out scorer).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from llmforge.pipeline.shards import Dataset

IGNORE_INDEX = -100  # targets equal to this carry no loss (matches GPT.forward's cross-entropy)


@runtime_checkable
class BatchSource(Protocol):
    """What the training loop needs from a batch source."""

    def get_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def to_device(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """numpy int64 array -> tensor on ``device`` (pinned + non_blocking on CUDA)."""
    t = torch.from_numpy(arr)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device) if device.type != "cpu" else t


def _windows(tokens: np.ndarray, width: int) -> np.ndarray:
    """Zero-copy (n - width + 1, width) view of every window of ``tokens``."""
    return np.lib.stride_tricks.sliding_window_view(tokens, width)


class ShardBatcher:
    """Random ``(x, y)`` batches of ``block_size`` tokens from one split of a token dataset.

    ``batch_size`` is the per-rank batch; ranks take disjoint slices of one global draw.
    """

    def __init__(
        self,
        dataset: Dataset,
        split: str,
        block_size: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ):
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"block_size and batch_size must be >= 1 (got {block_size}, {batch_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.dataset = dataset
        self.split = split
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.step = 0  # next step to be drawn; informational (batches depend only on their step)
        width = block_size + 1
        self._views: list[np.ndarray] = []
        counts = []
        for shard in dataset.shards(split):
            n = len(shard.tokens) - width + 1
            if n > 0:
                self._views.append(_windows(shard.tokens, width))
                counts.append(n)
        if not counts:
            raise ValueError(
                f"{dataset.root}: split {split!r} has no shard with at least {width} tokens "
                f"(block_size {block_size} + 1); use a smaller block_size or more data"
            )
        # ends[i] = number of valid window starts in shards 0..i; a global draw u < ends[-1]
        # maps to shard searchsorted(ends, u, 'right') at local start u - ends[i-1]
        self._ends = np.cumsum(np.asarray(counts, dtype=np.int64))
        self.num_windows = int(self._ends[-1])

    def __repr__(self) -> str:
        return (
            f"ShardBatcher({self.dataset.root}, split={self.split!r}, block_size={self.block_size}, "
            f"batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, windows={self.num_windows})"
        )

    def window_starts(self, step: int, micro: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, start offset) of this rank's windows for ``(step, micro)``."""
        rng = np.random.default_rng([self.seed, int(step), int(micro)])
        u = rng.integers(0, self.num_windows, size=self.batch_size * self.world_size, dtype=np.int64)
        u = u[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        shard = np.searchsorted(self._ends, u, side="right")
        start = u - np.where(shard > 0, self._ends[shard - 1], 0)
        return shard, start

    def get_numpy(self, step: int, micro: int = 0) -> np.ndarray:
        """The raw (batch_size, block_size + 1) int64 windows for ``(step, micro)``."""
        shard, start = self.window_starts(step, micro)
        if len(self._views) == 1:
            win = self._views[0][start]  # one gather (copy of B*(T+1) tokens) from the map
        else:
            win = np.empty((self.batch_size, self.block_size + 1), dtype=self._views[0].dtype)
            for s in np.unique(shard):
                sel = shard == s
                win[sel] = self._views[s][start[sel]]
        return win.astype(np.int64)

    def get_batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``x`` and next-token targets ``y``, both (batch_size, block_size) int64."""
        win = self.get_numpy(step, micro)
        self.step = max(self.step, int(step) + 1)
        if self.device.type == "cuda":
            t = to_device(win, self.device)
            return t[:, :-1].contiguous(), t[:, 1:].contiguous()
        return torch.from_numpy(np.ascontiguousarray(win[:, :-1])), torch.from_numpy(np.ascontiguousarray(win[:, 1:]))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"checkpoint data state was drawn with seed {state['seed']} but this run uses seed "
                f"{self.seed}; resuming would change the batch sequence (pass the original seed)"
            )
        self.step = int(state["step"])


class Prefetcher:
    """Wraps a batch source on CUDA: while step ``s`` runs, a background thread draws the next
    batch (``(s, micro + 1)`` or ``(s + 1, 0)``), pins it and copies it to the GPU on a side stream;
    the step waits only on that copy's event. Batches are a pure function of (step, micro), so
    prefetching cannot change them; a request for any other batch is drawn on the spot."""

    def __init__(self, source: Any, grad_accum: int, device: torch.device):
        from concurrent.futures import ThreadPoolExecutor

        self.source, self.grad_accum, self.device = source, grad_accum, device
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.stream = torch.cuda.Stream(device)
        self.pending: tuple[tuple[int, int], Any] | None = None

    def _fetch(self, step: int, micro: int):
        x, y = self.source.get_batch(step, micro)
        with torch.cuda.stream(self.stream):
            if not x.is_cuda:  # a source that already returns device tensors is passed through
                x = x.pin_memory().to(self.device, non_blocking=True)
                y = y.pin_memory().to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return x, y, done

    def get_batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pending is not None and self.pending[0] == (step, micro):
            x, y, done = self.pending[1].result()
        else:
            x, y, done = self._fetch(step, micro)
        nxt = (step, micro + 1) if micro + 1 < self.grad_accum else (step + 1, 0)
        self.pending = (nxt, self.pool.submit(self._fetch, *nxt))
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        x.record_stream(current)  # the copy's memory is not reused while this stream reads it
        y.record_stream(current)
        return x, y

    def __getattr__(self, name: str) -> Any:  # batch_size, block_size, ... of the source
        return getattr(self.source, name)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)
