"""MLflow, in one place: this package is the only code that imports ``mlflow``.

Where the store is, the experiment (tagged so the MLflow UI opens on its runs table), run names
a person can read, the tag and metric names every stage uses, params flattened from configs,
and the loss-curve plot. Stages get a :class:`StageRun` from :func:`stage_run` and call its
``params`` / ``metrics`` / ``tags`` / ``artifact`` methods; they never touch mlflow themselves.

The default store is ``mlruns/`` under the current directory, SQLite (``mlruns/mlflow.db``)
with artifacts in ``mlruns/artifacts``; ``LLMFORGE_MLRUNS`` moves it and
``MLFLOW_TRACKING_URI`` replaces it (an ``mlflow server``). ``mlflow ui --backend-store-uri
sqlite:///mlruns/mlflow.db`` shows it.

What goes where: **params** are config values (what was asked for: ``model.n_layer``,
``train.lr``); **metrics** are measured numbers under stable names (:data:`VAL_BPB` is
``val/bpb`` in the train run, the evaluate run and the pipeline run alike); **tags** are ids and
paths (dataset fingerprint and directory, checkpoint path, base run), which MLflow's compare
view would otherwise offer as parameters to plot.

Models: :func:`log_model` logs a checkpoint (weights only) to its run as an MLflow model that
loads back and generates, :func:`register_model` makes it a version of a registered model with
lineage tags, :func:`download_model` turns ``models:/NAME/VERSION`` into a local checkpoint (all
in :mod:`llmforge.tracking.registry`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

EXPERIMENT = "llmforge"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3 UI: open on the runs table, not GenAI traces

# tags (ids, paths, lineage)
TAG_STAGE = "llmforge.stage"
TAG_PIPELINE = "llmforge.pipeline"
TAG_STATUS = "llmforge.status"
TAG_CORPUS = "llmforge.corpus"
TAG_RECIPE = "llmforge.recipe"
TAG_DATASET = "llmforge.dataset_fingerprint"
TAG_DATASET_DIR = "llmforge.dataset_dir"
TAG_TOKENIZER = "llmforge.tokenizer_fingerprint"
TAG_CHECKPOINT = "llmforge.checkpoint"
TAG_MODEL_RUN = "llmforge.model_run_id"
TAG_BASE_RUN = "llmforge.base_run_id"
TAG_BASE_CHECKPOINT = "llmforge.base_checkpoint"
TAG_RESUMED_FROM = "llmforge.resumed_from_step"
TAG_FLOW_RUN = "prefect.flow_run_id"
TAG_PARENT = "mlflow.parentRunId"

# metrics (the numbers people compare, under the same name in every run that has them)
TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
VAL_BPB = "val/bpb"
VAL_PPL = "val/ppl"
TOKENS_PER_S = "tokens_per_s"
LR = "lr"
GRAD_NORM = "grad_norm"
MFU = "mfu"
BAD_STEPS = "bad_steps"
ELAPSED_S = "elapsed_s"
DURATION_S = "duration_s"

_MAX_PARAM = 6000  # MLflow's limit on a param value

from llmforge.tracking.registry import download_model, log_model, register_model  # noqa: E402  (no mlflow import)


def mlruns_dir() -> Path:
    return Path(os.environ.get("LLMFORGE_MLRUNS", "mlruns")).resolve()


def tracking_uri() -> str:
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    return f"sqlite:///{mlruns_dir() / 'mlflow.db'}"


def store_exists(uri: str | None = None) -> bool:
    uri = uri or tracking_uri()
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file()


def _quiet() -> None:
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # pyfunc's note on pickled models is about models from untrusted sources; ours is our own class
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in a command's output


def client(uri: str | None = None):
    """An ``MlflowClient`` on our store (read-only uses: ``llmforge runs``, tests)."""
    import mlflow

    _quiet()
    return mlflow.MlflowClient(tracking_uri=uri or tracking_uri())


def experiment_id(experiment: str = EXPERIMENT, uri: str | None = None) -> str:
    """The experiment's id, created (tagged as a model-development experiment) if missing."""
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        mlruns_dir().mkdir(parents=True, exist_ok=True)
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        kwargs = {}
        if uri.startswith("sqlite:///"):
            kwargs["artifact_location"] = (mlruns_dir() / "artifacts" / experiment).as_uri()
        try:
            return c.create_experiment(experiment, tags={"mlflow.experimentKind": EXPERIMENT_KIND}, **kwargs)
        except Exception:  # created concurrently by another process
            exp = c.get_experiment_by_name(experiment)
            if exp is None:
                raise
    if exp.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND:
        c.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)
    return exp.experiment_id


def ui_hint(experiment: str = EXPERIMENT) -> str:
    """How to look at the runs: the command to start the UI and the page with the runs table
    (MLflow 3.17's UI opens experiments on its GenAI view unless ?workflowType= says otherwise)."""
    uri = tracking_uri()
    exp = client(uri).get_experiment_by_name(experiment) if store_exists(uri) else None
    page = f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" if exp else ""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000/{page}"


