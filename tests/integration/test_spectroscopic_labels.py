"""Spectroscopic labels through the rest of the loop, on a real store: ALeRCE's classifier labels (quasars, Cepheids
and supernovae) pulled from the local ALeRCE server and BTS spectroscopic types pulled from the local BTS server into
one raw store, preprocessed for real, with a champion in a real MLflow registry (sqlite).

- The test split and the frozen promotion set score supernovae on spectroscopic labels only (the classifier's
  supernovae are left out and counted; quasars and Cepheids stay), and so does the promotion gate.
- The retraining decision counts the labels a BTS pull changed after the last training, from the time the train
  stage recorded in ``train.json`` (``trained_at``), not from the file's modification time.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from deeprubin.config import AlerceParams, BtsParams, EvaluateParams, FlowsParams, IngestParams, Params, \
    PreprocessParams, PromoteParams, RealSetParams, TrainParams
from deeprubin.data import ProcessedDataModule
from deeprubin.outputs import PROMOTION_REPORT, TRAIN_REPORT
from deeprubin.processed import INDEX
from deeprubin.schema import SPECTROSCOPIC
from deeprubin.stages import ingest, preprocess
from deeprubin.store import RawStore
from tests.alerce_server import AlerceReplayServer, Catalogue
from tests.bts_server import BtsServer, catalogue_rows, lightcurves, pick, shared_labels
from tests.model_fixtures import register_tcn, sqlite_uri

PER_TYPE = {"SN Ia": 5, "SN II": 3, "SN Ic": 1}
N_SIMULATED = 6  # per class, labelled by ALeRCE's classifier (p = 0.9)
CLASSIFIER = "alerce:lc_classifier"
SUPERNOVAE = ("SNIa", "SNII")


@pytest.fixture(scope="module")
def typed() -> pd.DataFrame:
    """The BTS objects: the catalogue's first rows, and one more SN Ia (``late``) that enters it later."""
    labels = shared_labels()
    return pick(labels.loc[labels["n_obs"] >= 10], {**PER_TYPE, "SN Ia": PER_TYPE["SN Ia"] + 1})


@pytest.fixture(scope="module")
def late(typed) -> str:
    return str(typed.loc[typed["bts_type"] == "SN Ia", "oid"].iloc[-1])


@pytest.fixture(scope="module")
def chosen(typed, late) -> pd.DataFrame:
    return typed.loc[typed["oid"] != late].reset_index(drop=True)


@pytest.fixture(scope="module")
def contested(chosen) -> str:
    """An SN Ia (spectroscopically) that ALeRCE's classifier lists as SNII with p = 0.9."""
    return str(chosen.loc[chosen["bts_type"] == "SN Ia", "oid"].iloc[0])


@pytest.fixture(scope="module")
def alerce(typed, contested):
    """Simulated objects of the four classes listed by the classifier (p = 0.9), and the BTS objects' real light
    curves (listed with p = 0.3, i.e. not pulled by ALeRCE, except the contested one)."""
    from deeprubin.config import SimulatorParams
    from deeprubin.sources.simulate import simulate

    sim = simulate(SimulatorParams(n_per_class=N_SIMULATED, survey_days=365.0), seed=7)
    real = lightcurves(list(typed["oid"]), alerce_class={contested: "SNII"})
    both = SimpleNamespace(objects=pd.concat([sim.objects[["oid", "label"]], real.objects], ignore_index=True),
                           detections=pd.concat([sim.detections, real.detections], ignore_index=True),
                           non_detections=pd.concat([sim.non_detections, real.non_detections], ignore_index=True))
    spectroscopic = set(typed["oid"]) - {contested}
    catalogue = Catalogue.from_lightcurves(both, probability=lambda oid, _: 0.3 if oid in spectroscopic else 0.9)
    with AlerceReplayServer(catalogue) as srv:
        yield srv


