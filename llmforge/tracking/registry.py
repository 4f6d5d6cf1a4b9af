"""The model registry: a checkpoint logged to its run as an MLflow model, versions with lineage.

**A logged model** is the ``model/`` directory of a run's artifacts, in MLflow's pyfunc format
(``MLmodel``, the pickled :class:`~llmforge.tracking.pyfunc.GPTPyfunc`, requirements) around ONE
file: ``artifacts/model.pt``, a weights-only checkpoint (model state, config, tokenizer, lineage and
the chat template; no optimizer state). ``mlflow.pyfunc.load_model(uri).predict(["prompt"])``
returns completions. A run holds one logged model; logging it again is a no-op when the same
weights are already there, so no file is uploaded twice.

**A registered version** (``models:/NAME/VERSION``) points at a run's logged model and carries
the lineage as tags: :data:`TAG_DATASET`, :data:`TAG_TOKENIZER`, :data:`TAG_VAL_BPB`,
:data:`TAG_SOURCE_RUN` and the checkpoint's sha256.

**Using one**: :func:`download_model` turns ``models:/NAME/VERSION`` (or ``models:/NAME@alias``,
``runs:/RUN_ID/model``) into a local checkpoint file, downloaded once into
``<mlruns>/downloads/`` and checked against its sha256; ``llmforge generate|chat|serve`` accept
such URIs through :func:`llmforge.model.generate.load_model`.

mlflow is imported inside the functions (only :mod:`llmforge.tracking.pyfunc` needs it at import).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

ARTIFACT = "model"  # the logged model's directory in a run's artifacts
CHECKPOINT_FILE = "model.pt"  # the weights inside it (artifacts/model.pt)
# on the run that holds a logged model: what its weights are (a digest of the tensors, so the same
# weights saved twice match) and the sha256 of the file (to verify a download)
TAG_WEIGHTS = "llmforge.model_weights"
TAG_MODEL_FILE = "llmforge.model_sha256"

# model version tags (lineage)
TAG_DATASET = "llmforge.dataset_fingerprint"
TAG_TOKENIZER = "llmforge.tokenizer_fingerprint"
TAG_VAL_BPB = "llmforge.val_bpb"
TAG_SOURCE_RUN = "llmforge.source_run"
TAG_CHECKPOINT_SHA = "llmforge.checkpoint_sha256"
TAG_BASE_RUN = "llmforge.base_run_id"

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$|^runs:/(?P<run>[0-9a-f]+)/(?P<path>.+)$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_only(checkpoint: str | os.PathLike, out: Path) -> tuple[Path, str]:
    """(``checkpoint`` itself when it holds no optimizer state, else a copy without it written to
    ``out`` (model state, config, tokenizer, lineage, val loss and extra kept), the weights' digest)."""
    from llmforge.model.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint

    path = find_checkpoint(checkpoint)
    ckpt = load_checkpoint(path)
    digest = weights_digest(ckpt)
    if ckpt.get("optimizer_state") is None:
        return path, digest
    return save_checkpoint(out, model_state=ckpt["model_state"], optimizer_state=None, scheduler_state=None,
                           step=ckpt.get("step", 0), data_state={}, rng_state={}, config=ckpt.get("config") or {},
                           lineage=ckpt.get("lineage") or {}, extra=ckpt.get("extra") or {},
                           tokenizer=ckpt.get("tokenizer"), val_loss=ckpt.get("val_loss")), digest


def weights_digest(ckpt: Mapping[str, Any]) -> str:
    """What the model computes, as a hash: every tensor (name, dtype, shape, bytes), the config,
    the tokenizer and the extra data (the chat template). File bytes would not do: torch.save
    writes a random serialization id into every file."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(ckpt["model_state"].items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    h.update(json.dumps([ckpt.get("config"), ckpt.get("extra")], sort_keys=True, default=str).encode())
    if ckpt.get("tokenizer") is not None:
        h.update(ckpt["tokenizer"].numpy().tobytes())
    return h.hexdigest()[:32]


def log_model(checkpoint: str | os.PathLike, *, run_id: str, register: str | None = None,
              tags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Log ``checkpoint`` (weights only) to run ``run_id`` as its MLflow model, and with
    ``register`` create a version of that registered model (:func:`register_model`).

    Returns ``{"model_uri": "runs:/<run>/model", "sha256", "logged": bool}`` (``logged`` False when
    the run already held these weights) plus, when registered, ``name``, ``version`` and ``tags``.
    """
    import mlflow.pyfunc

    from llmforge import tracking
    from llmforge.tracking import pyfunc

    c = tracking.client()
    with tempfile.TemporaryDirectory(prefix="llmforge-model-") as tmp:
        weights, digest = weights_only(checkpoint, Path(tmp) / CHECKPOINT_FILE)
        tags_now = c.get_run(run_id).data.tags
        have = tags_now.get(TAG_WEIGHTS)
        if have not in (None, digest):
            raise ValueError(f"run {run_id} already holds a different model ({have[:12]}); log this one to its own run")
        logged = have is None
        sha = tags_now.get(TAG_MODEL_FILE) if not logged else _sha256(weights)
        if logged:
            staged = Path(tmp) / "stage"
            staged.mkdir()
            if weights.name != CHECKPOINT_FILE:  # the artifact is named model.pt, whatever the source file was
                try:
                    os.link(weights, staged / CHECKPOINT_FILE)
                except OSError:
                    shutil.copyfile(weights, staged / CHECKPOINT_FILE)
                weights = staged / CHECKPOINT_FILE
            mlflow.pyfunc.save_model(
                path=str(Path(tmp) / ARTIFACT), python_model=pyfunc.GPTPyfunc(), artifacts={"checkpoint": str(weights)},
                pip_requirements=_requirements(), model_config=dict(pyfunc.DEFAULTS))
            c.log_artifacts(run_id, str(Path(tmp) / ARTIFACT), ARTIFACT)
            c.set_tag(run_id, TAG_MODEL_FILE, sha)
            c.set_tag(run_id, TAG_WEIGHTS, digest)  # last: its presence means the model is complete
    out: dict[str, Any] = {"model_uri": f"runs:/{run_id}/{ARTIFACT}", "sha256": sha, "weights": digest,
                           "logged": logged}
    if register:
        out.update(register_model(run_id, register, tags=tags))
    return out


def _requirements() -> list[str]:
    """What loading the model needs: llmforge (it brings torch, sentencepiece, mlflow)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return [f"llmforge=={version('llmforge')}"]
    except PackageNotFoundError:
        return ["llmforge"]


def lineage_tags(run_id: str, *, overrides: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The version tags for run ``run_id``'s logged model: from the checkpoint's lineage and the
    run (its val/bpb metric), with ``overrides`` (e.g. the pipeline's evaluated bpb) winning."""
    from llmforge import tracking

    run = tracking.client().get_run(run_id)
    t, m = run.data.tags, run.data.metrics
    tags = {TAG_SOURCE_RUN: run_id, TAG_CHECKPOINT_SHA: t.get(TAG_MODEL_FILE), TAG_DATASET: t.get(tracking.TAG_DATASET),
            TAG_TOKENIZER: t.get(tracking.TAG_TOKENIZER), TAG_VAL_BPB: m.get(tracking.VAL_BPB),
            TAG_BASE_RUN: t.get(tracking.TAG_BASE_RUN)}
    tags.update(overrides or {})
    return {k: str(v) for k, v in tags.items() if v not in (None, "", "None")}


def register_model(run_id: str, name: str, *, tags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A version of registered model ``name`` (created if missing) for run ``run_id``'s logged
    model, tagged with :func:`lineage_tags`; the existing one if this run's weights are already
    registered under ``name``. Returns ``name``, ``version``, ``uri``, ``tags``, ``created``."""
    from mlflow.exceptions import MlflowException

    from llmforge import tracking

    c = tracking.client()
    run = c.get_run(run_id)
    if TAG_WEIGHTS not in run.data.tags:
        raise ValueError(f"run {run_id} has no logged model to register; log_model() it first")
    try:
        c.create_registered_model(name, description="llmforge GPT; load with mlflow.pyfunc.load_model or "
                                                    "`llmforge generate|chat|serve models:/NAME/VERSION`")
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    all_tags = lineage_tags(run_id, overrides=tags)
    # registering the same run's same weights again (a re-run pipeline) finds the version it made
    for mv in c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if (mv.tags or {}).get(TAG_CHECKPOINT_SHA) == all_tags.get(TAG_CHECKPOINT_SHA):
            return {"name": name, "version": str(mv.version), "uri": f"models:/{name}/{mv.version}",
                    "tags": dict(mv.tags or {}), "created": False}
    mv = c.create_model_version(name, source=f"{run.info.artifact_uri}/{ARTIFACT}", run_id=run_id, tags=all_tags)
    return {"name": name, "version": str(mv.version), "uri": f"models:/{name}/{mv.version}", "tags": all_tags,
            "created": True}


def download_model(uri: str) -> Path:
    """The local checkpoint file of a logged model (see the module docstring); a name or version
    that does not exist is a one-line :class:`~llmforge.errors.NotFound`."""
    from llmforge import tracking
    from llmforge.errors import NotFound, suggest

    m = _URI.match(uri)
    if not m:
        raise NotFound(f"{uri}: not a model URI; use models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/model")
    c = tracking.client()
    from mlflow.exceptions import MlflowException

    if m["run"]:
        run_id, sub = m["run"], m["path"]
        key = Path("runs") / run_id / sub
        try:
            sha = c.get_run(run_id).data.tags.get(TAG_MODEL_FILE)
        except MlflowException:
            raise NotFound(f"{uri}: no run {run_id} in {tracking.tracking_uri()}") from None
        source = uri
    else:
        name = m["name"]
        try:
            mv = c.get_model_version(name, m["version"]) if m["version"] else c.get_model_version_by_alias(name, m["alias"])
        except MlflowException:
            known = [rm.name for rm in c.search_registered_models()]
            if name not in known:
                raise NotFound(f"{uri}: no registered model {name!r} in {tracking.tracking_uri()}; "
                               f"{suggest(name, known)}") from None
            versions = sorted(int(v.version) for v in c.search_model_versions(f"name = '{name}'"))
            what = f"version {m['version']}" if m["version"] else f"alias @{m['alias']}"
            raise NotFound(f"{uri}: model {name!r} has no {what} (versions: "
                           f"{', '.join(map(str, versions)) or 'none'})") from None
        key = Path(name) / str(mv.version)
        sha = (mv.tags or {}).get(TAG_CHECKPOINT_SHA)
        source = mv.source
    dest = tracking.mlruns_dir() / "downloads" / key
    found = _checkpoint_in(dest)
    if found is not None and (sha is None or _sha256(found) == sha):
        return found
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        import mlflow.artifacts

        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp),
                                            tracking_uri=tracking.tracking_uri(), registry_uri=tracking.tracking_uri())
        got = _checkpoint_in(tmp)
        if got is None:
            raise NotFound(f"{uri}: the logged model holds no {CHECKPOINT_FILE}; was it logged by llmforge?")
        if sha is not None and _sha256(got) != sha:
            raise NotFound(f"{uri}: downloaded checkpoint does not match its recorded sha256 {sha[:12]}")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)  # complete downloads only: a killed download never looks finished
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    found = _checkpoint_in(dest)
    assert found is not None
    return found


def _checkpoint_in(root: Path) -> Path | None:
    if not root.is_dir():
        return None
    hits = sorted(root.rglob(CHECKPOINT_FILE))
    return hits[0] if hits else None
