"""Prefect fit for a terminal: quiet by default, one temporary server per command at most.

A command that runs flows enters :func:`prefect_session` once, after every check that can fail
fast has passed. If a Prefect API is configured (``PREFECT_API_URL``, a profile, a worker's
environment) it is used as it is. Otherwise one temporary API server is started for the whole
command, the way Prefect's own ephemeral mode does it (uvicorn over Prefect's app, SQLite under
``PREFECT_HOME``, so the runs are there when you later ``prefect server start``), but in a
session of its own: Ctrl-C in the terminal reaches the command (training checkpoints and stops)
and not the server, which is stopped by its PID when the command ends. Subprocesses (the
process task runner, ``torchrun``) inherit its URL, so they never start servers of their own.

Offline runs print no ERROR lines: telemetry and resource-metric collection are off unless the
user turns them on, and Prefect's console logging shows warnings only (the command prints its own
progress once; the run's log in the Prefect UI still has every line).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

# settings that keep an offline terminal run quiet; the user's own environment wins
QUIET_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the server's telemetry heartbeat (needs internet)
    "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "PREFECT_UI_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    # the terminal shows our own lines (llmforge.console.say); Prefect's run logs still reach its API
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
}


def quiet_defaults() -> None:
    for k, v in QUIET_DEFAULTS.items():
        os.environ.setdefault(k, v)


def api_configured() -> bool:
    """Whether Prefect already has an API to talk to (env, profile or a worker's settings)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TemporaryServer:
    """A Prefect API server on 127.0.0.1 in its own session, stopped by PID."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "TemporaryServer":
        import prefect

        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
               "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
               str(self.port), "--log-level", "error", "--lifespan", "on"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                raise RuntimeError(f"the temporary Prefect server exited with {self.proc.returncode}: {err}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.api_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the temporary Prefect server did not answer on {self.api_url} within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


class _NoRunLogs:
    """Keeps flow/task-run log records (state changes, a failed run's traceback) out of the
    terminal: the command says what happened in one line, the Prefect UI keeps the full log."""

    def filter(self, record) -> bool:
        if record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return False
        # the event/log workers draining at the end of a command (_flush_events) is expected
        return not (record.name.endswith("Worker") and str(record.msg).startswith("Still processing items"))


def quiet_console() -> None:
    import logging

    import prefect.main  # noqa: F401  (configures Prefect's logging; a bare `import prefect` is lazy and does not)

    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _NoRunLogs) for f in handler.filters):
            handler.addFilter(_NoRunLogs())


@contextlib.contextmanager
def prefect_session() -> Iterator[str | None]:
    """Run the block with a Prefect API: the configured one, or one temporary server. Yields
    the temporary server's API URL (None when an API was configured)."""
    quiet_defaults()
    quiet_console()
    if api_configured():
        yield None
        return
    print("starting a temporary Prefect server for this command (set PREFECT_API_URL to use yours)...",
          file=sys.stderr, flush=True)
    server = TemporaryServer().start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        _flush_events()
        server.stop()


def _flush_events() -> None:
    """Let Prefect's background event/log workers drain while the server is still up, so
    nothing retries against a stopped server at exit."""
    with contextlib.suppress(Exception):
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=5)
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
