"""Redshift augmentation: a real supernova moved farther away is dimmer, time-dilated, as noisy as ZTF at its new
brightness, and keeps only 5-sigma detections."""

from __future__ import annotations

import numpy as np
import pytest

from deeprubin.augment import moved, redshift_for_modulus, redshifted, redshifted_curves
from deeprubin.lightcurves.tensorize import Curve
from deeprubin.sources.simulate import distance_modulus, sigma_mag_model

LN10_25 = 2.5 / np.log(10.0)


def bright_curve(oid: str = "SN1", n: int = 30) -> Curve:
    """A 17th-magnitude rise and decline in both bands, with small errors."""
    t = np.linspace(0.0, 60.0, n)
    flux = 10 ** (-0.4 * (17.0 - 23.9)) * np.exp(-0.5 * ((t - 15.0) / 12.0) ** 2) + 50.0
    return Curve(oid=oid, mjd=59000.0 + t, band=np.arange(n) % 2, flux=flux, flux_err=0.01 * flux)


def test_redshift_for_modulus_inverts_the_distance_modulus():
    z = np.array([0.01, 0.05, 0.1, 0.3])
    assert np.allclose(redshift_for_modulus(distance_modulus(z)), z, rtol=1e-3)


def test_moved_curve_is_dimmer_dilated_noisier_and_detected():
    curve, z, z_new = bright_curve(), 0.02, 0.06
    out = moved(curve, z, z_new, np.random.default_rng(1))
    assert out is not None and 5 <= len(out.flux) <= len(curve.flux)
    stretch = (1 + z_new) / (1 + z)
    original = curve.mjd[0] + (out.mjd - curve.mjd[0]) / stretch  # every kept time maps back onto an observed one
    distance = np.abs(original[:, None] - curve.mjd[None, :])
    assert distance.min(axis=1).max() < 1e-6
    scale = 10 ** (-0.4 * (distance_modulus(z_new) - distance_modulus(z)))
    kept = distance.argmin(axis=1)
    expected = curve.flux[kept] * scale
    err_model = expected * np.array([sigma_mag_model(23.9 - 2.5 * np.log10(f), b)
                                     for f, b in zip(expected, out.band)]) / LN10_25
    assert np.allclose(out.flux_err, np.fmax(err_model, curve.flux_err[kept] * scale), rtol=0.05)
    assert (np.abs(out.flux) >= 5 * out.flux_err).all()
    assert np.abs((out.flux - expected) / out.flux_err).mean() < 3  # noise at the stated level, not beyond


def test_far_enough_leaves_too_few_detections():
    assert moved(bright_curve(), 0.02, 0.5, np.random.default_rng(0)) is None


def test_redshifted_respects_the_peak_limit_and_needs_a_redshift():
    rng = np.random.default_rng(3)
    peaks = []
    for _ in range(50):
        out = redshifted(bright_curve(), 0.02, rng, max_peak_mag=19.0)
        assert out is not None
        peaks.append(23.9 - 2.5 * np.log10(out.flux.max()))
    assert 16.9 < min(peaks) and max(peaks) < 19.3  # uniform from the observed peak (17) to the limit (19), plus noise
    assert np.ptp(peaks) > 1.0
    assert redshifted(bright_curve(), float("nan"), rng) is None
    assert redshifted(bright_curve(), 0.02, rng, max_peak_mag=16.0) is None  # already fainter than the limit


def test_redshifted_curves_are_reproducible_and_named_after_their_owner():
    curves = [bright_curve("A"), bright_curve("B"), bright_curve("C")]
    seed_of = {"A": 1, "B": 2, "C": 3}.get
    first, owners = redshifted_curves(curves, {"A": 0.02, "B": 0.03}, 3, seed_of)
    again, _ = redshifted_curves(curves, {"A": 0.02, "B": 0.03}, 3, seed_of)
    assert set(owners) == {"A", "B"} and len(first) == 6
    assert [c.oid for c in first] == ["A#z0", "A#z1", "A#z2", "B#z0", "B#z1", "B#z2"]
    for a, b in zip(first, again):
        assert np.array_equal(a.flux, b.flux) and np.array_equal(a.mjd, b.mjd)


def test_real_bts_supernovae_mostly_move(shared_data):
    import pandas as pd

    from deeprubin.config import FilesParams
    from deeprubin.data import redshifts_of
    from deeprubin.lightcurves.tensorize import curves_from_detections
    from deeprubin.schema import validate_detections
    from deeprubin.sources.files import load

    root = shared_data / "bts"
    mapped = load(FilesParams(detections=root / "detections.parquet", labels=root / "labels.csv"))
    labels = mapped.labels.set_index("oid")["label"]
    sn2 = labels.index[labels == "SNII"][:100]
    det, _ = validate_detections(mapped.detections)
    curves = curves_from_detections(det.loc[det["oid"].isin(sn2)])
    views, owners = redshifted_curves(curves, redshifts_of(root / "labels.csv"), 2, lambda oid: hash(oid) % 1000)
    assert len(set(owners)) >= 0.9 * len(curves)
    fainter = [v.flux.max() < next(c for c in curves if c.oid == o).flux.max() * 1.2 for v, o in zip(views, owners)]
    assert np.mean(fainter) > 0.9
    assert pd.Series([len(v.flux) for v in views]).min() >= 5
