"""Checkpoints: the single owner of everything a bit-identical resume needs.

A checkpoint is one ``torch.save`` file holding only tensors and plain containers, so it
loads with ``torch.load(weights_only=True)`` and a file that smuggles in any other pickled
object (a class, an ``os.system`` reduce) is refused instead of executed. Its keys are:

====================  ==========================================================================
``format``            ``"llmforge.checkpoint"`` and ``format_version`` (int)
``model_state``       the model's ``state_dict()``
``optimizer_state``   the optimizer's ``state_dict()``
``scheduler_state``   the LR scheduler's ``state_dict()`` or ``None``
``step``              optimizer steps completed
``data_state``        the data loader's position (whatever it needs to continue where it stopped)
``rng_state``         :func:`capture_rng_state` (python, numpy, torch CPU and every CUDA device)
``config``            ``{"model": GPTConfig dict, "train": train config dict}``
``lineage``           ``{"dataset_fingerprint", "tokenizer_fingerprint", "mlflow_run_id",
                      "base_checkpoint"}``
``tokenizer``         the SentencePiece model file as a uint8 tensor (or ``None``), so a
                      checkpoint alone can generate text
``val_loss``          validation loss at this step, if measured
``extra``             any further plain data the caller wants kept
====================  ==========================================================================

Writes are atomic (temp file in the same directory, fsync, rename; see
:func:`pipeline.fsutil.atomic_path`): a crash mid-save leaves the previous file intact, and a full
disk is one line naming the file and the space.
:class:`CheckpointManager` keeps the last K ``ckpt-<step>.pt`` files plus ``best.pt`` and a
``latest.json`` pointer in a run's checkpoint directory.

Non-finite weights are never trusted: :func:`load_checkpoint` refuses a checkpoint whose weights
hold a NaN or an infinity (naming the file and the first such tensor), so resume, ``init_from``,
evaluate, generate and export all refuse it; :func:`save_checkpoint` refuses to write one; the
manager's rotation never removes the newest finite checkpoint (the one it just wrote), and
:meth:`CheckpointManager.last_good` names a checkpoint that loads and is finite.
``best.pt`` is its own file, written atomically: weights-only (model state, config, lineage,
tokenizer, step and val loss; no optimizer, data or RNG state), so it is about a third of a
resumable ``ckpt-*.pt`` and rewriting a checkpoint never changes it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmforge.errors import CheckpointError
from llmforge.pipeline.fsutil import atomic_path, atomic_write_json, clean_temp, read_json, stat_key

log = logging.getLogger(__name__)

FORMAT = "llmforge.checkpoint"
FORMAT_VERSION = 1
_CKPT_RE = re.compile(r"^ckpt-(\d{8,})\.pt$")
WHAT_TO_PASS = "give a checkpoint: ckpt-*.pt or best.pt of a training run (or its directory), or a fine-tune's model.pt"

__all__ = ["CheckpointError", "CheckpointManager", "load_checkpoint", "save_checkpoint", "find_checkpoint",
           "checkpoint_tokenizer", "tokenizer_bytes", "capture_rng_state", "restore_rng_state", "non_finite"]


# ---------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG a training step draws from, as tensors and plain types."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(py_version), "state": [int(x) for x in py_state],
                   "gauss_next": None if py_gauss is None else float(py_gauss)},
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` captured (CUDA: as many devices as both have)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npst = state["numpy"]
    keys = np.asarray(npst["keys"].numpy() if torch.is_tensor(npst["keys"]) else npst["keys"], dtype=np.uint32)
    np.random.set_state((npst["kind"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if len(cuda) != n:
            log.warning("checkpoint has CUDA RNG states for %d devices, this machine has %d; restoring %d",
                        len(cuda), n, min(n, len(cuda)))
        for i, s in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(s.cpu(), device=i)


# ---------------------------------------------------------------------------------------------
# save / load

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _check_plain(obj: Any, where: str) -> None:
    """Refuse, before writing anything, what ``weights_only`` loading would refuse later."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise CheckpointError(f"{where}: dict key {k!r} of type {type(k).__name__} cannot be saved")
            _check_plain(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot go in a checkpoint; "
        "checkpoints hold only tensors and plain containers (dict, list, tuple, str, int, float, bool, None)")


