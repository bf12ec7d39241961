"""The feature-based balanced random forest baseline: features, early truncation, training, persistence."""

from __future__ import annotations

import joblib
import numpy as np
import pandas as pd
import pytest

from deeprubin.models import forest as B
from deeprubin.models.forest import FEATURE_BANDS, BaselineForest, FeatureVersionError, extract_features, feature_names
from deeprubin.config import SimulatorParams
from deeprubin.data import split_objects
from deeprubin.evaluation.metrics import classification_metrics, macro_f1
from deeprubin.schema import CLASSES, map_detections, validate_detections
from deeprubin.sources.simulate import simulate
from deeprubin.lightcurves.window import truncate_after_first

STATS_AND_FITS = ("amplitude", "standard_deviation", "skew", "stetson_K", "linear_fit_slope", "weighted_mean",
                  "periodogram_period_0", "bazin_fit_rise_time", "bazin_fit_amplitude")


@pytest.fixture(scope="module")
def sim():
    return simulate(SimulatorParams(n_per_class=80), seed=3, workers=1)


@pytest.fixture(scope="module")
def labels(sim) -> pd.Series:
    return sim.objects.set_index("oid")["label"]


@pytest.fixture(scope="module")
def split(labels) -> dict[str, np.ndarray]:
    return split_objects(labels.index, labels.to_numpy(), val_fraction=0, test_fraction=0.3, seed=0)


@pytest.fixture(scope="module")
def forest(sim, labels, split) -> BaselineForest:
    train = sim.detections[sim.detections["oid"].isin(split["train"])]
    return BaselineForest(n_estimators=100, truncations=(10, 30), seed=1).fit(train, labels)


def _sn_like(oid: str, n_r: int, n_g: int, t0: float = 60000.0) -> pd.DataFrame:
    """A rising-then-fading curve with ``n_r`` r and ``n_g`` g points, in contract columns."""
    rows = []
    for band, n, offset in (("r", n_r, 0.0), ("g", n_g, 0.3)):
        t = t0 + offset + 3.0 * np.arange(n)
        mag = 19.0 - 1.5 * np.exp(-0.5 * ((t - t0 - 15.0) / 8.0) ** 2) + (0.2 if band == "g" else 0.0)
        flux = 10 ** (-0.4 * (mag - 23.9))
        rows.append(pd.DataFrame({"oid": oid, "mjd": t, "band": band, "mag": mag, "mag_err": 0.05,
                                  "flux": flux, "flux_err": 0.05 * flux * np.log(10) / 2.5}))
    return pd.concat(rows, ignore_index=True)


# --- features ---------------------------------------------------------------------------------------------------

def test_feature_frame_shape_columns_and_determinism(sim):
    det = sim.detections
    features = extract_features(det)
    oids = np.unique(det["oid"].astype(str))
    assert features.index.name == "oid"
    assert list(features.index) == sorted(oids)
    assert list(features.columns) == feature_names()
    assert features.columns.is_unique
    for band in FEATURE_BANDS:
        for name in ("n_det", "mag_peak", "mag_mean") + STATS_AND_FITS:
            assert f"{name}_{band}" in features.columns
    assert {"gr_peak", "gr_mean", "gr_first_pair", "gr_bazin_fit_rise_time"} <= set(features.columns)
    assert (features.dtypes == np.float64).all()
    assert not np.isinf(features.to_numpy()).any()
    # Every simulated object has >= 6 points in some band: its statistics exist there.
    assert features[["amplitude_g", "amplitude_r"]].notna().any(axis=1).all()
    n = det.groupby(["oid", "band"]).size().unstack(fill_value=0)
    np.testing.assert_array_equal(features["n_det_g"], n["g"].reindex(features.index))
    # Deterministic: again, on shuffled rows, and on two threads.
    pd.testing.assert_frame_equal(features, extract_features(det))
    shuffled = det.sample(frac=1.0, random_state=0)
    pd.testing.assert_frame_equal(features, extract_features(shuffled))
    pd.testing.assert_frame_equal(features, extract_features(det, n_jobs=2))


