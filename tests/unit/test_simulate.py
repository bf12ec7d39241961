"""The simulator: contract, reproducibility and each class's physical signature, measured on its own output."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deeprubin.config import SimulatorParams
from deeprubin.schema import BANDS, CLASSES, LightCurves
from deeprubin.sources import simulate as S
from deeprubin.sources.simulate import SimulatedLightCurves, simulate

N = 150


@pytest.fixture(scope="module")
def sim() -> SimulatedLightCurves:
    return simulate(SimulatorParams(n_per_class=N), seed=7)


def _of(sim: SimulatedLightCurves, label: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    truth = sim.truth[sim.truth["label"] == label].set_index("oid")
    det = sim.detections[sim.detections["oid"].isin(truth.index)]
    return truth, det


# --- contract ---------------------------------------------------------------------------------------------------

def test_contract_tables_cast_to_arrow(sim):
    assert isinstance(sim, LightCurves)
    tables = sim.to_arrow()
    assert tables["objects"].num_rows == 4 * N
    assert tables["detections"].num_rows == len(sim.detections) > 0
    assert tables["non_detections"].num_rows == len(sim.non_detections) > 0


def test_objects_counts_labels_and_summary_columns(sim):
    obj = sim.objects
    assert obj["oid"].is_unique
    assert obj["label"].value_counts().to_dict() == {c: N for c in CLASSES}
    assert (obj["label_source"] == "simulated").all() and (obj["label_probability"] == 1.0).all()
    assert (obj["source"] == "simulator").all()
    # ALeRCE's light-curve classifier needs 6 detections in g or in r: every simulated object has them.
    per_band = sim.detections.groupby(["oid", "band"]).size().unstack(fill_value=0).max(axis=1)
    assert (per_band.reindex(obj["oid"]) >= SimulatorParams().min_detections_per_band).all()
    g = sim.detections.groupby("oid")["mjd"]
    summary = pd.DataFrame({"first": g.min(), "last": g.max(), "n": g.size()}).reindex(obj["oid"])
    np.testing.assert_array_equal(summary["n"].to_numpy(), obj["n_det"].to_numpy())
    np.testing.assert_allclose(summary["first"].to_numpy(), obj["first_mjd"].to_numpy())
    np.testing.assert_allclose(summary["last"].to_numpy(), obj["last_mjd"].to_numpy())
    # Deterministic ingestion time: the end of the survey.
    p = SimulatorParams()
    assert obj["ingested_at"].nunique() == 1
    assert obj["ingested_at"].iloc[0] == pd.Timestamp("1858-11-17", tz="UTC") + pd.Timedelta(
        days=p.survey_start_mjd + p.survey_days)
    assert list(sim.truth["oid"]) == list(obj["oid"])
    assert list(sim.truth["label"]) == list(obj["label"])


def test_output_does_not_depend_on_the_number_of_workers():
    params = SimulatorParams(n_per_class=S.PARALLEL_MIN_OBJECTS // 4 + 1)  # large enough to use workers
    one, two = simulate(params, seed=3, workers=1), simulate(params, seed=3, workers=2)
    for name in ("objects", "detections", "non_detections", "truth"):
        pd.testing.assert_frame_equal(getattr(one, name), getattr(two, name))


def test_oids_hide_the_class(sim):
    obj = sim.objects
    assert obj["oid"].str.startswith("SIM").all()
    assert obj["oid"].str.len().nunique() == 1
    # Classes interleave: in oid order, no long runs of one class.
    runs = (obj["label"] != obj["label"].shift()).cumsum()
    assert obj.groupby(runs).size().max() < 15
    # Neither the prefix-less number nor its parity encodes the class.
    number = obj["oid"].str[-7:].astype(int)
    for c in CLASSES:
        share = (number[obj["label"] == c] < 2 * N).mean()
        assert 0.3 < share < 0.7


def test_detection_rows_are_sorted_unique_and_well_formed(sim):
    det = sim.detections
    assert not det.duplicated(["oid", "mjd", "band"]).any()
    srt = det.sort_values(["oid", "mjd", "band"], kind="mergesort")
    assert (srt.index == det.index).all()
    assert set(det["band"]) == set(BANDS)
    assert (det["mag_err"] > 0).all() and (det["flux_err"] > 0).all()
    assert np.isfinite(det[["mjd", "mag", "mag_err", "flux", "flux_err"]].to_numpy()).all()
    np.testing.assert_allclose(det["mag"], 23.9 - 2.5 * np.log10(np.abs(det["flux"])), atol=1e-9)
    np.testing.assert_allclose(det["mag_err"], 2.5 / np.log(10) * det["flux_err"] / np.abs(det["flux"]), rtol=1e-9)
    assert (det["source"] == "simulator").all()


def test_detections_obey_the_5_sigma_rule(sim):
    det = sim.detections
    snr = np.abs(det["flux"]) / det["flux_err"]
    assert snr.min() >= 5.0
    assert (det["mag_err"] <= 2.5 / np.log(10) / 5 + 1e-12).all()
    # Faint detections sit near the limit (ZTF alerts reach ~20.5), bright ones are not saturated.
    assert 20.0 < det["mag"].quantile(0.99) < 21.7
    sn = det[det["mag_corr"].isna()]
    assert sn["mag"].min() > S.SATURATION_MAG


def test_non_detections_are_fainter_than_their_limit_and_precede_a_detection(sim):
    nd = sim.non_detections
    assert not nd.duplicated(["oid", "mjd", "band"]).any()
    assert set(nd["band"]) <= set(BANDS)
    assert nd["diffmaglim"].between(17.0, 22.0).all()
    q = nd.groupby("band")["diffmaglim"].median()
    assert 19.8 < q["g"] < 20.6 and 19.8 < q["r"] < 20.6  # PRIORS §1: g 20.24, r 20.18
    # No observed epoch is both a detection and a non-detection.
    both = nd.merge(sim.detections[["oid", "mjd", "band"]], on=["oid", "mjd", "band"])
    assert both.empty
    # Alert history: every non-detection lies ≤ 30 d before a later detection of its object.
    det = sim.detections[["oid", "mjd"]].rename(columns={"mjd": "t_det"})
    last = det.groupby("oid")["t_det"].max()
    assert (nd["mjd"].to_numpy() < last.reindex(nd["oid"]).to_numpy()).all()


def test_non_detected_epochs_are_below_five_sigma():
    """On the raw epochs: every non-detection has |F_obs| < 5σ or was lost to the efficiency/saturation; every SN
    non-detection whose noisy flux is positive is fainter than its diffmaglim."""
    p = SimulatorParams(n_per_class=60)
    rng = np.random.default_rng(3)
    w = S.weather(rng, 731)
    for kind in ("SNIa", "QSO"):
        b = S._simulate_batch(kind, rng, 60, p, w)
        snr = np.abs(b.flux) / b.flux_err
        assert (snr[b.detected] >= 5).all()
        assert (~b.detected[snr < 5]).all()
        if kind == "SNIa":
            faint = ~b.detected & (snr < 5) & (b.flux > 0)
            assert (S.mag_from_flux(b.flux[faint]) > b.diffmaglim[faint]).all()


def test_mag_corr_only_where_the_reference_holds_the_source(sim):
    for label in ("SNIa", "SNII"):
        _, det = _of(sim, label)
        assert det["mag_corr"].isna().all()
    for label in ("QSO", "CEP"):
        _, det = _of(sim, label)
        assert det["mag_corr"].notna().mean() > 0.95
        assert (det["flux"] < 0).mean() > 0.2  # difference flux: fainter than the reference is common
    # Cepheid alert magnitude ≈ 1.4 [0.7, 2.3] mag fainter than apparent (PRIORS §1).
    _, det = _of(sim, "CEP")
    diff = (det["mag"] - det["mag_corr"]).dropna()
    assert 0.9 < diff.median() < 2.0
    assert 0.4 < diff.quantile(0.1) and diff.quantile(0.9) < 3.0


# --- reproducibility ----------------------------------------------------------------------------------------------

def test_same_seed_same_tables_and_different_seeds_differ():
    p = SimulatorParams(n_per_class=25)
    a, b = simulate(p, seed=11), simulate(p, seed=11)
    for name in ("objects", "detections", "non_detections", "truth"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
    ta, tb = a.to_arrow(), b.to_arrow()
    for name in ta:
        assert ta[name].equals(tb[name])
    c = simulate(p, seed=12)
    assert not a.objects["oid"].isin(c.objects["oid"]).any()
    assert len(a.detections) != len(c.detections) or not np.allclose(a.detections["mjd"], c.detections["mjd"])


def test_seed_precedence():
    assert S.resolve_seed(SimulatorParams()) == 42
    assert S.resolve_seed(SimulatorParams(seed=5)) == 5
    assert S.resolve_seed(SimulatorParams(seed=5), seed=9) == 9
    a = simulate(SimulatorParams(n_per_class=5, seed=5))
    b = simulate(SimulatorParams(n_per_class=5), seed=5)
    pd.testing.assert_frame_equal(a.detections, b.detections)


def test_class_subset_and_bad_classes():
    p = SimulatorParams(n_per_class=10, oid_prefix="ZZ")
    sub = simulate(p, classes=["SNII"], seed=1)
    assert set(sub.objects["label"]) == {"SNII"} and len(sub.objects) == 10
    assert sub.objects["oid"].str.startswith("ZZ").all()
    with pytest.raises(ValueError):
        simulate(p, classes=["SLSN"])
    with pytest.raises(ValueError):
        simulate(p, classes=["QSO", "QSO"])


# --- observing ------------------------------------------------------------------------------------------------

def test_cadence_gaps_same_night_pairs_and_seasons(sim):
    det = sim.detections.assign(night=np.floor(sim.detections["mjd"]))
    sn_truth, _ = _of(sim, "SNIa")
    sn = det[det["oid"].isin(sn_truth.index)]
    gaps, same = [], []
    for _, g in sn.groupby(["oid", "band"]):
        n = g["night"].to_numpy()
        d = np.diff(n)
        same.append(d == 0)
        gaps.append(np.diff(np.unique(n)))
    gaps = np.concatenate(gaps)
    same = np.concatenate(same)
    assert np.median(gaps) == 3.0  # PRIORS §1: 3.0 d [1, 8]
    assert np.quantile(gaps, 0.1) <= 1.5 and 5 <= np.quantile(gaps, 0.9) <= 11
    assert 0.08 < same.mean() < 0.22  # 12–16 % of same-band pairs on one night
    # g and r on the same night for most nights.
    nb = sn.groupby(["oid", "night"])["band"].nunique()
    assert (nb == 2).mean() > 0.5
    # Seasons: periodic sources show yearly gaps of ~2–6 months.
    cep_truth, _ = _of(sim, "CEP")
    cep = det[det["oid"].isin(cep_truth.index)]
    long_gaps = []
    for _, g in cep.groupby("oid"):
        n = np.unique(g["night"].to_numpy())
        if n.size > 20:
            long_gaps.append(np.diff(n).max())
    long_gaps = np.array(long_gaps)
    assert np.median(long_gaps) > 60 and np.median(long_gaps) < 220
    assert 80 < cep_truth["season_gap_d"].median() < 160


def test_phase_two_cadence_is_denser():
    rng = np.random.default_rng(0)
    w = np.ones(400, dtype=bool)
    e1, _ = S.observe(rng, 50, 58288.0, 400, "I", w)
    e2, _ = S.observe(rng, 50, 58288.0, 400, "II", w)
    assert 1.3 < len(e2) / len(e1) < 1.8


def test_error_model_matches_priors():
    # Unscaled fit at the median limit gives PRIORS' 0.03, 0.07, 0.11, 0.18, 0.24 at 16, 18, 19, 20, 20.5 mag.
    got = S.sigma_mag_model(np.array([16, 18, 19, 20, 20.5]), "g")
    np.testing.assert_allclose(got, [0.03, 0.07, 0.11, 0.18, 0.24], atol=0.012)
    # A source at the epoch's limit has S/N 5, whatever the depth and error scale.
    lim = np.array([19.0, 20.2, 20.9])
    for scale in (0.7, 1.0, 1.6):
        for band in (0, 1):
            f = S.flux_from_mag(lim)
            sig = S.flux_error(f, np.full(3, band), lim, np.full(3, scale))
            np.testing.assert_allclose(f / sig, 5.0, rtol=1e-9)


def test_distance_modulus_matches_astropy():
    from astropy.cosmology import FlatLambdaCDM

    z = np.array([0.01, 0.05, 0.1, 0.5, 2.0])
    np.testing.assert_allclose(S.distance_modulus(z), FlatLambdaCDM(H0=70, Om0=0.3).distmod(z).value, atol=2e-3)


# --- QSO ----------------------------------------------------------------------------------------------------------

def _sf(times: list[np.ndarray], values: list[np.ndarray], edges: np.ndarray,
        errors: list[np.ndarray] | None = None) -> np.ndarray:
    """Ensemble structure function sqrt(<Δx²> − <σi² + σj²>) per lag bin."""
    s2, n = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
    for c, (t, x) in enumerate(zip(times, values)):
        i, j = np.triu_indices(len(t), 1)
        lag = np.abs(t[j] - t[i])
        k = np.digitize(lag, edges) - 1
        ok = (k >= 0) & (k < len(edges) - 1)
        d2 = (x[j] - x[i]) ** 2
        if errors is not None:
            d2 = d2 - errors[c][i] ** 2 - errors[c][j] ** 2
        np.add.at(s2, k[ok], d2[ok])
        np.add.at(n, k[ok], 1)
    return np.sqrt(np.clip(s2 / np.maximum(n, 1), 0, None))


def test_drw_structure_function_slope_and_plateau():
    """Noise-free DRW of the simulator's own QSOs: SF ∝ Δt^0.5 for Δt ≪ τ, flat at SF∞ = √2 σ beyond τ."""
    rng = np.random.default_rng(1)
    n, tau = 400, 100.0
    t = np.sort(rng.uniform(0, 3000, (n, 300)), axis=1)
    x = S.ou_process(t, np.full(n, tau), rng)[0]
    edges = np.geomspace(0.5, 2500, 30)
    sf = _sf(list(t), list(x), edges)
    mid = np.sqrt(edges[1:] * edges[:-1])
    short = (mid > 1) & (mid < 0.1 * tau)
    slope = np.polyfit(np.log10(mid[short]), np.log10(sf[short]), 1)[0]
    assert 0.4 < slope < 0.6
    long = mid > 5 * tau
    np.testing.assert_allclose(sf[long], np.sqrt(2), rtol=0.1)
    theory = np.sqrt(2 * (1 - np.exp(-mid / tau)))
    np.testing.assert_allclose(sf[mid > 2], theory[mid > 2], rtol=0.12)


