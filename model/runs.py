"""The pipeline runs of an MLflow experiment as rows to compare: what ran, how well, how fast.

Prefect-free query and formatting behind ``llmforge runs``. A pipeline run is the MLflow parent
run tagged ``llmforge.pipeline=true`` (flows/pipeline.py); its stage runs (prepare, train,
evaluate, finetune) are children through the ``mlflow.parentRunId`` tag. A row takes the key
params from the parent (corpus, preset), the model's size from its train child (the parent only
records overrides), and the results from the parent's metrics (final val loss, bits per byte of
the base and of the fine-tuned model, tokens/s, duration).
"""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

from llmforge import tracking

PIPELINE_TAG = tracking.TAG_PIPELINE
STAGE_TAG = tracking.TAG_STAGE
PARENT_TAG = tracking.TAG_PARENT


@dataclass
class RunRow:
    """One line of ``llmforge runs``; ``None`` where the run did not record the value."""

    run_id: str
    name: str
    stage: str  # "pipeline" or the stage of a child run
    parent_run_id: str | None
    status: str
    start_time: str | None  # ISO 8601, UTC
    duration_s: float | None
    corpus: str | None
    preset: str | None
    model: str | None  # "<n_layer>x<n_embd>, <params>"
    params: int | None  # model parameters
    steps: int | None
    val_loss: float | None
    bpb: float | None
    ft_bpb: float | None
    tokens_per_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _int(x: Any) -> int | None:
    v = _num(x)
    return int(v) if v is not None else None


