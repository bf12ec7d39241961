"""A simulator of ZTF-like g/r alert light curves for QSO, CEP, SNIa and SNII.

One cohesive thing: the survey (cadence, weather, Moon, noise) and the four classes' models share one sourced
set of constants and one observation model; its length is those models, each a section below.

Every number below is sourced; ``docs/simulator.md`` has the full table and ``../shared/PRIORS.md`` the measured
values (reference keys as there: ML10 MacLeod+2010, S21 Suberlak+2021, M19 Masci+2019, SS simsurvey, SP/SPP
Superphot(+), A14 Anderson+2014, Bu20 Bulla+2020, Mi20 Miller+2020, meas. bts = measured on the BTS sample).
"(unc.)" marks a number that is an assumption or could not be verified against its source.

What an alert stream looks like, and how it is produced here
------------------------------------------------------------
1. **Observing** (:func:`observe`). Each object sits in a field that is visible for one season per year (yearly gap
   122 d [82, 179], meas. alerce). In season the field is scheduled every ``c`` nights (c = 3 in Phase I, 2 in
   Phase II; F20, IRSA DR8) with extra visits from other programmes, nights lost to weather (a Markov chain shared by
   every object: bad weather comes in runs) and to the scheduler. g and r are taken on the same night, ~30-90 min
   apart; a band is repeated in one night in ~16 % of visits (12–16 % of same-band pairs share a night, meas. bts).
   Each epoch gets a 5σ limiting magnitude ``diffmaglim`` from the measured distribution (g 20.24 [19.18, 20.86],
   r 20.18 [19.18, 20.72], meas. alerce) modulated by the Moon, and an error-scale factor (×0.7–1.6, meas. bts).
2. **Error model** (:func:`flux_error`). PRIORS' fit σ²(magpsf) = s0² + c1² x + c2² x², x = 10^(0.4(m−20)),
   rewritten in flux and re-anchored per epoch so that a source exactly at ``diffmaglim`` has S/N = 5 (the fit,
   unscaled, gives S/N 5 at m = 20.27 in g: the same as the median diffmaglim). The s0/c1 terms scale with the
   *total* flux in the science image (a bright Cepheid's subtraction residuals), the c2 term is the sky.
3. **Alert photometry**. ZTF alerts are difference-image PSF photometry: ``flux`` is F_science − F_reference, signed
   (``isdiffpos``). For QSOs and Cepheids the reference image contains the source, so the alert flux is the
   *difference* flux (often negative; Cepheid magpsf ≈ 1.4 mag fainter than apparent, PRIORS §1) and ``mag_corr`` is
   the apparent magnitude. For supernovae the reference has no SN: difference flux = SN flux, ``mag_corr`` is NaN.
   A detection is an epoch with |F_obs| ≥ 5 σ_F (alert threshold S/N ≥ 5, M19); every other observed epoch is a
   non-detection with its ``diffmaglim``. Non-detections are kept as ALeRCE serves them: those within 30 days before
   a detection of the same object (the alert packet's 30-day ``prv_candidates`` history), which also bounds volume.
   Epochs brighter than saturation (12.5 mag, LCL) are not usable and are dropped.
4. **Sources** (:func:`_qso`, :func:`_cep`, :func:`_sn`): see each function's docstring.

Vectorisation: everything is drawn for all objects of a class at once; the damped random walk is the exact OU
update applied epoch index by epoch index across all objects (:func:`ou_process`), with a per-object Python loop
(:func:`ou_process_reference`) kept as the reference the tests and ``bench/simulate_speed.py`` compare against.
Objects are kept only when ALeRCE's light-curve classifier could have labelled them: at least
``min_detections_per_band`` (default 6) detections in g or in r, its requirement (Sánchez-Sáez+2021, AJ 161 141);
the others are redrawn. For quasars this selects the strongly variable ones, as the real alert stream does.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from deeprubin.config import SimulatorParams
from deeprubin.schema import (
    AB_ZERO_POINT_UJY,
    BAND_INDEX,
    BANDS,
    CLASSES,
    DETECTIONS_SCHEMA,
    NON_DETECTIONS_SCHEMA,
    OBJECTS_SCHEMA,
    LightCurves,
)

DEFAULT_SEED = 42
CHUNK_OBJECTS = 500  # objects per independently seeded chunk of a class
PARALLEL_MIN_OBJECTS = 2000  # below this, worker processes cost more than they save
SOURCE = "simulator"
LABEL_SOURCE = "simulated"
MJD_EPOCH = pd.Timestamp("1858-11-17", tz="UTC")
LN10_25 = 2.5 / np.log(10.0)  # 1.0857: mag error = LN10_25 * flux error / flux

# --------------------------------------------------------------------------------------------------------------
# ZTF observing (PRIORS §1)
# --------------------------------------------------------------------------------------------------------------
# Effective wavelengths of ZTF g and r (Å; SVO filter service, Bellm+2019), for the QSO rest-frame scaling.
BAND_WAVELENGTH_A = np.array([4746.0, 6366.0])
# σ(magpsf) fit, per band (g, r): s0, c1, c2 (PRIORS §1, fit to bts).
ERR_S0 = np.array([0.013, 0.018])
ERR_C1 = np.array([0.177, 0.162])
ERR_C2 = np.array([0.063, 0.073])
# Error-scale scatter ×0.7–1.6 (10–90 %) about the fit: lognormal, ln-median 0.05, σ 0.32 (PRIORS §1).
ERR_SCALE_LN_MU, ERR_SCALE_LN_SIGMA = 0.05, 0.32
# Per-epoch diffmaglim: median and 10/90 % (g, r) (PRIORS §1, meas. alerce): a two-piece normal through them.
LIM_MEDIAN = np.array([20.24, 20.18])
LIM_P10 = np.array([19.18, 19.18])
LIM_P90 = np.array([20.86, 20.72])
# Moon: bright time costs depth, more in g than r (sky-brightness; M19 §3 quotes depth "in dark time", unc. size).
MOON_DEPTH_MAG = np.array([0.45, 0.25])
SYNODIC_MONTH_D = 29.530589
NEW_MOON_MJD = 51544.7743  # 2000-01-06 18:14 UT
SATURATION_MAG = 12.5  # LCL obstable (unc.)
DETECTION_SIGMA = 5.0  # alert threshold (M19; PRIORS §1)
PRV_CANDIDATES_DAYS = 30.0
# Detection efficiency just above threshold (real/bogus vetting of faint candidates; Duev+2019, M19 §7; unc.):
# logistic in S/N, 50 % at 5.5, width 0.5 (→ 27 % at S/N 5, 88 % at 6.5, 98 % at 7.5).
EFFICIENCY_SNR50, EFFICIENCY_WIDTH = 5.5, 0.5  # alert packets carry 30 days of history (sch: ztf-avro-alert schema)
# Cadence (per band): scheduled every CADENCE nights; extra visits from other programmes; losses (tuned so that the
# gap between detection nights per band is 3 d [1, 8] with 12–16 % same-night pairs, PRIORS §1 meas. bts).
CADENCE_NIGHTS = {"I": 3, "II": 2}
P_EXTRA_VISIT = 0.13
P_SCHEDULER_MISS = 0.08
P_BAND_GIVEN_VISIT = np.array([0.88, 0.94])
P_SAME_NIGHT_REPEAT = 0.17
# Weather at Palomar: a two-state Markov chain per night, ~22 % of nights lost, bad spells ~2 nights (unc.).
P_BAD_AFTER_GOOD, P_BAD_AFTER_BAD = 0.09, 0.55
# Seasons: yearly gap 122 d [82, 179] (PRIORS §1, meas. alerce): normal, σ 36 d, clipped.
SEASON_GAP_MEDIAN_D, SEASON_GAP_SIGMA_D = 122.0, 36.0
# Time of the first exposure in a night, as an MJD fraction (Palomar, UTC−8: night ≈ 0.12–0.55).
NIGHT_START_FRAC = (0.13, 0.40)

# --------------------------------------------------------------------------------------------------------------
# Cosmology (flat ΛCDM, H0 = 70, Ωm = 0.3; equals astropy FlatLambdaCDM(70, 0.3) to < 1e-3 mag)
# --------------------------------------------------------------------------------------------------------------
H0, OMEGA_M, C_KMS = 70.0, 0.3, 299792.458
_Z_GRID = np.linspace(0.0, 6.0, 6001)


def _comoving_grid() -> np.ndarray:
    ez = np.sqrt(OMEGA_M * (1 + _Z_GRID) ** 3 + 1 - OMEGA_M)
    inv = 1.0 / ez
    dz = np.diff(_Z_GRID)
    return np.concatenate([[0.0], np.cumsum(0.5 * (inv[1:] + inv[:-1]) * dz)]) * C_KMS / H0  # Mpc


_DC_GRID = _comoving_grid()


def distance_modulus(z: np.ndarray) -> np.ndarray:
    """μ(z) = 5 log10(D_L / 10 pc) in flat ΛCDM (H0 70, Ωm 0.3)."""
    z = np.asarray(z, dtype=float)
    dl = (1 + z) * np.interp(z, _Z_GRID, _DC_GRID)
    return 5.0 * np.log10(np.maximum(dl, 1e-6) * 1e5)


def comoving_volume_weight(z: np.ndarray) -> np.ndarray:
    """dV/dz / (1 + z) (∝ D_C² / E(z) / (1+z)): volumetric events per unit redshift, observer-frame rate."""
    dc = np.interp(z, _Z_GRID, _DC_GRID)
    ez = np.sqrt(OMEGA_M * (1 + z) ** 3 + 1 - OMEGA_M)
    return dc**2 / ez / (1 + z)


def _sample_volumetric_z(rng: np.random.Generator, n: int, z_max: float, rate_index: float = 0.0) -> np.ndarray:
    grid = np.linspace(1e-4, z_max, 2000)
    w = comoving_volume_weight(grid) * (1 + grid) ** rate_index
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    return np.interp(rng.random(n), cdf, grid)


def mag_from_flux(flux: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return AB_ZERO_POINT_UJY - 2.5 * np.log10(np.abs(flux))


def flux_from_mag(mag: np.ndarray) -> np.ndarray:
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - AB_ZERO_POINT_UJY))


# --------------------------------------------------------------------------------------------------------------
# The result type
# --------------------------------------------------------------------------------------------------------------
@dataclass
class SimulatedLightCurves(LightCurves):
    """Contract tables plus ``truth``: one row per object (oid, label and every drawn parameter; NaN if n/a)."""

    truth: pd.DataFrame = field(default_factory=pd.DataFrame)


# --------------------------------------------------------------------------------------------------------------
# Observing: epochs, limits and errors
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Epochs:
    """Observed epochs of a batch of objects, flat and sorted by (object, mjd, band)."""

    obj: np.ndarray  # int, index of the object in its batch
    mjd: np.ndarray
    band: np.ndarray  # int8: 0 = g, 1 = r
    diffmaglim: np.ndarray
    err_scale: np.ndarray

    def __len__(self) -> int:
        return len(self.mjd)


def weather(rng: np.random.Generator, n_nights: int) -> np.ndarray:
    """Usable nights (True) from a two-state Markov chain (bad weather comes in spells); shared by all objects."""
    ok = np.empty(n_nights, dtype=bool)
    u = rng.random(n_nights)
    bad = False
    stationary_bad = P_BAD_AFTER_GOOD / (1 - P_BAD_AFTER_BAD + P_BAD_AFTER_GOOD)
    bad = u[0] < stationary_bad
    for i in range(n_nights):
        if i:
            bad = u[i] < (P_BAD_AFTER_BAD if bad else P_BAD_AFTER_GOOD)
        ok[i] = not bad
    return ok


def _two_piece_normal(rng: np.random.Generator, median: np.ndarray, p10: np.ndarray, p90: np.ndarray,
                      z: np.ndarray) -> np.ndarray:
    lo = (median - p10) / 1.2816
    hi = (p90 - median) / 1.2816
    return median + np.where(z < 0, lo, hi) * z


def moon_illumination(mjd: np.ndarray) -> np.ndarray:
    """Illuminated fraction of the Moon (0 new, 1 full), from the mean synodic month."""
    phase = 2 * np.pi * (np.asarray(mjd) - NEW_MOON_MJD) / SYNODIC_MONTH_D
    return 0.5 * (1 - np.cos(phase))


def observe(rng: np.random.Generator, n_obj: int, start_mjd: float, n_nights: int, phase: str,
            weather_ok: np.ndarray, window: tuple[np.ndarray, np.ndarray] | None = None
            ) -> tuple[Epochs, pd.DataFrame]:
    """Draw the observed epochs of ``n_obj`` objects over the survey (see the module docstring, step 1).

    ``window`` (first, last MJD per object) keeps only the epochs a transient can need (a speed-up: epochs outside
    it would be neither detections nor kept non-detections). Returns the epochs and per-object observing truth.
    """
    cadence = CADENCE_NIGHTS[phase]
    nights = np.arange(n_nights)
    night_mjd = start_mjd + nights
    season_gap = np.clip(rng.normal(SEASON_GAP_MEDIAN_D, SEASON_GAP_SIGMA_D, n_obj), 60.0, 200.0)
    season_start = rng.uniform(0.0, 365.25, n_obj)  # day of the "year" the field rises
    offset = rng.integers(0, cadence, n_obj)
    in_season = np.mod(night_mjd[None, :] - start_mjd - season_start[:, None], 365.25) < (365.25 - season_gap[:, None])
    scheduled = (np.mod(nights[None, :] + offset[:, None], cadence) == 0) | (rng.random((n_obj, n_nights))
                                                                              < P_EXTRA_VISIT)
    visited = in_season & scheduled & weather_ok[None, :n_nights] & (rng.random((n_obj, n_nights))
                                                                      >= P_SCHEDULER_MISS)
    if window is not None:
        visited &= (night_mjd[None, :] + 1 >= window[0][:, None]) & (night_mjd[None, :] <= window[1][:, None])
    oi, ni = np.nonzero(visited)  # row-major: sorted by object, then night
    nv = len(oi)
    take = rng.random((nv, 2)) < P_BAND_GIVEN_VISIT[None, :]
    neither = ~take.any(axis=1)
    take[neither, 1] = True
    repeat = (rng.random((nv, 2)) < P_SAME_NIGHT_REPEAT) & take
    t_first = rng.uniform(*NIGHT_START_FRAC, nv)
    # r first, then g 0.02–0.08 d later (or the reverse, at random); a repeat 0.03–0.12 d after the first in its band.
    sep = rng.uniform(0.02, 0.08, nv)
    g_first = rng.random(nv) < 0.5
    t_band = np.stack([np.where(g_first, t_first, t_first + sep), np.where(g_first, t_first + sep, t_first)], axis=1)
    t_rep = t_band + rng.uniform(0.03, 0.12, (nv, 2))
    # (nv, 4) slots g, r, g-repeat, r-repeat; sorting the times inside each night keeps the whole table sorted.
    slot_t = np.concatenate([np.where(take, t_band, np.nan), np.where(repeat, t_rep, np.nan)], axis=1)
    slot_b = np.broadcast_to(np.array([0, 1, 0, 1], dtype=np.int8), slot_t.shape)
    o = np.argsort(slot_t, axis=1)  # NaN last
    slot_t = np.take_along_axis(slot_t, o, axis=1)
    slot_b = np.take_along_axis(slot_b, o, axis=1)
    present = ~np.isnan(slot_t)
    obj = np.broadcast_to(oi[:, None], slot_t.shape)[present]
    mjd = np.round((night_mjd[ni][:, None] + slot_t)[present], 5)
    band = slot_b[present]
    # Per-visit conditions: one depth draw per night shared by g and r (ρ ≈ 0.7), independent error scales.
    zl = np.broadcast_to(rng.standard_normal(nv)[:, None], slot_t.shape)[present]
    z = 0.7 * zl + np.sqrt(1 - 0.7**2) * rng.standard_normal(len(mjd))
    moon = MOON_DEPTH_MAG[band] * (moon_illumination(mjd) - 0.5)
    # Width of the measured distribution already contains the Moon: shrink the random part to keep the 10–90 %.
    lim = _two_piece_normal(rng, LIM_MEDIAN[band], LIM_P10[band] + 0.1, LIM_P90[band] - 0.05, z) - moon
    lim = np.clip(lim, 17.5, 21.6)
    err_scale = np.exp(rng.normal(ERR_SCALE_LN_MU, ERR_SCALE_LN_SIGMA, len(mjd)))
    truth = pd.DataFrame({"season_gap_d": season_gap, "season_start_d": season_start})
    return Epochs(obj=obj, mjd=mjd, band=band, diffmaglim=lim, err_scale=err_scale), truth


def _x_at_limit(band: np.ndarray, err_scale: np.ndarray) -> np.ndarray:
    """x = F_20/F at the epoch's limit: the root of s²(s0² + c1² x + c2² x²) = (1.0857/5)²."""
    a = ERR_C2[band] ** 2
    b = ERR_C1[band] ** 2
    c = ERR_S0[band] ** 2 - (LN10_25 / DETECTION_SIGMA / err_scale) ** 2
    return (-b + np.sqrt(b * b - 4 * a * c)) / (2 * a)