def test_vectorised_drw_matches_the_per_object_reference():
    rng = np.random.default_rng(2)
    n = 1500
    t = np.sort(rng.uniform(0, 1000, (n, 60)), axis=1)
    tau = np.exp(rng.uniform(np.log(20), np.log(400), n))
    fast = S.ou_process(t, tau, np.random.default_rng(5))[0]
    ref = S.ou_process_reference(list(t), list(tau), np.random.default_rng(6))
    edges = np.geomspace(1, 1000, 12)
    sf_fast = _sf(list(t), list(fast), edges)
    sf_ref = _sf(list(t), ref, edges)
    np.testing.assert_allclose(sf_fast, sf_ref, rtol=0.08)
    assert abs(np.std(fast) - 1) < 0.05 and abs(np.std(np.concatenate(ref)) - 1) < 0.05
    # Lag-one autocorrelation: both equal the exact E[x_k x_{k-1}] = <exp(−Δt/τ)>.
    expected = np.mean(np.exp(-np.diff(t, axis=1) / tau[:, None]))
    lag1_fast = np.mean(fast[:, 1:] * fast[:, :-1])
    lag1_ref = np.mean([np.mean(r[1:] * r[:-1]) for r in ref])
    assert abs(lag1_fast - expected) < 0.03 and abs(lag1_ref - expected) < 0.03