def _first(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if d.get(k) not in (None, "", "None"):
            return d[k]
    return None


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _duration(run: Any, metrics: dict[str, float], now_ms: int) -> float | None:
    if (d := _num(metrics.get(tracking.DURATION_S))) is not None:
        return d
    start, end = run.info.start_time, run.info.end_time
    if start is None:
        return None
    if end is None and run.info.status != "RUNNING":
        return None
    return ((end or now_ms) - start) / 1000


def _model(params: dict[str, str], train_params: dict[str, str]) -> tuple[str | None, int | None]:
    src = train_params or params
    n_layer = _first(src, "model.n_layer", "train.model.n_layer")
    n_embd = _first(src, "model.n_embd", "train.model.n_embd")
    n_params = _int(_first(src, "model.params"))
    if n_layer is None or n_embd is None:
        return None, n_params
    label = f"{n_layer}x{n_embd}"
    return (f"{label} {human_count(n_params)}" if n_params else label), n_params


def row_for(run: Any, train_child: Any | None = None, now_ms: int | None = None) -> RunRow:
    """A table row for a pipeline run (with its train child, for the model size) or a stage run."""
    now_ms = now_ms or int(time.time() * 1000)
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    stage = "pipeline" if t.get(PIPELINE_TAG) == "true" else t.get(STAGE_TAG, "-")
    train_params = train_child.data.params if train_child is not None else {}
    if stage == "train":
        train_params = p
    model, n_params = _model(p, train_params)
    train_m = train_child.data.metrics if train_child is not None else {}
    start = run.info.start_time
    return RunRow(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        stage=stage,
        parent_run_id=t.get(PARENT_TAG),
        status=run.info.status,
        start_time=(dt.datetime.fromtimestamp(start / 1000, dt.timezone.utc).isoformat(timespec="seconds")
                    if start else None),
        duration_s=_duration(run, m, now_ms),
        corpus=_first(p, "corpus", "corpus.name") or t.get(tracking.TAG_CORPUS),
        preset=t.get(tracking.TAG_RECIPE) or _first(p, "recipe", "preset", "model.preset"),
        model=model,
        params=n_params,
        steps=_int(_first(m, "train_steps") if stage == "pipeline" else None)
        or _int(_first(train_params, "train.max_steps")) or _int(_first(p, "train.max_steps")),
        val_loss=_num(m.get(tracking.VAL_LOSS)) or _num(train_m.get(tracking.VAL_LOSS)),
        bpb=_num(m.get(tracking.VAL_BPB)),
        ft_bpb=_num(m.get("ft/" + tracking.VAL_BPB)),
        tokens_per_s=_num(m.get(tracking.TOKENS_PER_S)) or _num(train_m.get(tracking.TOKENS_PER_S)),
    )


def query(client: Any, experiment: str = "llmforge", last: int | None = 20, include_stages: bool = False
          ) -> list[RunRow]:
    """Pipeline runs of ``experiment``, newest first (``last`` of them; ``None`` for all); with
    ``include_stages`` each is followed by its stage runs (oldest first), and stage runs that
    belong to no pipeline (e.g. a lone ``llmforge train``) come at the end."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise LookupError(f"no MLflow experiment named {experiment!r} (experiments: {', '.join(names) or 'none'})")
    ids = [exp.experiment_id]
    parents = _search(client, ids, f"tags.`{PIPELINE_TAG}` = 'true'", ["attributes.start_time DESC"], last)
    children_all = _search(client, ids, None, ["attributes.start_time ASC"], None)
    children: dict[str, list[Any]] = {}
    lone = []
    parent_ids = {r.info.run_id for r in parents}
    for c in children_all:
        if c.data.tags.get(PIPELINE_TAG) == "true":
            continue
        pid = c.data.tags.get(PARENT_TAG)
        if pid in parent_ids:
            children.setdefault(pid, []).append(c)
        elif pid is None and c.data.tags.get(STAGE_TAG):
            lone.append(c)
    now_ms = int(time.time() * 1000)
    rows: list[RunRow] = []
    for r in parents:
        kids = children.get(r.info.run_id, [])
        trains = [c for c in kids if c.data.tags.get(STAGE_TAG) == "train"]
        rows.append(row_for(r, trains[-1] if trains else None, now_ms))
        if include_stages:
            rows += [row_for(c, now_ms=now_ms) for c in kids]
    if include_stages:
        rows += [row_for(c, now_ms=now_ms) for c in reversed(lone)][: last or None]
    return rows


def _search(client: Any, ids: list[str], filt: str | None, order: list[str], limit: int | None) -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = client.search_runs(ids, filt or "", order_by=order, max_results=min(limit or 1000, 1000),
                                  page_token=token)
        out.extend(page)
        token = page.token
        if not token or (limit is not None and len(out) >= limit):
            return out[:limit] if limit is not None else out


COLUMNS: Sequence[tuple[str, str]] = (
    ("run", "run_id"), ("stage", "stage"), ("status", "status"), ("started (UTC)", "start_time"),
    ("duration", "duration_s"), ("corpus", "corpus"), ("preset", "preset"), ("model", "model"),
    ("steps", "steps"), ("val loss", "val_loss"), ("bpb", "bpb"), ("ft bpb", "ft_bpb"), ("tok/s", "tokens_per_s"),
)


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key == "run_id":
        return str(v)[:8]
    if key == "start_time":
        return str(v).replace("T", " ")[:16]
    if key == "duration_s":
        s = int(round(v))
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
    if key in ("val_loss", "bpb", "ft_bpb"):
        return f"{v:.4f}"
    if key == "tokens_per_s":
        return f"{v:,.0f}"
    if key == "status":
        return str(v).lower()
    return str(v)


def format_table(rows: Iterable[RunRow]) -> str:
    """Aligned text table; stage rows are indented under their pipeline row."""
    rows = list(rows)
    cells = [[h for h, _ in COLUMNS]]
    for r in rows:
        d = r.to_dict()
        line = [_fmt(k, d[k]) for _, k in COLUMNS]
        if r.stage != "pipeline" and r.parent_run_id:
            line[1] = "  " + line[1]
        cells.append(line)
    numeric = {i for i, (_, k) in enumerate(COLUMNS)
               if k in ("duration_s", "steps", "val_loss", "bpb", "ft_bpb", "tokens_per_s")}
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    out = []
    for n, c in enumerate(cells):
        out.append("  ".join(x.rjust(w) if i in numeric and n else x.ljust(w)
                             for i, (x, w) in enumerate(zip(c, widths))).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