def non_finite(state: dict[str, Any]) -> str | None:
    """``"<name> (3 NaN, 1 inf of 4096 values)"`` for the first tensor of a state dict (in its
    order) holding a NaN or an infinity, or None when every value is finite."""
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            if not bool(torch.isfinite(t).all()):
                nan = int(torch.isnan(t).sum())
                inf = int(torch.isinf(t).sum())
                what = ", ".join(x for x in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if x)
                return f"{name} ({what} of {t.numel()} values)"
    return None


def _nbytes(obj: Any) -> int:
    """Bytes of tensor data in a nest of containers (what torch.save will write, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def tokenizer_tensor(tokenizer: bytes | str | os.PathLike | torch.Tensor | None) -> torch.Tensor | None:
    """The SentencePiece model as a uint8 tensor, from its bytes, its file path, or a tensor."""
    if tokenizer is None or isinstance(tokenizer, torch.Tensor):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        p = Path(tokenizer)
        if not p.is_file():
            raise CheckpointError(f"tokenizer model file not found: {p}")
        tokenizer = p.read_bytes()
    return torch.frombuffer(bytearray(tokenizer), dtype=torch.uint8).clone()


def save_checkpoint(path: str | os.PathLike, *, model_state: dict, optimizer_state: dict | None,
                    scheduler_state: dict | None, step: int, data_state: dict, rng_state: dict,
                    config: dict, lineage: dict, extra: dict | None = None,
                    tokenizer: bytes | str | os.PathLike | torch.Tensor | None = None,
                    val_loss: float | None = None) -> Path:
    """Write one checkpoint atomically; see the module docstring for its keys. Weights holding a
    NaN or an infinity are refused (:class:`CheckpointError`): such a file would only poison
    whatever loads it."""
    path = Path(path)
    if (bad := non_finite(model_state)) is not None:
        raise CheckpointError(f"{path}: not written: the weights are not finite ({bad})")
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_state": model_state,
        "optimizer_state": optimizer_state,
        "scheduler_state": scheduler_state,
        "step": int(step),
        "data_state": data_state,
        "rng_state": rng_state,
        "config": config,
        "lineage": lineage,
        "tokenizer": tokenizer_tensor(tokenizer),
        "val_loss": None if val_loss is None else float(val_loss),
        "extra": extra or {},
    }
    _check_plain(ckpt, str(path))
    with atomic_path(path, size_hint=_nbytes(ckpt)) as tmp:
        torch.save(ckpt, tmp)
    return path


def sniff_kind(path: Path) -> str:
    """What a file is, from its first bytes: ``torch`` (a zip, as torch.save writes), ``safetensors``,
    ``gguf``, ``json``, ``empty`` or ``other``."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if head.startswith(b"GGUF"):
        return "gguf"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    return "other"


