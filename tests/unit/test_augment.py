"""Held-out real objects, truncated training views and the one-view-per-object sampler."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from deeprubin.data import ViewSampler, holdout_by_hash, truncated_views
from deeprubin.lightcurves.tensorize import CHANNELS, tensorize


def test_holdout_is_stratified_deterministic_and_independent_of_other_objects():
    oids = [f"A{i:03d}" for i in range(200)] + [f"B{i:03d}" for i in range(50)]
    labels = ["SNIa"] * 200 + ["SNII"] * 50
    held = holdout_by_hash(oids, labels, 0.3, seed=7)
    assert Counter(o[0] for o in held) == {"A": 60, "B": 15}
    # Same objects whatever the order, and whatever else is in the set (here: the SNII objects removed).
    assert np.array_equal(holdout_by_hash(oids[::-1], labels[::-1], 0.3, seed=7), held)
    assert set(holdout_by_hash(oids[:200], labels[:200], 0.3, seed=7)) == {o for o in held if o[0] == "A"}
    assert not np.array_equal(holdout_by_hash(oids, labels, 0.3, seed=8), held)
    with pytest.raises(ValueError, match="fraction"):
        holdout_by_hash(oids, labels, 0.0)


def _curve(oid: str, first: float, n: int, step: float = 2.0) -> pd.DataFrame:
    mjd = first + step * np.arange(n)
    flux = 100 * np.exp(-0.5 * ((mjd - first - 20) / 10) ** 2) + 5
    return pd.DataFrame({"oid": oid, "mjd": np.repeat(mjd, 2), "band": ["g", "r"] * n,
                         "flux": np.repeat(flux, 2), "flux_err": 3.0})


def test_truncated_views_cut_after_first_detection_and_match_inference():
    det = pd.concat([_curve("X1", 59000.0, 30), _curve("X2", 59100.0, 25), _curve("SHORT", 59300.0, 2, 0.5)])
    x, owners, days = truncated_views(det, ["X1", "X2", "SHORT"], n_views=3, min_days=3.0, seed=1)
    assert x.shape[1:] == (len(CHANNELS), 100) and len(x) == len(owners) == len(days)
    assert Counter(owners) == {"X1": 3, "X2": 3}  # SHORT spans 0.5 d < min_days: no cut
    spans = {"X1": 58.0, "X2": 48.0}
    assert all(3.0 <= d < spans[o] for o, d in zip(owners, days))
    # Deterministic per object, and each view is exactly what inference computes on the cut light curve.
    x2, owners2, days2 = truncated_views(det, ["X2", "X1"], n_views=3, min_days=3.0, seed=1)
    assert np.array_equal(days2, days) and np.array_equal(x2, x)
    i = 4
    cut = det.loc[(det["oid"] == owners[i]) & (det["mjd"] <= det.loc[det["oid"] == owners[i], "mjd"].min() + days[i])]
    np.testing.assert_allclose(tensorize(cut).x[0], x[i], rtol=1e-5, atol=1e-6)
    full = tensorize(det.loc[det["oid"] == owners[i]]).x[0]
    assert not np.allclose(full, x[i])
    assert len(truncated_views(det, ["X1"], n_views=0)[0]) == 0


def test_truncated_views_stop_at_max_days():
    det = pd.concat([_curve("X1", 59000.0, 30), _curve("X2", 59100.0, 25)])
    _, owners, days = truncated_views(det, ["X1", "X2"], n_views=20, min_days=3.0, seed=1, max_days=15.0)
    assert Counter(owners) == {"X1": 20, "X2": 20}
    assert days.min() >= 3.0 and days.max() < 15.0
    _, _, uncapped = truncated_views(det, ["X1", "X2"], n_views=20, min_days=3.0, seed=1)
    assert uncapped.max() > 15.0  # without the cap the cuts reach the span
    from deeprubin.data import ProcessedDataModule

    with pytest.raises(ValueError, match="truncation_max_days"):
        ProcessedDataModule("unused", truncations=2, truncation_min_days=5.0, truncation_max_days=5.0, raw_dir="raw")


def test_view_sampler_gives_each_object_once_per_epoch_with_varying_views():
    groups = [np.array([0, 3, 4]), np.array([1]), np.array([2, 5])]
    sampler = ViewSampler(groups, seed=3)
    owner = {r: i for i, g in enumerate(groups) for r in g}
    epochs = [list(sampler) for _ in range(20)]
    assert all(sorted(owner[r] for r in e) == [0, 1, 2] for e in epochs)
    seen = Counter(r for e in epochs for r in e)
    assert set(seen) == {0, 1, 2, 3, 4, 5}  # every view gets used
    assert [list(ViewSampler(groups, seed=3)) for _ in range(1)][0] == epochs[0]  # reproducible
    weighted = ViewSampler(groups, object_weights=np.array([0.0, 1.0, 0.0]), seed=3)
    assert list(weighted) == [1, 1, 1]
    with pytest.raises(ValueError, match="at least one view"):
        ViewSampler([np.array([], dtype=int)])


def test_view_sampler_shows_the_whole_curve_with_the_given_probability():
    groups = [np.array([0, 10, 11, 12, 13]) + 20 * i for i in range(200)]
    for p in (0.0, 0.5, 1.0):
        rows = [r for _ in range(5) for r in ViewSampler(groups, seed=4, full_probability=p)]
        full = np.mean([r % 20 == 0 for r in rows])
        assert abs(full - p) < 0.05, (p, full)
    with pytest.raises(ValueError, match="full_probability"):
        ViewSampler(groups, full_probability=1.5)


def test_evaluation_cuts_are_the_inference_tensors_of_the_cut_curves():
    from deeprubin.lightcurves.tensorize import curves_from_detections
    from deeprubin.processed import Preprocessing
    from deeprubin.stages.evaluate import _cut_tensors

    det = pd.concat([_curve("X1", 59000.0, 30), _curve("X2", 59100.0, 25)])
    curves = curves_from_detections(det)
    oids, x = _cut_tensors(curves, 1000.0, Preprocessing(100, 100.0))  # a cut after the last detection changes nothing
    np.testing.assert_array_equal(x, tensorize(det).x)
    oids, x = _cut_tensors(curves, 10.0, Preprocessing(100, 100.0))
    first = det.groupby("oid")["mjd"].transform("min")
    np.testing.assert_array_equal(x, tensorize(det[det["mjd"] <= first + 10.0]).x)
    assert list(oids) == ["X1", "X2"]