def test_qso_simulated_light_curves_show_the_drw(sim):
    truth, det = _of(sim, "QSO")
    # Drawn parameters follow MacLeod+2010: SF∞ ≈ 0.2 mag, τ_rest ≈ 100–300 d, bluer when brighter.
    assert 0.12 < truth["sf_inf_r"].median() < 0.35
    assert 100 < truth["tau_rest"].median() < 300
    ratio = truth["sf_inf_g"] / truth["sf_inf_r"]
    assert 1.08 < ratio.median() < 1.3
    # Measured on apparent magnitudes of the best-sampled QSOs: SF rises with lag and the g/r variations correlate.
    d = det.dropna(subset=["mag_corr"])
    rich = d.groupby("oid").size()
    rich = rich[rich >= 40].index
    assert len(rich) >= 10
    curves = [g for _, g in d[d["oid"].isin(rich) & (d["band"] == "r")].groupby("oid")]
    edges = np.array([1, 10, 30, 100, 300, 700])
    sf = _sf([g["mjd"].to_numpy() for g in curves], [g["mag_corr"].to_numpy() for g in curves], edges,
             [g["mag_corr_err"].to_numpy() for g in curves])
    assert sf[0] < sf[2] < sf[4]


# --- Cepheids -----------------------------------------------------------------------------------------------------

