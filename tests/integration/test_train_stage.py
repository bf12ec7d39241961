"""Stage ``train`` end to end on tiny simulated data: ingest -> preprocess -> train (2 epochs) into a local
MLflow (sqlite, no server). Checks the run (params, per-epoch metrics, tags), the logged model artifact, the
registered version, the DVC outputs, and that the registered model loads back and predicts probabilities."""

from __future__ import annotations

import json
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from deeprubin.config import BaseParams, IngestParams, Params, PreprocessParams, SimulatorParams, TrainParams
from deeprubin.outputs import CHECKPOINT, TRAIN_REPORT
from deeprubin.processed import load_processed
from deeprubin.stages import ingest, preprocess, train

MODEL_NAME = BaseParams().model_name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mp.setenv("DO_NOT_TRACK", "1")
    root = tmp_path_factory.mktemp("train_stage")
    ingest.run(Params(ingest=IngestParams(raw_dir=root / "raw", simulator=SimulatorParams(n_per_class=12),
                                                  mix_files=False)),
               ingest.IngestPaths(raw_dir=root / "raw"))
    preprocess.run(Params(preprocess=PreprocessParams(processed_dir=root / "processed", workers=1, partitions=2)),
                   preprocess.PreprocessPaths(raw_dir=root / "raw", processed_dir=root / "processed"))
    params = TrainParams(max_epochs=2, patience=5, accelerator="cpu", tracking_uri=f"sqlite:///{root}/mlflow.db",
                         artifact_location=(root / "artifacts").as_uri(), model_dir=root / "models")
    paths = train.TrainPaths(processed_dir=root / "processed", model_dir=root / "models",
                             dvc_lock=root / "dvc.lock")
    steps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train.run(Params(train=params), paths, progress=lambda *a, **k: steps.append((a, k)))
    yield root, params, result, steps
    mp.undo()


@pytest.fixture
def client(trained):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=trained[1].tracking_uri)


def test_run_has_params_metrics_and_tags(trained, client):
    root, params, result, _ = trained
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "deeprubin"
    logged = run.data.params
    assert logged["train/lr"] == "0.001" and logged["train/hidden"] == "32"
    assert logged["train/imbalance"] == "weights"
    assert logged["base/seed"] == "42" and logged["base/classes"] == "QSO,CEP,SNIa,SNII"
    assert logged["data/n_channels"] == "6"
    # Each parameter once: LitTCN's hyperparameters are not logged again beside the configuration (no bare `lr`).
    assert all("/" in key for key in logged), sorted(k for k in logged if "/" not in k)
    for key in ("train/loss", "train/macro_f1", "val/loss", "val/macro_f1"):
        history = client.get_metric_history(result.run_id, key)
        assert len(history) == 2, key  # one value per epoch
        assert all(np.isfinite(m.value) for m in history)
        # The training curves' x axis is the epoch: step 0, 1, ... (not the optimiser step count).
        assert sorted(m.step for m in history) == [0, 1], (key, [m.step for m in history])
    best = max(m.value for m in client.get_metric_history(result.run_id, "val/macro_f1"))
    assert result.best_val_macro_f1 == pytest.approx(best, abs=1e-6)
    tags = run.data.tags
    assert tags["git_commit"] == result.git_commit and tags["git_commit"]
    assert tags["data_hash_source"] == "index.parquet"  # no dvc.lock in the tmp project
    assert tags["data_hash"].startswith("sha256:") and tags["data_hash"] == result.data_hash
    assert tags["params_hash"] == train.params_hash(params, BaseParams()) and len(tags["params_hash"]) == 64
    assert [s[1] for s in trained[3] if s[1]][-1] == {"completed": 2, "total": 2}


def _register(root, params):
    from deeprubin.config import Params
    from deeprubin.stages import register

    full = Params.model_validate({"train": params.model_dump(mode="json"),
                                  "evaluate": {"metrics_dir": str(root / "no-metrics")}})
    return register.run(full, register.RegisterPaths.from_params(full))


