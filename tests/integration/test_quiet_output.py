"""What `make run` prints: the pipeline's own progress and summary, not MLflow's and Lightning's chatter.

One tiny `deeprubin nightly` in a subprocess (embedded Prefect, a real MLflow tracking server: the run links MLflow
prints only for a server), whose whole output must hold none of the third-party noise the pipeline used to show
(artifact download progress bars, the litlogger advertisement, known deprecation warnings, MLflow's run links and
registration messages) and must hold the nightly summary. Then the silencing itself, in-process: it drops exactly
the known noise and nothing else (errors, our warnings, other warnings still show)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NIGHT = "2026-01-01"
MODEL = "quiet-output-tcn"  # its own model and experiment: the MLflow server is shared with other test modules

NOISE = (
    "Downloading artifacts",  # MLflow's tqdm bars, one per model download (promote, classify)
    "💡 Tip", "litlogger",  # Lightning's advertisement
    "LeafSpec",  # torch/pytorch_lightning _pytree deprecation
    "noload",  # SQLAlchemy deprecation raised by MLflow's store
    "🏃 View run", "🧪 View experiment", "View run",  # MLflow's run links (printed twice per training run)
    "Successfully registered model", "Created version",  # mlflow.register_model's stderr prints
    "Waiting up to",  # MLflow's registry client, on every version registered against a tracking server
    "Creating initial MLflow database tables", "Experiment with name",
)


def make_project(root: Path) -> Path:
    """The repository's pipeline files with tiny parameters, as its own git repository."""
    root.mkdir(parents=True)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "infra" / "dvc", root / "infra" / "dvc")
    shutil.copytree(REPO / "data" / "bts", root / "data" / "bts")  # a dep of the DVC stages
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"]["model_name"] = MODEL
    params["ingest"]["simulator"]["n_per_class"] = 10
    params["ingest"]["mix_files"] = False
    params["preprocess"].update(partitions=2, workers=1)
    params["train"].update(max_epochs=2, patience=2, accelerator="cpu", truncations=0, calibration_views=1,
                           calibration="global", calibration_objects="all", experiment="quiet-output",
                           tracking_uri=None)
    params["evaluate"].update(n_bootstrap=10, forest_trees=5, early_days=[10, 30])
    params["evaluate"]["real"].update(detections=None, labels=None)
    params["evaluate"]["ogle"].update(path=None)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["init", "-q"], ["config", "user.email", "test@example.org"], ["config", "user.name", "test"]):
        subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, timeout=60)
    return root


def test_make_run_output_is_the_pipelines_own(tmp_path, mlflow_server):
    project = make_project(tmp_path / "project")
    # What `make run` has, plus a tracking server; none of the switches the fix sets, none of the user's Prefect API.
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", HOME=str(tmp_path), COLUMNS="120", DO_NOT_TRACK="1",
               MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1",
               MLFLOW_TRACKING_URI=mlflow_server["url"], PYTHONWARNINGS="default")
    proc = subprocess.run([str(BIN / "deeprubin"), "nightly", "--night", NIGHT], cwd=project, env=env,
                          capture_output=True, text=True, timeout=480)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    found = [noise for noise in NOISE if noise in output]
    assert not found, f"third-party noise {found} in:\n{output}"
    # The pipeline's own progress and summary.
    assert "Finished in state Completed()" in output and "Task run 'train" in output
    assert f"night {NIGHT}: pulled from simulator" in proc.stdout
    assert "promotion: version 1 promoted (no champion yet" in proc.stdout
    assert f"with models:/{MODEL}/1" in proc.stdout


