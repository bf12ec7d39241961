"""Light-curve statistics on synthetic curves with known answers, and on the real BTS / OGLE data (PRIORS §6)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deeprubin.lightcurves import stats as L


def shared_data_dir() -> Path:
    """The shared real data: $DEEPRUBIN_SHARED_DATA, else the repository's sibling ``shared/data``."""
    env = os.environ.get("DEEPRUBIN_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def frame(rows: list[tuple]) -> pd.DataFrame:
    """Detections from (oid, mjd, band, mag[, mag_err]) tuples."""
    rows = [r if len(r) == 5 else (*r, 0.02) for r in rows]
    return pd.DataFrame(rows, columns=["oid", "mjd", "band", "mag", "mag_err"])


# ------------------------------------------------------------------------------------------------------------------
# Transients: rise, decline, gaps, colour
# ------------------------------------------------------------------------------------------------------------------

def sn_curve(oid: str = "sn", t_first: float = 100.3, rise_g: float = 10.0, rise_r: float = 14.0,
             decline_g: float = 0.05, decline_r: float = 0.03, colour: float = 0.1) -> pd.DataFrame:
    """Noise-free SN-like curve sampled every 2 nights in g and r (same times), r alone on the first night.

    Linear rise (0.1 mag/d) to each band's peak at ``t_first + rise_<b>`` (even rises fall on sample times),
    then a linear decline; the g peak is ``colour`` mag fainter than the r peak.
    """
    rows = []
    t_pk = {"g": t_first + rise_g, "r": t_first + rise_r}
    m_pk = {"g": 18.0 + colour, "r": 18.0}
    slope = {"g": decline_g, "r": decline_r}
    for t in np.arange(t_first, t_first + 60.0, 2.0):
        for band in ("g", "r"):
            if band == "g" and t == t_first:
                continue  # the first detection is r
            x = t - t_pk[band]
            rows.append((oid, t, band, m_pk[band] + (slope[band] * x if x >= 0 else -0.1 * x)))
    return frame(rows)


def test_rise_is_first_detection_any_band_to_band_peak():
    det = sn_curve(t_first=100.3, rise_g=10.0, rise_r=14.0)
    pk = L.peaks(det)
    assert pk.loc["sn", "rise_g"] == pytest.approx(10.0)
    assert pk.loc["sn", "rise_r"] == pytest.approx(14.0)
    assert pk.loc["sn", "peak_mag_r"] == pytest.approx(18.0)


def test_linear_decline_is_recovered_per_band():
    det = sn_curve(decline_g=0.072, decline_r=0.038)
    dec = L.decline_rates(det)
    assert dec.loc["sn", "decline_g"] == pytest.approx(0.072, rel=1e-9)
    assert dec.loc["sn", "decline_r"] == pytest.approx(0.038, rel=1e-9)


def test_decline_uses_only_30_days_after_peak():
    # After +30 d the curve flattens; a fit over a longer window would give a smaller slope.
    t = np.arange(0.0, 80.0, 1.0)
    mag = np.where(t <= 30, 18 + 0.05 * t, 18 + 0.05 * 30)
    rows = [("a", ti, "r", mi) for ti, mi in zip(t, mag)]
    dec = L.decline_rates(frame(rows), bands=("r",))
    assert dec.loc["a", "decline_r"] == pytest.approx(0.05, rel=1e-9)


def test_gaps_count_distinct_nights_only():
    rows = [("a", 10.2, "g", 18), ("a", 10.4, "g", 18), ("a", 13.3, "g", 18), ("a", 15.2, "g", 18),
            ("a", 21.3, "g", 18), ("a", 10.3, "r", 18)]
    det = frame(rows)
    gaps = L.night_gaps(det)
    assert sorted(gaps.loc[gaps["band"] == "g", "gap"]) == [2.0, 3.0, 6.0]
    assert (gaps["band"] == "r").sum() == 0  # one r night: no gap
    med = L.median_gaps(det)
    assert med.loc["a", "gap_g"] == pytest.approx(3.0)
    assert math.isnan(med.loc["a", "gap_r"])


def test_colour_is_the_same_night_pair_nearest_the_r_peak():
    det = sn_curve(colour=0.25, rise_g=10.0, rise_r=14.0, decline_g=0.05)
    # At the r peak (day 14) g has declined for 4 d at 0.05 mag/d since its own peak.
    assert L.colour_at_peak(det).loc["sn"] == pytest.approx(0.25 + 4 * 0.05)
    # No g point within ±4 d of the r peak -> NaN.
    rows = [("b", t, "r", 18 + abs(t - 20) * 0.05) for t in range(0, 40, 2)]
    rows += [("b", 30.1, "g", 18.5), ("b", 30.3, "r", 18.4)]
    assert math.isnan(L.colour_at_peak(frame(rows)).loc["b"])


def test_transient_stats_with_few_points_give_nan_not_errors():
    det = pd.concat([sn_curve("good"), frame([("one", 1.0, "g", 19.0)]),
                     frame([("two", 1.0, "r", 19.0), ("two", 3.0, "r", 19.2)])], ignore_index=True)
    st = L.transient_stats(det)
    assert list(st.index) == ["good", "one", "two"]
    assert st.loc["one", "n_det"] == 1 and st.loc["one", "span"] == 0
    for col in ("rise_g", "rise_r", "decline_g", "decline_r", "gr_peak", "gap_g"):
        assert math.isnan(st.loc["one", col]), col
    assert math.isnan(st.loc["two", "decline_r"])  # 2 points: below MIN_POINTS_BAND
    assert st.loc["two", "peak_mag_r"] == pytest.approx(19.0)
    assert st.loc["good", "decline_g"] == pytest.approx(0.05)
    empty = L.transient_stats(frame([]).astype({"mjd": float, "mag": float, "oid": str, "band": str}))
    assert len(empty) == 0


# ------------------------------------------------------------------------------------------------------------------
# Periodic variables
# ------------------------------------------------------------------------------------------------------------------

def periodic_curve(period=3.7, a1=0.30, r21=0.40, phi1=0.5, phi2=1.9, n=160, span=300.0, noise=0.005, seed=1,
                   band="r", oid="cep"):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, span, n)) + 58000.0
    w = 2 * np.pi / period
    mag = 15 + a1 * np.sin(w * t + phi1) + a1 * r21 * np.sin(2 * w * t + phi2) + rng.normal(0, noise, n)
    return pd.DataFrame({"oid": oid, "mjd": t, "band": band, "mag": mag, "mag_err": noise})


