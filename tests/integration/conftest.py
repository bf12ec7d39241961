"""Real local servers for integration tests: one Prefect and one MLflow server per session, each on a free
127.0.0.1 port with its state in a temporary directory, started only when a test asks for it.

Nothing here changes the environment for the session. Note for Prefect: ``prefect`` reads its settings when it is
imported, so ``monkeypatch.setenv("PREFECT_API_URL", ...)`` alone does not reach in-process clients or flows (they
would silently start an ephemeral server instead); use the ``prefect_api`` fixture, which does both.
"""

from __future__ import annotations

import sys

import pytest

from deeprubin import servers


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A running MLflow tracking server; yields its record (``url`` is the MLFLOW_TRACKING_URI)."""
    state = tmp_path_factory.mktemp("mlflow-server")
    with servers.running(servers.mlflow_spec(state, port=servers.free_port()), state) as record:
        yield record


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A running Prefect server; yields its record (``url`` is the PREFECT_API_URL, ending in /api)."""
    state = tmp_path_factory.mktemp("prefect-server")
    with servers.running(servers.prefect_spec(state, port=servers.free_port()), state) as record:
        yield record
        _drain_prefect_workers()


@pytest.fixture
def prefect_api(prefect_server, monkeypatch):
    """Point Prefect at ``prefect_server`` for one test: the env var for subprocesses, the settings context for this
    process. Yields the API URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_server["url"])
    with temporary_settings(updates={PREFECT_API_URL: prefect_server["url"]}):
        yield prefect_server["url"]
        _drain_prefect_workers()


def _drain_prefect_workers() -> None:
    """Send the flow-run logs and events Prefect still queues in background threads while the API they were meant
    for is still set and up; otherwise they go at interpreter exit, to a stopped server ("Error logging to API")."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10)