def test_registering_against_a_tracking_server_prints_only_our_lines(tmp_path, mlflow_server):
    """`deeprubin register` against a real MLflow server: the version is created (and waited for: READY), and
    MLflow's "Waiting up to 300 seconds for model version to finish creation" is not printed (issue 17)."""
    import json

    from mlflow import MlflowClient

    url, name = mlflow_server["url"], "quiet-register-tcn"
    client = MlflowClient(tracking_uri=url)
    found = client.get_experiment_by_name("quiet-register")
    run = client.create_run(found.experiment_id if found else client.create_experiment("quiet-register"))
    client.log_text(run.info.run_id, "artifact_path: model\n", "model/MLmodel")
    client.set_terminated(run.info.run_id)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "train.json").write_text(json.dumps({
        "run_id": run.info.run_id, "model_uri": f"{run.info.artifact_uri}/model", "git_commit": "0" * 40,
        "data_hash": "md5:0", "epochs": 1, "best_val_macro_f1": 0.5}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(HOME=str(tmp_path), DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.run([str(BIN / "deeprubin"), "register", "--set", f"train.tracking_uri={url}",
                           "--set", f"base.model_name={name}", "--set", "train.model_dir=models",
                           "--set", "evaluate.metrics_dir=metrics"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert f"register: models:/{name}/1 new version" in proc.stdout, output
    assert "Waiting up to" not in output and "finish creation" not in output, output
    versions = client.search_model_versions(f"name='{name}'")
    assert [v.status for v in versions] == ["READY"]


def test_quiet_third_party_drops_the_known_noise_and_nothing_else(monkeypatch):
    from deeprubin.tracking import QUIET_ENV, quiet_third_party

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")  # the user's choice wins
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        quiet_third_party()
        quiet_third_party()  # idempotent
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("The ``noload`` loader strategy is deprecated and will be removed", DeprecationWarning)
        warnings.warn("something else is deprecated", FutureWarning)
        warnings.warn("`isinstance(treespec, LeafSpec)` as a UserWarning is not the known one", UserWarning)
    assert [str(w.message) for w in caught] == [
        "something else is deprecated", "`isinstance(treespec, LeafSpec)` as a UserWarning is not the known one"]
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == QUIET_ENV["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"]
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "false"

    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    assert len(rank_zero.filters) == 1

    class Keep(logging.Handler):  # on the logger itself: Lightning may stop its records propagating to the root
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    kept, level = Keep(), rank_zero.level
    rank_zero.addHandler(kept)
    rank_zero.setLevel(logging.INFO)
    try:
        rank_zero.info("💡 Tip: For seamless cloud logging ... try installing [litlogger]")
        rank_zero.info("TPU available: False, using: 0 TPU cores")
        rank_zero.info("GPU available: False, used: False")
        rank_zero.warning("💡 Tip: a warning is never dropped")
    finally:
        rank_zero.removeHandler(kept)
        rank_zero.setLevel(level)
    assert kept.messages == ["GPU available: False, used: False", "💡 Tip: a warning is never dropped"]
    # MLflow's wait for a new model version: its INFO line goes, its failures ("Exceeded max wait time") stay.
    registry_log = logging.getLogger("mlflow.store.model_registry.abstract_store")
    wait = registry_log.makeRecord(registry_log.name, logging.INFO, __file__, 0, "Waiting up to 300 seconds for "
                                   "model version to finish creation. Model name: m, version 1", (), None)
    failed = registry_log.makeRecord(registry_log.name, logging.ERROR, __file__, 0, "Waiting up to ... failed",
                                     (), None)
    assert not registry_log.filter(wait) and registry_log.filter(failed)
    assert logging.getLogger("mlflow.store.db.utils").getEffectiveLevel() == logging.WARNING


@pytest.mark.parametrize("uri, expected", [
    ("http://127.0.0.1:5000", {"experiment": "http://127.0.0.1:5000/#/experiments/7/runs",
                               "run": "http://127.0.0.1:5000/#/experiments/7/runs/r1",
                               "model": "http://127.0.0.1:5000/#/models/deeprubin-tcn"}),
    ("sqlite:///mlflow.db", {}),
])
def test_ui_urls_go_straight_to_the_runs_and_the_registry(uri, expected):
    from deeprubin.tracking import ui_urls

    assert ui_urls(uri, "7", "r1", "deeprubin-tcn") == expected