def flux_error(noise_flux: np.ndarray, band: np.ndarray, diffmaglim: np.ndarray, err_scale: np.ndarray) -> np.ndarray:
    """σ_F (µJy) of PSF photometry on the difference image (module docstring, step 2).

    ``noise_flux`` is the source flux in the science image (total flux for a star or quasar, the SN flux for a
    supernova). A source with ``noise_flux`` = flux at ``diffmaglim`` has S/N exactly 5.
    """
    f_lim = flux_from_mag(diffmaglim)
    x_lim = _x_at_limit(band, err_scale)
    f = np.maximum(noise_flux, 0.0)
    var = (ERR_S0[band] * f) ** 2 + ERR_C1[band] ** 2 * x_lim * f_lim * f + (ERR_C2[band] * x_lim * f_lim) ** 2
    return err_scale / LN10_25 * np.sqrt(var)


def sigma_mag_model(mag: np.ndarray, band: str | int) -> np.ndarray:
    """PRIORS' σ(magpsf) fit, unscaled, at the median limit: 0.03, 0.07, 0.11, 0.18, 0.24 at 16, 18, 19, 20, 20.5."""
    b = BAND_INDEX[band] if isinstance(band, str) else band
    x = 10 ** (0.4 * (np.asarray(mag, dtype=float) - 20.0))
    return np.sqrt(ERR_S0[b] ** 2 + ERR_C1[b] ** 2 * x + ERR_C2[b] ** 2 * x**2)