def params_for(root: Path, alerce: AlerceReplayServer, bts_url: str, tracking: str, **flows) -> Params:
    fast = dict(base_url=alerce.url, page_size=20, concurrency=2, requests_per_second=500.0, timeout_s=2.0,
                max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.1, commit_every=50)
    return Params(
        ingest=IngestParams(source="alerce", raw_dir=root / "raw", mix_files=False, alerce=AlerceParams(**fast),
                            bts=BtsParams(url=bts_url, timeout_s=2.0, max_attempts=3)),
        preprocess=PreprocessParams(processed_dir=root / "processed", partitions=1, workers=1),
        train=TrainParams(model_dir=root / "models", tracking_uri=tracking, val_fraction=0.2, test_fraction=0.4),
        evaluate=EvaluateParams(real=RealSetParams(detections=None, labels=None)),
        promote=PromoteParams(evaluation_set="test"),
        flows=FlowsParams(**flows))


def pull(params: Params, source: str):
    p = params.model_copy(update={"ingest": params.ingest.model_copy(update={"source": source})})
    result = ingest.run(p, ingest.IngestPaths.from_params(p))
    assert result.complete, result.missing
    return result


def refresh(params: Params) -> None:
    preprocess.run(params, preprocess.PreprocessPaths.from_params(params))


@pytest.fixture(scope="module")
def store(alerce, chosen, tmp_path_factory):
    """ALeRCE pull, then BTS pull, into one store; preprocessed; a champion registered. Yields (root, params)."""
    root = tmp_path_factory.mktemp("spectroscopic")
    tracking = sqlite_uri(root)
    with BtsServer(catalogue_rows(chosen)) as bts:
        params = params_for(root, alerce, bts.url, tracking)
        pull(params, "alerce")
        pull(params, "bts")
    refresh(params)
    register_tcn(tracking, params.base.model_name)
    return root, params


def test_the_store_mixes_classifier_and_spectroscopic_labels(store, chosen, contested):
    root, params = store
    objects = RawStore(params.ingest.raw_dir).read().objects.set_index("oid")
    assert (objects.loc[objects["label"].isin(["QSO", "CEP"]), "label_source"] == CLASSIFIER).all()
    sn = objects.loc[objects["label"].isin(SUPERNOVAE)]
    assert set(sn["label_source"]) == {CLASSIFIER, SPECTROSCOPIC}
    assert set(sn.index[sn["label_source"] == SPECTROSCOPIC]) == \
        set(chosen.loc[chosen["label"].isin(SUPERNOVAE), "oid"])
    assert (objects.loc[contested, "label"], objects.loc[contested, "label_source"]) == ("SNIa", SPECTROSCOPIC)


def _test_split(params: Params) -> pd.DataFrame:
    """The test split as the data module makes it (what training held out), with each object's label source."""
    dm = ProcessedDataModule(params.preprocess.processed_dir, classes=params.base.classes,
                             val_fraction=params.train.val_fraction, test_fraction=params.train.test_fraction,
                             seed=params.base.seed)
    dm.setup("test")
    test = dm.index.loc[dm.index["split"] == "test", ["oid", "label"]].astype(str)
    source = RawStore(params.ingest.raw_dir).read().objects.set_index("oid")["label_source"]
    return test.assign(label_source=test["oid"].map(source)).set_index("oid")


def test_the_test_split_and_the_promotion_set_score_supernovae_on_spectroscopic_labels_only(store):
    from deeprubin.evaluation.sets import frozen_set, split_test_set

    root, params = store
    test = _test_split(params)
    guessed = test["label"].isin(SUPERNOVAE) & (test["label_source"] == CLASSIFIER)
    assert guessed.sum() >= 2 and (~guessed & test["label"].isin(SUPERNOVAE)).sum() >= 2  # both kinds in the split
    assert {"QSO", "CEP"} <= set(test["label"])
    want = test.loc[~guessed]
    for eval_set in (split_test_set(params, params.ingest.raw_dir, params.preprocess.processed_dir, np.array([])),
                     frozen_set(params)):  # promote.evaluation_set = test
        assert eval_set.name == "test"
        got = pd.Series(eval_set.labels, index=eval_set.oids).sort_index()
        pd.testing.assert_series_equal(got, want["label"].sort_index(), check_names=False)
        # Quasars and Cepheids keep their classifier labels (the only labels they have); supernovae are
        # spectroscopic only.
        assert set(want.loc[want["label"].isin(["QSO", "CEP"]), "label_source"]) == {CLASSIFIER}
        assert set(want.loc[want["label"].isin(SUPERNOVAE), "label_source"]) == {SPECTROSCOPIC}
        assert eval_set.counts == {"supernovae_classifier_labelled_left_out": int(guessed.sum())}
        assert eval_set.note.startswith(f"{int(guessed.sum())} supernovae labelled by a classifier left out")
        assert set(eval_set.detections["oid"]) == set(want.index)
        assert len(eval_set.x) == len(want)


