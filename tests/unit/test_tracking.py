"""deeprubin.tracking.using: MLflow's process-wide state is put back exactly after a block."""

from __future__ import annotations

import os


def test_using_restores_uris_environment_and_the_active_experiment(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import fluent

    from deeprubin.tracking import using

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    first, second = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    with using(first):
        mlflow.set_experiment("only-in-a")
        assert mlflow.get_tracking_uri() == first
    assert fluent._active_experiment_id is None and "MLFLOW_EXPERIMENT_ID" not in os.environ
    assert "MLFLOW_TRACKING_URI" not in os.environ
    with using(second):  # a run in another store must not inherit the first store's experiment id
        with mlflow.start_run() as run:
            pass
    assert mlflow.MlflowClient(tracking_uri=second).get_run(run.info.run_id).info.experiment_id == "0"
