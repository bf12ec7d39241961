"""`dvc repro` runs the ingest stage through the real CLI and records it in dvc.lock; a second repro is a no-op."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
           "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "HOME": str(cwd)}
    proc = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def project(tmp_path: Path) -> Path:
    work = tmp_path / "project"
    work.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "infra" / "dvc", work / "infra" / "dvc")  # the offline plots template
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    shutil.copytree(REPO / "data" / "bts", work / "data" / "bts")  # a dep of the stages (evaluate.real, mix_files)
    params["ingest"]["simulator"]["n_per_class"] = 10
    params["ingest"]["mix_files"] = False  # the simulator alone keeps the pipeline small; BTS has its own tests
    params["preprocess"]["partitions"] = 2
    params["preprocess"]["workers"] = 1
    params["train"].update(max_epochs=2, accelerator="cpu", truncations=1)
    params["evaluate"].update(n_bootstrap=20, forest_trees=10)
    params["evaluate"]["real"].update(detections=None, labels=None)  # the real set has its own tests
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], work)
    run(["git", "config", "user.email", "test@example.org"], work)
    run(["git", "config", "user.name", "test"], work)
    shutil.copy(REPO / ".gitignore", work / ".gitignore")  # MLflow's files are never committed
    return work


def write_bytecode(project: Path) -> None:
    """What the next Python command does after a run: writes .pyc files beside modules the run did not import, into
    the code deps' directories (src/deeprubin/sources, models, evaluation); plus a stray legacy .pyc beside a module.
    .dvcignore keeps them out of the deps' hashes."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}
    src = project / "src"
    proc = subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=False,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for package in ("sources", "models", "evaluation"):
        assert list((src / "deeprubin" / package / "__pycache__").glob("*.pyc")), package
    (src / "deeprubin" / "sources" / "stray.pyc").write_bytes(b"stray")


def assert_up_to_date(project: Path, *targets: str) -> None:
    assert json.loads(run([str(BIN / "dvc"), "status", "--json", *targets], project).stdout or "{}") == {}


def test_dvc_repro_ingest_is_recorded_and_reproducible(project: Path):
    dvc = str(BIN / "dvc")
    run([dvc, "repro", "ingest"], project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    out = lock["stages"]["ingest"]["outs"][0]
    assert out["path"] == "data/raw" and out["nfiles"] >= 4
    assert lock["stages"]["ingest"]["params"]["params.yaml"]["ingest"]["simulator"]["n_per_class"] == 10
    assert (project / "data" / "raw" / "detections.parquet").exists()
    first_hash = out["md5"]

    second = run([dvc, "repro", "ingest"], project)
    assert "didn't change" in second.stdout or "up to date" in second.stdout
    write_bytecode(project)
    assert_up_to_date(project, "ingest")  # src/deeprubin/sources/__pycache__ is not part of the dep

    # Deleting the output and reproducing gives the same data version (the simulator is seeded).
    shutil.rmtree(project / "data" / "raw")
    run([dvc, "repro", "--force", "ingest"], project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["ingest"]["outs"][0]["md5"] == first_hash


def test_dvc_repro_preprocess_follows_ingest_and_is_then_a_no_op(project: Path):
    dvc = str(BIN / "dvc")
    run([dvc, "repro", "preprocess"], project)  # runs ingest first: preprocess depends on data/raw
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"ingest", "preprocess"}
    assert lock["preprocess"]["outs"][0]["path"] == "data/processed"
    assert lock["preprocess"]["params"]["params.yaml"]["preprocess.partitions"] == 2
    assert (project / "data" / "processed" / "index.parquet").exists()
    second = run([dvc, "repro"], project)
    assert "didn't change" in second.stdout or "up to date" in second.stdout


def test_dvc_repro_whole_pipeline_metrics_plots_and_an_experiment(project: Path):
    """`dvc repro` runs ingest, preprocess, train, baseline and evaluate through the CLI; the run's data_hash is the
    md5 DVC recorded for data/processed; a second repro is a no-op; `dvc metrics show` reads the evaluation;
    `dvc plots show` writes HTML with no CDN; `dvc exp run -S train.lr=1e-4` makes an experiment that
    `dvc exp show` lists with its parameter and metrics."""
    import json

    from mlflow import MlflowClient

    from deeprubin.outputs import TRAIN_REPORT

    dvc = str(BIN / "dvc")
    run([dvc, "repro"], project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"ingest", "preprocess", "train", "baseline", "evaluate"}
    assert [o["path"] for o in lock["train"]["outs"]] == ["models/tcn.ckpt", "models/train.json"]
    processed_md5 = lock["preprocess"]["outs"][0]["md5"]
    report = json.loads((project / "models" / TRAIN_REPORT).read_text())
    assert report["data_hash"] == processed_md5 and report["data_hash_source"] == "dvc.lock"
    assert (project / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    run_ = client.get_run(report["run_id"])
    assert run_.data.tags["data_hash"] == processed_md5 and run_.data.tags["git_commit"] == "unknown"
    assert "eval/tcn/test/macro_f1" in run_.data.metrics
    run([str(BIN / "deeprubin"), "register"], project)  # after evaluation; not a DVC stage (it writes the registry)
    registered = json.loads((project / "models" / "registered.json").read_text())
    assert client.get_model_version("deeprubin-tcn", registered["version"]).run_id == report["run_id"]
    second = run([dvc, "repro"], project)
    assert "didn't change" in second.stdout or "up to date" in second.stdout
    write_bytecode(project)
    assert_up_to_date(project)

    metrics = json.loads(run([dvc, "metrics", "show", "--json"], project).stdout)
    shown = json.dumps(metrics)
    assert "macro_f1" in shown and "forest" in shown

    run([dvc, "plots", "show", "--out", "plots_html"], project)
    html = (project / "plots_html" / "index.html").read_text()
    assert "https://cdn" not in html and "<script src" not in html
    assert "vegaEmbed" in html and "days" in html

    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    run([dvc, "exp", "run", "-S", "train.lr=1e-4"], project)
    shown = json.loads(run([dvc, "exp", "show", "--json"], project).stdout)
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    assert experiments, shown
    runs = [r for e in experiments for r in (e.get("revs") or [])]
    lrs = [r["data"]["params"]["params.yaml"]["data"]["train"]["lr"] for r in runs]
    assert 1e-4 in lrs
    assert any(r["data"]["metrics"] for r in runs)
