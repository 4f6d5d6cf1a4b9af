"""MLflow conventions shared by every stage: where the store is, how params are flattened.

The default store is ``mlruns/`` under the current directory with an SQLite backend
(``mlruns/mlflow.db``) and artifacts in ``mlruns/artifacts``; ``LLMFORGE_MLRUNS`` moves it and
``MLFLOW_TRACKING_URI`` overrides it outright (e.g. an ``mlflow server``). ``mlflow ui
--backend-store-uri sqlite:///mlruns/mlflow.db`` shows it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

DEFAULT_EXPERIMENT = "llmforge"


def mlruns_dir() -> Path:
    return Path(os.environ.get("LLMFORGE_MLRUNS", "mlruns")).resolve()


def tracking_uri() -> str:
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    return f"sqlite:///{mlruns_dir() / 'mlflow.db'}"


def artifact_root() -> str:
    return (mlruns_dir() / "artifacts").as_uri()


def setup(experiment: str = DEFAULT_EXPERIMENT):
    """Point mlflow at our store and make sure ``experiment`` exists; returns the mlflow module."""
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        mlruns_dir().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        kwargs = {}
        if uri.startswith("sqlite:///"):
            kwargs["artifact_location"] = artifact_root() + "/" + experiment
        try:
            client.create_experiment(experiment, **kwargs)
        except Exception:  # created concurrently by another process
            if client.get_experiment_by_name(experiment) is None:
                raise
    mlflow.set_experiment(experiment)
    return mlflow


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become their string form."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def log_params(params: Mapping[str, Any]) -> None:
    """Log a nested dict as params (MLflow caps a value at 6000 chars; we trim, never fail)."""
    import mlflow

    flat = {k: (str(v)[:6000] if v is not None else "None") for k, v in flatten(params).items()}
    items = list(flat.items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))


@contextlib.contextmanager
def run(
    name: str,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """Start (or resume, with ``run_id``) an MLflow run; nested under ``parent_run_id`` if given.

    ``parent_run_id`` defaults to ``LLMFORGE_PARENT_RUN_ID`` so that a pipeline flow can make
    every stage (even one running in a worker process) a child of its parent run.
    """
    mlflow = setup(experiment)
    parent_run_id = parent_run_id or os.environ.get("LLMFORGE_PARENT_RUN_ID") or None
    all_tags = dict(tags or {})
    if parent_run_id and not run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    # never nest under whatever run happens to be active in this thread: be explicit
    nested = mlflow.active_run() is not None
    with mlflow.start_run(
        run_id=run_id, run_name=None if run_id else name, tags=all_tags or None, nested=nested
    ) as r:
        yield r
