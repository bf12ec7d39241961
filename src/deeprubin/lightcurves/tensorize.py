"""Light curves -> model input: the one path from detections to the ``(N, C, grid_days)`` tensor, shared by the
``preprocess`` stage, training views, evaluation and every serving path (files, alerts, HTTP).

Per object: the window (:mod:`deeprubin.lightcurves.window`), a Matérn-3/2 GP per band
(:mod:`deeprubin.lightcurves.gp`) evaluated on the daily grid, and a float32 tensor of shape ``(C, grid_days)``
with the channels :data:`CHANNELS`:

==========  =====================================================================================================
gp_mean_g   GP mean of the g difference flux / ``flux_scale``
gp_mean_r   GP mean of the r difference flux / ``flux_scale``
gp_std_g    GP standard deviation in g / ``flux_scale`` (> 0)
gp_std_r    GP standard deviation in r / ``flux_scale`` (> 0)
since_g     time since the latest g detection at or before the grid point: ``log1p(dt) / log1p(grid_days)``, dt
            capped at ``grid_days``; 0 on a day with a detection, 1 before the band's first detection
since_r     the same for r
==========  =====================================================================================================

Per-object normalisation: ``flux_scale`` is the largest |flux| among the object's detections inside the window
(both bands together, at least the median flux error of those detections, so never ~0). One scale for both bands
keeps the colour (g/r ratio) and the sign of a difference flux (0 = the reference image's level) meaningful; it
depends on the given detections only, so it is the same at training and at inference. ``index.parquet`` records
``flux_scale``, so ``gp_mean * flux_scale`` is the GP mean in µJy again.

An object that cannot be made into a tensor is skipped with its reason (:class:`Skip`); no exception from one object
escapes a batch, and nothing non-finite is ever returned.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from deeprubin.lightcurves import gp
from deeprubin.lightcurves.window import Window, early_cut, fit_start, truncate, window_for
from deeprubin.schema import BAND_INDEX, DETECTION_KEY, PLAUSIBLE_MJD, implausible_brightness, implausible_time

CHANNELS: tuple[str, ...] = ("gp_mean_g", "gp_mean_r", "gp_std_g", "gp_std_r", "since_g", "since_r")


class Skip(Exception):
    """This object cannot be made into a tensor; ``reason`` is counted in the report, ``detail`` names the case."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Curve:
    """One object's detections as arrays (band: 0 = g, 1 = r), sorted by time."""

    oid: str
    mjd: np.ndarray
    band: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray

    @classmethod
    def from_frame(cls, oid: str, det: pd.DataFrame) -> "Curve":
        det = det.sort_values(["mjd", "band"], kind="mergesort")
        band = band_index(det["band"])
        return cls(oid=str(oid), mjd=det["mjd"].to_numpy(dtype=np.float64),
                   band=np.where(pd.isna(band), -1, band).astype(np.int64),
                   flux=det["flux"].to_numpy(dtype=np.float64), flux_err=det["flux_err"].to_numpy(dtype=np.float64))


def cut_after_first(curve: Curve, days: float, oid: str | None = None) -> Curve:
    """The curve as it was ``days`` after its first detection (:func:`deeprubin.lightcurves.window.early_cut`),
    named ``oid`` (default: the same name)."""
    if not len(curve.mjd):
        return curve if oid is None else replace(curve, oid=oid)
    keep = early_cut(curve.mjd, curve.mjd.min(), days)
    return Curve(curve.oid if oid is None else oid, curve.mjd[keep], curve.band[keep], curve.flux[keep],
                 curve.flux_err[keep])