def test_cepheid_periods_recovered_by_lomb_scargle(sim):
    from astropy.timeseries import LombScargle

    truth, det = _of(sim, "CEP")
    d = det.dropna(subset=["mag_corr"])
    d = d[d["band"] == "r"]
    counts = d.groupby("oid").size()
    rich = counts[counts >= 40].index
    assert len(rich) >= 30
    hits = 0
    for oid in rich:
        g = d[d["oid"] == oid]
        freq = np.linspace(1 / 120, 1 / 0.2, 60000)
        power = LombScargle(g["mjd"], g["mag_corr"]).power(freq)
        p = 1 / freq[np.argmax(power)]
        hits += abs(p / truth.loc[oid, "period"] - 1) < 0.01
    assert hits / len(rich) > 0.75


def test_cepheid_template_is_a_sawtooth_with_larger_g_amplitude(sim):
    truth, _ = _of(sim, "CEP")
    assert (truth["amplitude_g"] > truth["amplitude_r"]).all()
    assert 0.6 < (truth["amplitude_r"] / truth["amplitude_g"]).median() < 0.8
    assert ((truth["period"] > 0.2) & (truth["period"] < 100)).all()
    # Short-period F-mode template: fast rise (brightening) over < 40 % of the cycle.
    ph = np.linspace(0, 1, 1000, endpoint=False)
    m = S.cepheid_template(ph, 0.45, S.hertzsprung_phi21(np.log10(4.0)))
    brightening = np.mean(np.diff(np.append(m, m[0])) < 0)
    assert brightening < 0.4
    # Hertzsprung progression: R21 dips near 10 d.
    assert S.hertzsprung_r21(1.0) < 0.6 * S.hertzsprung_r21(0.5)