def test_period_and_fourier_parameters_of_a_sinusoid_plus_harmonic():
    det = periodic_curve(period=3.7, a1=0.30, r21=0.40, phi1=0.5, phi2=1.9)
    period, power = L.ls_period(det["mjd"], det["mag"], det["mag_err"], min_period=0.2, max_period=100)
    assert period == pytest.approx(3.7, rel=1e-3)
    assert power > 0.5
    f = L.fourier_fit(det["mjd"].to_numpy(), det["mag"].to_numpy(), period)
    assert f["A1"] == pytest.approx(0.30, abs=0.01)
    assert f["R21"] == pytest.approx(0.40, abs=0.02)
    # φ21 = φ2 − 2 φ1 (sine convention), independent of the time origin of the fit.
    assert f["phi21"] == pytest.approx((1.9 - 2 * 0.5) % (2 * np.pi), abs=0.05)
    # Peak-to-peak amplitude of the true curve, on a fine phase grid.
    x = np.linspace(0, 2 * np.pi, 10000)
    true_amp = np.ptp(0.3 * np.sin(x + 0.5) + 0.12 * np.sin(2 * x + 1.9))
    assert f["amp"] == pytest.approx(true_amp, abs=0.01)


def test_periodic_stats_per_band_and_amplitude_ratio():
    g = periodic_curve(a1=0.40, band="g", seed=2)
    r = periodic_curve(a1=0.28, band="r", seed=3)
    st = L.periodic_stats(pd.concat([g, r]), bands=("g", "r"))
    assert st.loc["cep", "period"] == pytest.approx(3.7, rel=1e-3)
    assert st.loc["cep", "amp_ratio"] == pytest.approx(0.7, abs=0.03)
    assert st.loc["cep", "R21_g"] == pytest.approx(0.40, abs=0.03)