@dataclass(frozen=True)
class PreparedCurve:
    """What the GP is given for one object: times relative to the window start, and the window itself."""

    oid: str
    window: Window
    t: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    band: np.ndarray
    in_window: np.ndarray  # bool per fitted detection
    flux_scale: float

    def gp_args(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.t, self.flux, self.flux_err, self.band, self.window.grid()

    def meta(self) -> dict[str, Any]:
        w = self.window
        return {"window_start_mjd": w.start_mjd, "window_end_mjd": w.end_mjd, "anchored": w.anchored,
                "first_mjd": w.first_mjd, "last_mjd": w.last_mjd,
                "n_det_g": int(((self.band == 0) & self.in_window).sum()),
                "n_det_r": int(((self.band == 1) & self.in_window).sum()),
                "n_fit": int(len(self.t)), "flux_scale": float(self.flux_scale)}


def screen(curve: Curve) -> Curve:
    """The curve without the points no ZTF-like photometry gives (:func:`deeprubin.schema.implausible_brightness`:
    brighter than magnitude 5, or a sentinel such as 99). Raises Skip, naming the reason, for times that are no
    plausible MJD (a JD where an MJD belongs, or outside 1990-2050: the whole object) and for a curve that had
    points and has none left. Files are screened point by point before this (validation counts what it drops);
    here every path (the HTTP service, alert streams, files, training) is guarded alike."""
    problem = implausible_time(curve.mjd)
    if problem is not None:
        raise Skip(*problem)
    masks = implausible_brightness(curve.flux, curve.flux_err)
    bad = np.zeros(len(curve.mjd), dtype=bool)
    for mask, _ in masks:
        bad |= mask
    if not bad.any():
        return curve
    if bad.all():
        counts = [(int(mask.sum()), reason) for mask, reason in masks if mask.any()]
        raise Skip(max(counts)[1], "; ".join(f"{n} x {reason}" for n, reason in counts))
    keep = ~bad
    return replace(curve, mjd=curve.mjd[keep], band=curve.band[keep], flux=curve.flux[keep],
                   flux_err=curve.flux_err[keep])


def screen_curves(curves: Sequence[Curve],
                  dropped: Counter | None = None) -> tuple[list[Curve], list[dict[str, str]]]:
    """:func:`screen` of many curves: ``(curves kept, rejections {oid, reason, detail})``. ``dropped``, when given,
    counts the points dropped from the curves kept, by reason (the objects rejected whole are in the rejections)."""
    kept, rejected = [], []
    for curve in curves:
        try:
            screened = screen(curve)
        except Skip as skip:
            rejected.append({"oid": curve.oid, "reason": skip.reason, "detail": skip.detail})
            continue
        kept.append(screened)
        if dropped is not None and len(screened.mjd) != len(curve.mjd):
            for mask, reason in implausible_brightness(curve.flux, curve.flux_err):
                if mask.any():
                    dropped[reason] += int(mask.sum())
    return kept, rejected


DUPLICATE_POINT = f"duplicate key {DETECTION_KEY}"  # the reason files' validation gives (validate_detections)


def drop_duplicate_points(curve: Curve) -> tuple[Curve, int]:
    """``(curve, n)``: the curve with one point per (mjd, band), the first given of each kept, and the number of
    points dropped; as files' validation does (:func:`deeprubin.schema.validate_detections`: a duplicate
    (oid, mjd, band) is dropped with the reason :data:`DUPLICATE_POINT`), so a repeated point neither counts twice
    in ``n_det`` nor weighs twice in the GP."""
    n = len(curve.mjd)
    if n < 2:
        return curve, 0
    order = np.lexsort((curve.band, curve.mjd))  # stable: among equal keys, the order given
    mjd, band = curve.mjd[order], curve.band[order]
    repeat = np.r_[False, (mjd[1:] == mjd[:-1]) & (band[1:] == band[:-1])]
    if not repeat.any():
        return curve, 0
    keep = np.ones(n, dtype=bool)
    keep[order[repeat]] = False
    return replace(curve, mjd=curve.mjd[keep], band=curve.band[keep], flux=curve.flux[keep],
                   flux_err=curve.flux_err[keep]), int(repeat.sum())


def prepare(curve: Curve, grid_days: int = 100, fit_context_days: float = 100.0,
            until_mjd: float | None = None) -> PreparedCurve:
    """Screen the curve (:func:`screen`), cut it at ``until_mjd``, choose its window, and select the detections the
    GP sees. Raises Skip."""
    curve = screen(curve)
    ok = np.isfinite(curve.mjd) & np.isfinite(curve.flux) & np.isfinite(curve.flux_err) & (curve.flux_err > 0) \
        & np.isin(curve.band, (0, 1))
    if until_mjd is not None:
        ok &= curve.mjd <= until_mjd
    if not ok.any():
        raise Skip("no usable detections", "none finite in g or r" + ("" if until_mjd is None else
                                                                      f" up to mjd {until_mjd}"))
    mjd = curve.mjd[ok]
    window = window_for(mjd.min(), mjd.max(), grid_days)
    keep = mjd >= fit_start(window, fit_context_days)
    t = mjd[keep] - window.start_mjd
    flux, flux_err, band = curve.flux[ok][keep], curve.flux_err[ok][keep], curve.band[ok][keep]
    order = np.lexsort((band, t))
    t, flux, flux_err, band = t[order], flux[order], flux_err[order], band[order]
    in_window = t >= 0
    scale = float(np.max(np.abs(flux[in_window])))
    scale = max(scale, float(np.median(flux_err[in_window])))
    return PreparedCurve(oid=curve.oid, window=window, t=t, flux=flux, flux_err=flux_err, band=band,
                         in_window=in_window, flux_scale=scale)


def prepare_many(curves: Sequence[Curve], grid_days: int = 100, fit_context_days: float = 100.0,
                 until_mjd: float | None = None) -> list[PreparedCurve | Exception]:
    """:func:`prepare` of each curve, the same to the bit, with the per-curve work done once for the whole batch
    (numpy over the concatenated points): a PreparedCurve, or the exception :func:`prepare` raises, per curve.

    Only ordinary curves take the batched path: arrays of the right types, every point usable and plausible.
    Any other (a point to screen out or drop, an empty curve, odd types) goes through :func:`prepare` itself, so
    its Skip and its reason are those of the one-curve path."""
    n = len(curves)
    out: list[PreparedCurve | Exception | None] = [None] * n
    plain = np.zeros(n, dtype=bool)
    if grid_days >= 2:
        for i, c in enumerate(curves):
            plain[i] = (isinstance(c.mjd, np.ndarray) and c.mjd.dtype == np.float64 and c.mjd.ndim == 1
                        and isinstance(c.flux, np.ndarray) and c.flux.dtype == np.float64
                        and isinstance(c.flux_err, np.ndarray) and c.flux_err.dtype == np.float64
                        and isinstance(c.band, np.ndarray) and c.band.dtype == np.int64
                        and len(c.mjd) > 0 and c.flux.shape == c.flux_err.shape == c.band.shape == c.mjd.shape)
    idx = np.flatnonzero(plain)
    if len(idx):
        batch = [curves[i] for i in idx]
        lens = np.fromiter((len(c.mjd) for c in batch), dtype=np.int64, count=len(batch))
        seg = np.repeat(np.arange(len(batch)), lens)
        mjd = np.concatenate([c.mjd for c in batch])
        band = np.concatenate([c.band for c in batch])
        flux = np.concatenate([c.flux for c in batch])
        err = np.concatenate([c.flux_err for c in batch])
        with np.errstate(invalid="ignore"):
            odd = ~np.isfinite(mjd) | (mjd < PLAUSIBLE_MJD[0]) | (mjd > PLAUSIBLE_MJD[1])  # screen()'s time rule
            for mask, _ in implausible_brightness(flux, err):  # and its brightness rules
                odd |= mask
            odd |= ~(np.isfinite(flux) & np.isfinite(err) & (err > 0) & ((band == 0) | (band == 1)))
            if until_mjd is not None:
                odd |= ~(mjd <= until_mjd)
        fine = np.bincount(seg, weights=odd, minlength=len(batch)) == 0
        plain[idx[~fine]] = False
        if fine.any():
            take = fine[seg]
            g_lens = lens[fine]
            m, b, f, e = mjd[take], band[take], flux[take], err[take]
            g = np.repeat(np.arange(len(g_lens)), g_lens)
            starts = np.r_[0, np.cumsum(g_lens)[:-1]]
            first = np.minimum.reduceat(m, starts)
            last = np.maximum.reduceat(m, starts)
            start = np.maximum(first, last - (grid_days - 1))  # window_for's rule
            keep = m >= (start - float(fit_context_days))[g]  # fit_start
            g, m, b, f, e = g[keep], m[keep], b[keep], f[keep], e[keep]
            t = m - start[g]
            order = np.lexsort((b, t, g))  # per curve: lexsort((band, t)), stable
            g, t, b, f, e = g[order], t[order], b[order], f[order], e[order]
            in_window = t >= 0
            k_lens = np.bincount(g, minlength=len(g_lens))
            k_starts = np.r_[0, np.cumsum(k_lens)[:-1]]
            scale = np.maximum.reduceat(np.where(in_window, np.abs(f), -np.inf), k_starts)
            # the median of each curve's in-window errors, as np.median computes it
            gw, ew = g[in_window], e[in_window]
            srt = ew[np.lexsort((ew, gw))]
            w_lens = np.bincount(gw, minlength=len(g_lens))
            w_starts = np.r_[0, np.cumsum(w_lens)[:-1]]
            hi = srt[w_starts + w_lens // 2]
            lo = srt[w_starts + np.maximum(w_lens // 2 - 1, 0)]
            median = np.where(w_lens % 2 == 1, hi, (lo + hi) / 2.0)
            scale = np.maximum(scale, median)
            ends = k_starts + k_lens
            for j, i in enumerate(idx[fine]):
                a, z = k_starts[j], ends[j]
                window = Window(start_mjd=float(start[j]), grid_days=int(grid_days), first_mjd=float(first[j]),
                                last_mjd=float(last[j]))
                out[i] = PreparedCurve(oid=curves[i].oid, window=window, t=t[a:z], flux=f[a:z], flux_err=e[a:z],
                                       band=b[a:z], in_window=in_window[a:z], flux_scale=float(scale[j]))
    for i in np.flatnonzero(~plain):
        try:
            out[i] = prepare(curves[i], grid_days, fit_context_days, until_mjd)
        except Exception as exc:  # noqa: BLE001 - the caller names the reason
            out[i] = exc
    return out  # type: ignore[return-value]


def time_since_detection(t: np.ndarray, band: np.ndarray, grid: np.ndarray, grid_days: int) -> np.ndarray:
    """(2, G): for each band, ``log1p(dt) / log1p(grid_days)`` with dt the days since the latest detection at or
    before the grid point, capped at ``grid_days`` (1.0 before the band's first detection)."""
    out = np.ones((2, len(grid)), dtype=np.float64)
    for b in (0, 1):
        tb = np.sort(t[band == b])
        if not len(tb):
            continue
        idx = np.searchsorted(tb, grid, side="right") - 1
        seen = idx >= 0
        dt = np.full(len(grid), float(grid_days))
        dt[seen] = np.minimum(grid[seen] - tb[idx[seen]], grid_days)
        out[b] = np.log1p(dt) / np.log1p(grid_days)
    return out


def assemble(prep: PreparedCurve, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The (C, G) float32 tensor of one object from its GP mean and std (2, G) in µJy. Raises Skip if not finite."""
    grid = prep.window.grid()
    g = len(grid)
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    if mean.shape != (2, g) or std.shape != (2, g):
        raise Skip("GP output has the wrong shape", f"mean {mean.shape}, std {std.shape}, expected (2, {g})")
    x = np.empty((len(CHANNELS), g), dtype=np.float64)
    x[0:2] = mean / prep.flux_scale
    x[2:4] = std / prep.flux_scale
    x[4:6] = time_since_detection(prep.t, prep.band, grid, prep.window.grid_days)
    x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():
        raise Skip("GP output is not finite", "NaN or infinite (or beyond float32) in the mean or std")
    if not (x32[2:4] > 0).all():
        raise Skip("GP output is not finite", "standard deviation not positive")
    return x32


def interpolate_batch_invariant(preps: Sequence[PreparedCurve]) -> list[Any]:
    """:func:`interpolate` with :data:`deeprubin.lightcurves.gp.BATCH_INVARIANT`: each curve's result is the same to
    the bit whatever other curves share the call (the preprocess stage's interpolator)."""
    return interpolate(preps, gp.BATCH_INVARIANT)


def interpolate(preps: Sequence[PreparedCurve], settings: gp.GPSettings = gp.DEFAULT_SETTINGS) -> list[Any]:
    """GP results for many prepared curves; an exception for one curve is returned in its place, never raised."""
    try:
        results = list(gp.interpolate_batch([p.gp_args() for p in preps], settings=settings))
        if len(results) != len(preps):
            raise RuntimeError(f"interpolate_batch returned {len(results)} results for {len(preps)} curves")
    except Exception:  # a bug in the batch path must not take down the other objects: one at a time
        results = []
        for p in preps:
            try:
                results.append(gp.interpolate(*p.gp_args(), settings=settings))
            except Exception as exc:  # noqa: BLE001 -- recorded as this object's skip reason
                results.append(exc)
    return results


def skip_from_exception(exc: BaseException) -> Skip:
    if isinstance(exc, Skip):
        return exc
    if isinstance(exc, gp.GPInputError):
        return Skip(f"cannot interpolate: {reason_key(str(exc))}", str(exc))
    return Skip(f"GP failed: {type(exc).__name__}", str(exc))


@dataclass
class Tensors:
    """Tensors of a batch of objects: X (N, C, G) float32, one meta row per X row, and the objects skipped."""

    x: np.ndarray
    rows: list[dict[str, Any]]
    skipped: list[dict[str, str]]


def tensorize_curves(curves: Sequence[Curve], grid_days: int = 100, fit_context_days: float = 100.0,
                     until_mjd: float | None = None,
                     interpolator: Callable[[Sequence[PreparedCurve]], list[Any]] | None = None) -> Tensors:
    """The one path from light curves to model input, shared by the stage, evaluation and classification.

    ``interpolator`` replaces :func:`interpolate` (benchmarks run the same path with a baseline GP)."""
    preps: list[PreparedCurve] = []
    skipped: list[dict[str, str]] = []
    for curve, prep in zip(curves, prepare_many(curves, grid_days, fit_context_days, until_mjd)):
        if isinstance(prep, PreparedCurve):
            preps.append(prep)
            continue
        skip = prep if isinstance(prep, Skip) else Skip(f"bad light curve: {type(prep).__name__}", str(prep))
        skipped.append({"oid": curve.oid, "reason": skip.reason, "detail": skip.detail})
    results = (interpolator or interpolate)(preps) if preps else []
    xs, rows = [], []
    for prep, res in zip(preps, results):
        try:
            if isinstance(res, BaseException):
                raise res
            x = assemble(prep, res.mean, res.std)
        except Exception as exc:  # noqa: BLE001
            skip = skip_from_exception(exc)
            skipped.append({"oid": prep.oid, "reason": skip.reason, "detail": skip.detail})
            continue
        xs.append(x)
        rows.append({"oid": prep.oid, **prep.meta(), "status": str(res.status)})
    x = np.stack(xs) if xs else np.zeros((0, len(CHANNELS), grid_days), dtype=np.float32)
    return Tensors(x=x, rows=rows, skipped=skipped)


def band_index(bands: pd.Series) -> np.ndarray:
    """``g``/``r`` -> 0/1, anything else -> -1 (vectorised: each distinct value is looked up once)."""
    codes, names = pd.factorize(bands)
    lookup = np.array([BAND_INDEX.get(b, -1) for b in names] + [-1], dtype=np.int64)  # code -1 (NaN) -> -1
    return lookup[codes]


def curves_from_detections(detections: pd.DataFrame) -> list[Curve]:
    """Contract detections (any number of objects) -> one Curve per oid, in oid order.

    Equal to ``Curve.from_frame`` per group, with one sort of the whole table instead of one per object."""
    if detections.empty:
        return []
    det = detections.assign(oid=detections["oid"].astype(str)).sort_values(["oid", "mjd", "band"], kind="mergesort")
    oid = det["oid"].to_numpy()
    band = band_index(det["band"])
    mjd, flux, err = (det[c].to_numpy(dtype=np.float64) for c in ("mjd", "flux", "flux_err"))
    starts = np.r_[0, np.flatnonzero(oid[1:] != oid[:-1]) + 1]
    ends = np.r_[starts[1:], len(oid)]
    return [Curve(oid=oid[a], mjd=mjd[a:b], band=band[a:b], flux=flux[a:b], flux_err=err[a:b])
            for a, b in zip(starts, ends)]


def tensorize(detections: pd.DataFrame, grid_days: int = 100, fit_context_days: float = 100.0,
              until_mjd: float | None = None) -> Tensors:
    """Contract detections -> model input (what `deeprubin classify` and evaluation call)."""
    return tensorize_curves(curves_from_detections(truncate(detections, until_mjd)), grid_days, fit_context_days)


def interpolate_one(detections: pd.DataFrame, grid_days: int = 100, fit_context_days: float = 100.0,
                    until_mjd: float | None = None):
    """(PreparedCurve, GPResult) of one object's detections, in µJy (for plots). Raises Skip or GPInputError."""
    curves = curves_from_detections(detections)
    if len(curves) != 1:
        raise Skip("expected one object", f"got {len(curves)}")
    prep = prepare(curves[0], grid_days, fit_context_days, until_mjd)
    return prep, gp.interpolate(*prep.gp_args())



def reason_key(message: str) -> str:
    """A countable reason from a message that may carry object-specific numbers: 'no usable points: 3 given' ->
    'no usable points'; 'dropped 2 bad point(s)' -> 'dropped N bad point(s)'."""
    head = re.split(r": |\(\d", message, maxsplit=1)[0].strip()
    return re.sub(r"\d+(\.\d+)?", "N", head) or message