def test_model_artifact_and_registered_version(trained, client):
    root, params, result, _ = trained
    assert not client.search_registered_models(f"name='{MODEL_NAME}'")  # train only logs
    first = _register(root, params)
    version = client.get_model_version(MODEL_NAME, first["version"])
    assert version.run_id == result.run_id and version.description.startswith("Not evaluated yet")
    assert version.tags["git_commit"] == result.git_commit and version.tags["data_hash"] == result.data_hash
    # Registering again (a rerun) finds the same version instead of adding one.
    again = _register(root, params)
    assert again["version"] == first["version"] and not again["new"] and first["new"]
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 1
    report = json.loads((root / "models" / "registered.json").read_text())
    assert report["model_uri"] == f"models:/{MODEL_NAME}/{first['version']}"
    # The logged model's files live under the tmp artifact location, not in ./mlruns.
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=result.extra["logged_model_uri"],
                                                     tracking_uri=params.tracking_uri))
    mlmodel = (local / "MLmodel").read_text()
    assert "pytorch" in mlmodel and "signature" in mlmodel
    requirements = (local / "requirements.txt").read_text()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert (local / "input_example.json").exists()
    assert (root / "artifacts").exists() and any((root / "artifacts").rglob("MLmodel"))


def test_the_promoted_version_is_readable_on_the_registry_page(trained, client):
    """After train, register and promote against a real registry: a handful of tags, and a description that says
    the decision and its reason before anything else."""
    from deeprubin.config import Params
    from deeprubin.registry import DESCRIPTION_PREFIX
    from deeprubin.stages import promote

    root, params, result, _ = trained
    registered = _register(root, params)
    full = Params.model_validate({
        "ingest": {"raw_dir": str(root / "raw")}, "preprocess": {"processed_dir": str(root / "processed")},
        "train": params.model_dump(mode="json"),
        "evaluate": {"real": {"detections": None, "labels": None}}})
    decision = promote.run(full, promote.PromotePaths.from_params(full), version=registered["version"])
    assert decision.promoted
    version = client.get_model_version(MODEL_NAME, registered["version"])
    assert len(version.tags) <= 8, sorted(version.tags)
    assert version.tags["promotion/decision"] == "promoted" and version.tags["classes"] == "QSO,CEP,SNIa,SNII"
    first, _, rest = version.description.partition("\n\n")
    assert first.startswith(f"{DESCRIPTION_PREFIX} promoted") and decision.reason in first
    assert "Scored on test" in first and "Not evaluated yet" in rest  # register's part stays below
    # Registering again (a rerun) keeps the decision on top.
    _register(root, params)
    assert client.get_model_version(MODEL_NAME, registered["version"]).description == version.description


def test_registered_model_loads_and_predicts_probabilities(trained):
    import mlflow

    root, params, result, _ = trained
    uri = _register(root, params)["model_uri"]
    from deeprubin.tracking import using

    with using(params.tracking_uri):
        model = mlflow.pytorch.load_model(uri)
        pyfunc = mlflow.pyfunc.load_model(uri)
    x, _ = load_processed(root / "processed")
    x = torch.from_numpy(np.asarray(x[:5], dtype=np.float32))
    with torch.no_grad():
        p = model(x)
    assert p.shape == (5, 4)
    assert torch.allclose(p.sum(dim=1), torch.ones(5), atol=1e-5) and (p >= 0).all()
    q = np.asarray(pyfunc.predict(x.numpy()))
    assert np.allclose(q, p.numpy(), atol=1e-5)
    # the network knows its 100-day window: it takes any number of days up to it (serving gives it those up to the
    # last detection), with the same probabilities
    assert pyfunc.metadata.get_input_schema().inputs[0].shape == (-1, 6, -1)
    from deeprubin.models.served import observed_lengths

    everything, _ = load_processed(root / "processed")
    young = torch.from_numpy(np.asarray(everything[np.argsort(observed_lengths(everything))[:5]], dtype=np.float32))
    days = int(observed_lengths(young.numpy()).max())
    assert days < 100
    with torch.no_grad():
        assert torch.allclose(model(young[:, :, :days]), model(young), atol=1e-6)


