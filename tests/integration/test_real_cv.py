"""`deeprubin evaluate --cv` end to end on a tiny configuration: simulated objects mixed with a small subset of the
real BTS supernovae (in a temporary directory), 2 folds, 1 epoch, 10 trees, supernovae trained on real objects only
(train.simulated_classes). The folds are disjoint and every real object is scored once per repeat; both models are
scored on identical folds and trained on the same objects, never on the fold's own; the train stage itself trains
each fold's TCN (recorded here) without touching the configured model directory; the JSON, the Markdown table, the
predictions and the MLflow run agree."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import yaml

from deeprubin.config import load_params
from deeprubin.evaluation import crossval
from deeprubin.evaluation.metrics import classification_metrics
from deeprubin.evaluation.scoring import restricted
from deeprubin.stages import ingest, preprocess, train

pytestmark = pytest.mark.real_data

N_IA, N_II = 24, 10


@pytest.fixture(scope="module")
def cv(tmp_path_factory, shared_data):
    from typer.testing import CliRunner

    from deeprubin.cli import app

    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    root = tmp_path_factory.mktemp("real_cv")
    labels = pd.read_csv(shared_data / "bts" / "labels.csv")
    subset = pd.concat([labels[labels["label"] == "SNIa"].head(N_IA), labels[labels["label"] == "SNII"].head(N_II),
                        labels[labels["label"] == "SNIbc"].head(2)])
    det = pd.read_parquet(shared_data / "bts" / "detections.parquet")
    det[det["oid"].isin(subset["oid"])].to_parquet(root / "bts.parquet")
    subset.to_csv(root / "bts.csv", index=False)
    tree = {
        "ingest": {"raw_dir": str(root / "raw"), "simulator": {"n_per_class": 8}, "mix_files": True,
                   "files": {"detections": str(root / "bts.parquet"), "labels": str(root / "bts.csv"),
                             "label_source": "bts:spectroscopic"}},
        "preprocess": {"processed_dir": str(root / "processed"), "workers": 1, "partitions": 2},
        # Supernovae trained on the real objects alone: the forest must leave the simulated ones out too.
        "train": {"max_epochs": 1, "accelerator": "cpu", "truncations": 1, "tracking_uri": f"sqlite:///{root}/m.db",
                  "simulated_classes": ["QSO", "CEP"],
                  "artifact_location": (root / "artifacts").as_uri(), "model_dir": str(root / "models")},
        "evaluate": {"metrics_dir": str(root / "metrics"), "n_bootstrap": 20, "forest_trees": 10,
                     "real": {"detections": str(root / "bts.parquet"), "labels": str(root / "bts.csv")},
                     "cv": {"days": [10, 30]}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(tree))
    params = load_params(root / "params.yaml")
    ingest.run(params, ingest.IngestPaths.from_params(params))
    preprocess.run(params, preprocess.PreprocessPaths.from_params(params))
    calls = []
    real_run = train.run

    def recording_run(fold_params, paths, progress=None):  # the train stage, recorded
        result = real_run(fold_params, paths, progress)
        calls.append((fold_params, paths, result))
        return result

    mp.setattr(train, "run", recording_run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        done = CliRunner().invoke(app, ["evaluate", "--cv", "--folds", "2", "--params", str(root / "params.yaml")])
    mp.undo()
    assert done.exit_code == 0, done.output
    results = json.loads((root / "metrics" / crossval.RESULTS).read_text())
    predictions = pd.read_parquet(root / "metrics" / crossval.PREDICTIONS)
    yield root, params, calls, results, predictions, done.output


def test_folds_are_disjoint_and_every_object_is_scored_once_per_repeat(cv):
    root, params, calls, results, pred, _ = cv
    bts = pd.read_csv(root / "bts.csv")
    scored = set(bts.loc[bts["label"].isin(["SNIa", "SNII"]), "oid"])  # SN Ib/c: not a class of the set
    assert results["settings"]["objects"] == {"SNIa": N_IA, "SNII": N_II}
    assert set(pred["age"]) == {"whole", "10d", "30d"} and set(pred["model"]) == {"tcn", "forest"}
    for (model, age, repeat), g in pred.groupby(["model", "age", "repeat"]):
        assert g["oid"].is_unique and set(g["oid"]) == scored, (model, age)
        folds = [set(f["oid"]) for _, f in g.groupby("fold")]
        assert len(folds) == 2 and not folds[0] & folds[1]
    assert results["settings"]["folds"] == 2 and len(results["folds"]) == 2 == len(calls)
    for report in results["folds"]:  # stratified: half of each class per fold
        assert report["test_objects"] == {"SNIa": N_IA // 2, "SNII": N_II // 2}


def test_both_models_on_identical_folds_and_training_objects_never_the_folds_own(cv):
    root, params, calls, results, pred, _ = cv
    from deeprubin.data import ProcessedDataModule

    for (repeat, fold, age), g in pred.groupby(["repeat", "fold", "age"]):
        tcn, forest = (set(g.loc[g["model"] == m, "oid"]) for m in ("tcn", "forest"))
        assert tcn == forest and tcn
    for (fold_params, paths, trained), report in zip(calls, results["folds"]):
        test = set(pred.loc[(pred["fold"] == report["fold"]) & (pred["repeat"] == report["repeat"]), "oid"])
        assert set(paths.holdout) == test  # the train stage was given exactly the fold's test objects to hold out
        dm = ProcessedDataModule(paths.processed_dir, holdout=paths.holdout, seed=params.base.seed)
        dm.setup()
        assert not set(dm.splits["train"]) & test and not set(dm.splits["val"]) & test
        assert trained.class_counts["train"] == report["train_objects"]  # the forest's training objects
        # The simulated quasars and Cepheids and some of the other fold's real supernovae trained (the simulated
        # supernovae left out by train.simulated_classes, for both models).
        n = report["train_objects"]
        assert 0 < n["SNIa"] <= N_IA // 2 and 0 < n["SNII"] <= N_II // 2 and n["QSO"] > 0 and n["CEP"] > 0
        # Each fold's TCN lives in a scratch directory and an MLflow experiment of its own, never the configured.
        assert paths.model_dir != params.train.model_dir and fold_params.train.experiment == "deeprubin-cv"
        assert trained.run_id == report["tcn_run_id"]
    assert not (params.train.model_dir / "tcn.ckpt").exists()


def test_numbers_json_table_and_predictions_agree(cv):
    root, params, calls, results, pred, output = cv
    classes = tuple(params.base.classes)
    for model in ("tcn", "forest"):
        assert set(results["summary"][model]) == {"whole", "10d", "30d"}
        for age, m in results["summary"][model].items():
            rows = results["per_fold"][model][age]
            assert [r["fold"] for r in rows] == [0, 1]
            for r in rows:  # each fold's numbers are the project's metrics on that fold's predictions
                g = pred[(pred["model"] == model) & (pred["age"] == age) & (pred["fold"] == r["fold"])]
                p = restricted(g[list(classes)].to_numpy(), classes, ["SNIa", "SNII"])
                with np.errstate(invalid="ignore"):  # a row with no SN probability at all (10 tiny trees)
                    ref = classification_metrics(g["label"], p, classes, labels=["SNIa", "SNII"],
                                                 restrict_predictions=True)
                assert r["macro_f1"] == pytest.approx(ref["macro_f1"]) and r["n"] == len(g)
                assert r["recall_SNII"] == pytest.approx(ref["per_class"]["SNII"]["recall"])
            f1 = m["macro_f1"]
            assert f1["mean"] == pytest.approx(np.mean([r["macro_f1"] for r in rows]))
            assert f1["pooled_low"] <= f1["pooled"] <= f1["pooled_high"]
    for age, d in results["paired"].items():
        assert d["macro_f1"]["mean"] == pytest.approx(results["summary"]["tcn"][age]["macro_f1"]["mean"]
                                                      - results["summary"]["forest"][age]["macro_f1"]["mean"])
    table = (root / "metrics" / crossval.TABLE).read_text()
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "model", "age", "n", "macro-F1 (mean ± std)", "macro-F1 pooled [95 % CI]", "SNIa recall (mean ± std)",
        "SNII recall (mean ± std)", "per-fold macro-F1"]
    assert sum(line.startswith(("| TCN |", "| forest |")) for line in table.splitlines()) == 6
    assert header in output and "seconds per fold" in output  # printed, one line per table row


def test_mlflow_run_has_the_means_the_files_and_the_fold_runs_as_children(cv):
    from mlflow import MlflowClient

    root, params, calls, results, *_ = cv
    client = MlflowClient(tracking_uri=params.train.tracking_uri)
    run_id = results["settings"]["mlflow_run_id"]
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "deeprubin-cv" and run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["cv/tcn/whole/macro_f1_mean"] == pytest.approx(results["summary"]["tcn"]["whole"]["macro_f1"]["mean"])
    assert "cv/tcn_minus_forest/10d/macro_f1_pooled" in m and run.data.params["cv.folds"] == "2"
    artifacts = {a.path for a in client.list_artifacts(run_id, "cv")}
    assert {f"cv/{crossval.RESULTS}", f"cv/{crossval.TABLE}", f"cv/{crossval.PREDICTIONS}"} <= artifacts
    for _, _, trained in calls:
        assert client.get_run(trained.run_id).data.tags["mlflow.parentRunId"] == run_id


def test_real_objects_missing_from_the_processed_data_are_a_clear_error(cv, shared_data, tmp_path):
    root, params, *_ = cv
    labels = pd.read_csv(shared_data / "bts" / "labels.csv")
    other = labels[labels["label"] == "SNIa"].iloc[100:110]  # never ingested
    other.to_csv(tmp_path / "other.csv", index=False)
    changed = params.model_copy(deep=True)
    changed.evaluate.real.detections = shared_data / "bts" / "detections.parquet"
    changed.evaluate.real.labels = tmp_path / "other.csv"
    changed.evaluate.metrics_dir = tmp_path / "metrics"
    with pytest.raises(ValueError, match="mix_files"):
        crossval.run(changed, train, log_to_mlflow=False)
