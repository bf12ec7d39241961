"""A feature-based baseline: a balanced random forest on light-curve features, in the style of ALeRCE's
light-curve classifier (Sánchez-Sáez et al. 2021, AJ 161, 141).

What it does, and why:

- **Features per band** (``<feature>_g``, ``<feature>_r``), computed by :func:`extract_features` from the detections
  of the contract:

  * *variability statistics on magnitudes* (ALeRCE computes its features on ``magpsf``): amplitude, standard
    deviation, skew, kurtosis, beyond-1σ fraction, median absolute deviation, median-buffer-range percentage,
    percent amplitude, inter-quartile range, Eta_e, Stetson K, maximum slope, weighted linear fit and linear trend,
    reduced χ², excess variance, Anderson–Darling normality, Cusum, duration, maximum time gap, weighted mean and the
    Lomb–Scargle best period and its significance. All come from the Rust ``light-curve`` package, in *one*
    :class:`light_curve.Extractor` call per band over all objects (``Extractor.many``), which is what makes
    thousands of objects take seconds;
  * *a parametric supernova fit on difference flux* (ALeRCE's SPM plays this role): the Bazin function fitted by
    ``light-curve`` (MCMC, then LMSDER polishing: a robust start, deterministic, about 1 ms per curve). The
    amplitude enters as log10 (so that its g−r difference is a colour), the baseline relative to the amplitude, the
    reference time relative to the object's first detection, χ² as log10(1 + χ²). A fit that fails gives NaN.
    The Villar function (a plateau on top of Bazin's shape) was tried too: in 5-fold cross-validation on the BTS
    training objects it did not improve SN Ia vs SN II at any epoch and doubled the extraction time, so it is out;
  * *simple transient descriptors* defined from a single point up: number of detections, brightest, mean, first and
    last magnitude, days from the object's first detection to the band's peak, rise and decline rates
    (mag/day) from the first point to the peak and from the peak to the last point, a least-squares decline slope
    over the 30 days after the peak, and the fraction of positive difference fluxes (ALeRCE's ``positive_fraction``).
- **Colours**: g−r of the brightest points and of the mean magnitudes (ALeRCE's ``g-r_max``, ``g-r_mean``), g−r of
  the first and the last same-night pair (nearest g and r detections within :data:`PAIR_MAX_DT` days) and the rate
  at which it changes, and g−r differences of the Bazin rise and fall times and peak epochs.
- Nothing taken from labels or from catalogue data (redshift, host, BTS's peak magnitude) is used: only the
  photometry up to the truncation time.
- **Few points**: the statistics need :data:`MIN_POINTS_STATS` points in the band, the Bazin fit 6 (light-curve's
  minimum); below that they are NaN, never an exception. The simple descriptors exist from one
  point on, so early curves still carry a peak magnitude and a colour.
- **Missing values** (too few points, a band with no detection, a failed fit) are filled with ``-999`` before the
  forest, as ALeRCE does, and not with a median: *that* a band or a fit is missing is itself informative early in a
  light curve (an object seen only in r after 5 days), a sentinel far below every real value is isolated by one
  split, while a median would make a missing value look like a typical one.
- **Early curves**: the forest is trained on the full curves *plus* copies truncated ``truncations`` days after the
  first detection (only objects whose curve extends past the cut get a copy, so no row is duplicated), so that it
  classifies partial curves of the ages it will meet.
- **Balanced random forest** (``imblearn.ensemble.BalancedRandomForestClassifier``): each tree sees a bootstrap
  sample in which every class is undersampled to the size of the smallest, as in ALeRCE's classifier; the seed is
  fixed, so training is deterministic.
- Saved with joblib together with :data:`FEATURE_VERSION`; a file written by code computing other features is
  refused with :class:`FeatureVersionError` rather than silently fed different columns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import joblib
import light_curve as lc
import numpy as np
import pandas as pd
from imblearn.ensemble import BalancedRandomForestClassifier

from deeprubin.schema import BANDS, CLASSES, flux_to_mag, mag_to_flux
from deeprubin.lightcurves.window import truncate_after_first

log = logging.getLogger(__name__)

FEATURE_BANDS: tuple[str, ...] = BANDS
# Bump whenever the feature set, a feature's definition or its column name changes: saved models then refuse to load.
FEATURE_VERSION = 1
MIN_POINTS_STATS = 3  # light-curve statistics need this many points in the band (fewer: NaN)
PAIR_MAX_DT = 1.0  # days: a g and an r detection closer than this form a colour pair (same night)
DECLINE_WINDOW = 30.0  # days after the peak over which the decline slope is fitted
FILL_VALUE = -999.0  # what missing features become before the forest (ALeRCE's choice, see the module docstring)
_FORMAT = "deeprubin.models.forest.BaselineForest"
_FIT_ALGORITHM = "mcmc-lmsder"


class FeatureVersionError(ValueError):
    """A saved model was trained on features of another :data:`FEATURE_VERSION`."""


# --------------------------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------------------------


def _stats_extractor() -> lc.Extractor:
    return lc.Extractor(
        lc.Amplitude(), lc.StandardDeviation(), lc.Skew(), lc.Kurtosis(), lc.BeyondNStd(1.0),
        lc.MedianAbsoluteDeviation(), lc.MedianBufferRangePercentage(0.1), lc.PercentAmplitude(),
        lc.InterPercentileRange(0.25), lc.EtaE(), lc.StetsonK(), lc.MaximumSlope(), lc.LinearFit(), lc.LinearTrend(),
        lc.ReducedChi2(), lc.ExcessVariance(), lc.AndersonDarlingNormal(), lc.Cusum(), lc.Duration(),
        lc.MaximumTimeInterval(), lc.WeightedMean(), lc.Periodogram(peaks=1),
    )


def _fit_extractors() -> tuple[lc.BazinFit]:
    return (lc.BazinFit(_FIT_ALGORITHM),)


def _clean(detections: pd.DataFrame) -> pd.DataFrame:
    """oid, band, t, mag, mag_err, flux, flux_err of usable g/r rows, sorted by (oid, band, t), one row per time.

    A missing magnitude is derived from the flux (AB, zero point 23.9 µJy) and a missing flux from the magnitude
    (then positive), so both representations exist for every row kept. Rows with a non-finite value or a
    non-positive error are dropped; of rows at the same time in a band the first is kept.
    """
    d = detections
    n = len(d)

    def col(name: str) -> np.ndarray:
        if name in d.columns:
            return pd.to_numeric(d[name], errors="coerce").to_numpy(dtype=float)
        return np.full(n, np.nan)

    mag, mag_err, flux, flux_err = col("mag"), col("mag_err"), col("flux"), col("flux_err")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        fmag, fmag_err = flux_to_mag(flux, flux_err)
        mflux, mflux_err = mag_to_flux(mag, mag_err)
    use_fmag = ~np.isfinite(mag)
    mag, mag_err = np.where(use_fmag, fmag, mag), np.where(use_fmag, fmag_err, mag_err)
    use_mflux = ~np.isfinite(flux)
    flux = np.where(use_mflux, mflux, flux)
    flux_err = np.where(use_mflux, mflux_err, flux_err)
    out = pd.DataFrame({"oid": d["oid"].astype(str).to_numpy(), "band": d["band"].astype(str).to_numpy(),
                        "t": pd.to_numeric(d["mjd"], errors="coerce").to_numpy(dtype=float),
                        "mag": mag, "mag_err": mag_err, "flux": flux, "flux_err": flux_err})
    ok = out["band"].isin(FEATURE_BANDS).to_numpy().copy()
    for name in ("t", "mag", "mag_err", "flux", "flux_err"):
        ok &= np.isfinite(out[name].to_numpy())
    ok &= (out["mag_err"].to_numpy() > 0) & (out["flux_err"].to_numpy() > 0)
    out = out.loc[ok].sort_values(["oid", "band", "t"], kind="mergesort")
    return out.drop_duplicates(["oid", "band", "t"], keep="first").reset_index(drop=True)


def _is_extractor_failure(exc: BaseException) -> bool:
    # light-curve raises ValueError/RuntimeError, and a Rust panic surfaces as pyo3's PanicException, which derives
    # from BaseException (not Exception) and cannot be imported by name.
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _many(extractor, curves: list[tuple[np.ndarray, ...]], n_features: int, n_jobs: int) -> np.ndarray:
    """``extractor.many`` with NaN for failures; a curve that makes the Rust code fail costs only its own row."""
    if not curves:
        return np.empty((0, n_features))
    try:
        return np.asarray(extractor.many(curves, fill_value=np.nan, sorted=True, check=False, n_jobs=n_jobs),
                          dtype=float)
    except BaseException as exc:
        if not _is_extractor_failure(exc):
            raise
    rows = np.full((len(curves), n_features), np.nan)
    failed = 0
    for i, curve in enumerate(curves):  # the batch failed: curve by curve, NaN for the culprits
        try:
            rows[i] = extractor(*curve, fill_value=np.nan, sorted=True, check=False)
        except BaseException as exc:
            if not _is_extractor_failure(exc):
                raise
            failed += 1
    log.debug("%s: %d of %d curves failed, their features are NaN", type(extractor).__name__, failed, len(curves))
    return rows


def _band_features(band_rows: pd.DataFrame, first_t: pd.Series, band: str, n_jobs: int) -> pd.DataFrame:
    """Features of one band, one row per oid present in ``band_rows`` (sorted by oid, t)."""
    oid = band_rows["oid"].to_numpy()
    t = band_rows["t"].to_numpy() - first_t.reindex(oid).to_numpy()  # days since the object's first detection
    mag, mag_err = band_rows["mag"].to_numpy(), band_rows["mag_err"].to_numpy()
    flux, flux_err = band_rows["flux"].to_numpy(), band_rows["flux_err"].to_numpy()
    oids, starts, counts = np.unique(oid, return_index=True, return_counts=True)
    ends = starts + counts
    feats: dict[str, np.ndarray] = {"n_det": counts.astype(float)}

    # Simple descriptors (from one point on), vectorised over objects.
    peak = np.array([s + np.argmin(mag[s:e]) for s, e in zip(starts, ends, strict=True)], dtype=np.int64)
    first, last = starts, ends - 1
    feats["mag_peak"] = mag[peak]
    feats["mag_mean"] = np.add.reduceat(mag, starts) / counts
    feats["mag_first"], feats["mag_last"] = mag[first], mag[last]
    feats["t_peak"] = t[peak]
    feats["t_first"] = t[first]
    with np.errstate(divide="ignore", invalid="ignore"):
        dt_rise, dt_fall = t[peak] - t[first], t[last] - t[peak]
        feats["rise_rate"] = np.where(dt_rise > 0, (mag[first] - mag[peak]) / dt_rise, np.nan)
        feats["fall_rate"] = np.where(dt_fall > 0, (mag[last] - mag[peak]) / dt_fall, np.nan)
        feats["dt_after_peak"] = dt_fall
        feats["positive_fraction"] = np.add.reduceat((flux > 0).astype(float), starts) / counts
        # Least-squares decline slope over [t_peak, t_peak + DECLINE_WINDOW]: sums per object of the points inside.
        obj = np.repeat(np.arange(len(oids)), counts)
        dt = t - t[peak][obj]
        inside = (dt >= 0) & (dt <= DECLINE_WINDOW)
        w = inside.astype(float)
        dm = mag - mag[peak][obj]
        s_n, s_t, s_m = (np.bincount(obj, weights=w * v, minlength=len(oids)) for v in (np.ones_like(dt), dt, dm))
        s_tt = np.bincount(obj, weights=w * dt * dt, minlength=len(oids))
        s_tm = np.bincount(obj, weights=w * dt * dm, minlength=len(oids))
        denom = s_n * s_tt - s_t * s_t
        feats["decline_30d"] = np.where((s_n >= 3) & (denom > 1e-9), (s_n * s_tm - s_t * s_m) / denom, np.nan)

    # light-curve statistics on magnitudes (curves with enough points only; the others stay NaN).
    stats = _stats_extractor()
    enough = np.flatnonzero(counts >= MIN_POINTS_STATS)
    curves = [(t[starts[i]:ends[i]], mag[starts[i]:ends[i]], mag_err[starts[i]:ends[i]]) for i in enough]
    values = np.full((len(oids), len(stats.names)), np.nan)
    values[enough] = _many(stats, curves, len(stats.names), n_jobs)
    for j, name in enumerate(stats.names):
        feats[name] = values[:, j]

    # Parametric fits on difference flux (light-curve fills NaN below each fit's minimum number of points).
    fit_curves = [(t[starts[i]:ends[i]], flux[starts[i]:ends[i]], flux_err[starts[i]:ends[i]]) for i in enough]
    for fit in _fit_extractors():
        values = np.full((len(oids), len(fit.names)), np.nan)
        values[enough] = _many(fit, fit_curves, len(fit.names), n_jobs)
        amp = values[:, fit.names.index(next(n for n in fit.names if n.endswith("_amplitude")))]
        with np.errstate(divide="ignore", invalid="ignore"):
            for j, name in enumerate(fit.names):
                v = values[:, j]
                if name.endswith("_amplitude"):
                    v = np.where(v > 0, np.log10(v), np.nan)
                elif name.endswith("_baseline"):
                    v = v / np.where(amp != 0, amp, np.nan)  # baseline relative to the amplitude: scale-free
                elif name.endswith("_reduced_chi2"):
                    v = np.log10(1.0 + v)
                feats[name] = np.where(np.isfinite(v), v, np.nan)
    frame = pd.DataFrame(feats, index=pd.Index(oids, name="oid"))
    return frame.add_suffix(f"_{band}")


_PAIR_COLUMNS = ("gr_first_pair", "gr_last_pair", "gr_pair_rate")


def _colour_pairs(rows: pd.DataFrame) -> pd.DataFrame:
    """g−r of the first and the last same-night pair of each object, and its rate of change (mag/day)."""
    g = rows.loc[rows["band"] == "g", ["oid", "t", "mag"]].sort_values("t", kind="mergesort")
    r = rows.loc[rows["band"] == "r", ["oid", "t", "mag"]].sort_values("t", kind="mergesort")
    empty = pd.DataFrame(columns=list(_PAIR_COLUMNS), dtype=float)
    if g.empty or r.empty:
        return empty
    pairs = pd.merge_asof(g, r.rename(columns={"t": "t_r", "mag": "mag_r"}), left_on="t", right_on="t_r",
                          by="oid", direction="nearest", tolerance=PAIR_MAX_DT)
    pairs = pairs.dropna(subset=["mag_r"])
    if pairs.empty:
        return empty
    pairs["gr"] = pairs["mag"] - pairs["mag_r"]
    pairs = pairs.sort_values(["oid", "t"], kind="mergesort")
    grouped = pairs.groupby("oid", sort=True)
    first, last = grouped.first(), grouped.last()
    out = pd.DataFrame({"gr_first_pair": first["gr"], "gr_last_pair": last["gr"]})
    dt = last["t"] - first["t"]
    out["gr_pair_rate"] = np.where(dt > 0, (last["gr"] - first["gr"]) / dt.where(dt > 0, 1.0), np.nan)
    return out


def feature_names() -> list[str]:
    """The columns of :func:`extract_features`, in order (the same for every input)."""
    return list(_empty_features().columns)


def _empty_features() -> pd.DataFrame:
    one = pd.DataFrame({"oid": ["x"] * 3 + ["x"] * 3, "mjd": [0.0, 1.0, 2.0, 0.1, 1.1, 2.1],
                        "band": ["g"] * 3 + ["r"] * 3, "mag": [19.0, 18.5, 18.8, 19.1, 18.6, 18.7],
                        "mag_err": [0.1] * 6})
    return _features(one, n_jobs=1).iloc[:0]


def _features(detections: pd.DataFrame, n_jobs: int) -> pd.DataFrame:
    all_oids = np.unique(detections["oid"].astype(str).to_numpy())
    rows = _clean(detections)
    first_t = rows.groupby("oid", sort=True)["t"].min()
    parts = []
    for band in FEATURE_BANDS:
        band_rows = rows.loc[rows["band"] == band]
        parts.append(_band_features(band_rows, first_t, band, n_jobs))
    frame = pd.concat(parts, axis=1).reindex(pd.Index(all_oids, name="oid"))
    for band in FEATURE_BANDS:  # no detection in the band: zero detections, not an unknown number
        frame[f"n_det_{band}"] = frame[f"n_det_{band}"].fillna(0.0)
    frame["n_det"] = frame["n_det_g"] + frame["n_det_r"]
    frame["duration"] = (rows.groupby("oid", sort=True)["t"].max() - first_t).reindex(frame.index)
    frame["frac_g"] = frame["n_det_g"] / frame["n_det"].where(frame["n_det"] > 0)
    # Colours (ALeRCE's g-r_max and g-r_mean) and g−r differences of the fitted shapes.
    frame["gr_peak"] = frame["mag_peak_g"] - frame["mag_peak_r"]
    frame["gr_mean"] = frame["mag_mean_g"] - frame["mag_mean_r"]
    frame["gr_t_peak"] = frame["t_peak_g"] - frame["t_peak_r"]
    for p in ("rise_time", "fall_time", "reference_time", "amplitude"):
        frame[f"gr_bazin_fit_{p}"] = frame[f"bazin_fit_{p}_g"] - frame[f"bazin_fit_{p}_r"]
    frame = frame.join(_colour_pairs(rows))
    frame = frame.astype(float)
    return frame.replace([np.inf, -np.inf], np.nan)


def extract_features(detections: pd.DataFrame, until_days: float | None = None, *,
                     n_jobs: int | None = None) -> pd.DataFrame:
    """One row per oid (index ``oid``, sorted), columns ``<feature>_<band>`` for g and r plus colours.

    ``detections`` follow the contract (oid, mjd, band, mag, mag_err, flux, flux_err; see the module docstring for
    what is computed). ``until_days``: keep only the detections with ``mjd <= first_mjd + until_days``, the object's
    first detection in either band (:func:`deeprubin.lightcurves.window.truncate_after_first`): an early, partial light curve.
    Magnitudes come from ``mag``/``mag_err``, or ``23.9 - 2.5 log10 |flux|`` where ``mag`` is missing. A band with
    too few points gives NaN features, a failed fit NaN; one bad object never raises. No label, redshift or
    catalogue peak magnitude is used. Deterministic, for any ``n_jobs`` (``None``: 1; ``-1``: all cores).
    """
    missing = [c for c in ("oid", "mjd", "band") if c not in detections.columns]
    if missing:
        raise ValueError(f"detections lack column(s) {missing}")
    if not ({"mag", "mag_err"} <= set(detections.columns) or {"flux", "flux_err"} <= set(detections.columns)):
        raise ValueError("detections need mag and mag_err, or flux and flux_err")
    if until_days is not None:
        detections = truncate_after_first(detections, until_days)
    jobs = 1 if n_jobs is None else ((os.cpu_count() or 1) if n_jobs < 0 else max(1, int(n_jobs)))
    if len(detections) == 0:
        return _empty_features()
    return _features(detections, jobs)


# --------------------------------------------------------------------------------------------------------------
# The forest
# --------------------------------------------------------------------------------------------------------------


class BaselineForest:
    """ALeRCE-style balanced random forest on :func:`extract_features`, trained on full and truncated curves."""

    def __init__(self, classes: Sequence[str] = CLASSES, n_estimators: int = 300,
                 truncations: Sequence[float] = (10, 20, 30, 50), seed: int = 42, n_jobs: int | None = None):
        self.classes = tuple(classes)
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise ValueError(f"classes must be distinct and non-empty, got {self.classes}")
        self.n_estimators = int(n_estimators)
        self.truncations = tuple(float(d) for d in truncations)
        self.seed = int(seed)
        self.n_jobs = n_jobs
        self.feature_version = FEATURE_VERSION
        self.feature_columns_: list[str] | None = None
        self.model_: BalancedRandomForestClassifier | None = None

    # -- training ---------------------------------------------------------------------------------------------

    def training_features(self, detections: pd.DataFrame, labels: pd.Series) -> tuple[pd.DataFrame, np.ndarray]:
        """Feature rows (full curves, then each truncation) and their class names; index ``oid`` repeats."""
        labels = pd.Series(labels).copy()
        labels.index = labels.index.astype(str)
        labels = labels[labels.isin(self.classes)]
        det = detections.loc[detections["oid"].astype(str).isin(labels.index)]
        if det.empty:
            raise ValueError(f"no detections of objects labelled with one of {list(self.classes)}")
        det = det.assign(oid=det["oid"].astype(str))
        t = pd.to_numeric(det["mjd"], errors="coerce")
        span = t.groupby(det["oid"]).max() - t.groupby(det["oid"]).min()
        frames = [extract_features(det, n_jobs=self.n_jobs)]
        for days in self.truncations:
            longer = span.index[span > days]  # only curves the cut actually shortens: no duplicated rows
            if len(longer):
                frames.append(extract_features(det.loc[det["oid"].isin(longer)], until_days=days,
                                               n_jobs=self.n_jobs))
        features = pd.concat(frames)
        return features, labels.reindex(features.index).to_numpy()

    def fit(self, detections: pd.DataFrame, labels: pd.Series) -> BaselineForest:
        """Train on ``detections`` of the objects whose label (``labels``: oid -> class name) is in ``classes``;
        the others are ignored. Rows: the full curves plus copies truncated at each of ``truncations`` days."""
        features, y = self.training_features(detections, labels)
        return self.fit_features(features, y)

    def fit_features(self, features: pd.DataFrame, y: Sequence[str]) -> BaselineForest:
        """Train on precomputed :func:`extract_features` rows with class names ``y`` (rows of other classes are
        ignored); :meth:`fit` is :meth:`training_features` followed by this."""
        y = np.asarray(y, dtype=object)
        keep = np.isin(y, self.classes)
        features, y = features.loc[keep], y[keep]
        present = sorted(set(y), key=self.classes.index)
        if len(present) < 2:
            raise ValueError(f"training needs at least two classes, got {present}")
        self.feature_columns_ = list(features.columns)
        self.model_ = BalancedRandomForestClassifier(
            n_estimators=self.n_estimators, sampling_strategy="all", replacement=True, bootstrap=False,
            max_features="sqrt", random_state=self.seed, n_jobs=self.n_jobs)
        self.model_.fit(self._matrix(features), y)
        return self

    def _matrix(self, features: pd.DataFrame) -> np.ndarray:
        x = features.reindex(columns=self.feature_columns_).to_numpy(dtype=np.float64)
        return np.where(np.isfinite(x), x, FILL_VALUE)

    # -- inference --------------------------------------------------------------------------------------------

    def predict_proba(self, detections: pd.DataFrame, until_days: float | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(oids sorted, probabilities ``(N, len(classes))`` in ``classes`` order; zeros for a class the forest
        never saw). ``until_days``: classify the curves as they were that many days after the first detection."""
        if self.model_ is None:
            raise RuntimeError("BaselineForest is not fitted")
        features = extract_features(detections, until_days=until_days, n_jobs=self.n_jobs)
        return features.index.to_numpy(dtype=str), self.proba_from_features(features)

    def proba_from_features(self, features: pd.DataFrame) -> np.ndarray:
        """Probabilities for precomputed :func:`extract_features` rows (columns in ``classes`` order)."""
        if self.model_ is None:
            raise RuntimeError("BaselineForest is not fitted")
        proba = np.zeros((len(features), len(self.classes)))
        if len(features):
            p = self.model_.predict_proba(self._matrix(features))
            for j, name in enumerate(self.model_.classes_):
                proba[:, self.classes.index(str(name))] = p[:, j]
        return proba

    def feature_importances(self) -> pd.Series:
        """Mean decrease in impurity per feature, largest first."""
        if self.model_ is None:
            raise RuntimeError("BaselineForest is not fitted")
        return pd.Series(self.model_.feature_importances_, index=self.feature_columns_).sort_values(ascending=False)

    # -- persistence ------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        joblib.dump({"format": _FORMAT, "feature_version": self.feature_version, "model": self}, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> BaselineForest:
        payload = joblib.load(Path(path))
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a saved BaselineForest")
        version = payload.get("feature_version")
        if version != FEATURE_VERSION:
            raise FeatureVersionError(
                f"{path} was trained on baseline features of version {version}, but this code computes version "
                f"{FEATURE_VERSION}; retrain the baseline (its feature columns would not match)")
        model = payload["model"]
        if not isinstance(model, cls):
            raise TypeError(f"{path} does not hold a {cls.__name__}")
        return model