# --- supernovae -------------------------------------------------------------------------------------------------

def _sn_curves(sim, label):
    from deeprubin.lightcurves import stats as L

    truth, det = _of(sim, label)
    return truth, L.transient_stats(det)


def test_sn_rise_decline_and_colour_in_priors_ranges(sim):
    ia_t, ia = _sn_curves(sim, "SNIa")
    ii_t, ii = _sn_curves(sim, "SNII")
    # PRIORS §6 (BTS): rise g 12.0 [6.9, 17.0] / r 13.9 [8.0, 18.8] (Ia); decline Ia r 0.038, II r 0.014 mag/d.
    assert 8 < ia["rise_g"].median() < 16 and 9 < ia["rise_r"].median() < 18
    assert 0.025 < ia["decline_r"].median() < 0.05
    assert 0.045 < ia["decline_g"].median() < 0.09
    assert 0.007 < ii["decline_r"].median() < 0.025
    assert ia["decline_r"].median() > 1.7 * ii["decline_r"].median()  # Ia fade faster than II
    assert ia["decline_g"].median() > ia["decline_r"].median()  # and faster in g
    assert -0.1 < ia["gr_peak"].median() < 0.15 and 0.05 < ii["gr_peak"].median() < 0.35
    # Truth: Ia first light → peak ≈ 15–30 d (Mi20 18.9 d); SN II plateau ~ 84 ± 17 d, slow plateau decline.
    assert 15 < (ia_t["t_peak"] - ia_t["t_first_light"]).median() < 30
    assert 60 < (ii_t["gamma"] / (1 + ii_t["z"])).median() < 100
    assert ii_t["plateau_slope"].median() < 0.02


