"""Stages baseline and evaluate end to end: simulated objects mixed with a small subset of the real BTS supernovae
(written to a temporary directory, never into the repository), the real held-out objects kept out of training,
the TCN and the forest scored side by side, DVC metrics/plots files, figures, and the MLflow run and version."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from deeprubin.config import Params
from deeprubin.stages import baseline, evaluate, ingest, preprocess, train

pytestmark = pytest.mark.real_data


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, shared_data):
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    root = tmp_path_factory.mktemp("evaluate_stage")
    labels = pd.read_csv(shared_data / "bts" / "labels.csv")
    subset = pd.concat([labels[labels["label"] == "SNIa"].head(50), labels[labels["label"] == "SNII"].head(30),
                        labels[labels["label"] == "SNIbc"].head(5)])
    det = pd.read_parquet(shared_data / "bts" / "detections.parquet")
    det[det["oid"].isin(subset["oid"])].to_parquet(root / "bts.parquet")
    subset.to_csv(root / "bts.csv", index=False)
    params = Params.model_validate({
        "ingest": {"raw_dir": str(root / "raw"), "simulator": {"n_per_class": 15}, "mix_files": True,
                   "files": {"detections": str(root / "bts.parquet"), "labels": str(root / "bts.csv"),
                             "label_source": "bts:spectroscopic"}},
        "preprocess": {"processed_dir": str(root / "processed"), "workers": 1, "partitions": 2},
        "train": {"max_epochs": 2, "accelerator": "cpu", "truncations": 2, "tracking_uri": f"sqlite:///{root}/m.db",
                  "artifact_location": (root / "artifacts").as_uri(), "model_dir": str(root / "models")},
        "evaluate": {"metrics_dir": str(root / "metrics"), "n_bootstrap": 50, "forest_trees": 20,
                     "real": {"detections": str(root / "bts.parquet"), "labels": str(root / "bts.csv")},
                     "ogle": {"path": str(shared_data / "other_surveys" / "ogle2_lmc_qso_cep_iband.csv")}},
    })
    ingest.run(params, ingest.IngestPaths.from_params(params))
    preprocess.run(params, preprocess.PreprocessPaths.from_params(params))
    from deeprubin.evaluation.sets import holdout_oids

    holdout = holdout_oids(params.evaluate.real, params.base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = train.run(params, train.TrainPaths.from_params(params))
        forest = baseline.run(params, baseline.BaselinePaths.from_params(params))
        steps = []
        result = evaluate.run(params, evaluate.EvaluatePaths.from_params(params),
                              progress=lambda *a, **k: steps.append((a, k)))
    from deeprubin.stages import register

    registered = register.run(params, register.RegisterPaths.from_params(params))
    trained.extra["registered"] = registered
    yield root, params, holdout, trained, forest, result
    mp.undo()


def test_real_held_out_objects_never_train(evaluated):
    root, params, holdout, trained, forest, _ = evaluated
    from deeprubin.data import ProcessedDataModule

    assert len(holdout) == round(0.3 * 50) + round(0.3 * 30)  # stratified; SNIbc is not a scored class
    dm = ProcessedDataModule(root / "processed", holdout=holdout, seed=params.base.seed)
    dm.setup()
    processed = set(dm.index["oid"])
    assert set(holdout) & processed  # mix_files put them into data/raw ...
    assert set(holdout) & processed <= set(dm.splits["test"])  # ... and they are only ever test objects
    assert trained.class_counts["train"]["SNIa"] > 15  # simulated + real SNe Ia trained
    assert sum(forest["objects_per_class"].values()) == trained.split_sizes["train"]


def test_forest_leaves_out_the_simulated_classes_the_tcn_leaves_out(evaluated, tmp_path):
    root, params, holdout, trained, forest, _ = evaluated
    real_only = params.model_copy(update={"train": params.train.model_copy(update={
        "simulated_classes": ["QSO", "CEP"], "model_dir": str(tmp_path / "models")})})
    report = baseline.run(real_only, baseline.BaselinePaths.from_params(real_only))
    from deeprubin.data import ProcessedDataModule

    dm = ProcessedDataModule(root / "processed", holdout=holdout, seed=params.base.seed)
    dm.setup()
    train_rows = dm.index.loc[dm.index["split"] == "train"]
    simulated = train_rows["oid"].astype(str).str.startswith(params.ingest.simulator.oid_prefix)
    counts, before = report["objects_per_class"], forest["objects_per_class"]
    for cls in ("QSO", "CEP"):  # simulated and kept
        assert counts[cls] == before[cls] > 0
    for sn in ("SNIa", "SNII"):  # only the real training supernovae remain, as the TCN trains
        n_simulated = int((simulated & (train_rows["label"] == sn)).sum())
        assert n_simulated > 0
        assert counts[sn] == before[sn] - n_simulated > 0


def test_metrics_file_has_both_models_on_both_sets_with_intervals(evaluated):
    root, params, holdout, *_, result = evaluated
    metrics = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert set(metrics) == {"tcn", "forest"}
    for model in ("tcn", "forest"):
        test, bts = metrics[model]["test"], metrics[model]["bts"]
        assert set(test["per_class"]) == {"QSO", "CEP", "SNIa", "SNII"}
        assert set(bts["per_class"]) == {"SNIa", "SNII"}  # SNIa vs SNII, prediction restricted to them
        assert bts["n"] == len(holdout)
        for m in (test, bts):
            assert 0 <= m["macro_f1_low"] <= m["macro_f1"] <= m["macro_f1_high"] <= 1
            assert 0 <= m["ece"] <= 1
            assert set(m["early"]) == {"5d", "10d", "20d", "30d", "50d", "100d"}
            for pc in m["per_class"].values():
                assert pc["recall_low"] <= pc["recall"] <= pc["recall_high"]
    # Every held-out object has a prediction at 100 days (its curve cut there, or whole).
    assert metrics["tcn"]["bts"]["early"]["100d"]["n"] == metrics["tcn"]["bts"]["n"]
    report = json.loads((root / "metrics" / "report.json").read_text())
    cm = report["tcn"]["bts"]["confusion_matrix"]
    assert cm["rows"] == ["SNIa", "SNII"] and np.sum(cm["counts"]) == len(holdout)


def test_the_dvc_metric_is_the_headline_of_the_metrics_file(evaluated):
    """headline.json (what dvc.yaml declares as metrics) holds a dozen numbers of evaluate.json (issue 17)."""
    from deeprubin.stages.evaluate import headline_metrics

    root, params, *_, result = evaluated
    assert result.headline_path == root / "metrics" / "headline.json"
    head = json.loads(result.headline_path.read_text())
    assert head == headline_metrics(result.metrics, params.evaluate.real.name)
    assert set(head) == {"test", "bts", "ogle_alert_stream", "ogle_apparent"}
    assert sum(len(row) for row in head.values()) <= 16
    metrics = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert head["bts"]["tcn_macro_f1"] == round(metrics["tcn"]["bts"]["macro_f1"], 4)
    assert head["bts"]["tcn_recall_SNII"] == round(metrics["tcn"]["bts"]["per_class"]["SNII"]["recall"], 4)


def test_ogle_quasars_and_cepheids_as_an_alert_stream_and_as_apparent_magnitudes(evaluated):
    root = evaluated[0]
    metrics = json.loads((root / "metrics" / "evaluate.json").read_text())
    report = json.loads((root / "metrics" / "report.json").read_text())
    for model in ("tcn", "forest"):
        stream, apparent = metrics[model]["ogle_alert_stream"], metrics[model]["ogle_apparent"]
        for name, m in (("ogle_alert_stream", stream), ("ogle_apparent", apparent)):
            assert set(m["per_class"]) == {"QSO", "CEP"} and m["n_in_file"] == 82
            assert m["per_class"]["QSO"]["support"] + m["per_class"]["CEP"]["support"] == m["n"]
            assert m["n"] + m.get("n_not_alerting", m.get("n_rejected_steady", 0)) <= 82 and m["n"] > 0
            for pc in m["per_class"].values():
                assert 0 <= pc["recall_low"] <= pc["recall"] <= pc["recall_high"] <= 1
            # Predictions over all four classes: a class's recall is the fraction of its objects called that class.
            cm = report[model][name]["confusion_matrix"]
            assert cm["rows"] == ["QSO", "CEP"] and cm["columns"] == ["QSO", "CEP", "SNIa", "SNII"]
            for i, c in enumerate(cm["rows"]):
                assert m["per_class"][c]["recall"] == pytest.approx(cm["counts"][i][i] / sum(cm["counts"][i]))
        # Given as apparent magnitudes, read as classify reads them: most are recognised and converted; a steady
        # one is rejected by name, not scored. Fewer clear 5 sigma in the stream's last 200 days.
        assert apparent["n_recognised_apparent"] >= 75
        assert apparent["n"] + apparent["n_rejected_steady"] <= 82 and apparent["n"] >= 60
        assert stream["n"] + stream["n_not_alerting"] == 82 and stream["n"] < 82


def test_plot_data_and_figures(evaluated):
    root, params = evaluated[0], evaluated[1]
    plots = root / "metrics" / "plots"
    early = pd.read_csv(plots / "early_bts.csv")
    assert list(early["days"]) == [5, 10, 20, 30, 50, 100] and {"tcn", "forest"} <= set(early.columns)
    conf = pd.read_csv(plots / "confusion_test.csv")
    assert list(conf.columns) == ["actual", "predicted", "actual_order", "predicted_order"]
    classes = list(params.base.classes)  # each class's position, and the rows in that order (the DVC plot sorts by it)
    assert (conf["actual_order"] == conf["actual"].map(classes.index)).all()
    assert list(conf["actual_order"]) == sorted(conf["actual_order"])
    dist = pd.read_csv(plots / "class_distribution.csv")
    assert dist.loc[dist["source"] == "simulator", "count"].sum() == 60
    names = {p.name for p in (root / "metrics" / "figures").iterdir()}
    for expected in ("confusion_tcn_test.png", "confusion_tcn_bts.png", "confusion_forest_bts.png",
                     "reliability_bts.png", "early_tcn_bts.png", "class_distribution.png", "mean_profiles.png"):
        assert expected in names
        assert (root / "metrics" / "figures" / expected).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mlflow_run_has_evaluation_metrics_artifacts_and_version_tags(evaluated):
    from mlflow import MlflowClient

    root, params, _, trained, _, result = evaluated
    client = MlflowClient(tracking_uri=params.train.tracking_uri)
    run = client.get_run(trained.run_id)
    assert result.run_id == trained.run_id
    m = run.data.metrics
    assert m["eval/tcn/bts/macro_f1"] == pytest.approx(result.metrics["tcn"]["bts"]["macro_f1"])
    assert "eval/forest/test/macro_f1" in m and "eval/tcn/bts/macro_f1_at_20d" in m
    artifacts = {a.path for a in client.list_artifacts(trained.run_id, "evaluation")}
    assert {"evaluation/confusion_tcn_bts.png", "evaluation/early_tcn_bts.png", "evaluation/report.json",
            "evaluation/mean_profiles.png", "evaluation/class_distribution.png"} <= artifacts
    version = client.get_model_version(params.base.model_name, trained.extra["registered"]["version"])
    # A few tags; the headline numbers are sentences of the description, the real held-out set first.
    assert set(version.tags) == {"git_commit", "data_hash", "classes"}
    lines = version.description.splitlines()
    assert lines[0].startswith("Evaluation of the TCN") and lines[1].startswith("- bts (real, held out, ")
    bts = result.metrics["tcn"]["bts"]
    assert f"macro-F1 {bts['macro_f1']:.3f} [" in lines[1]
    assert f", SNII {bts['per_class']['SNII']['recall']:.3f}" in lines[1] and "recall SNIa " in lines[1]
    assert f"forest baseline: macro-F1 {result.metrics['forest']['bts']['macro_f1']:.3f}" in lines[1]
    assert any(line.startswith("- test (simulated test split, ") for line in lines)


def test_missing_real_set_is_skipped_and_said(evaluated, tmp_path):
    root, params, *_ = evaluated
    other = params.model_copy(deep=True)
    other.evaluate.real.detections = tmp_path / "absent.parquet"
    other.evaluate.ogle.path = tmp_path / "absent.csv"
    other.evaluate.metrics_dir = tmp_path / "metrics"
    other.evaluate.baseline = False
    result = evaluate.run(other, evaluate.EvaluatePaths.from_params(other), log_to_mlflow=False)
    assert set(result.metrics) == {"tcn"} and set(result.metrics["tcn"]) == {"test"}
    assert "absent.parquet" in result.skipped["bts"]
    assert "absent.csv" in result.skipped["ogle_alert_stream"] and "absent.csv" in result.skipped["ogle_apparent"]
    assert json.loads((tmp_path / "metrics" / "evaluate.json").read_text())["skipped"]["bts"]


def test_missing_model_is_a_clear_error(tmp_path):
    params = Params.model_validate({"train": {"model_dir": str(tmp_path / "none")}})
    with pytest.raises(FileNotFoundError, match="deeprubin train"):
        evaluate.run(params, evaluate.EvaluatePaths.from_params(params))
