"""Implausible photometry is flagged on every path (issue 16): a magnitude brighter than 5 or fainter than 30 (a
sentinel such as 99) is dropped as a bad point with its reason; a time that is no plausible MJD (a JD, or outside
1990-2050) rejects the object with its reason. The file path (`classify`) is in test_hostile_files.py; here: the
contract's validation, the light-curve path every consumer shares, the HTTP service and the alert consumer, and the
real data training uses, none of which is flagged."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from deeprubin.config import load_params
from deeprubin.lightcurves.tensorize import Curve, Skip, curves_from_detections, screen, tensorize_curves
from deeprubin.models.served import ServingModel
from deeprubin.schema import (
    CLASSES,
    MAG_TOO_BRIGHT,
    MAG_TOO_FAINT,
    PLAUSIBILITY_REASONS,
    TIME_LOOKS_LIKE_JD,
    TIME_NOT_PLAUSIBLE_MJD,
    implausible_brightness,
    map_detections,
    mag_to_flux,
    validate_detections,
)
from deeprubin.sources import simulate
from tests.conftest import REPO
from tests.model_fixtures import served_tcn

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def model() -> ServingModel:
    return ServingModel(uri="local:test", name="test", version="0", classes=tuple(CLASSES), module=served_tcn())


def _flux(mag: float, err: float = 0.1) -> tuple[float, float]:
    f, e = mag_to_flux(np.array([mag]), np.array([err]))
    return float(f[0]), float(e[0])


def test_the_brightness_bounds_are_magnitudes_5_and_30():
    mags = np.array([-5.0, 4.9, 5.1, 12.0, 21.0, 29.9, 30.1, 99.0, 99.0])
    errs = np.array([0.1] * 8 + [99.0])
    flux, flux_err = mag_to_flux(mags, errs)
    (bright, b_reason), (faint, f_reason) = implausible_brightness(flux, flux_err)
    assert bright.tolist() == [True, True] + [False] * 7 and b_reason == MAG_TOO_BRIGHT
    assert faint.tolist() == [False] * 6 + [True, True, True] and f_reason == MAG_TOO_FAINT
    # a difference flux near 0 with a real (microjansky) error is a plausible measurement of nothing
    (bright, _), (faint, _) = implausible_brightness(np.array([0.001, -0.002, 5e-6]), np.array([4.0, 8.0, 3.0]))
    assert not bright.any() and not faint.any()


def _curve(oid: str, mjd, mags, err: float = 0.1) -> Curve:
    flux, flux_err = mag_to_flux(np.asarray(mags, float), np.full(len(mags), err))
    return Curve(oid, np.asarray(mjd, float), np.arange(len(mags)) % 2, flux, flux_err)


def test_the_shared_light_curve_path_screens_every_curve():
    t = 60000.0 + np.arange(12) * 3.0
    good = [18.0 + 0.1 * i for i in range(12)]
    curve = _curve("some99", t, [99.0 if i in (2, 5) else m for i, m in enumerate(good)])
    kept = screen(curve)
    assert len(kept.mjd) == 10 and 99.0 not in (23.9 - 2.5 * np.log10(np.abs(kept.flux))).round(3)
    cases = {"all99": (_curve("all99", t, [99.0] * 12), MAG_TOO_FAINT),
             "bright": (_curve("bright", t, [-5.0] * 12), MAG_TOO_BRIGHT),
             "jd": (_curve("jd", t + 2400000.5, good), TIME_LOOKS_LIKE_JD),
             "1980": (_curve("1980", t - 15700, good), TIME_NOT_PLAUSIBLE_MJD),
             "2100": (_curve("2100", t + 28000, good), TIME_NOT_PLAUSIBLE_MJD),
             "unix": (_curve("unix", t * 0 + 1.7e9 + np.arange(12) * 86400, good), TIME_NOT_PLAUSIBLE_MJD)}
    for oid, (c, reason) in cases.items():
        with pytest.raises(Skip) as caught:
            screen(c)
        assert caught.value.reason == reason, oid
    with pytest.raises(Skip, match="subtract 2400000.5"):
        screen(cases["jd"][0])
    t_ = tensorize_curves([curve, *(c for c, _ in cases.values())])  # training, evaluation, every serving path
    assert [r["oid"] for r in t_.rows] == ["some99"]
    assert {s["oid"]: s["reason"] for s in t_.skipped} == {oid: reason for oid, (_, reason) in cases.items()}


def test_validation_drops_implausible_points_and_objects_by_reason():
    rows = pd.DataFrame({"oid": ["ok"] * 3 + ["s99"] * 3 + ["jd"] * 2 + ["neg"] * 2,
                         "mjd": [60000.0, 60001.0, 60002.0, 60000.0, 60001.0, 60002.0, 2460000.5, 2460001.5,
                                 60000.0, 60001.0],
                         "fid": [1, 2, 1] * 3 + [1],
                         "magpsf": [18.0, 18.1, 18.2, 18.0, 99.0, 99.0, 18.0, 18.0, -5.0, 19.0],
                         "sigmapsf": [0.1] * 10})
    clean, report = validate_detections(map_detections(rows, source="test"))
    assert clean["oid"].tolist() == ["neg", "ok", "ok", "ok", "s99"]
    assert report.by_reason() == {MAG_TOO_FAINT: 2, TIME_LOOKS_LIKE_JD: 2, MAG_TOO_BRIGHT: 1}


def test_the_http_service_rejects_implausible_objects_with_the_reason(model):
    """Old: mag 99 or -5 points were classified (a QSO at p = 0.9999) and a JD passed silently."""
    from fastapi.testclient import TestClient

    from deeprubin.serving.service import create_app

    params = load_params(None, ["classify.model_uri=local-test"])
    app = create_app(params, model_loader=lambda uri, tracking, classes: model)
    t = [60000.0 + 2.0 * i for i in range(10)]
    good = [{"mjd": m, "band": "gr"[i % 2], "mag": 18.0 + 0.2 * i, "mag_err": 0.1} for i, m in enumerate(t)]
    curves = [
        {"oid": "good", "detections": good},
        {"oid": "some99", "detections": [*good, {"mjd": 60030.0, "band": "g", "mag": 99.0, "mag_err": 99.0}]},
        {"oid": "all99", "detections": [dict(d, mag=99.0) for d in good]},
        {"oid": "minus5", "detections": [dict(d, mag=-5.0) for d in good]},
        {"oid": "jd", "detections": [dict(d, mjd=d["mjd"] + 2400000.5) for d in good]},
        {"oid": "1970", "detections": [dict(d, mjd=d["mjd"] - 19413) for d in good]},
        {"oid": "apparent99", "photometry": "apparent", "detections": [dict(d, mag=99.0) for d in good]},
    ]
    with TestClient(app) as client:
        r = client.post("/classify", json={"light_curves": curves})
    assert r.status_code == 200, r.text
    body = r.json()
    classified = {c["oid"]: c for c in body["classifications"]}
    assert set(classified) == {"good", "some99"}
    assert classified["some99"]["n_det"] == classified["good"]["n_det"] == 10  # the sentinel point was dropped
    assert classified["some99"]["probabilities"] == pytest.approx(classified["good"]["probabilities"], abs=1e-6)
    reasons = {r["oid"]: r["reason"] for r in body["rejected"]}
    assert reasons == {"all99": MAG_TOO_FAINT, "minus5": MAG_TOO_BRIGHT, "jd": TIME_LOOKS_LIKE_JD,
                       "1970": TIME_NOT_PLAUSIBLE_MJD, "apparent99": MAG_TOO_FAINT}
    assert "2400000.5" in next(r for r in body["rejected"] if r["oid"] == "jd")["reason"]


def test_the_alert_consumer_rejects_an_implausible_curve_with_the_reason(model, tmp_path):
    from deeprubin.serving.alerts import AlertClassifier, AlertWriter, consume, iter_directory, \
        read_classifications, read_rejections
    from tests.alert_packets import ztf_alert_record, ztf_ocf, ztf_point

    packets = tmp_path / "packets"
    packets.mkdir()
    for n, (oid, mag) in enumerate((("ZTFgood", 18.0), ("ZTF99", 99.0), ("ZTFminus5", -5.0))):
        hist = [ztf_point(60000.0 + 2 * k, 1 + k % 2, mag + 0.1 * k, 0.1, "t", 100 * n + k) for k in range(6)]
        (packets / f"{oid}.avro").write_bytes(ztf_ocf([ztf_alert_record(oid, 100 * n + 50, 60013.0, 1, mag,
                                                                        prv=hist)]))
    writer = AlertWriter(tmp_path / "out")
    try:
        consume(iter_directory(packets), AlertClassifier(model), writer, batch_alerts=10)
    finally:
        writer.close()
    assert set(read_classifications(tmp_path / "out")["oid"]) == {"ZTFgood"}
    rejected = read_rejections(tmp_path / "out").set_index("oid")["reason"].to_dict()
    assert rejected == {"ZTF99": MAG_TOO_FAINT, "ZTFminus5": MAG_TOO_BRIGHT}


# --- the data training uses is never flagged ---------------------------------------------------------------------

def _flagged(detections: pd.DataFrame) -> Counter:
    _, report = validate_detections(detections)
    counts = Counter({r: n for r, n in report.by_reason().items() if r in PLAUSIBILITY_REASONS})
    for curve in curves_from_detections(detections):
        try:
            if len(screen(curve).mjd) != len(curve.mjd):
                counts["screened"] += 1
        except Skip as skip:
            counts[skip.reason] += 1
    return counts


def test_no_real_bts_point_and_no_simulated_point_is_flagged():
    bts = map_detections(pd.read_parquet(REPO / "data" / "bts" / "detections.parquet"), source="files")
    assert len(bts) > 60_000
    assert _flagged(bts) == Counter()
    sim = simulate.simulate(load_params(None).ingest.simulator.model_copy(update={"n_per_class": 150}), seed=11)
    assert _flagged(sim.detections) == Counter()


def test_no_real_ogle_or_alerce_point_is_flagged(shared_data):
    from deeprubin.evaluation.ogle import read_ogle

    ogle = read_ogle(shared_data / "other_surveys" / "ogle2_lmc_qso_cep_iband.csv").drop(columns="label")
    assert _flagged(ogle) == Counter()
    root = shared_data / "alerce" / "lc_classifier_examples"
    periodic = map_detections(pd.read_csv(root / "25_periodic_detections.csv"), source="alerce")
    periodic = periodic.loc[periodic["band"].isin(["g", "r"])]
    assert _flagged(periodic) == Counter()