# --------------------------------------------------------------------------------------------------------------
# Damped random walk
# --------------------------------------------------------------------------------------------------------------
def ou_process(times: np.ndarray, tau: np.ndarray, rng: np.random.Generator, x0: np.ndarray | None = None,
               t0: np.ndarray | None = None, n_series: int = 1) -> np.ndarray:
    """Unit-variance Ornstein–Uhlenbeck process at padded times ``(n_obj, K)`` (NaN = padding at the end).

    Exact update (Gillespie 1996): x_{k+1} = x_k a + sqrt(1 − a²) N(0, 1), a = exp(−Δt/τ). Vectorised across
    objects: one loop over the epoch index. ``x0`` at ``t0`` (default: a stationary draw at the first time).
    Returns ``(n_series, n_obj, K)``: independent series sharing the times and τ.
    """
    n_obj, k_max = times.shape
    if k_max == 0:
        return np.full((n_series, n_obj, 0), np.nan)
    out = np.empty((k_max, n_series, n_obj))  # epoch-major, so each step writes one contiguous block
    noise = rng.standard_normal((k_max, n_series, n_obj))
    if x0 is None:
        x0 = noise[0].copy()
        t0 = times[:, 0]
        noise[0] = 0.0
    # All decay factors and innovations at once (padding: Δt = 0, so a = 1 and no innovation); then the recursion.
    prev = np.concatenate([np.asarray(t0, dtype=float)[:, None], times[:, :-1]], axis=1)
    dt = np.nan_to_num(times - prev, nan=0.0).T  # (K, n_obj)
    a = np.exp(-dt / np.asarray(tau, dtype=float)[None, :])
    b = np.sqrt(1.0 - a * a)[:, None, :] * noise
    x = np.broadcast_to(x0, (n_series, n_obj)).astype(float).copy()
    for k in range(k_max):
        x *= a[k]
        x += b[k]
        out[k] = x
    out = out.transpose(1, 2, 0)
    out[:, np.isnan(times)] = np.nan  # padding
    return out


def ou_process_reference(times: Sequence[np.ndarray], tau: Sequence[float], rng: np.random.Generator) -> list:
    """Per-object, per-epoch Python loop of the same exact OU update (unit variance): the baseline of the tests and
    of ``bench/simulate_speed.py``."""
    out = []
    for t, ta in zip(times, tau):
        x = np.empty(len(t))
        if len(t):
            x[0] = rng.standard_normal()
            for k in range(1, len(t)):
                a = np.exp(-(t[k] - t[k - 1]) / ta)
                x[k] = x[k - 1] * a + np.sqrt(1.0 - a * a) * rng.standard_normal()
        out.append(x)
    return out


