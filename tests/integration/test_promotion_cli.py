"""The README's promotion walkthrough through the command line, embedded (a tiny project, sqlite MLflow): a retrained
model that only ties the champion is rejected, `deeprubin rollback` then exits 1 saying why and what to do, and
after `deeprubin promote --force` it restores the champion that the forced promotion replaced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.model_fixtures import register_tcn

REPO = Path(__file__).resolve().parents[2]
TINY = ["--set", "ingest.simulator.n_per_class=12", "--set", "ingest.mix_files=false",
        "--set", "evaluate.real.detections=null", "--set", "evaluate.real.labels=null", "--set", "preprocess.workers=1"]


def _cli(*args: str):
    from typer.testing import CliRunner

    from deeprubin.cli import app

    return CliRunner().invoke(app, [*args, *TINY])


@pytest.fixture
def project(tmp_path, monkeypatch):
    """ingest + preprocess on 48 simulated objects; two versions of one and the same network, as a retraining on
    unchanged data gives (same seed, same data: the same scores)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    for stage in ("ingest", "preprocess"):
        done = _cli(stage)
        assert done.exit_code == 0, done.output
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert [register_tcn(uri, alias=None), register_tcn(uri, alias=None)] == ["1", "2"]
    return tmp_path


def test_the_readme_walkthrough_of_promote_and_rollback(project):
    from deeprubin.registry import Registry

    first = _cli("promote", "--version", "1")
    assert first.exit_code == 0 and "promoted" in first.output, first.output
    tie = _cli("promote", "--version", "2")
    assert tie.exit_code == 0 and "rejected" in tie.output and "+0.0000" in tie.output, tie.output

    refused = _cli("rollback")
    assert refused.exit_code == 1, refused.output
    said = " ".join(refused.output.split())
    assert "rollback failed: deeprubin-tcn has no previous champion to roll back to: version 1 is champion" in said
    assert "version 2, was rejected by the promotion gate" in said and "--force" in said

    registry = Registry(f"sqlite:///{project / 'mlflow.db'}", "deeprubin-tcn")
    assert registry.aliases() == {"champion": "1", "challenger": "2"}

    forced = _cli("promote", "--version", "2", "--force")
    assert forced.exit_code == 0, forced.output
    said = " ".join(forced.output.split())
    assert "version 2: forced (--force overrides the promotion gate, which rejects it" in said
    assert "champion is now 2" in said
    report = json.loads((project / "models" / "promotion.json").read_text())
    assert report["outcome"] == "forced" and report["forced"] and report["champion_before"] == "1"
    assert registry.aliases() == {"champion": "2", "challenger": "2", "previous": "1"}

    back = _cli("rollback")
    assert back.exit_code == 0, back.output
    assert "version 1 is champion again in place of 2" in " ".join(back.output.split())
    assert registry.alias("champion") == "1"