def test_fourier_fit_refuses_a_gap_in_phase_and_sparse_curves_are_not_overfitted():
    det = periodic_curve(period=3.7, a1=0.3, r21=0.4, n=200)
    phase = np.mod((det["mjd"] - 58000.0) / 3.7, 1.0)
    gappy = det[(phase < 0.3) | (phase > 0.7)]  # 40% of the cycle never observed
    assert L.max_phase_gap(gappy["mjd"].to_numpy(), 3.7) > 0.35
    f = L.fourier_fit(gappy["mjd"].to_numpy(), gappy["mag"].to_numpy(), 3.7)
    assert math.isnan(f["amp"]) and f["phase_gap"] > 0.35
    # 15 well-spread points: BIC keeps few harmonics, and the amplitude stays close to the truth.
    sparse = periodic_curve(period=3.7, a1=0.3, r21=0.4, n=15, noise=0.02, seed=4)
    f = L.fourier_fit(sparse["mjd"].to_numpy(), sparse["mag"].to_numpy(), 3.7,
                      dm=sparse["mag_err"].to_numpy(), max_gap=1.0)
    assert f["n_harmonics"] == 2
    x = np.linspace(0, 2 * np.pi, 10000)
    assert f["amp"] == pytest.approx(np.ptp(0.3 * np.sin(x + 0.5) + 0.12 * np.sin(2 * x + 1.9)), abs=0.08)


def test_periodic_stats_with_few_points_give_nan():
    det = pd.concat([periodic_curve(n=5, oid="short"), periodic_curve(oid="ok")])
    st = L.periodic_stats(det, bands=("r",))
    assert math.isnan(st.loc["short", "period"]) and math.isnan(st.loc["short", "amp_r"])
    assert np.isfinite(st.loc["ok", "period"])


# ------------------------------------------------------------------------------------------------------------------
# Damped random walk
# ------------------------------------------------------------------------------------------------------------------

def drw_curves(tau=60.0, sf_inf=0.25, n_obj=40, n=300, span=2000.0, noise=0.02, seed=7) -> pd.DataFrame:
    """Exact Ornstein–Uhlenbeck draws (σ = SF∞/√2) at random times, plus white noise."""
    rng = np.random.default_rng(seed)
    sigma = sf_inf / np.sqrt(2)
    frames = []
    for k in range(n_obj):
        t = np.sort(rng.uniform(0, span, n))
        x = np.empty(n)
        x[0] = rng.normal(0, sigma)
        for i in range(1, n):
            a = np.exp(-(t[i] - t[i - 1]) / tau)
            x[i] = a * x[i - 1] + rng.normal(0, sigma * np.sqrt(1 - a * a))
        frames.append(pd.DataFrame({"oid": f"q{k:03d}", "mjd": t, "band": "r",
                                    "mag": 19 + x + rng.normal(0, noise, n), "mag_err": noise}))
    return pd.concat(frames, ignore_index=True)


def test_structure_function_and_drw_fit_recover_tau():
    det = drw_curves(tau=60.0, sf_inf=0.25, noise=0.06)
    sf = L.structure_function(det, band="r")
    assert sf["n_pairs"].sum() > 0
    # The noise-corrected SF climbs with lag and saturates near SF∞.
    long = sf.loc[sf["lag"] > 600, "sf_corr"].dropna()
    assert long.median() == pytest.approx(0.25, rel=0.15)
    assert sf.loc[sf["lag"] < 2, "sf_corr"].dropna().max() < 0.1
    assert sf.loc[sf["lag"] < 2, "sf"].dropna().min() > 0.08  # raw SF: photometric noise dominates
    fit = L.fit_drw(sf)
    assert fit["tau"] == pytest.approx(60.0, rel=0.3)
    assert fit["sf_inf"] == pytest.approx(0.25, rel=0.15)
    assert fit["noise"] == pytest.approx(0.06 * np.sqrt(2), abs=0.02)  # the SF floor: √2 σ_phot


def test_per_object_drw_likelihood_fit_recovers_tau_and_sf_inf():
    det = drw_curves(tau=60.0, sf_inf=0.25, n_obj=12, seed=11)
    fits = L.drw_fits(det, band="r")
    assert len(fits) == 12
    assert fits["tau"].median() == pytest.approx(60.0, rel=0.35)
    assert fits["sf_inf"].median() == pytest.approx(0.25, rel=0.2)
    # A DRW with a much longer τ is told apart.
    slow = L.drw_fits(drw_curves(tau=600.0, sf_inf=0.25, n_obj=12, seed=12), band="r")
    assert slow["tau"].median() > 3 * fits["tau"].median()