def test_dvc_outputs(trained):
    root, params, result, _ = trained
    report = json.loads((root / "models" / TRAIN_REPORT).read_text())
    assert report["run_id"] == result.run_id and report["model_uri"] == result.model_uri
    assert report["split_sizes"] == {"train": 32, "val": 8, "test": 8}
    # When it trained (UTC): the retraining policy counts label changes from it, not from the file's mtime.
    trained_at = datetime.fromisoformat(report["trained_at"])
    assert trained_at.utcoffset() == timedelta(0)
    assert trained_at.timestamp() <= (root / "models" / TRAIN_REPORT).stat().st_mtime
    assert {CHECKPOINT, TRAIN_REPORT} <= {p.name for p in (root / "models").iterdir()}
    assert not list((root / "models").glob("best*.ckpt"))
    from deeprubin.models.lit import LitTCN

    best = LitTCN.load_from_checkpoint(root / "models" / CHECKPOINT, map_location="cpu")
    assert best.classes == tuple(BaseParams().classes)


def test_data_hash_prefers_a_current_dvc_lock(tmp_path, trained):
    root = trained[0]
    processed = root / "processed"
    nfiles, size = train._dir_stats(processed)
    lock = tmp_path / "dvc.lock"
    lock.write_text(json.dumps({"schema": "2.0", "stages": {"preprocess": {"outs": [
        {"path": str(processed), "md5": "abc.dir", "nfiles": nfiles, "size": size}]}}}))
    assert train.data_hash(processed, lock) == ("abc.dir", "dvc.lock")
    lock.write_text(json.dumps({"stages": {"preprocess": {"outs": [
        {"path": str(processed), "md5": "abc.dir", "nfiles": nfiles + 1, "size": size}]}}}))
    assert train.data_hash(processed, lock)[1] == "index.parquet"  # stale lock: not trusted


def test_missing_processed_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="deeprubin preprocess"):
        train.run(Params(train=TrainParams(tracking_uri=f"sqlite:///{tmp_path}/m.db")),
                  train.TrainPaths(processed_dir=tmp_path / "nope", model_dir=tmp_path / "models"))


def test_the_logged_model_records_the_preprocessing_it_was_trained_with(trained):
    from deeprubin.models.served import load_model
    from deeprubin.processed import Preprocessing, preprocessing_of

    root, params, result, _ = trained
    model = load_model(result.extra["logged_model_uri"], params.tracking_uri)
    assert model.preprocessing == preprocessing_of(root / "processed")
    assert model.preprocessing.grid_days == PreprocessParams().grid_days
    assert Preprocessing.from_tags(result.extra["tags"]) == model.preprocessing  # registered versions get them too


def test_the_calibration_is_in_the_logged_model_the_checkpoint_and_the_reports(trained, client):
    from deeprubin.models.calibration import AGE_EDGES
    from deeprubin.models.served import load_checkpoint, load_model

    root, params, result, _ = trained
    report = json.loads((root / "models" / TRAIN_REPORT).read_text())["calibration"]
    assert report["mode"] == "per_age" and report["edges"] == list(AGE_EDGES)
    assert len(report["temperatures"]) == len(AGE_EDGES) and all(t > 0 for t in report["temperatures"])
    assert report["argmax_changed"] == 0.0  # one temperature per object never moves its argmax
    assert report["after"]["all"]["nll"] <= report["before"]["all"]["nll"] + 1e-9  # fitted on these rows
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["calibration/temperature_from_0d"] == pytest.approx(report["temperatures"][0])
    assert "calibration/after/all/nll" in metrics
    logged = load_model(result.extra["logged_model_uri"], params.tracking_uri)
    checkpoint = load_checkpoint(root / "models" / CHECKPOINT)
    assert logged.calibration == checkpoint.calibration and logged.calibration["temperatures"] == \
        pytest.approx(report["temperatures"])
    x, _ = load_processed(root / "processed")
    x = np.asarray(x[:6], dtype=np.float32)
    np.testing.assert_allclose(logged.predict_proba(x), checkpoint.predict_proba(x), atol=1e-6)


