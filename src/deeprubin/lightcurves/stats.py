"""Light-curve statistics: what a light curve *looks like*, measured the same way on real and simulated data.

One cohesive thing: a library of independent, per-object measurements with shared conventions (below); its size
is its number of statistics, not a mix of jobs.

Every function takes a detections table in the contract (columns ``oid``, ``mjd``, ``band``, ``mag``, ``mag_err``;
see :mod:`deeprubin.schema`) and returns one row per object (a DataFrame indexed by ``oid``), or a long table where
that is the natural shape. Objects with too few points get NaN, never an exception. Functions are band-agnostic:
per-band columns are named ``<quantity>_<band>`` (``peak_mag_g``, ``rise_r``, ``amp_I``).

Transient definitions follow PRIORS.md §6 exactly ("Detections only; gaps between distinct nights. Rise: first
detection → brightest point in band; decline: slope over the next 30 d; g−r: same-night pair nearest the r peak
(±4 d)"), made precise here so that the §6 table is reproduced on the BTS data:

- **night**: ``floor(mjd)``. For ZTF at Palomar the UTC day boundary falls in the local afternoon, so one night is one
  integer MJD. Gaps are the differences between consecutive *distinct* nights with a detection in the band
  (same-night repeats are not gaps); gap statistics pool every gap of every object (:func:`night_gaps`).
- **peak**: the brightest detection (smallest mag) in the band. Rise and decline need at least ``MIN_POINTS_BAND``
  (5) detections in the band (with this cut the BTS numbers of §6 are reproduced to the quoted digits; without
  it the SNIa r rise is 13.1 d, not 13.9 d); the peak magnitude and the g−r colour use every object.
- **rise**: time of the band's peak minus the time of the object's first detection in *any* band.
- **decline**: slope (mag/d, positive = fading) of a least-squares line through the band's detections in
  ``[t_peak, t_peak + 30 d]`` (peak included); at least ``MIN_POINTS_DECLINE`` (3) points.
- **g−r at peak**: per night with both g and r detections, mean g minus mean r; the night whose mean r time is
  nearest the r peak, within ±4 d.

Variable-star and quasar statistics: rms per band, the structure function (ensemble and per object) with a damped
random walk fit, the Lomb–Scargle period, and a Fourier decomposition at that period (amplitude, R21, φ21 in the
sine convention of PRIORS §3: m(t) = A0 + Σ A_k sin(k ω t + φ_k), φ21 = φ2 − 2 φ1 mod 2π).

Summaries: :func:`summarise` formats "median [p10, p90]"; :func:`quantiles` returns the numbers.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

# --- definitions (PRIORS §6) -------------------------------------------------------------------------------------
MIN_POINTS_BAND = 5  # detections a band needs for peak, rise and decline
DECLINE_WINDOW_D = 30.0  # decline: fit over [t_peak, t_peak + 30 d]
MIN_POINTS_DECLINE = 3  # points the decline fit needs
COLOUR_WINDOW_D = 4.0  # g−r: same-night pair within ±4 d of the r peak
# --- variables ---------------------------------------------------------------------------------------------------
SF_BINS_D = np.geomspace(1.0, 3000.0, 22)  # default log-spaced lag bin edges (days) of the structure function
MIN_PAIRS_BIN = 10  # bins with fewer pairs are NaN
MIN_POINTS_PERIODIC = 12  # points a band needs for a period or a Fourier fit
DEFAULT_HARMONICS = 4

_REQUIRED = ("oid", "mjd", "band", "mag")


def _check(det: pd.DataFrame, cols: Iterable[str] = _REQUIRED) -> None:
    missing = [c for c in cols if c not in det.columns]
    if missing:
        raise KeyError(f"detections table lacks column(s) {missing}; has {list(det.columns)}")


def _finite(det: pd.DataFrame, mag_col: str = "mag") -> pd.DataFrame:
    """Rows with a finite time and magnitude, sorted by object and time (a stable sort; input order breaks ties)."""
    keep = np.isfinite(det["mjd"].to_numpy(dtype=float)) & np.isfinite(det[mag_col].to_numpy(dtype=float))
    return det.loc[keep].sort_values(["oid", "mjd"], kind="mergesort")


def _oids(det: pd.DataFrame) -> pd.Index:
    return pd.Index(pd.unique(det["oid"]), name="oid").sort_values()


def _wide(series: pd.Series, prefix: str, bands: Sequence[str], index: pd.Index) -> pd.DataFrame:
    """(oid, band)-indexed series -> one column per band, ``prefix_band``, reindexed to every object."""
    out = pd.DataFrame(index=index)
    for band in bands:
        try:
            values = series.xs(band, level="band")
        except KeyError:
            values = pd.Series(dtype=float)
        out[f"{prefix}_{band}"] = values.reindex(index).astype(float)
    return out


def _bands_of(det: pd.DataFrame, bands: Sequence[str] | None) -> list[str]:
    if bands is not None:
        return list(bands)
    return sorted(pd.unique(det["band"].astype(str)))


def nights(mjd: np.ndarray | pd.Series) -> np.ndarray:
    """The night of each time: ``floor(mjd)`` (one integer per ZTF night at Palomar)."""
    return np.floor(np.asarray(mjd, dtype=float))


def apparent_magnitudes(det: pd.DataFrame) -> pd.DataFrame:
    """A copy whose ``mag``/``mag_err`` are the apparent magnitude ``mag_corr``/``mag_corr_err`` where finite.

    Alert magnitudes are difference magnitudes; for variable stars and quasars their apparent brightness and
    amplitude are only in ``mag_corr`` (ALeRCE ``magpsf_corr``). Rows without ``mag_corr`` keep ``mag``; a column
    ``mag_is_apparent`` says which rows were replaced.
    """
    out = det.copy()
    if "mag_corr" not in out.columns:
        out["mag_is_apparent"] = False
        return out
    corr = out["mag_corr"].to_numpy(dtype=float)
    use = np.isfinite(corr)
    out["mag"] = np.where(use, corr, out["mag"].to_numpy(dtype=float))
    if "mag_corr_err" in out.columns and "mag_err" in out.columns:
        corr_err = out["mag_corr_err"].to_numpy(dtype=float)
        out["mag_err"] = np.where(use & np.isfinite(corr_err), corr_err, out["mag_err"].to_numpy(dtype=float))
    out["mag_is_apparent"] = use
    return out


# ================================================================================================================
# Cadence
# ================================================================================================================

def n_detections(det: pd.DataFrame) -> pd.Series:
    """Detections per object (all bands)."""
    _check(det, ("oid",))
    return det.groupby("oid").size().rename("n_det")


def time_span(det: pd.DataFrame) -> pd.Series:
    """Last minus first detection time per object (days)."""
    _check(det, ("oid", "mjd"))
    grouped = det.groupby("oid")["mjd"]
    return (grouped.max() - grouped.min()).rename("span")


def night_gaps(det: pd.DataFrame) -> pd.DataFrame:
    """Every gap between consecutive distinct nights with a detection, per object and band (long: oid, band, gap)."""
    _check(det, ("oid", "mjd", "band"))
    frame = pd.DataFrame({"oid": det["oid"].to_numpy(), "band": det["band"].astype(str).to_numpy(),
                          "night": nights(det["mjd"])})
    frame = frame.dropna().drop_duplicates().sort_values(["oid", "band", "night"], kind="mergesort")
    frame["gap"] = frame.groupby(["oid", "band"], sort=False)["night"].diff()
    return frame.dropna(subset=["gap"])[["oid", "band", "gap"]].reset_index(drop=True)


def median_gaps(det: pd.DataFrame, bands: Sequence[str] | None = ("g", "r")) -> pd.DataFrame:
    """Per object, the median gap between distinct detection nights in each band (``gap_<band>``; NaN if < 2 nights)."""
    bands = _bands_of(det, bands)
    gaps = night_gaps(det)
    return _wide(gaps.groupby(["oid", "band"])["gap"].median(), "gap", bands, _oids(det))


# ================================================================================================================
# Transients (PRIORS §6)
# ================================================================================================================

def peaks(det: pd.DataFrame, bands: Sequence[str] | None = ("g", "r"),
          min_points_rise: int = MIN_POINTS_BAND) -> pd.DataFrame:
    """Per object and band: ``peak_mag_<b>``, ``peak_mjd_<b>`` (the brightest detection), ``n_<b>`` and ``rise_<b>``.

    The peak is defined for any band with a detection; the rise (peak time minus the object's first detection in
    any band) only for bands with at least ``min_points_rise`` detections (NaN otherwise).
    """
    _check(det)
    bands = _bands_of(det, bands)
    index = _oids(det)
    d = _finite(det)
    first = d.groupby("oid")["mjd"].min()
    d = d[d["band"].isin(bands)]
    counts = d.groupby(["oid", "band"]).size()
    at_peak = d.loc[d.groupby(["oid", "band"])["mag"].idxmin()].set_index(["oid", "band"])
    n = counts.reindex(at_peak.index)
    rise = at_peak["mjd"] - first.reindex(at_peak.index.get_level_values("oid")).to_numpy()
    rise = rise.where(n.to_numpy() >= min_points_rise)
    out = pd.concat([_wide(at_peak["mag"], "peak_mag", bands, index), _wide(at_peak["mjd"], "peak_mjd", bands, index),
                     _wide(rise, "rise", bands, index), _wide(counts.astype(float), "n", bands, index)], axis=1)
    for b in bands:
        out[f"n_{b}"] = out[f"n_{b}"].fillna(0).astype(int)
    return out


def decline_rates(det: pd.DataFrame, bands: Sequence[str] | None = ("g", "r"), window: float = DECLINE_WINDOW_D,
                  min_points: int = MIN_POINTS_DECLINE, min_points_band: int = MIN_POINTS_BAND) -> pd.DataFrame:
    """Per object and band, ``decline_<b>``: the least-squares slope (mag/d) over ``[t_peak, t_peak + window]``.

    Needs ``min_points_band`` detections in the band and ``min_points`` in the window (NaN otherwise).
    Vectorised: the slope of each (object, band) group comes from grouped sums of t, m, t², t·m (times relative to
    the peak, so the sums stay well conditioned).
    """
    bands = _bands_of(det, bands)
    index = _oids(det)
    pk = peaks(det, bands)
    d = _finite(det)
    d = d[d["band"].isin(bands)]
    tp = pd.concat([pk[f"peak_mjd_{b}"].where(pk[f"n_{b}"] >= min_points_band).rename(b) for b in bands],
                   axis=1).stack().rename("tp")
    tp.index = tp.index.set_names(["oid", "band"])
    d = d.join(tp, on=["oid", "band"], how="inner")
    t = d["mjd"].to_numpy(dtype=float) - d["tp"].to_numpy(dtype=float)
    sel = (t >= 0) & (t <= window)
    w = pd.DataFrame({"oid": d["oid"].to_numpy()[sel], "band": d["band"].to_numpy()[sel], "t": t[sel],
                      "m": d["mag"].to_numpy(dtype=float)[sel]})
    w["tt"], w["tm"] = w["t"] ** 2, w["t"] * w["m"]
    s = w.groupby(["oid", "band"]).agg(n=("t", "size"), st=("t", "sum"), sm=("m", "sum"), stt=("tt", "sum"),
                                       stm=("tm", "sum"))
    denom = s["n"] * s["stt"] - s["st"] ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (s["n"] * s["stm"] - s["st"] * s["sm"]) / denom
    ok = (s["n"] >= min_points) & (denom > 1e-9 * s["n"] ** 2)
    return _wide(slope.where(ok), "decline", bands, index)


def colour_at_peak(det: pd.DataFrame, window: float = COLOUR_WINDOW_D, blue: str = "g",
                   red: str = "r") -> pd.Series:
    """Per object, ``blue − red`` (g−r) at the red peak: ``<blue>_<red>_peak`` (``gr_peak`` for g, r).

    Nights with detections in both bands give a pair (the mean magnitude of each band that night); the pair whose
    mean red time is nearest the red peak (:func:`peaks`), within ±``window`` days, is taken. NaN when none.
    """
    _check(det)
    index = _oids(det)
    name = f"{blue}{red}_peak"
    tp = peaks(det, (red,))[f"peak_mjd_{red}"].dropna()
    d = _finite(det)
    d = d[d["band"].isin((blue, red))].assign(night=nights(d.loc[d["band"].isin((blue, red)), "mjd"]))
    per_night = d.groupby(["oid", "night", "band"]).agg(m=("mag", "mean"), t=("mjd", "mean")).reset_index()
    b = per_night[per_night["band"] == blue][["oid", "night", "m"]]
    r = per_night[per_night["band"] == red][["oid", "night", "m", "t"]]
    pairs = b.merge(r, on=["oid", "night"], suffixes=("_b", "_r"))
    pairs = pairs[pairs["oid"].isin(tp.index)]
    if pairs.empty:
        return pd.Series(np.nan, index=index, name=name)
    pairs["dist"] = np.abs(pairs["t"].to_numpy() - tp.reindex(pairs["oid"]).to_numpy())
    pairs = pairs[pairs["dist"] <= window]
    best = pairs.sort_values(["oid", "dist"], kind="mergesort").drop_duplicates("oid", keep="first")
    colour = pd.Series(best["m_b"].to_numpy() - best["m_r"].to_numpy(), index=best["oid"].to_numpy())
    return colour.reindex(index).rename(name)


def transient_stats(det: pd.DataFrame, bands: Sequence[str] = ("g", "r")) -> pd.DataFrame:
    """All PRIORS §6 quantities per object: n_det, span, gap_<b>, peak_mag_<b>, rise_<b>, decline_<b>, gr_peak.

    Gap columns are per-object medians; the pooled gap distribution of §6 is :func:`night_gaps`.
    """
    _check(det)
    index = _oids(det)
    pk = peaks(det, bands)
    out = pd.concat([n_detections(det).reindex(index), time_span(det).reindex(index), median_gaps(det, bands),
                     pk[[c for c in pk.columns if c.startswith(("peak_mag", "rise"))]], decline_rates(det, bands),
                     colour_at_peak(det, blue=bands[0], red=bands[1]) if len(bands) == 2 else None], axis=1)
    return out


# ================================================================================================================
# Variability: rms, structure function, damped random walk
# ================================================================================================================

def rms(det: pd.DataFrame, bands: Sequence[str] | None = None, min_points: int = 3,
        mag_col: str = "mag") -> pd.DataFrame:
    """Per object and band, ``rms_<b>``: the standard deviation (ddof 1) of the magnitudes; NaN under ``min_points``."""
    bands = _bands_of(det, bands)
    d = _finite(det, mag_col)
    g = d.groupby(["oid", "band"])[mag_col]
    return _wide(g.std(ddof=1).where(g.size() >= min_points), "rms", bands, _oids(det))


def _pairs(t: np.ndarray, m: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    i, j = np.triu_indices(len(t), k=1)
    return np.abs(t[j] - t[i]), m[j] - m[i], e[i] ** 2 + e[j] ** 2


def _sf_from_pairs(lag: np.ndarray, dm: np.ndarray, var: np.ndarray, bins: np.ndarray,
                   min_pairs: int) -> pd.DataFrame:
    k = np.digitize(lag, bins) - 1
    nb = len(bins) - 1
    ok = (k >= 0) & (k < nb)
    k, lag, dm, var = k[ok], lag[ok], dm[ok], var[ok]
    n = np.bincount(k, minlength=nb)
    with np.errstate(divide="ignore", invalid="ignore"):
        msq = np.bincount(k, weights=dm ** 2, minlength=nb) / n
        noise = np.bincount(k, weights=var, minlength=nb) / n
        mlag = np.bincount(k, weights=np.log(lag), minlength=nb) / n
    good = n >= min_pairs
    return pd.DataFrame({
        "lag_lo": bins[:-1], "lag_hi": bins[1:],
        "lag": np.where(good, np.exp(mlag), np.sqrt(bins[:-1] * bins[1:])),
        "n_pairs": n,
        "sf": np.where(good, np.sqrt(msq), np.nan),  # rms of the pair differences, noise included
        "sf_corr": np.where(good, np.sqrt(np.clip(msq - noise, 0.0, None)), np.nan),  # minus the quoted errors
        "noise": np.where(good, np.sqrt(noise), np.nan),
    })


def _iter_curves(det: pd.DataFrame, band: str | None, mag_col: str, err_col: str | None):
    d = _finite(det, mag_col)
    if band is not None:
        d = d[d["band"] == band]
    t_all = d["mjd"].to_numpy(dtype=float)
    m_all = d[mag_col].to_numpy(dtype=float)
    e_all = (d[err_col].to_numpy(dtype=float) if err_col and err_col in d.columns else np.zeros(len(d)))
    e_all = np.where(np.isfinite(e_all), e_all, 0.0)
    oids = d["oid"].to_numpy()
    if len(d) == 0:
        return
    starts = np.flatnonzero(np.r_[True, oids[1:] != oids[:-1]])
    ends = np.r_[starts[1:], len(d)]
    for s, e in zip(starts, ends):
        yield oids[s], t_all[s:e], m_all[s:e], e_all[s:e]


def structure_function(det: pd.DataFrame, band: str | None = None, bins: np.ndarray = SF_BINS_D,
                       per_object: bool = False, mag_col: str = "mag", err_col: str | None = "mag_err",
                       min_pairs: int = MIN_PAIRS_BIN) -> pd.DataFrame:
    """The structure function SF(Δt) in lag bins (days), from all pairs of detections of one object in one band.

    Per bin: ``sf`` = sqrt(<Δm²>) (the rms pair difference, photometric noise included), ``sf_corr`` =
    sqrt(<Δm²> − <σ_i² + σ_j²>) (noise removed with the quoted errors, clipped at 0), ``noise`` = sqrt(<σ_i²+σ_j²>),
    ``lag`` (geometric mean lag of the pairs) and ``n_pairs``. The ensemble SF (default) pools the pairs of every
    object; ``per_object=True`` returns one SF per object (an ``oid`` column). ``band=None`` uses every band (only
    for single-band data). Bins with fewer than ``min_pairs`` pairs are NaN.
    """
    _check(det)
    bins = np.asarray(bins, dtype=float)
    frames, lags, dms, vars_ = [], [], [], []
    for oid, t, m, e in _iter_curves(det, band, mag_col, err_col):
        if len(t) < 2:
            continue
        lag, dm, var = _pairs(t, m, e)
        if per_object:
            frames.append(_sf_from_pairs(lag, dm, var, bins, min_pairs).assign(oid=oid))
        else:
            lags.append(lag), dms.append(dm), vars_.append(var)
    if per_object:
        if not frames:
            return _sf_from_pairs(np.empty(0), np.empty(0), np.empty(0), bins, min_pairs).assign(oid=pd.Series(
                dtype=object)).iloc[0:0]
        return pd.concat(frames, ignore_index=True)
    if not lags:
        return _sf_from_pairs(np.empty(0), np.empty(0), np.empty(0), bins, min_pairs)
    return _sf_from_pairs(np.concatenate(lags), np.concatenate(dms), np.concatenate(vars_), bins, min_pairs)


def drw_sf(lag: np.ndarray, sf_inf: float, tau: float, noise: float = 0.0) -> np.ndarray:
    """Damped-random-walk SF with a noise term: sqrt(SF∞² (1 − e^(−Δt/τ)) + noise²) (MacLeod+ 2010)."""
    lag = np.asarray(lag, dtype=float)
    return np.sqrt(sf_inf ** 2 * (1.0 - np.exp(-lag / tau)) + noise ** 2)


def fit_drw(sf_table: pd.DataFrame, tau_bounds: tuple[float, float] = (1.0, 1.0e4),
            column: str = "sf") -> dict[str, float]:
    """Fit ``sf = sqrt(SF∞² (1 − e^(−Δt/τ)) + noise²)`` to a binned SF (from :func:`structure_function`).

    Least squares on SF² with weights from the pair counts (Var(<Δm²>) ≈ 2 SF⁴ / n_pairs). Returns
    ``sf_inf``, ``tau`` (days, observed frame), ``noise`` (the SF floor at zero lag, ≈ √2 σ_phot) and
    ``n_bins``; NaN when fewer than 4 usable bins or the fit fails. τ near the bounds means "not constrained".
    """
    from scipy.optimize import least_squares

    nan = {"sf_inf": math.nan, "tau": math.nan, "noise": math.nan, "n_bins": 0}
    ok = np.isfinite(sf_table[column].to_numpy(dtype=float)) & (sf_table["n_pairs"].to_numpy() > 0)
    lag = sf_table["lag"].to_numpy(dtype=float)[ok]
    sf2 = sf_table[column].to_numpy(dtype=float)[ok] ** 2
    n = sf_table["n_pairs"].to_numpy(dtype=float)[ok]
    nan["n_bins"] = int(ok.sum())
    if ok.sum() < 4 or not np.any(sf2 > 0):
        return nan
    sigma = np.maximum(sf2, 1e-8) * np.sqrt(2.0 / np.maximum(n, 1.0))
    # Parameters in log space: log SF∞, log τ, log noise.
    lo = [math.log(1e-4), math.log(tau_bounds[0]), math.log(1e-5)]
    hi = [math.log(10.0), math.log(tau_bounds[1]), math.log(5.0)]

    def resid(p):
        s, tau, nz = np.exp(p)
        return (s ** 2 * (1 - np.exp(-lag / tau)) + nz ** 2 - sf2) / sigma

    s0 = math.sqrt(max(sf2.max(), 1e-6))
    nz0 = math.sqrt(max(sf2.min(), 1e-8)) * 0.5
    best = None
    for tau0 in (30.0, 300.0, 3000.0):
        x0 = np.clip([math.log(s0), math.log(tau0), math.log(nz0)], np.array(lo) + 1e-6, np.array(hi) - 1e-6)
        try:
            res = least_squares(resid, x0, bounds=(lo, hi), method="trf")
        except (ValueError, RuntimeError):
            continue
        if best is None or res.cost < best.cost:
            best = res
    if best is None or not best.success:
        return nan
    s, tau, nz = np.exp(best.x)
    return {"sf_inf": float(s), "tau": float(tau), "noise": float(nz), "n_bins": int(ok.sum())}


def drw_likelihood_fit(t: np.ndarray, m: np.ndarray, dm: np.ndarray | None = None,
                       tau_bounds: tuple[float, float] = (1.0, 1.0e4)) -> dict[str, float]:
    """Maximum-likelihood damped random walk of one light curve (a celerite2 exponential-kernel Gaussian process).

    Model: m(t) = mean + DRW with covariance σ² exp(−|Δt|/τ), plus the quoted errors ``dm`` on the diagonal.
    Returns ``sf_inf`` = √2 σ (the asymptotic SF), ``tau`` (days, observed frame) and ``sigma``; NaN when fewer than
    10 points or the fit fails. τ is ill-constrained when it is not well below the baseline (Kozłowski 2017).
    """
    import celerite2
    from celerite2 import terms
    from scipy.optimize import minimize

    nan = {"sf_inf": math.nan, "tau": math.nan, "sigma": math.nan}
    t, m = np.asarray(t, float), np.asarray(m, float)
    dm = np.zeros_like(m) if dm is None else np.asarray(dm, float)
    ok = np.isfinite(t) & np.isfinite(m) & np.isfinite(dm)
    t, m, dm = t[ok], m[ok], dm[ok]
    if len(t) < 10 or np.ptp(m) == 0:
        return nan
    order = np.argsort(t, kind="mergesort")
    t, m, dm = t[order], m[order], dm[order]
    keep = np.r_[True, np.diff(t) > 0]  # celerite needs strictly increasing times
    t, m, dm = t[keep], m[keep], dm[keep]
    var_err = np.maximum(dm ** 2, 1e-10)
    y = m - np.average(m, weights=1.0 / var_err)
    lo_tau, hi_tau = math.log(tau_bounds[0]), math.log(tau_bounds[1])

    def nll(p):
        log_s, log_tau = p
        gp = celerite2.GaussianProcess(terms.RealTerm(a=math.exp(2 * log_s), c=math.exp(-log_tau)), mean=0.0)
        try:
            gp.compute(t, diag=var_err, quiet=True)
            value = -gp.log_likelihood(y)
        except Exception:  # noqa: BLE001 - a failed factorisation is just a bad point
            return 1e25
        return value if np.isfinite(value) else 1e25

    s0 = max(float(np.std(y)), 1e-3)
    best = None
    for tau0 in (30.0, 1000.0):  # two starts: short and long τ (the likelihood can have two basins)
        x0 = [math.log(s0), min(max(math.log(tau0), lo_tau), hi_tau)]
        res = minimize(nll, x0, method="L-BFGS-B", bounds=[(math.log(1e-4), math.log(10.0)), (lo_tau, hi_tau)])
        if best is None or res.fun < best.fun:
            best = res
    if best is None or best.fun >= 1e24:
        return nan
    sigma, tau = math.exp(best.x[0]), math.exp(best.x[1])
    return {"sf_inf": math.sqrt(2.0) * sigma, "tau": tau, "sigma": sigma}


def drw_fits(det: pd.DataFrame, band: str | None = None, method: str = "likelihood", bins: np.ndarray = SF_BINS_D,
             mag_col: str = "mag", err_col: str | None = "mag_err", min_points: int = 10) -> pd.DataFrame:
    """Per object, a damped random walk fit in ``band``: columns ``sf_inf``, ``tau`` (days) and more.

    ``method="likelihood"`` (default): :func:`drw_likelihood_fit` (a Gaussian-process likelihood; the standard
    per-object estimator). ``method="sf"``: :func:`fit_drw` to the object's own binned SF (noisy for single objects;
    meant for ensembles). Objects with fewer than ``min_points`` points in the band are NaN.
    """
    if method not in ("likelihood", "sf"):
        raise ValueError(f"method must be 'likelihood' or 'sf', not {method!r}")
    keys = ["sf_inf", "tau", "sigma"] if method == "likelihood" else ["sf_inf", "tau", "noise", "n_bins"]
    rows = {}
    for oid, t, m, e in _iter_curves(det, band, mag_col, err_col):
        if len(t) < min_points:
            rows[oid] = {k: math.nan for k in keys}
        elif method == "likelihood":
            rows[oid] = drw_likelihood_fit(t, m, e)
        else:
            lag, dm, var = _pairs(t, m, e)
            rows[oid] = fit_drw(_sf_from_pairs(lag, dm, var, np.asarray(bins, float), MIN_PAIRS_BIN))
    out = pd.DataFrame.from_dict(rows, orient="index", columns=keys) if rows else pd.DataFrame(columns=keys)
    out.index.name = "oid"
    return out.reindex(_oids(det)).astype(float)


# ================================================================================================================
# Periodic variables: Lomb–Scargle period, Fourier decomposition
# ================================================================================================================

def ls_period(t: np.ndarray, m: np.ndarray, dm: np.ndarray | None = None, min_period: float = 0.2,
              max_period: float = 200.0, samples_per_peak: int = 3, n_candidates: int = 5) -> tuple[float, float]:
    """Lomb–Scargle (astropy, one sinusoid) best period (days) and its normalised power; (NaN, NaN) if too few points.

    The longest period searched is capped at half the time span (a period must repeat to be measured). Two stages,
    for speed: a coarse grid (``samples_per_peak``, astropy's fast method), then a fine grid around each of the
    ``n_candidates`` highest coarse peaks, evaluated exactly; the best fine peak wins.
    """
    from astropy.timeseries import LombScargle

    t, m = np.asarray(t, float), np.asarray(m, float)
    ok = np.isfinite(t) & np.isfinite(m)
    if dm is not None:
        dm = np.asarray(dm, float)
        ok &= np.isfinite(dm) & (dm > 0)
    t, m = t[ok], m[ok]
    dm = dm[ok] if dm is not None else None
    if len(t) < MIN_POINTS_PERIODIC or np.ptp(m) == 0:
        return math.nan, math.nan
    span = float(np.ptp(t))
    max_period = min(max_period, span / 2.0)
    if max_period <= min_period:
        return math.nan, math.nan
    ls = LombScargle(t, m, dm)
    fmin, fmax = 1.0 / max_period, 1.0 / min_period
    freq, power = ls.autopower(minimum_frequency=fmin, maximum_frequency=fmax, samples_per_peak=samples_per_peak,
                               method="fast")
    power = np.where(np.isfinite(power), power, -np.inf)
    if len(power) < 3 or not np.isfinite(power).any():
        return math.nan, math.nan
    df = freq[1] - freq[0]
    is_peak = np.r_[power[0] > power[1], (power[1:-1] >= power[:-2]) & (power[1:-1] >= power[2:]),
                    power[-1] > power[-2]]
    cand = np.flatnonzero(is_peak)
    cand = cand[np.argsort(power[cand])[::-1][:n_candidates]]
    fine = np.concatenate([np.linspace(freq[k] - df, freq[k] + df, 41) for k in cand])
    fine = fine[(fine >= fmin) & (fine <= fmax)]
    pfine = ls.power(fine, method="cython")
    j = int(np.nanargmax(pfine))
    return float(1.0 / fine[j]), float(pfine[j])


MAX_PHASE_GAP = 0.3  # Fourier fits whose largest gap in phase exceeds this fraction of a cycle are not trusted


def _design(phase: np.ndarray, nh: int) -> np.ndarray:
    cols = [np.ones_like(phase)]
    for k in range(1, nh + 1):
        cols += [np.sin(k * phase), np.cos(k * phase)]
    return np.column_stack(cols)


def max_phase_gap(t: np.ndarray, period: float) -> float:
    """The largest gap between consecutive phases of times ``t`` at ``period`` (fraction of a cycle, wrapping)."""
    t = np.asarray(t, float)
    t = t[np.isfinite(t)]
    if len(t) < 2 or not (np.isfinite(period) and period > 0):
        return math.nan
    ph = np.sort(np.mod(t / period, 1.0))
    return float(max(np.max(np.diff(ph)), ph[0] + 1.0 - ph[-1]))


def fourier_fit(t: np.ndarray, m: np.ndarray, period: float, n_harmonics: int = DEFAULT_HARMONICS,
                dm: np.ndarray | None = None, max_gap: float = MAX_PHASE_GAP) -> dict[str, float]:
    """Fourier decomposition at ``period``: m(t) = A0 + Σ_k A_k sin(2π k t / P + φ_k) (sine convention).

    Returns ``A1``, ``A2``, ``R21`` = A2/A1, ``phi21`` = φ2 − 2φ1 mod 2π (independent of the time origin),
    ``amp`` = peak-to-peak amplitude of the fitted curve, ``mean`` = A0, ``n_harmonics`` and ``phase_gap`` (largest
    gap in phase, :func:`max_phase_gap`). The number of harmonics is chosen by BIC between 2 and ``n_harmonics``
    (at most one per 6 points), so that sparse curves are not over-fitted. NaN when there are fewer than
    MIN_POINTS_PERIODIC points, or when the phase gap exceeds ``max_gap`` (a fit across a gap in phase can swing
    freely and its amplitude means nothing).
    """
    nan = {"A1": math.nan, "A2": math.nan, "R21": math.nan, "phi21": math.nan, "amp": math.nan,
           "mean": math.nan, "n_harmonics": 0, "phase_gap": math.nan}
    t, m = np.asarray(t, float), np.asarray(m, float)
    ok = np.isfinite(t) & np.isfinite(m)
    w = None
    if dm is not None:
        dm = np.asarray(dm, float)
        ok &= np.isfinite(dm) & (dm > 0)
    t, m = t[ok], m[ok]
    if dm is not None:
        w = 1.0 / dm[ok]
    if not (np.isfinite(period) and period > 0) or len(t) < MIN_POINTS_PERIODIC:
        return nan
    gap = max_phase_gap(t, period)
    nan["phase_gap"] = gap
    if gap > max_gap:
        return nan
    nh_max = int(max(2, min(n_harmonics, (len(t) - 1) // 6)))
    phase = 2 * np.pi * ((t - t.min()) / period)
    best = None
    for nh in range(2, nh_max + 1):
        X = _design(phase, nh)
        Xw, mw = (X * w[:, None], m * w) if w is not None else (X, m)
        coef, *_ = np.linalg.lstsq(Xw, mw, rcond=None)
        rss = float(np.sum((mw - Xw @ coef) ** 2))
        bic = len(t) * math.log(max(rss, 1e-300) / len(t)) + (2 * nh + 1) * math.log(len(t))
        if best is None or bic < best[0]:
            best = (bic, nh, coef)
    _, nh, coef = best
    a = coef[1::2]  # sin coefficients = A_k cos φ_k
    b = coef[2::2]  # cos coefficients = A_k sin φ_k
    amps = np.hypot(a, b)
    phis = np.arctan2(b, a)
    grid = 2 * np.pi * np.linspace(0, 1, 400, endpoint=False)
    model = sum(a[k - 1] * np.sin(k * grid) + b[k - 1] * np.cos(k * grid) for k in range(1, nh + 1))
    r21 = amps[1] / amps[0] if amps[0] > 0 else math.nan
    return {"A1": float(amps[0]), "A2": float(amps[1]), "R21": float(r21),
            "phi21": float(np.mod(phis[1] - 2 * phis[0], 2 * np.pi)), "amp": float(np.ptp(model)),
            "mean": float(coef[0]), "n_harmonics": nh, "phase_gap": gap}


def periodic_stats(det: pd.DataFrame, bands: Sequence[str] | None = None, mag_col: str = "mag",
                   err_col: str | None = "mag_err", min_period: float = 0.2, max_period: float = 200.0,
                   period_band: str | None = None, n_harmonics: int = DEFAULT_HARMONICS) -> pd.DataFrame:
    """Per object: Lomb–Scargle ``period`` (from ``period_band``, or the band with the most points: ``period_band``
    column), its ``ls_power``, and per band at that one period ``amp_<b>`` (peak-to-peak of the Fourier fit),
    ``A1_<b>``, ``R21_<b>``, ``phi21_<b>``, ``rms_<b>``; ``amp_ratio`` = amp of the second band / the first (A_r/A_g
    for bands ("g", "r")) when exactly two bands are given.
    """
    _check(det)
    bands = _bands_of(det, bands)
    d = _finite(det, mag_col)
    d = d[d["band"].isin(bands)]
    rows = {}
    for oid, g in d.groupby("oid", sort=True):
        row: dict[str, float | str] = {}
        per_band = {b: g[g["band"] == b] for b in bands}
        counts = {b: len(x) for b, x in per_band.items()}
        pb = period_band if period_band is not None else max(bands, key=lambda b: counts[b])
        x = per_band.get(pb, g.iloc[0:0])
        err = x[err_col].to_numpy(float) if err_col and err_col in x.columns else None
        period, power = ls_period(x["mjd"].to_numpy(float), x[mag_col].to_numpy(float), err, min_period, max_period)
        row.update(period=period, ls_power=power, period_band=pb)
        for b in bands:
            xb = per_band[b]
            eb = xb[err_col].to_numpy(float) if err_col and err_col in xb.columns else None
            f = fourier_fit(xb["mjd"].to_numpy(float), xb[mag_col].to_numpy(float), period, n_harmonics, eb)
            row.update({f"amp_{b}": f["amp"], f"A1_{b}": f["A1"], f"R21_{b}": f["R21"], f"phi21_{b}": f["phi21"],
                        f"rms_{b}": float(xb[mag_col].std(ddof=1)) if len(xb) >= 3 else math.nan})
        if len(bands) == 2:
            a0, a1 = row[f"amp_{bands[0]}"], row[f"amp_{bands[1]}"]
            row["amp_ratio"] = a1 / a0 if (np.isfinite(a0) and a0 > 0) else math.nan
        rows[oid] = row
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "oid"
    return out.reindex(_oids(det))


# ================================================================================================================
# Summaries
# ================================================================================================================

def quantiles(values: Iterable[float] | pd.Series | np.ndarray, q: Sequence[float] = (0.1, 0.5, 0.9)) -> dict:
    """``{"median", "p10", "p90", "n"}`` of the finite values (NaN and n = 0 when there are none)."""
    arr = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").to_numpy(dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return {"median": math.nan, "p10": math.nan, "p90": math.nan, "n": 0}
    p10, med, p90 = np.quantile(arr, [q[0], q[1], q[2]])
    return {"median": float(med), "p10": float(p10), "p90": float(p90), "n": int(arr.size)}


def _fmt(x: float, digits: int | None) -> str:
    if not np.isfinite(x):
        return "nan"
    if digits is None:
        ax = abs(x)
        digits = 3 if ax < 0.1 else 2 if ax < 10 else 1 if ax < 1000 else 0
    return f"{x:.{digits}f}".replace("-", "−")


def summarise(values: Iterable[float] | pd.Series | np.ndarray, digits: int | None = None) -> str:
    """"median [p10, p90]" of the finite values (PRIORS style; "n/a" when there are none).

    ``digits`` fixes the decimals; by default they follow the size (0.072, 13.9, 3.00 → "3.00").
    """
    s = quantiles(values)
    if s["n"] == 0:
        return "n/a"
    if digits is None:
        scale = max(abs(s["median"]), abs(s["p10"]), abs(s["p90"]))
        digits = 3 if scale < 0.5 else 2 if scale < 10 else 1 if scale < 1000 else 0
    return f"{_fmt(s['median'], digits)} [{_fmt(s['p10'], digits)}, {_fmt(s['p90'], digits)}]"


__all__ = [
    "MIN_POINTS_BAND", "DECLINE_WINDOW_D", "MIN_POINTS_DECLINE", "COLOUR_WINDOW_D", "SF_BINS_D",
    "nights", "apparent_magnitudes", "n_detections", "time_span", "night_gaps", "median_gaps", "peaks",
    "decline_rates", "colour_at_peak", "transient_stats", "rms", "structure_function", "drw_sf", "fit_drw",
    "drw_likelihood_fit", "drw_fits", "ls_period", "max_phase_gap", "fourier_fit", "periodic_stats", "quantiles",
    "summarise",
]
