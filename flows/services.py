"""Local servers started by PID: a Prefect server (SQLite, 127.0.0.1, a free port, its own PREFECT_HOME).

Used by the tests, the benchmarks and `scripts/dev-servers`; each is stopped by the PID we started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process for {url} exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{url} not up after {timeout}s\n{tail}")


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a process we started (and its process group), by PID."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


class PrefectServer:
    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.log = home / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return prefect_env(self.home, self.url)

    def start(self, timeout: float = 120) -> "PrefectServer":
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        env.pop("PREFECT_API_URL", None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_http(self.url + "/health", timeout, self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def prefect_env(home: Path, api_url: str | None) -> dict[str, str]:
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to ``pid`` and every process descended from it (each by its PID).

    A Prefect process worker starts each flow run in a session of its own, so signalling the
    worker's process group would leave the flow run alive; walking the tree reaches it.
    Returns the PIDs signalled.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=15)
    return [p.pid for p in procs]


def stop_tree(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM a process we started and its descendants, then SIGKILL whatever is left."""
    import psutil

    if proc.poll() is not None:
        return
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    proc.poll()


def prefect_cli(args: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300,
                check: bool = True) -> subprocess.CompletedProcess:
    """Run ``prefect ARGS`` (this venv's) and return the completed process (output captured as text)."""
    r = subprocess.run([str(VENV_BIN / "prefect"), *args], env={**os.environ, **env}, cwd=cwd, timeout=timeout,
                       capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} exited with {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


class PrefectWorker:
    """``prefect worker start --pool POOL`` in ``cwd`` with extra ``env``; logs to ``log``.

    ``kill()`` SIGKILLs the worker and the flow runs it started (what a power cut or an OOM
    kill does); ``stop()`` asks them to exit first.
    """

    def __init__(self, pool: str, env: dict[str, str], log: Path, cwd: Path | None = None,
                 worker_type: str = "process"):
        self.pool, self.env, self.log, self.cwd, self.type = pool, env, log, cwd, worker_type
        self.proc: subprocess.Popen | None = None

    def start(self) -> "PrefectWorker":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "prefect"), "worker", "start", "--pool", self.pool, "--type", self.type],
                env={**os.environ, **self.env}, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def kill(self) -> list[int]:
        return kill_tree(self.proc.pid) if self.proc is not None else []

    def stop(self) -> None:
        if self.proc is not None:
            stop_tree(self.proc)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 (a free port) over an SQLite store and an artifact folder."""

    def __init__(self, store: Path, port: int | None = None, log: Path | None = None):
        self.store = Path(store).resolve()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or self.store / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "MlflowServer":
        self.store.mkdir(parents=True, exist_ok=True)
        cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.store / 'mlflow.db'}",
               "--default-artifact-root", (self.store / "artifacts").as_uri(), "--workers", "1"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(self.url + "/health", timeout, self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_tree(self.proc)
