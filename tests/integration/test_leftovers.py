"""Nothing is left behind when a run ends badly: ``serve-api`` stopped with SIGTERM (how ``deeprubin down`` stops
it) removes its copy of the model; ``deeprubin classify`` killed with SIGKILL takes its worker processes with it,
and the next run removes the scratch folder it left. Real subprocesses of the real command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from deeprubin import servers
from deeprubin.models.served import log_and_register
from deeprubin.schema import CLASSES
from tests.model_fixtures import served_tcn, sqlite_uri
from tests.service_process import start_service, wait_healthy

pytestmark = pytest.mark.timeout(300)

QUIET = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "PYTHONUNBUFFERED": "1"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env.update(QUIET, **extra)
    return env


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_serve_api_stopped_with_sigterm_leaves_no_model_copy(tmp_path):
    uri = sqlite_uri(tmp_path)
    log_and_register(served_tcn(), uri, "deeprubin-tcn", CLASSES, alias="champion", experiment="test-models",
                     artifact_location=(tmp_path / "artifacts").as_uri())
    (tmp_path / "params.yaml").write_text(json.dumps({"train": {"tracking_uri": uri}}))
    scratch = tmp_path / "tmp"  # the service's temporary directory
    scratch.mkdir()
    port = servers.free_port()
    log = tmp_path / "serve.log"
    proc = start_service(tmp_path / "params.yaml", tmp_path, log, port, _env(TMPDIR=str(scratch)))
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", log, timeout_s=120)
        copies = [p.name for p in scratch.iterdir() if p.name.startswith("deeprubin-model-")]
        assert len(copies) == 1 and copies[0].startswith(f"deeprubin-model-{proc.pid}-"), copies
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]  # a clean exit, not death by signal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [p.name for p in scratch.iterdir() if p.name.startswith("deeprubin-model-")] == []


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import mlflow

    path = tmp_path_factory.mktemp("model") / "tcn"
    mlflow.pytorch.save_model(served_tcn(), path, pip_requirements=["torch"], serialization_format="pt2",
                              input_example=np.zeros((2, 6, 100), dtype=np.float32))
    return path


@pytest.fixture(scope="module")
def detections() -> pd.DataFrame:
    from deeprubin.config import load_params
    from deeprubin.sources import simulate

    sim = simulate.simulate(load_params(None).ingest.simulator.model_copy(update={"n_per_class": 3}), seed=3,
                            workers=1)
    return sim.detections.sort_values(["oid", "mjd"], kind="stable").reset_index(drop=True)


def _workers_armed(main: psutil.Process, family: list[psutil.Process], n: int) -> bool:
    """``n`` pool workers (forked by the forkserver, so not the run's own children) that have run their initializer
    (a second thread: the parent watch)."""
    try:
        workers = [p for p in family if p.ppid() != main.pid]
        return len(workers) >= n and all(p.num_threads() >= 2 for p in workers)
    except psutil.NoSuchProcess:
        return False


def test_classify_killed_outright_takes_its_workers_along_and_the_next_run_cleans_up(model_dir, detections,
                                                                                     tmp_path):
    from deeprubin.config import load_params
    from deeprubin.models.served import load_model
    from deeprubin.serving import classify as clf
    from tests.conftest import REPO

    copies = []  # enough rows for the process pool (classify.MIN_ROWS_FOR_POOL)
    for i in range(clf.MIN_ROWS_FOR_POOL // len(detections) + 1):
        copies.append(detections.assign(oid=detections["oid"] + f"x{i:03d}"))
    big = tmp_path / "big.parquet"
    pd.concat(copies, ignore_index=True).to_parquet(big, index=False)
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "classify.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "deeprubin.cli", "classify", "--input", str(big), "--output",
                                 str(out / "classes.parquet"), "--model", str(model_dir), "--params",
                                 str(REPO / "params.yaml"), "--set", "classify.workers=2", "--set",
                                 "classify.batch_size=16"], cwd=tmp_path,
                                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=_env())
    main = psutil.Process(proc.pid)
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                family = main.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            if _workers_armed(main, family, 2):
                break
            time.sleep(0.2)
        assert len(family) >= 3, (family, log.read_text()[-3000:])  # a forkserver and its workers at least
        assert [p.name for p in out.glob(f".classify-{proc.pid}-*")]  # the run's scratch folder
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(_gone(p.pid) for p in family):
            time.sleep(0.2)
        alive = [(p.pid, p.name()) for p in family if not _gone(p.pid)]
        assert alive == [], f"processes left by the killed run: {alive}"
    finally:
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    stale = list(out.glob(f".classify-{proc.pid}-*"))
    assert stale  # kill -9 runs no cleanup...
    small = tmp_path / "small.parquet"
    detections.to_parquet(small, index=False)
    done = clf.run_file(load_params(None, ["classify.workers=1"]), small, out / "classes.parquet",
                        model=load_model(str(model_dir), sqlite_uri(tmp_path)))
    assert done.n_classified > 0
    assert not any(p.exists() for p in stale)  # ...the next run removes what it left
    assert list(out.glob(".classify-*")) == []