def test_band_with_one_point_gives_nan_features_without_raising():
    det = pd.concat([_sn_like("A", n_r=12, n_g=1), _sn_like("B", n_r=10, n_g=0), _sn_like("C", n_r=10, n_g=10)])
    bad = pd.DataFrame({"oid": ["D", "D"], "mjd": [60000.0, 60001.0], "band": ["g", "r"], "mag": [np.nan, np.nan],
                        "mag_err": [0.1, 0.1], "flux": [np.nan, np.nan], "flux_err": [1.0, 1.0]})
    features = extract_features(pd.concat([det, bad], ignore_index=True))
    assert list(features.index) == ["A", "B", "C", "D"]
    a = features.loc["A"]
    assert a["n_det_g"] == 1 and a["n_det_r"] == 12
    for name in STATS_AND_FITS:
        assert np.isnan(a[f"{name}_g"]), name
        assert np.isfinite(a[f"{name}_r"]), name
    # One point still has a magnitude, so the colour at peak exists.
    assert np.isfinite(a["mag_peak_g"]) and np.isfinite(a["gr_peak"])
    b = features.loc["B"]
    assert b["n_det_g"] == 0 and np.isnan(b["mag_peak_g"]) and np.isnan(b["gr_peak"])
    c = features.loc["C"]
    assert np.isfinite(c[[f"{n}_g" for n in STATS_AND_FITS]].to_numpy()).all()
    # The fitted Bazin rise of the symmetric test curve is a few days, its peak near day 15.
    assert 1.0 < c["bazin_fit_rise_time_r"] < 15.0 and 8.0 < c["bazin_fit_reference_time_r"] < 22.0
    assert features.loc["D", "n_det"] == 0 and features.loc["D"].drop(["n_det", "n_det_g", "n_det_r"]).isna().all()


def test_until_days_drops_later_points(sim):
    det = sim.detections
    days = 15.0
    early = extract_features(det, until_days=days)
    first = det.groupby("oid")["mjd"].transform("min")
    manual = det[det["mjd"] <= first + days]
    pd.testing.assert_frame_equal(early, extract_features(manual))
    pd.testing.assert_frame_equal(early, extract_features(truncate_after_first(det, days)))
    full = extract_features(det)
    assert list(early.index) == list(full.index)
    assert (early["n_det"] <= full["n_det"]).all() and (early["n_det"] < full["n_det"]).any()
    assert (early["duration"] <= days).all()
    changed = early["n_det"] < full["n_det"]
    assert not np.allclose(early.loc[changed, "mag_mean_r"], full.loc[changed, "mag_mean_r"], equal_nan=True)


def test_magnitudes_fall_back_to_flux(sim):
    det = sim.detections.iloc[:3000]
    no_mag = det.assign(mag=np.nan, mag_err=np.nan)
    pd.testing.assert_frame_equal(extract_features(det), extract_features(no_mag), rtol=1e-6)
    only_flux = det.drop(columns=["mag", "mag_err"])
    pd.testing.assert_frame_equal(extract_features(det), extract_features(only_flux), rtol=1e-6)


# --- the forest -------------------------------------------------------------------------------------------------

def test_fit_predict_beats_chance_on_held_out_simulated_objects(forest, sim, labels, split):
    test = sim.detections[sim.detections["oid"].isin(split["test"])]
    oids, proba = forest.predict_proba(test)
    assert list(oids) == sorted(split["test"])
    assert proba.shape == (len(oids), len(CLASSES))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    y = labels.reindex(oids).to_numpy()
    metrics = classification_metrics(y, proba)
    assert metrics["macro_f1"] > 0.6, metrics  # chance is 0.25; a model that ignores its features scores ~0.1
    # Early curves are harder but still informative.
    oids20, proba20 = forest.predict_proba(test, until_days=20)
    assert list(oids20) == list(oids)
    np.testing.assert_allclose(proba20.sum(axis=1), 1.0)
    assert macro_f1(y, proba20) > 0.4


