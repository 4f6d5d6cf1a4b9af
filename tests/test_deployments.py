"""End to end on the production path: a real Prefect server, the `llmforge` process pool, the
deployments of prefect.yaml and a process worker, with MLflow recording every stage.

1. `prefect deployment run 'llm-pipeline/quickstart' --watch` with tiny parameters completes and
   leaves a parent MLflow run with prepare/train/evaluate/finetune child runs, their params,
   metrics and artifacts.
2. A worker SIGKILLed mid-training (with the flow run it started) leaves the run "Running"; the
   user marks it Crashed (the UI's "Change state"), `prefect flow-run retry`s it, a new worker
   picks it up, the data stages are skipped and training resumes from its newest checkpoint in
   the same MLflow run.

Every process is started by this module and stopped by PID (with its descendants), even on failure.
Nothing is written into the repository: shards, runs and the MLflow store live under tmp paths.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from llmforge.flows.services import PrefectWorker, prefect_cli

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SFT_FILE = REPO / "configs" / "finetune" / "python-docs.jsonl"
POOL = "llmforge"
DEPLOYMENT = "llm-pipeline/quickstart"
TINY_MODEL = {"n_layer": 2, "n_embd": 64, "n_head": 2}
STAGES = {"prepare", "train", "evaluate", "finetune"}
RESUME_STEPS = 120  # the killed run's max_steps: long enough to kill it after its first checkpoint


@dataclass
class Stack:
    root: Path
    env: dict[str, str]
    api_url: str
    shards: Path
    mlruns: Path
    workers: list[PrefectWorker]

    def start_worker(self) -> PrefectWorker:
        w = PrefectWorker(POOL, self.env, self.root / f"worker-{len(self.workers)}.log", cwd=REPO).start()
        self.workers.append(w)
        return w

    def logs(self) -> str:
        """The tails of the worker logs, for assertion messages."""
        out = []
        for w in self.workers:
            if w.log.exists():
                out.append(f"--- {w.log.name}\n{w.log.read_text(errors='replace')[-6000:]}")
        return "\n".join(out)

    def mlflow(self):
        from llmforge import tracking

        return tracking.client(f"sqlite:///{self.mlruns / 'mlflow.db'}")


@pytest.fixture(scope="module")
def stack(prefect_server, tmp_path_factory) -> Iterator[Stack]:
    """Pool + deployments (from the repo root, as a user does) + one worker, against a real server."""
    root = tmp_path_factory.mktemp("deploy")
    mlruns = root / "mlruns"
    env = {
        **prefect_server.env,
        "LLMFORGE_MLRUNS": str(mlruns),
        "MLFLOW_TRACKING_URI": "",  # the local store above, whatever the caller's shell says
        "PYTHONUNBUFFERED": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",  # the worker log shows the flow runs' progress
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # the worker looks for scheduled runs every 2 s, not 10
    }
    # the session's shared shards root: tests/test_mlflow_server.py reuses the prepared dataset
    s = Stack(root, env, prefect_server.url, tmp_path_factory.getbasetemp() / "shards", mlruns, [])
    try:
        prefect_cli(["work-pool", "create", POOL, "--type", "process"], env, cwd=REPO)
        r = prefect_cli(["deploy", "--all"], env, cwd=REPO, timeout=300)
        assert DEPLOYMENT in r.stdout, r.stdout[-3000:]
        s.start_worker()
        yield s
    finally:
        for w in s.workers:
            w.stop()


def tiny_params(stack: Stack, runs: Path, **train: Any) -> dict[str, Any]:
    return {
        "corpus": "quickstart",
        "preset": "tiny",
        "model": TINY_MODEL,
        "train": {"max_steps": 40, "batch_size": 8, "eval_every": 20, "ckpt_every": 10, "eval_tokens": 16384, **train},
        "evaluate": {"max_tokens": 20000},
        "finetune": {"sft": str(SFT_FILE), "mode": "lora", "train": {"max_steps": 10}},
        "shards": str(stack.shards),
        "runs": str(runs),
    }


def run_deployment(stack: Stack, params: dict, watch: bool, timeout: float = 600):
    args = ["deployment", "run", DEPLOYMENT, "--params", json.dumps(params)]
    if watch:
        args += ["--watch", "--watch-interval", "2", "--watch-timeout", str(int(timeout))]
    r = prefect_cli(args, stack.env, cwd=REPO, timeout=timeout + 60, check=False)
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", r.stdout)
    assert m, f"no flow run id in:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return m.group(1), r


def prefect_client(stack: Stack):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Ctx:
        def __enter__(self):
            self._settings = temporary_settings({PREFECT_API_URL: stack.api_url})
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc):
            self._client.__exit__(*exc)
            self._settings.__exit__(*exc)

    return _Ctx()


def flow_run_state(stack: Stack, flow_run_id: str):
    with prefect_client(stack) as client:
        return client.read_flow_run(flow_run_id).state


def wait_for_state(stack: Stack, flow_run_id: str, timeout: float) -> Any:
    deadline = time.time() + timeout
    state = None
    while time.time() < deadline:
        state = flow_run_state(stack, flow_run_id)
        if state is not None and state.is_final():
            return state
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} still {state and state.name} after {timeout}s\n{stack.logs()}")


def pipeline_runs(stack: Stack, flow_run_id: str):
    """(parent run, children) of the pipeline run recorded for this Prefect flow run."""
    client = stack.mlflow()
    exp = client.get_experiment_by_name("llmforge")
    assert exp is not None, f"no 'llmforge' experiment in {stack.mlruns}"
    parents = client.search_runs([exp.experiment_id],
                                 f"tags.`prefect.flow_run_id` = '{flow_run_id}' and tags.`llmforge.pipeline` = 'true'")
    assert len(parents) == 1, f"expected one parent run for flow run {flow_run_id}, got {len(parents)}"
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    return parent, children


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for f in client.list_artifacts(run_id, path):
        if f.is_dir:
            out |= artifact_paths(client, run_id, f.path)
        else:
            out.add(f.path)
    return out


def by_stage(children) -> dict[str, list]:
    out: dict[str, list] = {}
    for c in children:
        out.setdefault(c.data.tags.get("llmforge.stage", "?"), []).append(c)
    return out


def tree_mtimes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*")) if p.is_file()}


def checkpoints(runs: Path) -> list[Path]:
    return sorted(runs.glob("train-*/ckpt-*.pt"))


def ckpt_step(path: Path) -> int:
    return int(re.search(r"ckpt-0*(\d+)", path.name).group(1))


# ---------------------------------------------------------------------------------------------------


def test_quickstart_deployment_runs_on_worker_and_records_every_stage_in_mlflow(stack: Stack) -> None:
    runs = stack.root / "runs-1"
    flow_run_id, r = run_deployment(stack, tiny_params(stack, runs), watch=True, timeout=480)
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-2000:]}\n{stack.logs()}"
    state = flow_run_state(stack, flow_run_id)
    assert state.is_completed(), f"flow run {flow_run_id} is {state.name}\n{stack.logs()}"

    # every output landed in the paths we gave, none in the repository
    assert list(stack.shards.glob("quickstart/tokens-*/manifest.json")), "no token dataset under the shards param"
    assert checkpoints(runs), f"no training checkpoint under the runs param {runs}: {sorted(runs.rglob('*'))[:20]}"
    assert list(runs.glob("finetune-lora-*")), f"no fine-tune output under {runs}"

    client = stack.mlflow()
    parent, children = pipeline_runs(stack, flow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["corpus"] == "quickstart"
    assert parent.data.params["train.max_steps"] == "40"
    for key in ("val/loss", "val/bpb", "ft/val/bpb", "tokens_per_s", "duration_s"):
        assert key in parent.data.metrics, f"parent run lacks metric {key}: {sorted(parent.data.metrics)}"
    assert 0 < parent.data.metrics["val/bpb"] < 20
    assert "pipeline_summary.md" in artifact_paths(client, parent.info.run_id)

    stages = by_stage(children)
    assert STAGES <= set(stages), f"child runs by stage: {sorted(stages)}"
    assert len(stages["evaluate"]) == 2, "the base model and the fine-tuned model are both evaluated"
    for c in children:
        assert c.info.status == "FINISHED", f"{c.info.run_name} is {c.info.status}"

    prep = stages["prepare"][0]
    assert prep.data.params["corpus.name"] == "quickstart"
    assert prep.data.metrics["tokens.train"] > 0
    assert {"dataset/manifest.json", "tokenizer/tokenizer.model", "summary.md"} <= artifact_paths(client, prep.info.run_id)

    train = stages["train"][0]
    assert train.data.params["train.max_steps"] == "40"
    assert train.data.params["model.n_layer"] == "2"
    steps = [m.step for m in client.get_metric_history(train.info.run_id, "train/loss")]
    assert max(steps) == 40
    assert [m.step for m in client.get_metric_history(train.info.run_id, "val/loss")] == [20, 40]
    train_art = artifact_paths(client, train.info.run_id)
    assert "plots/loss_curve.png" in train_art, sorted(train_art)
    assert "model/artifacts/model.pt" in train_art, sorted(train_art)
    png = Path(client.download_artifacts(train.info.run_id, "plots/loss_curve.png", str(stack.root / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for ev in stages["evaluate"]:
        art = artifact_paths(client, ev.info.run_id)
        results = [p for p in art if p.endswith(".json")]
        assert results, f"no evaluation JSON among {sorted(art)}"
        result = json.loads(Path(client.download_artifacts(ev.info.run_id, results[0], str(stack.root / "dl"))).read_text())
        assert result["val"]["bits_per_byte"] == pytest.approx(ev.data.metrics["val/bpb"])
        assert 0 < ev.data.metrics["val/bpb"] < 20

    ft = stages["finetune"][0]
    assert ft.data.tags["llmforge.finetune_mode"] == "lora"
    assert artifact_paths(client, ft.info.run_id), "the fine-tune run has no artifacts"


def test_killed_worker_run_is_retried_and_resumes_training_from_checkpoint(stack: Stack) -> None:
    # the data stages of the first test are in place; a new runs dir makes training start from scratch
    datasets = sorted(stack.shards.glob("quickstart/*"))
    assert datasets, "the first test prepares the quickstart shards"
    before = {str(d): tree_mtimes(d) for d in datasets if d.is_dir() and d.name != "downloads"}
    runs = stack.root / "runs-2"
    params = tiny_params(stack, runs, max_steps=RESUME_STEPS, eval_every=RESUME_STEPS // 2, log_every=5)
    params["finetune"] = None
    flow_run_id, r = run_deployment(stack, params, watch=False, timeout=60)
    assert r.returncode == 0, r.stdout[-3000:]

    # the first checkpoint is written: kill the worker and the flow run it started, like a power cut
    deadline = time.time() + 420
    while not checkpoints(runs):
        state = flow_run_state(stack, flow_run_id)
        assert not state.is_final(), f"flow run ended {state.name} before the kill\n{stack.logs()}"
        assert time.time() < deadline, f"no checkpoint under {runs} after 420s\n{stack.logs()}"
        time.sleep(0.2)
    killed = stack.workers[-1].kill()
    assert len(killed) >= 2, f"expected the worker and its flow run process, killed {killed}"
    at_kill = checkpoints(runs)
    resume_step = max(ckpt_step(p) for p in at_kill)
    assert resume_step < RESUME_STEPS, f"training finished before the kill: {at_kill}"

    client = stack.mlflow()
    parent_before, children_before = pipeline_runs(stack, flow_run_id)
    train_before = by_stage(children_before)["train"]
    assert len(train_before) == 1
    train_run_id = train_before[0].info.run_id

    # nobody is left to report on the run: it stays Running until the user marks it Crashed
    # (the UI's "Change state"; the client call below is what the UI does)
    time.sleep(3)
    state = flow_run_state(stack, flow_run_id)
    assert state.is_running(), f"expected the orphaned run to be Running, got {state.name}"
    from prefect.states import Crashed

    with prefect_client(stack) as pc:
        pc.set_flow_run_state(flow_run_id, Crashed(message="worker killed"), force=True)
    assert flow_run_state(stack, flow_run_id).is_crashed()

    retry = prefect_cli(["flow-run", "retry", flow_run_id], stack.env, cwd=REPO)
    assert "scheduled for retry" in retry.stdout, retry.stdout
    stack.start_worker()
    state = wait_for_state(stack, flow_run_id, timeout=480)
    assert state.is_completed(), f"retried flow run is {state.name}: {state.message}\n{stack.logs()}"

    # data stages skipped: the same dataset, not one file rewritten, and the prepare runs say so
    after = {str(d): tree_mtimes(d) for d in sorted(stack.shards.glob("quickstart/*")) if d.is_dir()
             and d.name != "downloads"}
    assert after == before, "the data stages rewrote files on the retried run"
    parent, children = pipeline_runs(stack, flow_run_id)
    assert parent.info.run_id == parent_before.info.run_id, "the retry reuses the pipeline's MLflow parent run"
    assert parent.info.status == "FINISHED"
    stages = by_stage(children)
    for prep in stages["prepare"]:
        summary = Path(client.download_artifacts(prep.info.run_id, "summary.md", str(stack.root / prep.info.run_id)))
        text = summary.read_text()
        for stage in ("extract+clean", "train_tokenizer", "tokenize"):
            assert re.search(rf"\| {re.escape(stage)} \| skipped \|", text), f"{stage} not skipped:\n{text}"
        assert "tokenize.seconds" not in prep.data.metrics

    # training resumed in the same MLflow run from the newest checkpoint, and finished
    trains = stages["train"]
    assert [t.info.run_id for t in trains] == [train_run_id], "training continued in the same MLflow run"
    train = client.get_run(train_run_id)
    assert train.info.status == "FINISHED"
    assert train.data.tags["llmforge.resumed_from_step"] == str(resume_step)
    steps = sorted({m.step for m in client.get_metric_history(train_run_id, "train/loss")})
    assert steps[0] <= resume_step < steps[-1] == RESUME_STEPS
    assert all(s in steps for s in range(5, RESUME_STEPS + 1, 5)), "the loss curve has a gap around the resume"
    final = checkpoints(runs)
    assert ckpt_step(final[-1]) == RESUME_STEPS
    summary = json.loads((final[-1].parent / "summary.json").read_text())
    assert summary["step"] == RESUME_STEPS and summary["mlflow_run_id"] == train_run_id
