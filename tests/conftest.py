"""Shared pytest fixtures. Keep this small: helpers live in tests/support/."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

try:  # tests/ is on sys.path (rootdir conftest without tests/__init__.py)
    from support.http import TestHTTPServer
except ImportError:  # tests/ is a package
    from tests.support.http import TestHTTPServer


# A flow called from Python with no API configured starts Prefect's own ephemeral server, which
# gives up after 20 s by default; a loaded CI machine (2 cores, a test beside it) has taken longer.
# Subprocesses inherit this.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

# xdist workers (pyproject's addopts) share the machine's cores: each worker and every process it
# starts (CLI runs, the Prefect worker's flow runs, servers) computes on its share of them. torch
# on every core beside a busy neighbour spins in OpenMP barriers instead of computing. Set before
# anything imports torch; subprocesses inherit it.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


# The test files that take longest (seconds on the 2-core CI machine, one process), run first so
# that the two xdist workers (pyproject's addopts, --dist loadfile) finish together instead of
# one worker starting a four-minute file when the other is done. Order only: any file may be
# added or renamed without touching this.
LONGEST_FIRST = ("test_deployments.py", "test_train.py", "test_prepare.py", "test_mlflow_server.py",
                 "test_packaging.py", "test_registry.py", "test_cli_errors.py", "test_finetune.py",
                 "test_evaluate.py", "test_safety.py", "test_neardup.py", "test_chat.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps the order in a file


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[TestHTTPServer]:
    """A real HTTP server on 127.0.0.1 serving ``tmp_path / "www"`` (Range + fault injection)."""
    with TestHTTPServer(tmp_path / "www") as server:
        yield server


if TYPE_CHECKING:
    from llmforge.flows.services import PrefectServer

SHARED_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "gutenberg"


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator["PrefectServer"]:
    """A real Prefect server (SQLite, 127.0.0.1, free port, private PREFECT_HOME) for the session."""
    from llmforge.flows.services import PrefectServer

    server = PrefectServer(tmp_path_factory.mktemp("prefect-home")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """One empty, migrated MLflow SQLite database per worker. A new store runs MLflow's migrations
    (~5 s of CPU on the 2-core CI machine, in every test that makes one); a copy of this one costs
    milliseconds and is the same store (llmforge names its experiment's artifact location itself,
    so nothing in it points here)."""
    from llmforge import tracking

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    tracking.client(f"sqlite:///{db}").search_experiments()  # creates and migrates it
    return db


@pytest.fixture
def new_mlruns(empty_mlflow_db: Path, tmp_path: Path) -> Path:
    """``tmp_path / "mlruns"``, an LLMFORGE_MLRUNS directory holding an empty store."""
    import shutil

    (tmp_path / "mlruns").mkdir()
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlruns" / "mlflow.db")
    return tmp_path / "mlruns"


@pytest.fixture
def shared_corpus() -> Path:
    """../shared/corpus/gutenberg (real books); tests that need it skip on a clone without it."""
    if not (SHARED_CORPUS / "MANIFEST.json").is_file():
        pytest.skip(f"needs {SHARED_CORPUS} (the team's shared corpus), not present in this checkout")
    return SHARED_CORPUS