def test_probability_columns_follow_classes_even_when_a_class_is_absent(sim, labels, split):
    train = sim.detections[sim.detections["oid"].isin(split["train"])]
    odd = labels.copy()
    odd[odd == "CEP"] = "SNIbc"  # outside classes: ignored
    classes = ("SNII", "CEP", "QSO", "SNIa")
    forest = BaselineForest(classes=classes, n_estimators=30, truncations=(), seed=0).fit(train, odd)
    oids, proba = forest.predict_proba(sim.detections[sim.detections["oid"].isin(split["test"])])
    assert proba.shape == (len(oids), 4)
    assert (proba[:, 1] == 0).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    y = labels.reindex(oids)
    sn2 = (y == "SNII").to_numpy()
    qso = (y == "QSO").to_numpy()
    assert proba[sn2, 0].mean() > proba[qso, 0].mean()
    assert proba[qso, 2].mean() > proba[sn2, 2].mean()
    with pytest.raises(ValueError, match="two classes"):
        BaselineForest(classes=("QSO", "CEP"), n_estimators=5).fit(train, labels.where(labels == "QSO", "SNIa"))


def test_training_is_deterministic(sim, labels, split, forest):
    train = sim.detections[sim.detections["oid"].isin(split["train"])]
    test = sim.detections[sim.detections["oid"].isin(split["test"])]
    again = BaselineForest(n_estimators=100, truncations=(10, 30), seed=1).fit(train, labels)
    np.testing.assert_array_equal(forest.predict_proba(test)[1], again.predict_proba(test)[1])


def test_save_load_round_trip_and_version_check(forest, sim, split, tmp_path, monkeypatch):
    test = sim.detections[sim.detections["oid"].isin(split["test"])]
    path = forest.save(tmp_path / "baseline.joblib")
    loaded = BaselineForest.load(path)
    assert loaded.classes == forest.classes and loaded.feature_columns_ == forest.feature_columns_
    o1, p1 = forest.predict_proba(test, until_days=20)
    o2, p2 = loaded.predict_proba(test, until_days=20)
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(p1, p2)

    monkeypatch.setattr(B, "FEATURE_VERSION", B.FEATURE_VERSION + 1)
    with pytest.raises(FeatureVersionError, match="version"):
        BaselineForest.load(path)
    monkeypatch.undo()

    joblib.dump({"something": "else"}, tmp_path / "other.joblib")
    with pytest.raises(ValueError, match="not a saved BaselineForest"):
        BaselineForest.load(tmp_path / "other.joblib")


# --- real data --------------------------------------------------------------------------------------------------

@pytest.mark.real_data
def test_bts_snia_vs_snii_held_out(shared_data):
    root = shared_data / "bts"
    labels = pd.read_csv(root / "labels.csv").set_index("oid")["label"]
    labels = labels[labels.isin(["SNIa", "SNII"])]
    rng = np.random.default_rng(0)
    # A fixed subset of 400 SN Ia and 200 SN II keeps the test fast and the hold-out's SN II count useful.
    keep = np.concatenate([rng.choice(labels.index[labels == c], n, replace=False)
                           for c, n in (("SNIa", 400), ("SNII", 200))])
    labels = labels.loc[np.sort(keep)]
    raw = pd.read_parquet(root / "detections.parquet")
    det, _ = validate_detections(map_detections(raw[raw["oid"].isin(labels.index)], source="bts"))
    split = split_objects(labels.index, labels.to_numpy(), val_fraction=0, test_fraction=0.3, seed=0)
    forest = BaselineForest(n_estimators=150, truncations=(10, 20, 50), seed=0)
    forest.fit(det[det["oid"].isin(split["train"])], labels)
    oids, proba = forest.predict_proba(det[det["oid"].isin(split["test"])])
    f1 = macro_f1(labels.reindex(oids).to_numpy(), proba, labels=["SNIa", "SNII"], restrict_predictions=True)
    assert f1 > 0.7, f1