def run_name(stage: str, *parts: Any) -> str:
    """``"train · gutenberg · cpu-10min · 10m"``: what ran, on what, how big, for how long."""
    return " · ".join([stage, *(str(p) for p in parts if p not in (None, ""))])


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class StageRun:
    """One MLflow run (a stage's, or a pipeline's parent run), written through the client API."""

    def __init__(self, mlflow_client: Any, run_id: str, experiment: str):
        self.client = mlflow_client
        self.run_id = run_id
        self.experiment = experiment

    # -- what was asked for
    def params(self, nested: Mapping[str, Any]) -> None:
        """Config values as params (trimmed to MLflow's limit); params already set are kept
        (they are write-once, and a resumed run logged them before)."""
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        items = [Param(k, "None" if v is None else str(v)[:_MAX_PARAM]) for k, v in flatten(nested).items()
                 if k not in have]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    # -- what was measured
    def metrics(self, values: Mapping[str, float | None], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step or 0) for k, v in values.items()
              if v is not None and math.isfinite(float(v))]
        if ms:
            self.client.log_batch(self.run_id, metrics=ms)

    def history(self, key: str) -> dict[int, float]:
        """step -> value of a metric (the last write of a step wins)."""
        return {m.step: m.value for m in self.client.get_metric_history(self.run_id, key)}

    # -- ids, paths, lineage
    def tags(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(k, str(v)) for k, v in values.items() if v is not None]
        if tags:
            self.client.log_batch(self.run_id, tags=tags)

    # -- files
    def artifact(self, path: str | os.PathLike, directory: str | None = None) -> None:
        """A file, or every file of a directory (under ``directory``/its name)."""
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), f"{directory}/{Path(path).name}" if directory
                                      else Path(path).name)
        else:
            self.client.log_artifact(self.run_id, str(path), directory)

    def text(self, text: str, file: str) -> None:
        self.client.log_text(self.run_id, text, file)

    def json(self, obj: Any, file: str) -> None:
        self.client.log_dict(self.run_id, obj, file)

    def model(self, checkpoint: str | os.PathLike, register: str | None = None,
              tags: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Log ``checkpoint`` (weights only) as this run's MLflow model; see :func:`log_model`."""
        return log_model(checkpoint, run_id=self.run_id, register=register, tags=tags)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


@contextlib.contextmanager
def stage_run(name: str, *, stage: str, experiment: str = EXPERIMENT, parent_run_id: str | None = None,
              run_id: str | None = None, tags: Mapping[str, Any] | None = None) -> Iterator[StageRun]:
    """Open (or, with ``run_id``, reopen) a stage's run for the duration of its work, so the UI
    shows its real duration; it ends FINISHED, or FAILED / KILLED if the block raises.

    ``parent_run_id`` (default: ``LLMFORGE_PARENT_RUN_ID``) nests it under a pipeline run."""
    c = client()
    exp_id = experiment_id(experiment)
    parent_run_id = parent_run_id or os.environ.get("LLMFORGE_PARENT_RUN_ID") or None
    if run_id is None:
        all_tags = {TAG_STAGE: stage, **{k: str(v) for k, v in (tags or {}).items() if v is not None}}
        if parent_run_id:
            all_tags[TAG_PARENT] = parent_run_id
        run_id = c.create_run(exp_id, run_name=name, tags=all_tags).info.run_id
    else:
        c.update_run(run_id, status="RUNNING")
    run = StageRun(c, run_id, experiment)
    try:
        yield run
    except KeyboardInterrupt:
        run.finish("KILLED")
        raise
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish("FINISHED")


def pipeline_run(experiment: str, name: str, params: Mapping[str, Any], flow_run_id: str | None,
                 tags: Mapping[str, Any] | None = None) -> StageRun:
    """The pipeline's parent run: the one tagged with this Prefect flow run's id (a retry of the
    same flow run reuses it), or a new one."""
    c = client()
    exp_id = experiment_id(experiment)
    if flow_run_id:
        found = c.search_runs([exp_id], f"tags.`{TAG_FLOW_RUN}` = '{flow_run_id}'", max_results=1)
        if found:
            c.update_run(found[0].info.run_id, status="RUNNING")
            return StageRun(c, found[0].info.run_id, experiment)
    all_tags = {TAG_PIPELINE: "true", TAG_STAGE: "pipeline", TAG_FLOW_RUN: flow_run_id or "",
                **{k: str(v) for k, v in (tags or {}).items() if v is not None}}
    run = StageRun(c, c.create_run(exp_id, run_name=name, tags=all_tags).info.run_id, experiment)
    run.params(params)
    return run


def plot_loss_curves(run: StageRun, path: Path) -> Path | None:
    """train/val loss against step from the run's metric history, as a PNG (None if no data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmforge.pipeline.fsutil import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4))
    any_data = False
    for key, style in ((TRAIN_LOSS, "-"), (VAL_LOSS, "o-")):
        points = run.history(key)
        if points:
            steps = sorted(points)
            ax.plot(steps, [points[s] for s in steps], style, label=key, markersize=3)
            any_data = True
    if not any_data:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