_KIND_HINT = {
    "safetensors": "a safetensors file (exported weights, no config or tokenizer)",
    "gguf": "a GGUF file (for llama.cpp)",
    "json": "a JSON file",
    "other": "not a torch checkpoint",
}


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, checked by kind before anything unpickles it; a run directory gives its
    ``best.pt`` (else its newest ``ckpt-*.pt``; a fine-tune directory its ``model.pt``)."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "model.pt"):
            if (p / name).is_file():
                return p / name
        found = sorted(p.glob("ckpt-*.pt"))
        if found:
            return found[-1]
        if (p / "manifest.json").is_file():
            raise CheckpointError(f"{p}: a token dataset, not a checkpoint; {WHAT_TO_PASS}")
        raise CheckpointError(f"{p}: no checkpoint in this directory (no best.pt, model.pt or ckpt-*.pt); "
                              f"{WHAT_TO_PASS}")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file; {WHAT_TO_PASS}")
    kind = sniff_kind(p)
    if kind == "empty":
        raise CheckpointError(f"{p}: checkpoint file is empty (a save that never finished?)")
    if kind != "torch":
        what = _KIND_HINT[kind]
        if p.name == "manifest.json":
            what = "a dataset manifest"
        raise CheckpointError(f"{p}: {what}, not an llmforge checkpoint; {WHAT_TO_PASS}")
    return p


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    allow_non_finite: bool = False) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; :class:`CheckpointError` says what is wrong,
    including weights that hold a NaN or an infinity (unless ``allow_non_finite``, for tools
    that inspect a broken file)."""
    path = find_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL\s+([\w.]+)", str(e))
        culprit = m.group(1) if m else "an object that is not a tensor or plain container"
        raise CheckpointError(
            f"{path}: refused to load: it contains a pickled {culprit}, which is not a tensor or plain "
            "container. Checkpoints are loaded with weights_only=True so that opening one can never run "
            "code; re-save it from its state_dicts, or load it yourself only if you trust its source.") from e
    except PermissionError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint: {e}") from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or not a torch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'unexpected end of file'})") from e
    if not isinstance(ckpt, dict) or "model_state" not in ckpt:
        keys = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not an llmforge checkpoint (no 'model_state'; found {keys})")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ckpt['format_version']} is newer than "
                              f"this code understands ({FORMAT_VERSION}); upgrade llmforge")
    if not allow_non_finite and isinstance(ckpt["model_state"], dict) and \
            (bad := non_finite(ckpt["model_state"])) is not None:
        raise CheckpointError(f"{path}: refused: the weights are not finite, first in {bad}; it was written "
                              f"while training was diverging: use an earlier checkpoint of the run")
    return ckpt


def tokenizer_bytes(ckpt: dict[str, Any]) -> bytes | None:
    """The SentencePiece model file embedded in a loaded checkpoint (None if it has none)."""
    t = ckpt.get("tokenizer")
    return None if t is None else t.cpu().numpy().tobytes()


def checkpoint_tokenizer(ckpt: dict[str, Any], path: str | os.PathLike = "checkpoint"):
    """The :class:`~llmforge.pipeline.tokenizer.Tokenizer` a checkpoint carries: the one way
    code gets a tokenizer out of a checkpoint."""
    from llmforge.pipeline.tokenizer import Tokenizer

    data = tokenizer_bytes(ckpt)
    if data is None:
        raise CheckpointError(f"{path}: checkpoint carries no tokenizer, so it cannot encode or decode text")
    return Tokenizer(data)


# ---------------------------------------------------------------------------------------------
# a run's checkpoint directory


class CheckpointManager:
    """``out_dir/ckpt-<step:08d>.pt`` (the last ``keep_last``), ``best.pt`` (lowest val loss) and
    ``latest.json`` (names the newest and the best). Pass ``tokenizer`` (bytes or the ``.model``
    path) once here and every checkpoint embeds it."""

    def __init__(self, out_dir: str | os.PathLike, keep_last: int = 3,
                 tokenizer: bytes | str | os.PathLike | torch.Tensor | None = None) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self.tokenizer = tokenizer_tensor(tokenizer)
        self._good: tuple[Path, list[int]] | None = None  # the newest checkpoint known finite
        removed = clean_temp(self.out_dir)
        if removed:
            log.info("removed %d unfinished checkpoint temp file(s) in %s", removed, self.out_dir)
        self._index = self._read_index()

    @property
    def index_path(self) -> Path:
        return self.out_dir / "latest.json"

    def _read_index(self) -> dict[str, Any]:
        try:
            return read_json(self.index_path)
        except FileNotFoundError:
            pass
        except ValueError:
            log.warning("%s is not valid JSON; rebuilding it from the checkpoint files", self.index_path)
        best = self.out_dir / "best.pt"
        if best.is_file():  # index lost (killed between writes): recover the best val loss
            try:
                ck = load_checkpoint(best)
                if ck.get("val_loss") is not None:
                    return {"best": {"file": "best.pt", "step": ck["step"], "val_loss": ck["val_loss"]}}
            except CheckpointError as e:
                log.warning("ignoring unreadable %s: %s", best, e)
        return {}

    @staticmethod
    def list(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
        """(step, path) of every complete ``ckpt-*.pt`` in ``out_dir``, oldest first."""
        found = []
        for p in Path(out_dir).iterdir():
            m = _CKPT_RE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete ``ckpt-*.pt``, oldest first."""
        return self.list(self.out_dir)

    def save(self, step: int, *, model_state: dict, optimizer_state: dict | None,
             scheduler_state: dict | None, data_state: dict, rng_state: dict, config: dict,
             lineage: dict, extra: dict | None = None, val_loss: float | None = None) -> Path | None:
        """Write ``ckpt-<step>.pt`` (and ``best.pt`` when ``val_loss`` is the lowest yet), update
        ``latest.json`` and remove the checkpoints beyond the last ``keep_last``. Non-finite
        weights are not written (a warning, and None), so nothing here ever points at them."""
        path = self.out_dir / f"ckpt-{step:08d}.pt"
        if (bad := non_finite(model_state)) is not None:
            log.warning("not writing %s: the weights are not finite (%s)", path, bad)
            return None
        save_checkpoint(path, model_state=model_state, optimizer_state=optimizer_state,
                        scheduler_state=scheduler_state, step=step, data_state=data_state,
                        rng_state=rng_state, config=config, lineage=lineage, extra=extra,
                        tokenizer=self.tokenizer, val_loss=val_loss)
        self._good = (path, stat_key(path.stat()))
        best = self._index.get("best")
        if val_loss is not None and math.isfinite(val_loss) and (best is None or val_loss < best["val_loss"]):
            # its own file (a hard link would change with any rewrite of ``path``), weights only
            save_checkpoint(self.out_dir / "best.pt", model_state=model_state, optimizer_state=None,
                            scheduler_state=None, step=step, data_state=None, rng_state=None, config=config,
                            lineage=lineage, extra=extra, tokenizer=self.tokenizer, val_loss=val_loss)
            best = {"file": "best.pt", "step": int(step), "val_loss": float(val_loss)}
        self._index = {"latest": path.name, "step": int(step), "best": best}
        atomic_write_json(self.index_path, self._index)
        for _, old in self.checkpoints()[:-self.keep_last]:
            if old != path:  # the file just written is the newest finite one, whatever its step
                old.unlink(missing_ok=True)
        return path

    def last_good(self) -> Path | None:
        """The newest checkpoint that loads and whose weights are finite: the one this manager
        wrote last (if unchanged since), else the newest of the directory that passes
        :func:`load_checkpoint`."""
        if self._good is not None:
            path, key = self._good
            with contextlib.suppress(OSError):
                if stat_key(path.stat()) == key:
                    return path
        for _, p in reversed(self.checkpoints()):
            try:
                load_checkpoint(p)
            except CheckpointError:
                continue
            return p
        return None

    @property
    def best_val_loss(self) -> float | None:
        """Lowest validation loss saved so far (survives restarts through latest.json / best.pt)."""
        best = self._index.get("best")
        return None if best is None else float(best["val_loss"])

    def latest(self) -> Path | None:
        """The newest complete checkpoint (by step), or None in an empty directory."""
        ckpts = self.checkpoints()
        return ckpts[-1][1] if ckpts else None

    def best(self) -> Path | None:
        p = self.out_dir / "best.pt"
        return p if p.is_file() else None

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """Load the newest checkpoint that loads; an unreadable newest one is skipped with a
        warning (never deleted) so a damaged file does not cost the run its earlier progress."""
        for _, p in reversed(self.checkpoints()):
            try:
                return load_checkpoint(p, map_location)
            except CheckpointError as e:
                log.warning("skipping unreadable checkpoint: %s", e)
        return None