def test_the_promotion_gate_scores_both_versions_on_the_spectroscopic_set(store):
    from deeprubin.evaluation.sets import frozen_set, objects_hash
    from deeprubin.stages import promote

    root, params = store
    frozen = frozen_set(params)
    version = register_tcn(params.train.tracking_uri, params.base.model_name, seed=1, alias=None)
    decision = promote.run(params, promote.PromotePaths.from_params(params), version=version)
    assert decision.evaluation_set == "test"
    assert decision.set_hash == objects_hash(frozen.oids, frozen.labels)
    assert decision.challenger["n_objects"] == decision.champion["n_objects"] == len(frozen.oids)
    assert len(frozen.oids) < len(_test_split(params))  # the classifier's supernovae were not scored
    written = json.loads((params.train.model_dir / PROMOTION_REPORT).read_text())
    assert written["set_hash"] == decision.set_hash


# ---------------------------------------------------------------------------------------------------------------
# The retraining decision counts label changes from the recorded training time.
# ---------------------------------------------------------------------------------------------------------------


def labelled(params: Params) -> int:
    index = pd.read_parquet(params.preprocess.processed_dir / INDEX, columns=["oid", "label"])
    return int(index.loc[index["label"].isin(params.base.classes), "oid"].nunique())


def write_report(params: Params | Path, n_labelled: int, trained_at: pd.Timestamp | None,
                 mtime: float | None = None) -> None:
    """``train.json`` (in ``params.train.model_dir``, or a directory) as the train stage writes it, in the parts the
    retraining policy reads."""
    model_dir = Path(params.train.model_dir) if isinstance(params, Params) else Path(params)
    model_dir.mkdir(parents=True, exist_ok=True)
    report = {"run_id": "trained-earlier", "split_sizes": {"train": n_labelled, "val": 0, "test": 0},
              "extra": {"tags": {"n_labelled_objects": str(n_labelled)}}}
    if trained_at is not None:
        report["trained_at"] = trained_at.isoformat()
    path = model_dir / TRAIN_REPORT
    path.write_text(json.dumps(report))
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def decide(params: Params, threshold: int) -> tuple[bool, str]:
    from deeprubin.retraining import should_retrain

    p = params.model_copy(update={"flows": params.flows.model_copy(update={"retrain_min_new_labelled": threshold})})
    return should_retrain(p)


@pytest.fixture
def after_training(store, tmp_path):
    """A copy of the store, a model trained on all of it at ``trained_at`` (recorded in train.json)."""
    root, params = store
    for name in ("raw", "processed"):
        shutil.copytree(root / name, tmp_path / name)
    params = params.model_copy(update={
        "ingest": params.ingest.model_copy(update={"raw_dir": tmp_path / "raw"}),
        "preprocess": params.preprocess.model_copy(update={"processed_dir": tmp_path / "processed"}),
        "train": params.train.model_copy(update={"model_dir": tmp_path / "models"})})
    trained_at = pd.Timestamp.now(tz="UTC")
    write_report(params, labelled(params), trained_at)
    time.sleep(0.01)
    return params, trained_at


def retype_and_pull(params: Params, chosen: pd.DataFrame, late: str, retyped: dict[str, str]):
    """The BTS catalogue re-types ``retyped`` and lists ``late``: a BTS pull, then preprocessing, as each night."""
    rows = catalogue_rows(pd.concat([chosen, shared_labels().loc[lambda t: t["oid"] == late]], ignore_index=True))
    with BtsServer(rows) as bts:
        for oid, bts_type in retyped.items():
            bts.set_type(oid, bts_type)
        p = params.model_copy(update={"ingest": params.ingest.model_copy(update={
            "bts": params.ingest.bts.model_copy(update={"url": bts.url})})})
        result = pull(p, "bts")
    refresh(params)
    return result