def test_calibration_views_cut_the_validation_objects_and_know_the_real_ones(trained):
    from deeprubin.data import ProcessedDataModule
    from deeprubin.models.lit import LitTCN
    from deeprubin.processed import preprocessing_of
    from deeprubin.store import RawStore

    root, params, _, _ = trained
    dm = ProcessedDataModule(root / "processed", val_fraction=params.val_fraction, test_fraction=params.test_fraction)
    dm.setup("fit")
    x, y, owner, real = train.calibration_views(dm, root / "raw", 3, 42, 100, 100.0)
    val = set(dm.splits["val"])
    assert len(x) == len(y) == len(owner) > len(val) and set(owner) == val
    for oid in val:  # every cut carries its object's label
        assert len(set(y[owner == oid])) == 1
    objects = RawStore(root / "raw").read().objects
    simulated = set(objects.loc[objects["source"] == "simulator", "oid"])
    assert real.tolist() == [o not in simulated for o in owner]

    net = LitTCN.load_from_checkpoint(root / "models" / CHECKPOINT, map_location="cpu").eval().model
    settings = preprocessing_of(root / "processed")
    cfg = params.model_copy(update={"calibration_views": 3, "calibration_objects": "all"})
    _, report = train.calibrate(net, dm, cfg, BaseParams(), root / "raw", settings)
    assert report["fitted_on"] == "all" and sum(r["all"] for r in report["rows"].values()) == len(x)
    assert report["n_objects"] == {"all": len(val), "real": len(set(owner[real]))}
    assert {"global/all", "per_age/all"} <= set(report["crossfit"])
    # Real objects only, and the split has none (no raw store: no sources known): fitted on all, with a warning.
    with pytest.warns(UserWarning, match="no real objects"):
        _, report = train.calibrate(net, dm, params.model_copy(update={"calibration_objects": "real"}), BaseParams(),
                                    None, settings)
    assert report["fitted_on"] == "all" and report["n_objects"]["real"] == 0


