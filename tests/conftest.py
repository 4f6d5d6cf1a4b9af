"""Shared pytest fixtures. Keep this small: helpers live in tests/support/."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

try:  # tests/ is on sys.path (rootdir conftest without tests/__init__.py)
    from support.http import TestHTTPServer
except ImportError:  # tests/ is a package
    from tests.support.http import TestHTTPServer


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


@pytest.fixture
def shared_corpus() -> Path:
    """../shared/corpus/gutenberg (real books); tests that need it skip on a clone without it."""
    if not (SHARED_CORPUS / "MANIFEST.json").is_file():
        pytest.skip(f"needs {SHARED_CORPUS} (the team's shared corpus), not present in this checkout")
    return SHARED_CORPUS