def test_spectroscopic_label_changes_after_training_count_toward_the_threshold(after_training, alerce, chosen,
                                                                               contested, late):
    params, trained_at = after_training
    assert decide(params, 1) == (False, "only 0 new labelled objects since the last training (threshold 1)")
    # The BTS re-types an SN II as an SN Ia and an SN Ia as an SN II (labels change, the count does not), and lists
    # one new SN Ia.
    sn_ii = str(chosen.loc[chosen["bts_type"] == "SN II", "oid"].iloc[0])
    sn_ia = str(chosen.loc[(chosen["bts_type"] == "SN Ia") & (chosen["oid"] != contested), "oid"].iloc[0])
    result = retype_and_pull(params, chosen, late, {sn_ii: "SN Ia", sn_ia: "SN II"})
    assert sorted(result.extra["changed_labels"]) == sorted([sn_ii, sn_ia]) and result.extra["new"] == 1
    index = pd.read_parquet(params.preprocess.processed_dir / INDEX).set_index("oid")
    assert (index.loc[sn_ii, "label"], index.loc[sn_ia, "label"]) == ("SNIa", "SNII")  # what training would see
    # 1 new labelled object + 2 changed labels = 3: at the threshold, retrain; one above, not.
    retrain, why = decide(params, 3)
    assert retrain and why == ("1 labelled objects arrived and 2 labels changed (spectroscopic types) since the "
                               "last training (threshold 3)")
    retrain, why = decide(params, 4)
    assert not retrain and why == ("only 1 new labelled objects and 2 labels changed (spectroscopic types) since "
                                   "the last training (threshold 4)")


def test_the_recorded_training_time_counts_not_the_reports_file_time(after_training, alerce, chosen, contested,
                                                                      late):
    params, trained_at = after_training
    sn_ii = str(chosen.loc[chosen["bts_type"] == "SN II", "oid"].iloc[0])
    retype_and_pull(params, chosen, late, {sn_ii: "SN Ia"})
    n = labelled(params)  # the late SN Ia included: only the label change is left to count
    # A checkout rewrites train.json after the changes (its mtime is now): the recorded time still counts them.
    write_report(params, n, trained_at, mtime=time.time())
    assert decide(params, 1) == (True, "0 labelled objects arrived and 1 labels changed (spectroscopic types) "
                                       "since the last training (threshold 1)")
    # A model trained after the changes (recorded) saw them: nothing to count, whatever the file's time.
    write_report(params, n, pd.Timestamp.now(tz="UTC"), mtime=trained_at.timestamp() - 3600)
    assert decide(params, 1) == (False, "only 0 new labelled objects since the last training (threshold 1)")
    # A report from before trained_at was recorded: the file's time stands in for it.
    write_report(params, n, None, mtime=trained_at.timestamp())
    assert decide(params, 1)[0] is True
    write_report(params, n, None, mtime=time.time())
    assert decide(params, 1)[0] is False


# ---------------------------------------------------------------------------------------------------------------
# The nightly flow with ingest.bts.enabled, against a real Prefect server and the local ALeRCE and BTS servers.
# ---------------------------------------------------------------------------------------------------------------

NIGHT = "2026-12-01"


def nightly_overrides(project: Path, alerce: AlerceReplayServer, bts: BtsServer, threshold: int) -> list[str]:
    return ["ingest.source=alerce", f"ingest.alerce.base_url={alerce.url}", "ingest.alerce.requests_per_second=500",
            "ingest.alerce.backoff_base_s=0.01", "ingest.alerce.backoff_max_s=0.1", "ingest.alerce.timeout_s=2",
            "ingest.bts.enabled=true", f"ingest.bts.url={bts.url}", "ingest.bts.timeout_s=2",
            f"train.tracking_uri={sqlite_uri(project)}", "train.test_fraction=0.4",
            f"flows.retrain_min_new_labelled={threshold}", "flows.retries=1", "flows.retry_delay_s=0.05"]