def _pad(obj: np.ndarray, values: np.ndarray, n_obj: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat values sorted by obj -> (n_obj, K) padded with NaN, plus the column index of each flat value."""
    counts = np.bincount(obj, minlength=n_obj)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    col = np.arange(len(obj)) - starts[obj]
    k_max = int(counts.max()) if len(counts) else 0
    padded = np.full((n_obj, k_max), np.nan)
    padded[obj, col] = values
    return padded, col


# --------------------------------------------------------------------------------------------------------------
# Sources. Each returns (truth frame, true difference flux, flux in the science image for the noise, reference
# flux per epoch (0 for SNe)), for the given epochs.
# --------------------------------------------------------------------------------------------------------------
# QSO: ML10 eq. 7 / Table 1: log f = A + B log(λ_RF/4000 Å) + C (M_i + 23) + D log(M_BH / 1e9 M☉)
ML10_SF = (-0.51, -0.479, 0.131, 0.18)  # SF∞ in mag
ML10_TAU = (2.4, 0.17, 0.03, 0.21)  # τ_rest in days
ML10_SCATTER_DEX = (0.15, 0.2)  # intrinsic scatter about the relations (SF∞, τ) (unc.; ML10 §5 shows ~0.1–0.2 dex)
# Mean r of alerting quasars: N(18.6, 0.8) on [15.5, 20.8] (ALeRCE QSO magnitudes unsourced; OGLE-II MQS quasars
# 18.9 [17.9, 19.6] in I, PRIORS §2 check; unc.). Fainter quasars almost never reach |ΔF| ≥ 5σ.
QSO_MAG_MEAN, QSO_MAG_SIGMA = 18.6, 0.8
QSO_INDEPENDENT_FRACTION = 0.25  # fraction of each band's σ that is band-independent (g-r correlation ≈ 0.94; unc.)


def _qso(rng: np.random.Generator, n: int, ep: Epochs, start_mjd: float):
    """Quasars: a damped random walk in magnitude (ML10), SF∞ and τ from ML10's scaling relations.

    - z ~ a broad quasar redshift distribution (lognormal, median 1.3, 10–90 % ≈ 0.55–2.5; SDSS DR7Q-like, unc.);
      mean r ~ N(18.6, 0.8) on [15.5, 20.8] (ALeRCE QSO magnitudes unsourced; OGLE MQS quasars 18.9 [17.9, 19.6]
      in I; the alert requirement |ΔF| ≥ 5σ then favours the bright and the strongly variable, unc.).
    - M_i = m_i − μ(z) + 2.5(1 + α_ν) log10(1+z)... with α_ν = −0.5 (K-correction of a power law, unc.);
      log M_BH = 2.0 − 0.27 M_i + N(0, 0.35) (Eddington ratio ~0.1, derived, unc.).
    - SF∞(λ_RF) and τ_rest(λ_RF) per band from ML10 eq. 7 (λ_RF = λ_eff/(1+z)), 0.15/0.2 dex scatter;
      τ_obs = τ_rest (1+z). Bands share one latent OU (τ at r) plus a 25 % independent part: Δg/Δr = SF∞,g/SF∞,r
      ≈ 1.15 (bluer when brighter, Sc12/K14: 1.1–1.25).
    - The reference image is the source at a time 30–200 d before the survey (ZTF references were built from early
      2018 data, M19): F_ref = F(t_ref); alert flux = F(t) − F_ref.
    """
    z = np.clip(np.exp(rng.normal(np.log(1.3), 0.5, n)), 0.1, 4.5)
    m = np.clip(rng.normal(QSO_MAG_MEAN, QSO_MAG_SIGMA, n), 15.5, 20.8)
    gr = rng.normal(0.15, 0.15, n)  # quasar g−r (SDSS colours, z-averaged, unc.)
    mean_mag = np.stack([m + gr, m], axis=1)  # (n, 2): g, r
    m_i = m - 0.2  # r−i ≈ 0.2 (unc.)
    abs_i = m_i - distance_modulus(z) + 2.5 * (1 - 0.5) * np.log10(1 + z)
    log_mbh = np.clip(2.0 - 0.27 * abs_i + rng.normal(0, 0.35, n), 6.5, 10.5)
    lam_rf = BAND_WAVELENGTH_A[None, :] / (1 + z[:, None])

    def ml10(coef, lam, scatter):
        a, b, c, d = coef
        return 10 ** (a + b * np.log10(lam / 4000.0) + c * (abs_i[:, None] + 23) + d * (log_mbh[:, None] - 9)
                      + scatter)

    sf_scatter = rng.normal(0, ML10_SCATTER_DEX[0], n)[:, None]
    tau_scatter = rng.normal(0, ML10_SCATTER_DEX[1], n)[:, None]
    sf_inf = ml10(ML10_SF, lam_rf, sf_scatter)  # (n, 2)
    tau_rest = ml10(ML10_TAU, lam_rf, tau_scatter)[:, 1]
    tau_obs = tau_rest * (1 + z)
    sigma = sf_inf / np.sqrt(2.0)

    t_ref = start_mjd - rng.uniform(30.0, 200.0, n)
    times, col = _pad(ep.obj, ep.mjd, n)
    x0 = rng.standard_normal((3, n))
    series = ou_process(times, tau_obs, rng, x0=x0, t0=t_ref, n_series=3)  # latent, g-only, r-only
    eps = QSO_INDEPENDENT_FRACTION
    shared = np.sqrt(1 - eps**2)
    lat = series[0][ep.obj, col]
    own = np.where(ep.band == 0, series[1][ep.obj, col], series[2][ep.obj, col])
    dmag = sigma[ep.obj, ep.band] * (shared * lat + eps * own)
    mag_t = mean_mag[ep.obj, ep.band] + dmag
    ref_dmag = sigma * (shared * x0[0][:, None] + eps * np.stack([x0[1], x0[2]], axis=1))
    ref_mag = mean_mag + ref_dmag
    f_t = flux_from_mag(mag_t)
    f_ref = flux_from_mag(ref_mag)[ep.obj, ep.band]
    truth = pd.DataFrame({
        "z": z, "mean_mag_g": mean_mag[:, 0], "mean_mag_r": mean_mag[:, 1], "ref_mag_g": ref_mag[:, 0],
        "ref_mag_r": ref_mag[:, 1], "abs_mag_i": abs_i, "log_mbh": log_mbh, "sf_inf_g": sf_inf[:, 0],
        "sf_inf_r": sf_inf[:, 1], "tau_rest": tau_rest, "tau": tau_obs, "t_ref": t_ref,
    })
    return truth, f_t - f_ref, f_t, f_ref


def hertzsprung_r21(log_p: np.ndarray) -> np.ndarray:
    """F-mode R21 against log P: ≈0.45 for short periods, a minimum ≈0.15 at P ≈ 10 d (Hertzsprung progression;
    PRIORS §3: OGLE I 0.37–0.47 at 2.6–7.7 d, ALeRCE DCEP P = 13 d R21 0.12; shape after Simon & Lee 1981, unc.)."""
    return 0.46 - 0.31 * np.exp(-0.5 * ((log_p - 1.0) / 0.1) ** 2)


def hertzsprung_phi21(log_p: np.ndarray) -> np.ndarray:
    """F-mode φ21 (sine series) against log P: ≈π for the saw-tooth short periods (OGLE I 2.8–3.6 at 2.6–7.7 d,
    PRIORS §3) rising slowly, then jumping by ~1.3 rad across the bump at P ≈ 10 d (unc.)."""
    return 2.95 + 0.9 * (log_p - 0.4) + 1.3 / (1 + np.exp(-(log_p - 1.0) / 0.04))


def cepheid_template(phase: np.ndarray, r21: np.ndarray, phi21: np.ndarray, n_harm: int = 4) -> np.ndarray:
    """Σ_k R_k1 sin(2πkφ + (k−1)φ21)-style saw-tooth, R_k1 = R21^(k−1), φ_k1 = (k−1)φ21 (φ21 = π, R21 = ½ is
    the ideal saw-tooth: slow fading, fast rise). Not normalised; broadcasts over objects."""
    out = np.zeros(np.broadcast(phase, r21).shape)
    for k in range(1, n_harm + 1):
        out = out + r21 ** (k - 1) * np.sin(2 * np.pi * k * phase + (k - 1) * phi21)
    return out


# Mean r of alerting Cepheids: N(15.5, 1.3) on [12.8, 19.5] (ALeRCE "Ceph" 15.1 [13.8, 17.6], PRIORS §3; unc.).
CEP_MAG_MEAN, CEP_MAG_SIGMA = 15.5, 1.3


def _cep(rng: np.random.Generator, n: int, ep: Epochs, start_mjd: float):
    """Classical Cepheids: Fourier templates with the Hertzsprung progression, A_g > A_r.

    - Mode: 70 % fundamental (F), 30 % first overtone (1O) (unc.). log P: F ~ N(0.70, 0.25) on [0, 2] (P 1–100 d,
      median 5 d); 1O ~ N(0.33, 0.15) on [log 0.24, log 8] (PRIORS §3 ranges; MW histogram unsourced, unc.).
    - Shape: F from :func:`hertzsprung_r21`/:func:`hertzsprung_phi21` (+ scatter 0.04 / 0.25 rad); 1O nearly
      sinusoidal, R21 ~ U(0.10, 0.22) (OGLE I, PRIORS §3), φ21 ~ U(3.6, 4.6) (unc.).
    - Peak-to-peak A_g: F lognormal median 0.85 mag [0.6, 1.25], 1O median 0.42 (PRIORS §3: 0.3–0.8 mag "typical",
      the ALeRCE DCEP A_g 1.32; OGLE I amplitudes × ~1.8 for g; unc.); A_r/A_g ~ N(0.70, 0.04) (PRIORS §3).
      Amplitude dips with R21 across the Hertzsprung minimum (× 0.8 at 10 d, unc.).
    - Mean r ~ N(15.5, 1.3) on [12.8, 19.5] (ALeRCE "Ceph" 15.1 [13.8, 17.6], PRIORS §3; unc.); mean
      g−r = 0.35 + 0.3 (log P − 0.5) + E(g−r), E(g−r) ~ Exp(0.5) (Galactic-plane reddening, unc.).
    - r lags g by 0.01–0.03 in phase (unc.). Reference flux = mean over 20 random phases (reference stacks of
      ≥ 15 images, M19). Alert flux = F(t) − F_ref.
    """
    first_overtone = rng.random(n) < 0.3
    log_p = np.where(first_overtone,
                     np.clip(rng.normal(0.33, 0.15, n), np.log10(0.24), np.log10(8.0)),
                     np.clip(rng.normal(0.70, 0.25, n), 0.0, 2.0))
    period = 10**log_p
    r21 = np.where(first_overtone, rng.uniform(0.10, 0.22, n),
                   np.clip(hertzsprung_r21(log_p) + rng.normal(0, 0.04, n), 0.05, 0.6))
    phi21 = np.where(first_overtone, rng.uniform(3.6, 4.6, n), hertzsprung_phi21(log_p) + rng.normal(0, 0.25, n))
    amp_g = np.where(first_overtone, np.exp(rng.normal(np.log(0.42), 0.3, n)),
                     np.exp(rng.normal(np.log(0.85), 0.3, n)) * (1 - 0.2 * np.exp(-0.5 * ((log_p - 1.0) / 0.1) ** 2)))
    ratio = np.clip(rng.normal(0.70, 0.04, n), 0.55, 0.85)
    amp = np.stack([amp_g, amp_g * ratio], axis=1)
    lag = np.stack([np.zeros(n), rng.uniform(0.01, 0.03, n)], axis=1)
    # Normalise each template to peak-to-peak 1 on a phase grid.
    grid = np.linspace(0, 1, 256, endpoint=False)[None, :]
    tmpl = cepheid_template(grid, r21[:, None], phi21[:, None])
    tmin, tmax = tmpl.min(axis=1), tmpl.max(axis=1)
    mid = 0.5 * (tmin + tmax)
    ptp = tmax - tmin
    m_r = np.clip(rng.normal(CEP_MAG_MEAN, CEP_MAG_SIGMA, n), 12.8, 19.5)
    gr = 0.35 + 0.3 * (log_p - 0.5) + rng.exponential(0.5, n)
    mean_mag = np.stack([m_r + gr, m_r], axis=1)
    epoch0 = start_mjd + rng.uniform(0, 1, n) * period

    def mag_at(obj, band, t):
        ph = np.mod((t - epoch0[obj]) / period[obj] - lag[obj, band], 1.0)
        shape = (cepheid_template(ph, r21[obj], phi21[obj]) - mid[obj]) / ptp[obj]
        return mean_mag[obj, band] + amp[obj, band] * shape

    mag_t = mag_at(ep.obj, ep.band, ep.mjd)
    f_t = flux_from_mag(mag_t)
    # Reference: mean flux over 20 random epochs before the survey.
    n_ref = 20
    ro = np.repeat(np.arange(n), 2 * n_ref)
    rb = np.tile(np.repeat([0, 1], n_ref), n)
    rt = start_mjd - rng.uniform(30, 200, len(ro))
    f_ref_ob = flux_from_mag(mag_at(ro, rb, rt)).reshape(n, 2, n_ref).mean(axis=2)
    f_ref = f_ref_ob[ep.obj, ep.band]
    ref_mag = mag_from_flux(f_ref_ob)
    truth = pd.DataFrame({
        "period": period, "mode": np.where(first_overtone, "1O", "F"), "amplitude_g": amp[:, 0],
        "amplitude_r": amp[:, 1], "r21": r21, "phi21": np.mod(phi21, 2 * np.pi), "mean_mag_g": mean_mag[:, 0],
        "mean_mag_r": mean_mag[:, 1], "ref_mag_g": ref_mag[:, 0], "ref_mag_r": ref_mag[:, 1], "epoch_max": epoch0,
    })
    return truth, f_t - f_ref, f_t, f_ref


# Supernovae -----------------------------------------------------------------------------------------------------
TAU_CO56_D = 111.3  # 56Co e-folding time: tail 0.98 mag/100 d
# g−r colour curves (phase from the r-band peak, rest frame, stretch-corrected for Ia), PRIORS §4/§5 (Bu20; meas.
# bts): Ia peak 0.02, +15 d 0.40, +30 d 1.04, +50 d 0.82, ≈ −0.15 from ~6 d after first light; II 0.19 → 0.46 →
# 0.68 → 0.89. Early and late knots (unc.).
COLOUR_KNOTS = {
    "SNIa": (np.array([-30.0, -20.0, -13.0, -6.0, 0.0, 10.0, 15.0, 25.0, 30.0, 50.0, 100.0, 400.0]),
             np.array([0.25, 0.10, -0.15, -0.10, 0.0, 0.30, 0.45, 0.92, 1.04, 0.82, 0.65, 0.55])),
    "SNII": (np.array([-40.0, -15.0, -5.0, 0.0, 15.0, 30.0, 50.0, 100.0, 150.0, 400.0]),
             np.array([-0.25, -0.20, -0.05, 0.07, 0.38, 0.62, 0.85, 1.10, 1.25, 1.30])),
}
# Labelled-sample selection on the r peak magnitude: logistic, 50 % at SEL_M50, width SEL_W. BTS is complete to
# 18.5 (F20); ALeRCE alerts and labels go to ~20.5: this keeps most mass at 17–19.5 with a tail to 20.5 (see docs).
SEL_M50, SEL_W = 18.8, 0.35
SN_MAX_PEAK_MAG = 20.6
# SNe first detected > 5 d after the r peak (exploded in a season gap or before the survey) are kept with
# probability 0.2: spectroscopic labels go mostly to young SNe (BTS rise ≥ 7–8 d for 90 %, PRIORS §6; unc.).
LATE_DISCOVERY_D, P_LATE_KEPT = 5.0, 0.2
SN_Z_MAX = {"SNIa": 0.3, "SNII": 0.15}
SN_WINDOW_D = 600.0  # rest days after t0 that are simulated (the SN is > 7 mag below peak by then)


def _sn_shape(t_rel: np.ndarray, p: dict, obj: np.ndarray, kind: str) -> np.ndarray:
    """r-band flux (unnormalised) at t − t0 (observer days) for objects ``obj``: Villar+2019-style.

    L = 1/(1 + exp(−t/τ_rise)) (rise) × a decline that is linear in magnitude (slope s1, mag/d) until t1 = γ
    (the Villar "plateau" segment; for SNe II the plateau proper), then: Ia an exponential fall (τ_fall);
    II a drop of ``drop`` mag over τ_drop onto the 56Co tail (τ = 111.3 d (1+z)).
    """
    tr = p["tau_rise"][obj]
    g = p["gamma"][obj]
    s1 = p["s1"][obj]
    lt = np.clip(t_rel / tr, -60, 60)
    rise = 1.0 / (1.0 + np.exp(-lt))
    tp = np.clip(t_rel, 0.0, None)
    plateau = 10 ** (-0.4 * s1 * np.minimum(tp, g))
    after = np.clip(t_rel - g, 0.0, None)
    if kind == "SNIa":
        fall = np.exp(-after / p["tau_fall"][obj])
    else:
        f_tail = 10 ** (-0.4 * p["drop"][obj])
        fall = (1 - f_tail) * np.exp(-after / p["tau_drop"][obj]) + f_tail * np.exp(-after / p["tau_tail"][obj])
    # Nothing before first light: the logistic is cut ~7 τ_rise before t0 (flux < 0.1 % of peak there).
    return np.where(t_rel < -7.0 * tr, 0.0, rise * plateau * fall)


def _sn_params(rng: np.random.Generator, n: int, kind: str) -> dict:
    """Draw SN parameters (see :func:`_sn_draw`)."""
    p: dict[str, np.ndarray] = {}
    z_all, m_all = [], []
    need = n
    while need > 0:  # volumetric z, luminosity function, selection on peak magnitude (accept–reject)
        k = max(64, 20 * need)
        z = _sample_volumetric_z(rng, k, SN_Z_MAX[kind], rate_index=1.5 if kind == "SNIa" else 2.7)
        if kind == "SNIa":
            x1 = np.where(rng.random(k) < 0.75, rng.normal(0.5, 1.0, k), rng.normal(-1.0, 1.0, k))
            c = rng.normal(0.0, 0.1, k)
            abs_r = -19.3 - 0.13 * x1 + 3.0 * c + rng.normal(0, 0.12, k)
            extra = {"x1": x1, "c": c, "ebv_host": np.full(k, np.nan)}
        else:
            ebv = rng.exponential(0.11, k)
            abs_b = rng.normal(-16.75, 1.0, k)
            abs_r = abs_b - 0.15 + 1.7 * ebv  # A_r ≈ 1.7 E(B−V) for R_V = 2 (unc.)
            extra = {"x1": np.full(k, np.nan), "c": np.full(k, np.nan), "ebv_host": ebv}
        m_peak = abs_r + distance_modulus(z)
        p_sel = 1.0 / (1.0 + np.exp((m_peak - SEL_M50) / SEL_W))
        keep = (rng.random(k) < p_sel) & (m_peak < SN_MAX_PEAK_MAG) & (m_peak > 12.8)
        idx = np.nonzero(keep)[0][:need]
        z_all.append(z[idx])
        m_all.append(np.column_stack([abs_r[idx], m_peak[idx]] + [extra[key][idx] for key in ("x1", "c", "ebv_host")]))
        need -= len(idx)
    z = np.concatenate(z_all)
    arr = np.concatenate(m_all)
    p["z"], p["abs_mag_r"], p["peak_mag_r"], p["x1"], p["c"], p["ebv_host"] = (z, *arr.T)
    dil = 1 + z
    if kind == "SNIa":
        x1 = p["x1"]
        stretch = 0.98 + 0.091 * x1 + 0.003 * x1**2  # SALT2 x1 → stretch (Guy+2007, unc.)
        p["stretch"] = stretch
        ts = stretch * dil
        # Villar fit to bts SNIa, r: τ_rise 3.5 [2.3, 5.5], γ 18 [10, 28], τ_fall 29 [21, 53], β 0.025 (PRIORS §4)
        p["tau_rise"] = np.exp(rng.normal(np.log(3.3), 0.25, n)) * ts
        p["gamma"] = np.exp(rng.normal(np.log(17.0), 0.25, n)) * ts
        p["s1"] = np.exp(rng.normal(np.log(0.045), 0.22, n)) / ts  # mag/d (β ≈ 0.025–0.04 of peak flux per day)
        p["tau_fall"] = np.exp(rng.normal(np.log(25.0), 0.25, n)) * ts
        p["colour_offset"] = p["c"] + rng.normal(0, 0.05, n)  # E(g−r) ≈ c (unc.)
        p["colour_stretch"] = ts
        for key in ("drop", "tau_drop", "tau_tail", "plateau_slope"):
            p[key] = np.full(n, np.nan)
    else:
        p["stretch"] = np.full(n, np.nan)
        # Decline on the plateau (r, mag/100 d): lognormal median 1.3, σ_ln 0.8 → [0.45, 3.7] (meas. bts r decline
        # +10→+50 d 1.26 [0.34, 3.47]; A14 s2 1.27 in V); brighter SNe II decline faster (A14: ~0.2 dex/mag, unc.).
        s2 = np.exp(rng.normal(np.log(1.3), 0.8, n) - 0.23 * (p["abs_mag_r"] + 16.9))
        p["plateau_slope"] = s2 / 100.0
        p["s1"] = p["plateau_slope"] / dil
        # Plateau length from t0: A14/dJ19 84 ± 17 d (unc.), shorter for fast decliners (IIL continuum, A14).
        plat = rng.normal(84.0, 17.0, n) * np.clip(1 - 0.15 * np.log2(s2 / 1.3), 0.5, 1.3)
        p["gamma"] = np.clip(plat, 30.0, 150.0) * dil
        # Rise: g ≈ 7.5 d rest (GG15), r slower; Villar τ_rise (r, bts) 3.3 [0.3, 23] (PRIORS §5).
        p["tau_rise"] = np.exp(rng.normal(np.log(2.5), 0.55, n)) * dil
        p["drop"] = rng.uniform(1.3, 2.6, n)  # fall from the plateau, mag (Olivares+2010; A14, unc.)
        p["tau_drop"] = rng.uniform(4.0, 10.0, n) * dil
        p["tau_tail"] = np.full(n, TAU_CO56_D) * dil
        p["tau_fall"] = np.full(n, np.nan)
        # E(g−r) ≈ 0.9 E(B−V) (unc.), about the median: the colour knots were measured on reddened SNe.
        p["colour_offset"] = 0.9 * (p["ebv_host"] - 0.11 * np.log(2)) + rng.normal(0.0, 0.06, n)
        p["colour_stretch"] = dil
    return p


def _sn_draw(rng: np.random.Generator, n: int, ep: Epochs, t0: np.ndarray, p: dict, kind: str):
    """Supernovae: Villar-style r-band flux, g from a literature colour curve, peak magnitudes from a luminosity
    function and a volumetric redshift distribution, with a labelled-sample selection on peak magnitude.

    - z: volumetric (dV/dz/(1+z)) × rate ∝ (1+z)^1.5 (Ia) or ^2.7 (II, star formation) to z 0.3 / 0.15 (unc.).
    - Ia: M_r = −19.3 − 0.13 x1 + 3 c + N(0, 0.12); x1 ~ 0.75 N(0.5, 1) + 0.25 N(−1, 1), c ~ N(0, 0.1) (SS).
      II: M_B ~ N(−16.75, 1.0), host E(B−V) ~ Exp(0.11), R_V = 2 (SS); M_r = M_B − 0.15 + 1.7 E(B−V) (unc.).
    - Peak magnitude selection: logistic at 19.0 ± 0.35 (see module constants), cut at 20.6.
    - Time dilation (1+z) and, for Ia, SALT2 stretch on every timescale; K-corrections are ignored (z ≲ 0.15).
    - t0 uniform over [survey start − 60 d, survey end] (SNe explode at a random time in the survey).
    """
    # Normalise: numerical r peak on a grid (0.5 d).
    grid = np.linspace(-30.0, 200.0, 461)
    oo = np.repeat(np.arange(n), len(grid))
    shape = _sn_shape(np.tile(grid, n), p, oo, kind).reshape(n, len(grid))
    ipk = shape.argmax(axis=1)
    t_peak_rel = grid[ipk]
    amp = flux_from_mag(p["peak_mag_r"]) / shape[np.arange(n), ipk]
    kx, ky = COLOUR_KNOTS[kind]

    def colour(obj, t_rel):
        phase = (t_rel - t_peak_rel[obj]) / p["colour_stretch"][obj]
        return np.interp(phase, kx, ky) + p["colour_offset"][obj]

    t_rel = ep.mjd - t0[ep.obj]
    f_r = amp[ep.obj] * _sn_shape(t_rel, p, ep.obj, kind)
    f = np.where(ep.band == 0, f_r * 10 ** (-0.4 * colour(ep.obj, t_rel)), f_r)
    # True g peak from the grid.
    f_g_grid = shape * amp[:, None] * 10 ** (-0.4 * colour(oo, np.tile(grid, n)).reshape(n, len(grid)))
    ig = f_g_grid.argmax(axis=1)
    truth = pd.DataFrame({
        "z": p["z"], "t0": t0, "t_peak": t0 + t_peak_rel, "t_peak_g": t0 + grid[ig],
        "t_first_light": t0 - 4.6 * p["tau_rise"], "peak_mag_r": p["peak_mag_r"],
        "peak_mag_g": mag_from_flux(f_g_grid[np.arange(n), ig]), "abs_mag_r": p["abs_mag_r"],
        "x1": p["x1"], "c": p["c"], "stretch": p["stretch"], "ebv_host": p["ebv_host"],
        "tau_rise": p["tau_rise"], "gamma": p["gamma"], "decline_s1": p["s1"], "tau_fall": p["tau_fall"],
        "plateau_slope": p["plateau_slope"], "drop_mag": p["drop"], "tau_drop": p["tau_drop"],
        "gr_peak": colour(np.arange(n), t_peak_rel),
    })
    return truth, f, f, np.zeros_like(f)


# --------------------------------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _Batch:
    truth: pd.DataFrame
    obj: np.ndarray
    mjd: np.ndarray
    band: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    f_ref: np.ndarray
    diffmaglim: np.ndarray
    detected: np.ndarray
    flux_true: np.ndarray


def _simulate_batch(kind: str, rng: np.random.Generator, n: int, params: SimulatorParams,
                    weather_ok: np.ndarray) -> _Batch:
    n_nights = int(np.ceil(params.survey_days))
    window = None
    if kind in ("SNIa", "SNII"):
        p = _sn_params(rng, n, kind)
        t0 = params.survey_start_mjd + rng.uniform(-60.0, params.survey_days, n)
        # From 30 d before first light (alert history) to when the SN is ≥ 7 mag below peak (never detected).
        window = (t0 - 7.0 * p["tau_rise"] - PRV_CANDIDATES_DAYS - 1, t0 + SN_WINDOW_D * (1 + p["z"]))
    ep, obs_truth = observe(rng, n, params.survey_start_mjd, n_nights, params.phase, weather_ok, window)
    if kind == "QSO":
        truth, f_diff, f_noise, f_ref = _qso(rng, n, ep, params.survey_start_mjd)
    elif kind == "CEP":
        truth, f_diff, f_noise, f_ref = _cep(rng, n, ep, params.survey_start_mjd)
    else:
        truth, f_diff, f_noise, f_ref = _sn_draw(rng, n, ep, t0, p, kind)
    sigma_true = flux_error(f_noise, ep.band, ep.diffmaglim, ep.err_scale)
    f_obs = f_diff + sigma_true * rng.standard_normal(len(sigma_true))
    # The pipeline's error comes from the image: the source term at the *measured* flux (science = reference +
    # difference). Then, for a SN, |F| ≥ 5σ is exactly "brighter than diffmaglim".
    sigma = flux_error(np.maximum(f_ref + f_obs, 0.0), ep.band, ep.diffmaglim, ep.err_scale)
    usable = mag_from_flux(np.maximum(f_noise, 1e-30)) > SATURATION_MAG
    snr = np.abs(f_obs) / sigma
    # Alert threshold S/N ≥ 5, and the real/bogus + pipeline efficiency that loses marginal candidates.
    efficiency = 1.0 / (1.0 + np.exp(-(snr - EFFICIENCY_SNR50) / EFFICIENCY_WIDTH))
    detected = usable & (snr >= DETECTION_SIGMA) & (rng.random(len(snr)) < efficiency)
    truth = pd.concat([truth, obs_truth], axis=1)
    return _Batch(truth=truth, obj=ep.obj[usable], mjd=ep.mjd[usable], band=ep.band[usable], flux=f_obs[usable],
                  flux_err=sigma[usable], f_ref=f_ref[usable], diffmaglim=ep.diffmaglim[usable],
                  detected=detected[usable], flux_true=f_diff[usable])


def _subset(b: _Batch, keep_obj: np.ndarray, new_index: np.ndarray) -> _Batch:
    """Rows of the objects in ``keep_obj`` (bool per batch object), objects renumbered by ``new_index``."""
    rows = keep_obj[b.obj]
    return _Batch(truth=b.truth.loc[keep_obj].reset_index(drop=True), obj=new_index[b.obj[rows]],
                  mjd=b.mjd[rows], band=b.band[rows], flux=b.flux[rows], flux_err=b.flux_err[rows],
                  f_ref=b.f_ref[rows], diffmaglim=b.diffmaglim[rows], detected=b.detected[rows],
                  flux_true=b.flux_true[rows])


def _concat(batches: list[_Batch]) -> _Batch:
    offs = np.cumsum([0] + [len(b.truth) for b in batches])
    return _Batch(
        truth=pd.concat([b.truth for b in batches], ignore_index=True),
        obj=np.concatenate([b.obj + o for b, o in zip(batches, offs)]),
        **{k: np.concatenate([getattr(b, k) for b in batches])
           for k in ("mjd", "band", "flux", "flux_err", "f_ref", "diffmaglim", "detected", "flux_true")},
    )


def simulate_class(kind: str, n: int, params: SimulatorParams, rng: np.random.Generator,
                   weather_ok: np.ndarray) -> _Batch:
    """``n`` objects of one class that ALeRCE's light-curve classifier would have classified: each has at least
    ``params.min_detections_per_band`` detections in g or in r (objects with fewer are redrawn)."""
    if kind not in CLASSES:
        raise ValueError(f"unknown class {kind!r}; known: {list(CLASSES)}")
    batches: list[_Batch] = []
    have = 0
    yield_frac = {"QSO": 0.5, "CEP": 0.7, "SNIa": 0.6, "SNII": 0.6}[kind]
    for _ in range(200):
        need = n - have
        if need <= 0:
            break
        m = int(np.ceil(need / yield_frac * 1.15)) + 8
        b = _simulate_batch(kind, rng, m, params, weather_ok)
        det_obj, det_band = b.obj[b.detected], b.band[b.detected]
        per_band = np.stack([np.bincount(det_obj[det_band == k], minlength=m) for k in range(len(BANDS))])
        ok = per_band.max(axis=0) >= params.min_detections_per_band
        if kind in ("SNIa", "SNII"):
            # Labelled-sample selection: SNe first detected well after peak are rarely classified.
            first = np.full(m, np.inf)
            np.minimum.at(first, b.obj[b.detected], b.mjd[b.detected])
            late = first > b.truth["t_peak"].to_numpy() + LATE_DISCOVERY_D
            ok &= ~late | (rng.random(m) < P_LATE_KEPT)
        yield_frac = max(0.05, ok.mean())
        ok &= np.cumsum(ok) <= need
        new_index = np.cumsum(ok) - 1
        batches.append(_subset(b, ok, new_index))
        have += int(ok.sum())
    if have < n:
        raise RuntimeError(f"simulator: could not draw {n} {kind} objects with "
                           f"{params.min_detections_per_band} detections in a band")
    return _concat(batches)


def _oid_tag(seed: int) -> str:
    """Three seed-derived characters (base 36), so simulations with different seeds get different oids."""
    v = zlib.crc32(f"deeprubin-sim-{seed}".encode()) % (36**3)
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    return "".join(digits[(v // 36**i) % 36] for i in (2, 1, 0))


def resolve_seed(params: SimulatorParams, seed: int | None = None) -> int:
    if seed is not None:
        return int(seed)
    if params.seed is not None:
        return int(params.seed)
    return DEFAULT_SEED


def _simulate_chunk(task: tuple) -> _Batch:
    kind, size, params, stream, weather_ok = task
    return simulate_class(kind, size, params, np.random.default_rng(stream), weather_ok)


def _run_chunks(tasks: list[tuple], workers: int | None) -> list[_Batch]:
    """Simulate the chunks, in worker processes when there are enough objects to pay for them."""
    return _run_tasks(_simulate_chunk, tasks, workers)


def _select_rows(b, row_g: np.ndarray, params: SimulatorParams) -> tuple[np.ndarray, np.ndarray]:
    """Row indices into the simulated epochs ``b`` (objects numbered ``row_g``): the detections sorted by (object,
    mjd, band), and the non-detections kept as alert history, the 30 days before each detection (ALeRCE's
    prv_candidates), sorted the same way. Every step is per object, so a chunk gives its objects' rows exactly."""
    d = b.detected
    di = np.nonzero(d)[0][np.lexsort((b.band[d], b.mjd[d], row_g[d]))]
    span = params.survey_days + 2000.0
    key_det = row_g[di] * span + (b.mjd[di] - params.survey_start_mjd + 500.0)
    nd = np.nonzero(~d)[0]
    key_nd = row_g[nd] * span + (b.mjd[nd] - params.survey_start_mjd + 500.0)
    nxt = np.searchsorted(key_det, key_nd, side="right")
    valid = nxt < len(key_det)
    nxt_c = np.minimum(nxt, len(key_det) - 1)
    valid &= (row_g[di][nxt_c] == row_g[nd]) & (b.mjd[di][nxt_c] - b.mjd[nd] <= PRV_CANDIDATES_DAYS)
    nd = nd[valid]
    return di, nd[np.lexsort((b.band[nd], b.mjd[nd], row_g[nd]))]


def simulate(params: SimulatorParams, classes: Sequence[str] = CLASSES, seed: int | None = None,
             workers: int | None = None) -> SimulatedLightCurves:
    """Simulate ``params.n_per_class`` ZTF-like alert light curves per class (contract tables + truth).

    ``seed`` overrides ``params.seed``, which overrides 42. Same seed, same tables (byte for byte); each class draws
    from its own child stream of the seed, so its objects do not depend on which other classes are simulated.
    Classes are simulated in chunks of ``CHUNK_OBJECTS`` objects, on ``workers`` processes (default: one per core);
    the output is the same for any number of workers.
    """
    seed = resolve_seed(params, seed)
    classes = list(classes)
    unknown = [c for c in classes if c not in CLASSES]
    if unknown or len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be distinct members of {list(CLASSES)}; got {classes}")
    n = params.n_per_class
    root = np.random.SeedSequence(seed)
    streams = root.spawn(len(CLASSES) + 2)
    weather_ok = weather(np.random.default_rng(streams[-1]), int(np.ceil(params.survey_days)) + 1)
    # Fixed-size chunks, each with its own child stream: the result does not depend on how many workers run them.
    tasks = []
    for c in classes:
        sizes = [min(CHUNK_OBJECTS, n - start) for start in range(0, n, CHUNK_OBJECTS)]
        for size, stream in zip(sizes, streams[CLASSES.index(c)].spawn(len(sizes))):
            tasks.append((c, size, params, stream, weather_ok))
    batches = _run_chunks(tasks, workers)
    total = n * len(classes)
    width = max(7, len(str(total - 1)))
    perm = np.random.default_rng(streams[-2]).permutation(total)  # interleave classes: the oid hides the label
    tag = _oid_tag(seed)
    b = _concat(batches)
    labels = np.repeat(np.array(classes, dtype=object), n)
    gidx = perm  # global index (= oid number) of each object in concatenation order
    oid_of = np.array([f"{params.oid_prefix}{tag}{i:0{width}d}" for i in range(total)], dtype=object)

    # Detections, sorted by (oid, mjd, band): oids are fixed-width so string order = number order.
    row_g = gidx[b.obj]
    di, nd = _select_rows(b, row_g, params)
    flux, flux_err = b.flux[di], b.flux_err[di]
    mag = mag_from_flux(flux)
    mag_err = LN10_25 * flux_err / np.abs(flux)
    f_ref = b.f_ref[di]
    is_sn = f_ref <= 0
    f_corr = f_ref + flux
    with np.errstate(divide="ignore", invalid="ignore"):
        mag_corr = np.where(is_sn | (f_corr <= 0), np.nan, mag_from_flux(f_corr))
        mag_corr_err = np.where(np.isnan(mag_corr), np.nan, LN10_25 * flux_err / f_corr)
    band_names = np.array(BANDS, dtype=object)
    detections = pd.DataFrame({
        "oid": oid_of[row_g[di]], "mjd": b.mjd[di], "band": band_names[b.band[di]], "mag": mag, "mag_err": mag_err,
        "flux": flux, "flux_err": flux_err, "mag_corr": mag_corr, "mag_corr_err": mag_corr_err, "source": SOURCE,
    })

    non_detections = pd.DataFrame({"oid": oid_of[row_g[nd]], "mjd": b.mjd[nd], "band": band_names[b.band[nd]],
                                   "diffmaglim": b.diffmaglim[nd]})

    # Objects and truth, sorted by oid.
    ingested_at = (MJD_EPOCH + pd.to_timedelta(params.survey_start_mjd + params.survey_days, unit="D")).floor("us")
    det_obj = row_g[di]
    n_det = np.bincount(det_obj, minlength=total)
    first = np.full(total, np.nan)
    last = np.full(total, np.nan)
    starts = np.searchsorted(det_obj, np.arange(total), side="left")
    ends = np.searchsorted(det_obj, np.arange(total), side="right")
    mjd_sorted = b.mjd[di]
    first[n_det > 0] = mjd_sorted[starts[n_det > 0]]
    last[n_det > 0] = mjd_sorted[ends[n_det > 0] - 1]
    inv = np.argsort(gidx)  # concatenation position of each global index
    objects = pd.DataFrame({
        "oid": oid_of, "label": labels[inv], "label_source": LABEL_SOURCE, "label_probability": 1.0,
        "first_mjd": first, "last_mjd": last, "n_det": n_det.astype("int64"), "source": SOURCE,
        "ingested_at": pd.Series([ingested_at] * total, dtype="datetime64[us, UTC]"),
    })
    truth = b.truth.iloc[inv].reset_index(drop=True)
    truth.insert(0, "label", labels[inv])
    truth.insert(0, "oid", oid_of)
    for col in ("mode",):
        if col in truth:
            truth[col] = truth[col].astype(object)
    return SimulatedLightCurves(objects=objects, detections=detections, non_detections=non_detections, truth=truth)



# --------------------------------------------------------------------------------------------------------------
# The same tables streamed: blocks of consecutive oids, memory independent of the number of objects
# --------------------------------------------------------------------------------------------------------------
BLOCK_OBJECTS = 2000  # objects per block that simulate_blocks yields
_DET_COLUMNS = (("mjd", "f8"), ("flux", "f8"), ("flux_err", "f8"), ("f_ref", "f8"), ("band", "i1"))
_ND_COLUMNS = (("mjd", "f8"), ("diffmaglim", "f8"), ("band", "i1"))


@dataclass
class _Spilled:
    """One chunk's rows, written by its worker to ``path`` column after column (detections, then non-detections),
    each sorted as the tables are (global index, mjd, band); its objects listed by global index."""

    path: str
    label: str
    gidx: np.ndarray  # int64, the chunk's objects' global indices (= oid numbers), ascending
    det_start: np.ndarray  # int64, len(gidx) + 1: the object's first detection row (and the end)
    nd_start: np.ndarray

    def read(self, columns: tuple, base: int, n_rows: int, lo: int, hi: int, fh) -> dict[str, np.ndarray]:
        out, offset = {}, base
        for name, dtype in columns:
            size = np.dtype(dtype).itemsize
            fh.seek(offset + lo * size)
            out[name] = np.frombuffer(fh.read((hi - lo) * size), dtype=dtype)
            offset += n_rows * size
        return out


def _spill_chunk(task: tuple) -> _Spilled:
    """A worker: simulate one chunk (as :func:`_simulate_chunk`), select and sort its rows as :func:`simulate`
    does for the whole set (every step is per object, so a chunk gives its objects' rows exactly), write them."""
    kind, size, params, stream, weather_ok, gidx_local, path = task
    b = _simulate_chunk((kind, size, params, stream, weather_ok))
    row_g = gidx_local[b.obj]
    di, nd = _select_rows(b, row_g, params)
    gidx = np.sort(gidx_local)
    det_g, nd_g = row_g[di], row_g[nd]
    bounds = np.append(gidx, np.iinfo(np.int64).max)
    with open(path, "wb") as fh:
        for name, dtype in _DET_COLUMNS:
            np.ascontiguousarray(getattr(b, name)[di], dtype=dtype).tofile(fh)
        for name, dtype in _ND_COLUMNS:
            np.ascontiguousarray(getattr(b, name)[nd], dtype=dtype).tofile(fh)
    return _Spilled(path=str(path), label=kind, gidx=gidx.astype(np.int64),
                    det_start=np.searchsorted(det_g, bounds, side="left").astype(np.int64),
                    nd_start=np.searchsorted(nd_g, bounds, side="left").astype(np.int64))


def simulate_blocks(params: SimulatorParams, scratch: Path | str, classes: Sequence[str] = CLASSES,
                    seed: int | None = None, workers: int | None = None,
                    block_objects: int = BLOCK_OBJECTS) -> Iterator[LightCurves]:
    """:func:`simulate`'s contract tables (no truth) as blocks of ``block_objects`` consecutive oids, in oid order:
    concatenated, they are :func:`simulate`'s tables, row for row and value for value, for any block size and any
    number of workers.

    The workers write each chunk's rows into the folder ``scratch`` (one file per chunk, removed as the last block
    is yielded) instead of sending them back, and each block reads its objects' rows from there: the memory held
    is one block's, whatever the number of objects. Yields :class:`LightCurves` (objects with the simulator's
    columns, detections, non-detections).
    """
    seed = resolve_seed(params, seed)
    classes = list(classes)
    unknown = [c for c in classes if c not in CLASSES]
    if unknown or len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be distinct members of {list(CLASSES)}; got {classes}")
    if block_objects < 1:
        raise ValueError("block_objects must be at least 1")
    n = params.n_per_class
    root = np.random.SeedSequence(seed)
    streams = root.spawn(len(CLASSES) + 2)
    weather_ok = weather(np.random.default_rng(streams[-1]), int(np.ceil(params.survey_days)) + 1)
    total = n * len(classes)
    perm = np.random.default_rng(streams[-2]).permutation(total)  # as simulate(): concatenation position -> oid
    scratch = Path(scratch)
    tasks, position = [], 0
    for c in classes:
        sizes = [min(CHUNK_OBJECTS, n - start) for start in range(0, n, CHUNK_OBJECTS)]
        for size, stream in zip(sizes, streams[CLASSES.index(c)].spawn(len(sizes))):
            path = scratch / f"chunk-{len(tasks):06d}.bin"
            tasks.append((c, size, params, stream, weather_ok, perm[position:position + size].copy(), path))
            position += size
    del perm
    spilled = _run_tasks(_spill_chunk, tasks, workers)
    width = max(7, len(str(total - 1)))
    tag = _oid_tag(seed)
    ingested_at = (MJD_EPOCH + pd.to_timedelta(params.survey_start_mjd + params.survey_days, unit="D")).floor("us")
    band_names = np.array(BANDS, dtype=object)
    try:
        for start in range(0, total, block_objects):
            yield _block(spilled, start, min(total, start + block_objects), params, tag, width, band_names,
                         ingested_at)
    finally:
        for sp in spilled:
            Path(sp.path).unlink(missing_ok=True)


def _block(spilled: list[_Spilled], start: int, end: int, params: SimulatorParams, tag: str, width: int,
           band_names: np.ndarray, ingested_at: pd.Timestamp) -> LightCurves:
    """The tables of the objects with global index in [start, end), built as :func:`simulate` builds them."""
    det_parts, nd_parts, det_g, nd_g = [], [], [], []
    labels = np.empty(end - start, dtype=object)
    for sp in spilled:
        i0, i1 = np.searchsorted(sp.gidx, [start, end])
        if i0 == i1:
            continue
        g = sp.gidx[i0:i1]
        labels[g - start] = sp.label
        n_det_rows, n_nd_rows = int(sp.det_start[-1]), int(sp.nd_start[-1])
        det_counts, nd_counts = np.diff(sp.det_start[i0:i1 + 1]), np.diff(sp.nd_start[i0:i1 + 1])
        with open(sp.path, "rb") as fh:
            det_parts.append(sp.read(_DET_COLUMNS, 0, n_det_rows, int(sp.det_start[i0]), int(sp.det_start[i1]), fh))
            nd_base = sum(n_det_rows * np.dtype(t).itemsize for _, t in _DET_COLUMNS)
            nd_parts.append(sp.read(_ND_COLUMNS, nd_base, n_nd_rows, int(sp.nd_start[i0]), int(sp.nd_start[i1]),
                                    fh))
        det_g.append(np.repeat(g, det_counts))
        nd_g.append(np.repeat(g, nd_counts))

    def gather(parts: list[dict[str, np.ndarray]], columns: tuple, g: list[np.ndarray]):
        cols = {name: np.concatenate([p[name] for p in parts]) for name, _ in columns}
        rows = np.concatenate(g)
        order = np.lexsort((cols["band"], cols["mjd"], rows))
        return {k: v[order] for k, v in cols.items()}, rows[order]

    oid_of = np.array([f"{params.oid_prefix}{tag}{i:0{width}d}" for i in range(start, end)], dtype=object)
    det, det_rows = gather(det_parts, _DET_COLUMNS, det_g)
    flux, flux_err, f_ref = det["flux"], det["flux_err"], det["f_ref"]
    mag = mag_from_flux(flux)
    mag_err = LN10_25 * flux_err / np.abs(flux)
    is_sn = f_ref <= 0
    f_corr = f_ref + flux
    with np.errstate(divide="ignore", invalid="ignore"):
        mag_corr = np.where(is_sn | (f_corr <= 0), np.nan, mag_from_flux(f_corr))
        mag_corr_err = np.where(np.isnan(mag_corr), np.nan, LN10_25 * flux_err / f_corr)
    local = det_rows - start
    detections = pd.DataFrame({
        "oid": oid_of[local], "mjd": det["mjd"], "band": band_names[det["band"]], "mag": mag, "mag_err": mag_err,
        "flux": flux, "flux_err": flux_err, "mag_corr": mag_corr, "mag_corr_err": mag_corr_err, "source": SOURCE,
    })
    nd, nd_rows = gather(nd_parts, _ND_COLUMNS, nd_g)
    non_detections = pd.DataFrame({"oid": oid_of[nd_rows - start], "mjd": nd["mjd"], "band": band_names[nd["band"]],
                                   "diffmaglim": nd["diffmaglim"]})
    count = end - start
    n_det = np.bincount(local, minlength=count)
    first = np.full(count, np.nan)
    last = np.full(count, np.nan)
    starts = np.searchsorted(local, np.arange(count), side="left")
    ends = np.searchsorted(local, np.arange(count), side="right")
    first[n_det > 0] = det["mjd"][starts[n_det > 0]]
    last[n_det > 0] = det["mjd"][ends[n_det > 0] - 1]
    objects = pd.DataFrame({
        "oid": oid_of, "label": labels, "label_source": LABEL_SOURCE, "label_probability": 1.0,
        "first_mjd": first, "last_mjd": last, "n_det": n_det.astype("int64"), "source": SOURCE,
        "ingested_at": pd.Series([ingested_at] * count, dtype="datetime64[us, UTC]"),
    })
    return LightCurves(objects=objects, detections=detections, non_detections=non_detections)


def _run_tasks(fn, tasks: list[tuple], workers: int | None) -> list:
    """``fn`` over the chunk tasks, in worker processes when there are enough objects to pay for them (as
    :func:`_run_chunks`); results in task order."""
    n_objects = sum(t[1] for t in tasks)
    workers = min(len(tasks), os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or n_objects < PARALLEL_MIN_OBJECTS:
        return [fn(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
        futures = {i: pool.submit(fn, tasks[i])
                   for i in sorted(range(len(tasks)), key=lambda i: tasks[i][0] != "QSO")}
        return [futures[i].result() for i in range(len(tasks))]


__all__ = [
    "SimulatedLightCurves", "simulate", "simulate_blocks", "simulate_class", "observe", "flux_error", "ou_process",
    "ou_process_reference", "cepheid_template", "distance_modulus", "sigma_mag_model", "weather",
    "DETECTIONS_SCHEMA", "NON_DETECTIONS_SCHEMA", "OBJECTS_SCHEMA",
]
