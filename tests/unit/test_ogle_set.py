"""The OGLE-II quasars and Cepheids presented as a ZTF alert stream (deeprubin.evaluation.ogle): epochs alternate
between g and r without loss or duplication, the reference is the whole curve's median, only 5 sigma points of the
last ``alert_days`` days are alerts; the apparent row is read as classify reads undeclared input (recognised as
apparent and turned into difference flux, or rejected as steady)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deeprubin.evaluation import ogle
from deeprubin.schema import mag_to_flux

T0 = 2450500.0  # HJD


def _write(tmp_path, rows) -> str:
    frame = pd.DataFrame(rows, columns=["oid", "label", "time", "mag", "mag_err"])
    frame.insert(2, "survey", "OGLE-II")
    frame.insert(3, "band", "I")
    path = tmp_path / "ogle.csv"
    frame.to_csv(path, index=False)
    return str(path)


def test_epochs_alternate_between_g_and_r_once_each(tmp_path):
    rows = [("A", "QSO", T0 + d, 19.0 + 0.01 * d, 0.05) for d in (0, 3, 1, 7, 9)]  # out of time order
    rows += [("A", "QSO", T0 + 7, 19.5, 0.05)]  # the same epoch twice (float32 times): kept once
    rows += [("B", "Ceph", T0 + d, 17.0, 0.02) for d in range(4)]
    det = ogle.read_ogle(_write(tmp_path, rows))
    a = det[det["oid"] == "A"]
    assert list(a["mjd"]) == [T0 + d - 2400000.5 for d in (0, 1, 3, 7, 9)]
    assert list(a["band"]) == ["g", "r", "g", "r", "g"]
    assert a.loc[a["mjd"] == T0 + 7 - 2400000.5, "mag"].item() == pytest.approx(19.07)  # the first of the pair
    flux, err = mag_to_flux(a["mag"].to_numpy(), a["mag_err"].to_numpy())
    assert np.allclose(a["flux"], flux) and np.allclose(a["flux_err"], err) and (a["flux"] > 0).all()
    assert list(det.loc[det["oid"] == "B", "band"]) == ["g", "r", "g", "r"]
    assert set(det["label"]) == {"QSO", "CEP"}  # Ceph -> CEP


def _flat_with_flares(oid, level, flares, days=1000, step=2.0, err=0.01):
    """A steady source with brightenings: ``flares`` = [(start, end, delta mag)] in days from the start."""
    out = []
    for d in np.arange(0, days, step):
        m = level - sum(dm for s, e, dm in flares if s <= d < e)
        out.append((oid, "QSO", T0 + d, m, err))
    return out


def test_alert_stream_view_reference_threshold_and_last_days(tmp_path):
    # Steady at 18 mag with a flare long ago and one at the end: only the recent flare is in the view.
    rows = _flat_with_flares("A", 18.0, [(300, 340, 1.0), (900, 950, 1.0)])
    # The last 200 days all 0.3 mag brighter: the whole-curve reference makes them alerts (a reference from the
    # view alone would sit at the bright level and leave almost none).
    rows += _flat_with_flares("B", 18.0, [(800, 1000, 0.3)])
    apparent = ogle.read_ogle(_write(tmp_path, rows))
    diff = ogle.alert_stream(apparent, alert_days=200)
    a = diff[diff["oid"] == "A"]
    day = a["mjd"].to_numpy() - (T0 - 2400000.5)
    assert len(a) == 25 and day.min() >= 900 and day.max() < 950  # the recent flare only, every epoch of it
    bright, steady = mag_to_flux(np.array([17.0, 18.0]), np.array([0.01, 0.01]))[0]
    assert np.allclose(a["flux"], bright - steady)  # difference from the median (the steady level)
    assert np.allclose(a["mag_corr"], 17.0)  # the apparent magnitude kept
    b = diff[diff["oid"] == "B"]
    assert len(b) == 100 and (b["flux"] > 0).all()
    # As classify reads the apparent curves: both recognised (long, bright, steady level) and converted over the
    # whole curve, so A keeps both flares; a steady source is rejected.
    steady_rows = _flat_with_flares("C", 18.0, [])
    curves, counts = ogle.as_classify_reads_it(ogle.read_ogle(_write(tmp_path, rows + steady_rows)))
    assert counts == {"n_recognised_apparent": 3, "n_rejected_steady": 1}
    by_oid = {c.oid: c for c in curves}
    assert set(by_oid) == {"A", "B"} and len(by_oid["A"].flux) == 45  # 20 + 25 flare epochs
    assert np.allclose(np.sort(by_oid["A"].flux), bright - steady)


def test_real_ogle_curves(shared_data):
    path = shared_data / "other_surveys" / "ogle2_lmc_qso_cep_iband.csv"
    if not path.exists():
        pytest.skip(f"{path} not found")
    raw = pd.read_csv(path)
    det = ogle.read_ogle(path)
    assert len(det) == len(raw.drop_duplicates(["oid", "time"])) and det["oid"].nunique() == 82
    per_band = det.groupby(["oid", "band"]).size().unstack()
    assert (abs(per_band["g"] - per_band["r"]) <= 1).all()  # half of the epochs each
    stream = ogle.alert_stream(det, alert_days=200)
    span = stream.groupby("oid")["mjd"].agg(lambda t: t.max() - t.min())
    assert (span < 200).all()
    n_alert = stream.groupby("oid").size().reindex(det["oid"].unique(), fill_value=0)
    n_epochs = det.groupby("oid").size()
    assert (n_alert <= n_epochs).all() and n_alert.sum() < n_epochs.sum()
    curves, counts = ogle.as_classify_reads_it(det)
    assert counts["n_recognised_apparent"] >= 75  # recognised as apparent magnitudes (a few faint quasars are not)
    assert len(curves) + counts["n_rejected_steady"] == 82