def _artifact(flow_run_id, key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    (found,) = [a for a in artifacts if a.key == key]
    return found.data if isinstance(found.data, str) else json.dumps(found.data)


def test_the_nightly_flow_pulls_bts_beside_alerce_and_decides_on_new_and_changed_labels(alerce, chosen, contested,
                                                                                        prefect_api, tmp_path):
    from deeprubin_flows.nightly import nightly
    from tests.integration.test_flows import make_project

    project = make_project(tmp_path / "project")
    register_tcn(sqlite_uri(project))  # the champion of an earlier training, on none of tonight's objects
    sn_ii = str(chosen.loc[chosen["bts_type"] == "SN II", "oid"].iloc[0])
    with BtsServer(catalogue_rows(chosen)) as bts, pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        write_report(project / "models", 0, pd.Timestamp.now(tz="UTC"))
        state = nightly(params_path="params.yaml", overrides=nightly_overrides(project, alerce, bts, 1000),
                        night=NIGHT, return_state=True)
        assert state.is_completed(), state.message
        out = state.result()
        index = pd.read_parquet(project / "data" / "processed" / INDEX)
        n = int(index["label"].isin(Params().base.classes).sum())
        assert out["pulled"]["source"] == "alerce+bts" and out["label_changes"] == 1  # the contested object
        assert {r["source"] for r in out["pulled"]["per_class"]} == {"alerce", "bts"}
        assert out["retrain"] == {"retrain": False, "reason": f"only {n} new labelled objects and 1 labels changed "
                                  "(spectroscopic types) since the last training (threshold 1000)"}
        assert "train" not in out and "No retraining" in _artifact(state.state_details.flow_run_id,
                                                                   "promotion-decision")
        assert out["classify"]["n_classified"] == out["changed_objects"] > 0
        objects = RawStore(project / "data" / "raw").read().objects.set_index("oid")
        assert (objects.loc[contested, "label"], objects.loc[contested, "label_source"]) == ("SNIa", SPECTROSCOPIC)
        assert set(objects.loc[objects["label_source"] == SPECTROSCOPIC].index) == set(chosen["oid"])

        # A model trained since on all of it; the BTS then re-types an SN II as an SN Ia: the next night pulls only
        # that object, and its label change is the one thing counted.
        write_report(project / "models", n, pd.Timestamp.now(tz="UTC"))
        bts.set_type(sn_ii, "SN Ia")
        again = nightly(params_path="params.yaml", overrides=nightly_overrides(project, alerce, bts, 2), night=NIGHT)
    assert again["label_changes"] == 1 and again["changed_objects"] == 0  # same detections, new label
    assert again["retrain"] == {"retrain": False, "reason": "only 0 new labelled objects and 1 labels changed "
                                "(spectroscopic types) since the last training (threshold 2)"}
    index = pd.read_parquet(project / "data" / "processed" / INDEX).set_index("oid")
    assert index.loc[sn_ii, "label"] == "SNIa"


@pytest.mark.slow
def test_a_full_night_with_bts_trains_evaluates_on_spectroscopic_supernovae_and_records_when_it_trained(
        alerce, chosen, prefect_api, tmp_path):
    from deeprubin_flows.nightly import nightly
    from tests.integration.test_flows import make_project

    project = make_project(tmp_path / "project")
    sn_ii = str(chosen.loc[chosen["bts_type"] == "SN II", "oid"].iloc[0])
    with BtsServer(catalogue_rows(chosen)) as bts, pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        started = pd.Timestamp.now(tz="UTC")
        out = nightly(params_path="params.yaml", night=NIGHT,
                      overrides=[*nightly_overrides(project, alerce, bts, 1), "train.max_epochs=3", "train.patience=3"])
        assert out["retrain"]["reason"] == "no model trained yet"
        test = out["evaluate"]["tcn"]["test"]
        assert test["supernovae_classifier_labelled_left_out"] > 0
        assert "supernovae labelled by a classifier left out" in test["note"]
        assert out["promotion"]["outcome"] == "promoted"
        report = json.loads((project / "models" / TRAIN_REPORT).read_text())
        assert started <= pd.Timestamp(report["trained_at"]) <= pd.Timestamp.now(tz="UTC")
        # The next night: one re-typed object, counted from the recorded training time (threshold 2: no training).
        bts.set_type(sn_ii, "SN Ia")
        again = nightly(params_path="params.yaml", overrides=nightly_overrides(project, alerce, bts, 2), night=NIGHT)
    assert again["retrain"] == {"retrain": False, "reason": "only 0 new labelled objects and 1 labels changed "
                                "(spectroscopic types) since the last training (threshold 2)"}
