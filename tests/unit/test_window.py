"""The window policy (deeprubin.lightcurves.window) and the per-object tensor it feeds (no look past the last detection)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deeprubin.lightcurves.tensorize import CHANNELS, Curve, prepare, tensorize, time_since_detection
from deeprubin.lightcurves.window import Window, fit_start, truncate, truncate_after_first, window_for


def test_young_transient_starts_at_first_detection():
    w = window_for(60000.3, 60020.3, 100)
    assert w.start_mjd == 60000.3 and w.anchored == "first"
    assert w.end_mjd == pytest.approx(60099.3)
    assert len(w.grid()) == 100 and w.grid()[0] == 0 and w.grid()[-1] == 99
    after = w.days_after_last()
    assert after[0] == pytest.approx(-20) and after[-1] == pytest.approx(79)  # the grid runs past the data


def test_long_curve_takes_the_latest_days_ending_at_the_last_detection():
    w = window_for(59000.0, 59700.5, 100)
    assert w.anchored == "last"
    assert w.end_mjd == 59700.5 and w.start_mjd == 59601.5
    assert w.grid_mjd()[-1] == 59700.5
    assert (w.days_after_last() <= 0).all()  # nothing past the last detection


def test_the_two_cases_meet_continuously():
    first = 60000.0
    starts = [window_for(first, first + span, 100).start_mjd for span in np.arange(90, 110, 0.25)]
    assert np.all(np.diff(starts) >= 0)
    assert window_for(first, first + 99, 100).start_mjd == first
    assert window_for(first, first + 99.25, 100).start_mjd == pytest.approx(first + 0.25)


@given(first=st.floats(50000, 70000), span=st.floats(0, 3000), grid=st.integers(10, 300))
@settings(max_examples=200, deadline=None)
def test_window_properties(first, span, grid):
    last = first + span
    w = window_for(first, last, grid)
    assert isinstance(w, Window)
    assert w.start_mjd >= first and w.start_mjd <= last  # starts at a detection or inside the curve
    assert w.start_mjd <= last <= w.end_mjd + 1e-6  # the last detection is always inside
    assert w.end_mjd - w.start_mjd == pytest.approx(grid - 1)
    if span < grid - 1:
        assert w.start_mjd == first
    else:
        assert w.end_mjd == pytest.approx(last)


def test_window_rejects_nonsense():
    with pytest.raises(ValueError, match="before the first"):
        window_for(10.0, 5.0)
    with pytest.raises(ValueError, match="finite"):
        window_for(float("nan"), 5.0)
    with pytest.raises(ValueError, match="grid_days"):
        window_for(1.0, 2.0, 1)


def test_window_does_not_need_the_label():
    # The policy is a function of the light curve's times alone: classification does not know the class.
    import inspect

    assert list(inspect.signature(window_for).parameters) == ["first_mjd", "last_mjd", "grid_days"]


def _det(oid: str, mjd, band, flux, err=5.0) -> pd.DataFrame:
    n = len(mjd)
    return pd.DataFrame({"oid": oid, "mjd": np.asarray(mjd, float), "band": list(band),
                         "flux": np.asarray(flux, float), "flux_err": np.full(n, err)})


def test_truncate_helpers():
    det = pd.concat([_det("A", [1, 2, 3, 10], "gggr", [1, 2, 3, 4]), _det("B", [5, 50, 90], "rrr", [1, 1, 1])])
    assert truncate(det, None) is det
    assert truncate(det, 3.0)["mjd"].tolist() == [1, 2, 3]
    early = truncate_after_first(det, 5)
    assert early.groupby("oid").size().to_dict() == {"A": 3, "B": 1}
    w = window_for(0, 500, 100)
    assert fit_start(w, 100) == w.start_mjd - 100


def test_time_since_detection_channel():
    grid = np.arange(10, dtype=float)
    t = np.array([0.0, 3.5, 2.0])
    band = np.array([0, 0, 1])
    since = time_since_detection(t, band, grid, 10)
    assert since.shape == (2, 10)
    assert since[0, 0] == 0.0  # a detection on day 0
    assert since[1, 0] == 1.0 and since[1, 1] == 1.0  # before r's first detection: "nothing yet"
    assert since[1, 2] == 0.0
    assert np.all(np.diff(since[0, 4:]) > 0)  # grows after the last g detection
    assert np.all((since >= 0) & (since <= 1))


def _sn(oid="SN1", n=30, t0=60000.0):
    rng = np.random.default_rng(1)
    t = t0 + np.sort(rng.uniform(0, 60, n))
    flux = 300 * np.exp(-((t - t0 - 15) / 12) ** 2) + rng.normal(0, 5, n)
    band = np.where(np.arange(n) % 2 == 0, "g", "r")
    return _det(oid, t, band, flux)


def test_tensor_never_sees_past_the_cutoff():
    det = _sn()
    cut = 60030.0
    a = tensorize(det, until_mjd=cut)
    # Whatever happens after the cut-off cannot change the tensor.
    later = det.copy()
    later.loc[later["mjd"] > cut, "flux"] *= -7
    extra = _det("SN1", [cut + 1, cut + 2], "gr", [1e4, 1e4])
    b = tensorize(pd.concat([later, extra]), until_mjd=cut)
    assert a.x.shape == (1, len(CHANNELS), 100)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.rows[0]["last_mjd"] <= cut
    # and it is the same as the curve that really stopped there
    np.testing.assert_array_equal(a.x, tensorize(det.loc[det["mjd"] <= cut]).x)


def test_tensor_channels_and_normalisation():
    det = _sn()
    out = tensorize(det)
    x, row = out.x[0], out.rows[0]
    assert x.dtype == np.float32 and np.isfinite(x).all()
    assert row["anchored"] == "first" and row["window_start_mjd"] == det["mjd"].min()
    assert row["flux_scale"] == pytest.approx(np.abs(det["flux"]).max())
    assert np.abs(x[0:2]).max() < 1.5  # GP mean in units of the object's peak |flux|
    assert (x[2:4] > 0).all()
    # past the last detection the GP predicts (std grows) and the time-since channels grow to 1
    last_day = int(np.floor(row["last_mjd"] - row["window_start_mjd"]))
    assert x[2, -1] > x[2, last_day]
    last_g = det.loc[det["band"] == "g", "mjd"].max()
    assert x[4, -1] == pytest.approx(np.log1p(row["window_end_mjd"] - last_g) / np.log1p(100), rel=1e-5)
    assert np.all(np.diff(x[4, last_day + 1:]) > 0)


def test_prepare_fits_context_before_the_window():
    t = np.arange(59000.0, 59500.0, 3.0)
    curve = Curve("Q", t, np.arange(len(t)) % 2, 100 + np.sin(t / 30), np.full(len(t), 2.0))
    prep = prepare(curve, grid_days=100, fit_context_days=50)
    assert prep.window.anchored == "last"
    assert prep.t.min() >= -50 and prep.t.max() == pytest.approx(99)
    assert prep.in_window.sum() == np.sum(t >= prep.window.start_mjd)
