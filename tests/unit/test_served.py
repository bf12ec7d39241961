"""The served model carries the preprocessing it was trained with, and every serving path uses it rather than
today's params.yaml (deeprubin.models.served, deeprubin.serving.classify)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deeprubin.config import load_params
from deeprubin.lightcurves.tensorize import CHANNELS, curves_from_detections, tensorize
from deeprubin.models.served import ServingModel, load_model, log_and_register
from deeprubin.processed import Preprocessing
from deeprubin.schema import CLASSES
from deeprubin.serving import classify as clf
from deeprubin.sources import simulate
from tests.model_fixtures import served_tcn, sqlite_uri

TRAINED_WITH = Preprocessing(grid_days=60, fit_context_days=30.0, channels=CHANNELS)


@pytest.fixture(scope="module")
def detections() -> pd.DataFrame:
    sim = simulate.simulate(load_params(None).ingest.simulator.model_copy(update={"n_per_class": 3}), seed=5)
    return sim.detections.sort_values(["oid", "mjd"], kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    uri = sqlite_uri(root)
    version = log_and_register(served_tcn(), uri, "settings-test", CLASSES, alias="champion",
                               experiment="test-models", artifact_location=(root / "artifacts").as_uri(),
                               preprocessing=TRAINED_WITH)
    return uri, version


def test_the_registered_model_carries_its_preprocessing(registry):
    uri, version = registry
    model = load_model("models:/settings-test@champion", uri)
    assert model.version == version and model.classes == CLASSES
    assert model.preprocessing == TRAINED_WITH
    import mlflow

    tags = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("settings-test", version).tags
    assert Preprocessing.from_tags(tags) == TRAINED_WITH  # visible in the registry UI too
    # The MLmodel metadata alone is enough (a local copy of the model has no registry tags).
    local = load_model(model.local_path, uri)
    assert local.preprocessing == TRAINED_WITH


def test_classification_uses_the_models_settings_not_the_configured_ones(registry, detections, tmp_path):
    uri, _ = registry
    model = load_model("models:/settings-test@champion", uri)
    params = load_params(None, ["classify.workers=1", "preprocess.grid_days=100", "preprocess.fit_context_days=100"])
    out = pd.read_parquet(clf.run(params, detections, tmp_path / "out.parquet", model=model).output)
    proba = out.set_index("oid")[[f"p_{c}" for c in CLASSES]]
    t60 = tensorize(detections, TRAINED_WITH.grid_days, TRAINED_WITH.fit_context_days)
    want = pd.DataFrame(model.predict_proba(t60.x), index=[r["oid"] for r in t60.rows], columns=proba.columns)
    pd.testing.assert_frame_equal(proba.sort_index(), want.sort_index(), check_names=False, rtol=1e-6)
    # The exported graph is fixed to the grid it was trained on: today's 100-day grid would not even run.
    with pytest.raises(Exception, match="60"):
        model.predict_proba(tensorize(detections, 100, 100.0).x)
    # The in-process path (the HTTP service and the alert consumer) agrees with the file path.
    settings = clf.serving_settings(model, params)
    assert settings == TRAINED_WITH
    direct, _ = clf.classify_curves(curves_from_detections(detections), model, settings.grid_days,
                                    settings.fit_context_days)
    np.testing.assert_allclose(direct.set_index("oid").loc[proba.index, proba.columns].to_numpy(), proba.to_numpy(),
                               rtol=1e-6)


def test_a_model_without_settings_is_served_with_the_configured_ones_and_says_so(detections):
    legacy = ServingModel(uri="local:legacy", name="legacy", version="0", classes=tuple(CLASSES),
                              module=served_tcn())
    params = load_params(None, ["preprocess.grid_days=80"])
    with pytest.warns(UserWarning, match="records no preprocessing settings"):
        assert clf.serving_settings(legacy, params) == Preprocessing(80, params.preprocess.fit_context_days)
