"""`deeprubin up` / `down` for real: Prefect and MLflow servers as background processes on free ports, used by their
real clients, reused, refused on a taken port, stopped without leftovers, and a failing start that shows its log.

The tests share one `up` (each server starts once, ~15-25 s on two cores) and run in file order: the last one stops it.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from deeprubin import servers


def _get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=10, trust_env=False)


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deeprubin-state")


@pytest.fixture(scope="module")
def stack(state):
    """Both servers, started together by `up`; `down` again afterwards whatever happened."""
    ports = {"prefect_port": servers.free_port(), "mlflow_port": servers.free_port()}
    try:
        yield servers.up(state, **ports), ports
    finally:
        servers.down(state)


def test_up_starts_both_healthy_with_records_and_logs(stack, state):
    records, ports = stack
    assert set(records) == {"prefect", "mlflow"}
    assert records["prefect"]["url"] == f"http://127.0.0.1:{ports['prefect_port']}/api"
    assert records["mlflow"]["url"] == f"http://127.0.0.1:{ports['mlflow_port']}"
    assert _get(records["prefect"]["url"] + "/health").status_code == 200
    assert _get(records["mlflow"]["url"] + "/health").status_code == 200
    for name, record in records.items():
        assert record["reused"] is False
        saved = json.loads((state / "run" / f"{name}.json").read_text())
        assert saved["pid"] == record["pid"] and saved["url"] == record["url"]
        assert Path(record["log"]).is_file() and Path(record["log"]).stat().st_size > 0
    by_name = {s["name"]: s for s in servers.status(state)}
    assert all(by_name[n]["alive"] and by_name[n]["healthy"] for n in ("prefect", "mlflow"))
    assert servers.client_env(records) == {"PREFECT_API_URL": records["prefect"]["url"],
                                           "MLFLOW_TRACKING_URI": records["mlflow"]["url"]}
    assert servers.client_env(servers.status(state)) == servers.client_env(records)


def test_mlflow_client_logs_and_reads_back(stack, state):
    import mlflow

    url = stack[0]["mlflow"]["url"]
    client = mlflow.MlflowClient(tracking_uri=url)
    experiment_id = client.create_experiment("servers-smoke")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "auc", 0.93)
    client.set_terminated(run.info.run_id)
    history = client.get_metric_history(run.info.run_id, "auc")
    assert [m.value for m in history] == [0.93]
    assert (state / "mlflow" / "mlflow.db").is_file()  # the server's sqlite store, not a local ./mlruns


def test_prefect_client_reads_from_the_server(stack):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = stack[0]["prefect"]["url"]
    # Prefect reads env settings at import, so the settings context is what reaches an in-process client.
    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        assert str(client.api_url).rstrip("/") == url
        assert client.api_healthcheck() is None  # None means healthy
        assert isinstance(client.read_flows(), list)


def test_the_prefect_ui_is_given_its_own_server_api_not_the_default_port(stack):
    """The UI reads its API address from /ui-settings: on a port other than 4200 it must still be this server's."""
    url = stack[0]["prefect"]["url"]
    base = url[:-len("/api")] if url.endswith("/api") else url
    settings = _get(f"{base}/ui-settings")
    assert settings.status_code == 200, settings.text
    assert settings.json()["api_url"].rstrip("/") == f"{base}/api"


def test_up_again_reuses_the_running_servers(stack, state):
    records, ports = stack
    again = servers.up(state, **ports)
    for name in ("prefect", "mlflow"):
        assert again[name]["reused"] is True
        assert again[name]["pid"] == records[name]["pid"]


def test_a_port_held_by_someone_else_is_refused_by_number_and_a_stale_record_dropped(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()  # its pid no longer runs: the record left behind is stale
    stale = tmp_path / "run" / "mlflow.json"
    stale.parent.mkdir()
    stale.write_text(json.dumps({"name": "mlflow", "pid": dead.pid, "url": "x", "health_url": "x"}))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(servers.ServerError, match=rf"port {port}\b.*already in use"):
            servers.start(servers.mlflow_spec(tmp_path, port=port), tmp_path)
    assert not stale.exists()
    assert servers.stop("mlflow", tmp_path) is False


def test_a_running_server_asked_for_another_port_is_not_duplicated(stack, state):
    with pytest.raises(servers.ServerError, match="already running"):
        servers.start(servers.mlflow_spec(state, port=servers.free_port()), state)


def test_down_stops_everything_and_is_idempotent(stack, state):
    records, ports = stack
    procs = []
    for record in records.values():
        parent = psutil.Process(record["pid"])
        procs += [parent, *parent.children(recursive=True)]
    assert servers.down(state) == {"prefect": True, "mlflow": True}
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)
    for port in ports.values():
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
    assert not list((state / "run").glob("*.json"))
    assert not any(s["alive"] for s in servers.status(state))
    assert servers.down(state) == {"prefect": False, "mlflow": False}


def test_a_failing_start_raises_with_its_log_and_leaves_nothing(tmp_path):
    spec = servers.mlflow_spec(tmp_path, port=servers.free_port())
    cmd = list(spec.cmd)
    cmd[cmd.index("--backend-store-uri") + 1] = "bogus://x"
    with pytest.raises(servers.ServerError) as err:
        servers.start(dataclasses.replace(spec, cmd=cmd), tmp_path, timeout_s=60)
    message = str(err.value)
    assert "mlflow" in message and str(spec.port) in message
    assert "Traceback" in message and "bogus://x" in message  # the server's own words from its log
    assert not (tmp_path / "run" / "mlflow.json").exists()
    assert servers.status(tmp_path)[1]["alive"] is False