def test_per_object_sf_and_too_short_objects():
    det = pd.concat([drw_curves(n_obj=2, n=100), frame([("tiny", 1.0, "r", 19.0), ("tiny", 5.0, "r", 19.1)])])
    per = L.structure_function(det, band="r", per_object=True)
    assert set(per["oid"]) == {"q000", "q001", "tiny"}
    assert per.loc[per["oid"] == "tiny", "sf"].isna().all()
    fits = L.drw_fits(det, band="r")
    assert math.isnan(fits.loc["tiny", "tau"]) and np.isfinite(fits.loc["q000", "tau"])
    assert math.isnan(L.rms(det, bands=("r",)).loc["tiny", "rms_r"])


def test_drw_sf_formula():
    assert L.drw_sf(np.array([0.0]), 0.2, 100.0)[0] == 0.0
    assert L.drw_sf(np.array([1e6]), 0.2, 100.0)[0] == pytest.approx(0.2)
    assert L.drw_sf(np.array([100.0]), 0.2, 100.0, noise=0.0)[0] == pytest.approx(0.2 * np.sqrt(1 - np.exp(-1)))


# ------------------------------------------------------------------------------------------------------------------
# Summaries and helpers
# ------------------------------------------------------------------------------------------------------------------

def test_summarise_and_quantiles():
    values = np.arange(0.0, 101.0)  # p10 = 10, median = 50, p90 = 90
    assert L.summarise(values, digits=1) == "50.0 [10.0, 90.0]"
    q = L.quantiles(list(values) + [np.nan, None])
    assert (q["median"], q["p10"], q["p90"], q["n"]) == (50.0, 10.0, 90.0, 101)
    assert L.summarise([np.nan]) == "n/a"
    assert L.summarise(pd.Series([0.05, 0.07, 0.09])) == "0.070 [0.054, 0.086]"
    assert L.summarise([-0.1, 0.0, 0.3]) == "0.000 [−0.080, 0.240]"


def test_apparent_magnitudes_prefer_mag_corr():
    det = pd.DataFrame({"oid": ["a", "a"], "mjd": [1.0, 2.0], "band": ["r", "r"], "mag": [19.0, 19.5],
                        "mag_err": [0.1, 0.1], "mag_corr": [16.0, np.nan], "mag_corr_err": [0.01, np.nan]})
    out = L.apparent_magnitudes(det)
    assert list(out["mag"]) == [16.0, 19.5]
    assert list(out["mag_err"]) == [0.01, 0.1]
    assert list(out["mag_is_apparent"]) == [True, False]
    assert list(det["mag"]) == [19.0, 19.5]  # the input is not modified


# ------------------------------------------------------------------------------------------------------------------
# Real data: PRIORS §6 (BTS) and §2/§3 (OGLE-II)
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bts() -> tuple[pd.DataFrame, pd.DataFrame]:
    from deeprubin.schema import map_detections, validate_detections

    root = shared_data_dir() / "bts"
    if not (root / "detections.parquet").exists() or not (root / "labels.csv").exists():
        pytest.skip(f"real BTS data not found under {root} (set DEEPRUBIN_SHARED_DATA to the shared/data folder)")
    det, _ = validate_detections(map_detections(pd.read_parquet(root / "detections.parquet"), source="bts"))
    labels = pd.read_csv(root / "labels.csv")
    return det, labels