def test_members_are_trained_independently_and_served_as_one_model(trained, tmp_path):
    """train.members=2: two networks, each with its own seed, batch order, early stop and MLflow child run; the
    first is the single network of the same seed (the `trained` fixture), weight for weight; the checkpoint and the
    logged model are their ensemble. Training into a model folder that already holds a checkpoint gives no
    Lightning warning about the folder and leaves no checkpoint folder behind."""
    from mlflow import MlflowClient

    from deeprubin.models.lit import LitTCN
    from deeprubin.models.tcn import TCNEnsemble

    root, single_params, single, _ = trained
    params = single_params.model_copy(update={"members": 2, "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                              "artifact_location": (tmp_path / "artifacts").as_uri(),
                                              "model_dir": tmp_path / "models"})
    paths = train.TrainPaths(processed_dir=root / "processed", model_dir=tmp_path / "models",
                             dvc_lock=tmp_path / "dvc.lock")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / CHECKPOINT).write_bytes((root / "models" / CHECKPOINT).read_bytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train.run(Params(train=params), paths)
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted([CHECKPOINT, TRAIN_REPORT])

    client = MlflowClient(tracking_uri=params.tracking_uri)
    children = client.search_runs([result.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == ["member-1", "member-2"]
    assert sorted(r.data.tags["member_seed"] for r in children) == ["42", "43"]
    # Same seed as the `trained` run, yet another name: MLflow's names came from the seeded `random`, so every run
    # of one seed was called the same.
    single_run = MlflowClient(tracking_uri=single_params.tracking_uri).get_run(single.run_id)
    single_name = single_run.data.tags["mlflow.runName"]
    parent_name = client.get_run(result.run_id).data.tags["mlflow.runName"]
    assert parent_name.startswith("train-") and single_name.startswith("train-") and parent_name != single_name
    for child in children:
        assert child.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val/macro_f1")] == [0, 1]
    parent = client.get_run(result.run_id).data
    assert {"member_1/best_val_macro_f1", "member_2/best_val_macro_f1", "best_val_macro_f1"} <= set(parent.metrics)
    assert [m["seed"] for m in result.extra["members"]] == [42, 43]

    ensemble = LitTCN.load_from_checkpoint(tmp_path / "models" / CHECKPOINT, map_location="cpu").eval()
    alone = LitTCN.load_from_checkpoint(root / "models" / CHECKPOINT, map_location="cpu").eval()
    assert isinstance(ensemble.model, TCNEnsemble) and len(ensemble.model.members) == 2
    first, second = (m.state_dict() for m in ensemble.model.members)
    assert all(torch.equal(first[k], v) for k, v in alone.model.state_dict().items())
    assert not all(torch.equal(first[k], second[k]) for k in first)

    import mlflow

    from deeprubin.models.served import load_checkpoint
    from deeprubin.tracking import using

    x, _ = load_processed(root / "processed")
    x = torch.from_numpy(np.asarray(x[:6], dtype=np.float32))
    with using(params.tracking_uri):
        served = mlflow.pytorch.load_model(result.model_uri)
    with torch.no_grad():
        mean_of_members = torch.stack([torch.softmax(m(x), dim=1) for m in ensemble.model.members]).mean(dim=0)
        assert torch.allclose(torch.softmax(ensemble(x), dim=1), mean_of_members, atol=1e-6)
        assert torch.allclose(served(x), load_checkpoint(tmp_path / "models" / CHECKPOINT).module(x), atol=1e-5)


def test_finetuning_on_real_objects_continues_each_network_and_keeps_it_only_when_better(tmp_path, shared_data):
    """train.finetune_epochs: after training, the network continues on the real objects (and simulated QSO/CEP) at
    finetune_lr; its curves are in the run under `finetune-`, and the fine-tuned weights are served only when they
    score higher on the same validation objects. Simulated data alone: nothing to fine-tune on, said so."""
    import pandas as pd
    from mlflow import MlflowClient

    from deeprubin.config import FilesParams

    labels = pd.read_csv(shared_data / "bts" / "labels.csv")
    labels = pd.concat([labels[labels["label"] == c].head(25) for c in ("SNIa", "SNII")])
    det = pd.read_parquet(shared_data / "bts" / "detections.parquet")
    labels.to_csv(tmp_path / "labels.csv", index=False)
    det[det["oid"].isin(labels["oid"])].to_parquet(tmp_path / "detections.parquet")
    files = FilesParams(detections=tmp_path / "detections.parquet", labels=tmp_path / "labels.csv",
                        label_source="bts:spectroscopic")
    ingest.run(Params(ingest=IngestParams(raw_dir=tmp_path / "raw", simulator=SimulatorParams(n_per_class=10),
                                          files=files, mix_files=True)), ingest.IngestPaths(raw_dir=tmp_path / "raw"))
    preprocess.run(Params(preprocess=PreprocessParams(processed_dir=tmp_path / "processed", workers=1)),
                   preprocess.PreprocessPaths(raw_dir=tmp_path / "raw", processed_dir=tmp_path / "processed"))
    params = TrainParams(max_epochs=2, patience=5, accelerator="cpu", truncations=0, calibration="none",
                         finetune_epochs=3, finetune_lr=1e-3, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                         artifact_location=(tmp_path / "artifacts").as_uri(), model_dir=tmp_path / "models")
    paths = train.TrainPaths(processed_dir=tmp_path / "processed", model_dir=tmp_path / "models",
                             raw_dir=tmp_path / "raw", dvc_lock=tmp_path / "dvc.lock")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train.run(Params(train=params), paths)
    finetune = result.extra["members"][0]["finetune"]
    assert 1 <= finetune["epochs"] <= 3 and isinstance(finetune["kept"], bool)
    assert finetune["kept"] == (finetune["best_val_macro_f1"] > finetune["before"])
    served = finetune["best_val_macro_f1"] if finetune["kept"] else finetune["before"]
    assert result.best_val_macro_f1 == pytest.approx(served)
    client = MlflowClient(tracking_uri=params.tracking_uri)
    tuned = client.get_metric_history(result.run_id, "finetune-val/macro_f1")
    assert 1 <= len(tuned) <= 3 and max(m.value for m in tuned) == pytest.approx(finetune["best_val_macro_f1"])
    assert len(client.get_metric_history(result.run_id, "val/macro_f1")) == 2  # the first phase's curve, apart

    simulated_only = params.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path}/sim.db",
                                               "model_dir": tmp_path / "sim-models"})
    root = tmp_path / "sim"
    ingest.run(Params(ingest=IngestParams(raw_dir=root / "raw", simulator=SimulatorParams(n_per_class=10),
                                          mix_files=False)), ingest.IngestPaths(raw_dir=root / "raw"))
    preprocess.run(Params(preprocess=PreprocessParams(processed_dir=root / "processed", workers=1)),
                   preprocess.PreprocessPaths(raw_dir=root / "raw", processed_dir=root / "processed"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = train.run(Params(train=simulated_only),
                          train.TrainPaths(processed_dir=root / "processed", model_dir=tmp_path / "sim-models",
                                           raw_dir=root / "raw", dvc_lock=tmp_path / "dvc.lock"))
    assert alone.extra["members"][0]["finetune"] == {"skipped": "no real object in the training split"}