def test_sn_peak_magnitudes_cover_the_alert_range(sim):
    for label in ("SNIa", "SNII"):
        truth, _ = _of(sim, label)
        m = truth["peak_mag_r"]
        assert 17.8 < m.median() < 19.2
        assert m.min() < 17.5 and m.max() > 19.8 and m.max() < S.SN_MAX_PEAK_MAG
    ia, _ = _of(sim, "SNIa")
    ii, _ = _of(sim, "SNII")
    assert ia["z"].median() > 1.5 * ii["z"].median()  # Ia are more luminous, seen further
    assert -19.6 < ia["abs_mag_r"].median() < -18.9


def test_sn_ii_plateau_shape():
    """Noise-free model: SN II stays within ~1.5 mag of peak for 50 d, then drops ≥ 1 mag onto the 56Co tail."""
    rng = np.random.default_rng(4)
    p = S._sn_params(rng, 200, "SNII")
    t = np.linspace(-20, 300, 641)
    oo = np.repeat(np.arange(200), len(t))
    f = S._sn_shape(np.tile(t, 200), p, oo, "SNII").reshape(200, -1)
    with np.errstate(divide="ignore"):  # zero flux before first light is -inf mag: fine here
        m = -2.5 * np.log10(f / f.max(axis=1, keepdims=True))
    at50 = m[:, np.searchsorted(t, 50)]
    assert np.median(at50) < 1.0
    # After the plateau (γ) + 40 d, the curve is ≥ drop − 0.3 mag below its level at γ.
    g = p["gamma"]
    i0 = np.searchsorted(t, g)
    i1 = np.searchsorted(t, g + 40)
    ok = i1 < len(t)
    fall = m[ok, i1[ok]] - m[ok, i0[ok]]
    assert np.median(fall - p["drop"][ok]) > -0.3
    # Ia decline monotonically after peak and faster than II.
    pa = S._sn_params(rng, 200, "SNIa")
    fa = S._sn_shape(np.tile(t, 200), pa, oo, "SNIa").reshape(200, -1)
    with np.errstate(divide="ignore"):
        ma = -2.5 * np.log10(fa / fa.max(axis=1, keepdims=True))
    assert np.median(ma[:, np.searchsorted(t, 60)]) > np.median(at50) + 0.5
