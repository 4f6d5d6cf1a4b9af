"""Pipeline runs as a user compares them: through `mlflow server`'s REST API and `llmforge runs`.

The store is made by the project itself: two real `llmforge pipeline` runs with tiny settings
(the first fine-tunes, the second trains longer without fine-tuning) into a tmp MLflow store.
Their Prefect flows report to the session's real Prefect server. Servers are stopped by PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from llmforge.flows.services import MlflowServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SFT_FILE = REPO / "configs" / "finetune" / "python-docs.jsonl"
TINY = ["--set", "train.batch_size=8", "--set", "train.eval_every=0", "--set", "train.eval_tokens=16384",
        "--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.n_head=2",
        "--set", "eval.max_tokens=20000", "--task-runner", "thread"]


def llmforge(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmforge", *args], env={**os.environ, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def store(prefect_server, tmp_path_factory) -> Iterator[Path]:
    """A tmp MLflow store holding two finished pipeline runs (steps 20 with LoRA, then 30).

    Shards go to the session's shared root, so a dataset tests/test_deployments.py prepared is reused."""
    root = tmp_path_factory.mktemp("mlflow-store")
    env = {**prefect_server.env, "LLMFORGE_MLRUNS": str(root / "mlruns"), "MLFLOW_TRACKING_URI": "",
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    common = ["pipeline", "--corpus", "quickstart", "--preset", "tiny", *TINY,
              "--shards", str(tmp_path_factory.getbasetemp() / "shards"), "--runs", str(root / "runs")]
    for extra in (["--set", "train.max_steps=20", "--sft", str(SFT_FILE), "--set", "finetune.mode=lora",
                   "--set", "finetune.train.max_steps=5"],
                  ["--max-steps", "30"]):
        r = llmforge(common + extra, env, cwd=root)  # cwd: relative outputs stay out of the repo
        assert r.returncode == 0, f"llmforge pipeline failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    yield root / "mlruns"


def local_pipeline_runs(mlruns: Path):
    from llmforge import tracking

    client = tracking.client(f"sqlite:///{mlruns / 'mlflow.db'}")
    exp = client.get_experiment_by_name("llmforge")
    return client.search_runs([exp.experiment_id], "tags.`llmforge.pipeline` = 'true'",
                              order_by=["attributes.start_time DESC"])


def api(url: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_mlflow_server_serves_both_pipeline_runs_and_their_metrics(store: Path, tmp_path: Path) -> None:
    local = {r.info.run_id: r for r in local_pipeline_runs(store)}
    assert len(local) == 2
    server = MlflowServer(store, log=tmp_path / "mlflow-server.log").start()
    try:
        exp = api(f"{server.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=llmforge")["experiment"]
        found = api(f"{server.url}/api/2.0/mlflow/runs/search",
                    {"experiment_ids": [exp["experiment_id"]], "filter": "tags.`llmforge.pipeline` = 'true'",
                     "order_by": ["attributes.start_time ASC"]})["runs"]
        assert {r["info"]["run_id"] for r in found} == set(local)
        for r in found:
            rid = r["info"]["run_id"]
            assert r["info"]["status"] == "FINISHED"
            metrics = {m["key"]: m["value"] for m in r["data"]["metrics"]}
            params = {p["key"]: p["value"] for p in r["data"]["params"]}
            assert metrics == pytest.approx(local[rid].data.metrics)
            assert params["corpus"] == "quickstart" and params["preset"] == "tiny"
            assert 0 < metrics["val/bpb"] < 20 and metrics["val/loss"] > 0
        steps = [json.loads(r["data"] and next(p["value"] for p in r["data"]["params"] if p["key"] == "train.max_steps"))
                 for r in found]
        assert steps == [20, 30]
        assert "ft/val/bpb" in {m["key"] for m in found[0]["data"]["metrics"]}
        assert "ft/val/bpb" not in {m["key"] for m in found[1]["data"]["metrics"]}

        # the stage runs are there too, as children, with their metric history
        first = found[0]["info"]["run_id"]
        kids = api(f"{server.url}/api/2.0/mlflow/runs/search",
                   {"experiment_ids": [exp["experiment_id"]], "filter": f"tags.`mlflow.parentRunId` = '{first}'"})["runs"]
        stages = {next(t["value"] for t in k["data"]["tags"] if t["key"] == "llmforge.stage") for k in kids}
        assert {"prepare", "train", "evaluate", "finetune"} <= stages
        train = next(k for k in kids if {"key": "llmforge.stage", "value": "train"} in k["data"]["tags"])
        hist = api(f"{server.url}/api/2.0/mlflow/metrics/get-history?run_id={train['info']['run_id']}"
                   f"&metric_key=train/loss")["metrics"]
        assert max(m["step"] for m in hist) == 20

        # `llmforge runs` reads the server when MLFLOW_TRACKING_URI points at it
        r = llmforge(["runs", "--json"], {"MLFLOW_TRACKING_URI": server.url}, cwd=tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr
        assert {row["run_id"] for row in json.loads(r.stdout)} == set(local)
    finally:
        server.stop()
    assert server.proc.poll() is not None


def test_runs_command_lists_pipeline_runs_newest_first_with_results(store: Path, tmp_path: Path) -> None:
    env = {"LLMFORGE_MLRUNS": str(store), "MLFLOW_TRACKING_URI": ""}
    r = llmforge(["runs", "--json"], env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    local = local_pipeline_runs(store)
    assert [row["run_id"] for row in rows] == [x.info.run_id for x in local]  # newest first
    for row, run in zip(rows, local):
        m = run.data.metrics
        assert row["stage"] == "pipeline" and row["status"] == "FINISHED"
        assert row["corpus"] == "quickstart" and row["preset"] == "tiny"
        assert row["model"].startswith("2x64 ") and row["params"] > 0
        assert row["val_loss"] == pytest.approx(m["val/loss"])
        assert row["bpb"] == pytest.approx(m["val/bpb"])
        assert row["tokens_per_s"] == pytest.approx(m["tokens_per_s"])
        assert row["duration_s"] == pytest.approx(m["duration_s"])
    assert [row["steps"] for row in rows] == [30, 20]
    assert rows[0]["ft_bpb"] is None and rows[1]["ft_bpb"] == pytest.approx(local[1].data.metrics["ft/val/bpb"])

    table = llmforge(["runs"], env, cwd=tmp_path, timeout=120)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "stage", "status"] and "bpb" in lines[0] and "tok/s" in lines[0]
    body = [ln for ln in lines[2:] if ln.strip() and not ln.startswith(("\n", " "))][:2]
    assert [ln.split()[0] for ln in body] == [row["run_id"][:8] for row in rows]
    assert f"{rows[1]['bpb']:.4f}" in body[1] and f"{rows[1]['ft_bpb']:.4f}" in body[1]

    last = json.loads(llmforge(["runs", "--last", "1", "--json"], env, cwd=tmp_path, timeout=120).stdout)
    assert [x["run_id"] for x in last] == [rows[0]["run_id"]]

    every = json.loads(llmforge(["runs", "--all", "--json"], env, cwd=tmp_path, timeout=120).stdout)
    older = [x for x in every if x["parent_run_id"] == rows[1]["run_id"]]
    assert {"prepare", "train", "evaluate", "finetune"} <= {x["stage"] for x in older}
    assert [x["stage"] for x in every].count("pipeline") == 2


def test_runs_command_names_a_missing_store(tmp_path: Path) -> None:
    r = llmforge(["runs"], {"LLMFORGE_MLRUNS": str(tmp_path / "nowhere"), "MLFLOW_TRACKING_URI": ""},
                 cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert str(tmp_path / "nowhere" / "mlflow.db") in r.stderr
    assert not (tmp_path / "nowhere").exists(), "listing runs must not create a store"