# PRIORS §6, "median [p10, p90]": quantity -> (SNIa, SNII).
PRIORS_6 = {
    "n_det": ((24, 11, 59), (39.5, 15.5, 110)),
    "span": ((47, 27, 87), (89, 42, 181)),
    "peak_mag_g": ((18.4, 17.1, 19.0), (18.4, 17.2, 19.1)),
    "peak_mag_r": ((18.3, 17.1, 18.9), (18.3, 17.2, 18.9)),
    "rise_g": ((12.0, 6.9, 17.0), (7.1, 0.0, 20.4)),
    "rise_r": ((13.9, 8.0, 18.8), (13.9, 4.1, 38.1)),
    "decline_g": ((0.072, 0.050, 0.091), (0.032, 0.015, 0.070)),
    "decline_r": ((0.038, 0.030, 0.050), (0.014, 0.004, 0.042)),
    "gr_peak": ((0.02, -0.14, 0.32), (0.17, -0.10, 0.68)),
}
# Tolerance on each of median, p10 and p90: the larger of a relative and an absolute one.
TOLERANCE = {"n_det": (0.05, 1.0), "span": (0.05, 1.0), "peak_mag_g": (0.0, 0.06), "peak_mag_r": (0.0, 0.06),
             "rise_g": (0.05, 0.3), "rise_r": (0.05, 0.3), "decline_g": (0.05, 0.003),
             "decline_r": (0.05, 0.002), "gr_peak": (0.0, 0.03)}


@pytest.mark.real_data
@pytest.mark.parametrize("cls", ["SNIa", "SNII"])
def test_bts_reproduces_priors_section_6(bts, cls):
    det, labels = bts
    sub = det[det["oid"].isin(labels.loc[labels["label"] == cls, "oid"])]
    st = L.transient_stats(sub)
    assert len(st) == {"SNIa": 1399, "SNII": 266}[cls]
    failures = []
    for quantity, targets in PRIORS_6.items():
        target = targets[0 if cls == "SNIa" else 1]
        q = L.quantiles(st[quantity])
        rel, ab = TOLERANCE[quantity]
        for got, want, what in zip((q["median"], q["p10"], q["p90"]), target, ("median", "p10", "p90")):
            if abs(got - want) > max(rel * abs(want), ab):
                failures.append(f"{quantity} {what}: {got:.4f} vs PRIORS {want}")
    # Gaps: pooled over all gaps between distinct nights, per band.
    gaps = L.night_gaps(sub)
    want_gaps = {"SNIa": {"g": (3, 1, 8), "r": (3, 1, 7)}, "SNII": {"g": (3, 1, 9), "r": (3, 1, 8)}}[cls]
    for band, want in want_gaps.items():
        q = L.quantiles(gaps.loc[gaps["band"] == band, "gap"])
        if (q["median"], q["p10"], q["p90"]) != want:
            failures.append(f"gap {band}: {q} vs PRIORS {want}")
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def ogle() -> pd.DataFrame:
    path = shared_data_dir() / "other_surveys" / "ogle2_lmc_qso_cep_iband.csv"
    if not path.exists():
        pytest.skip(f"real OGLE-II data not found at {path} (set DEEPRUBIN_SHARED_DATA)")
    raw = pd.read_csv(path)
    return pd.DataFrame({"oid": raw["oid"], "mjd": raw["time"] - 2400000.5, "band": "I", "mag": raw["mag"],
                         "mag_err": raw["mag_err"], "label": raw["label"]})


@pytest.mark.real_data
def test_ogle_cepheids_match_priors_section_3(ogle):
    st = L.periodic_stats(ogle[ogle["label"] == "CEP"], bands=("I",), max_period=100)
    assert len(st) == 12 and st["period"].between(1.2, 8.0).all()
    fundamental = st[st["period"] > 2.5]  # PRIORS: F 2.6–7.7 d, A 0.32–0.59, R21 0.37–0.47, φ21 2.8–3.6
    assert fundamental["amp_I"].between(0.30, 0.61).all()
    assert fundamental["R21_I"].between(0.35, 0.49).all()
    assert fundamental["phi21_I"].between(2.75, 3.65).all()


@pytest.mark.real_data
def test_ogle_quasars_match_priors_section_2(ogle):
    qso = ogle[ogle["label"] == "QSO"]
    fits = L.drw_fits(qso, band="I")
    assert L.quantiles(fits["sf_inf"])["median"] == pytest.approx(0.12, abs=0.02)  # PRIORS: 0.12 [0.05, 0.19]
    assert 80 < L.quantiles(fits["tau"])["median"] < 250  # PRIORS: τ_obs 141 d (ill-constrained)
    assert L.quantiles(L.rms(qso)["rms_I"])["median"] == pytest.approx(0.11, abs=0.01)
