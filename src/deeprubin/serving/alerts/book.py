"""The light-curve book: each object's detections, merged from the alerts seen, bounded in objects and in days.

:class:`LightCurveBook` keeps each object's detections (time, band, flux, error: the contract's units) merged from
every alert seen (history and triggering point), deduplicated on (time, band). It is bounded: at most
``max_objects`` objects (the least recently updated are dropped first), and for each object only the first
detection plus the detections the window policy can still use (the last ``grid_days - 1 + fit_context_days`` days,
with a margin) are kept, so a years-long variable does not grow without bound; the tensors are the same as with the
whole history (:mod:`deeprubin.lightcurves.window`). ``n_det`` still counts every detection the book has seen (history re-sent
for times already trimmed is not counted twice). Each alert is classified with its object's curve **as of that
alert**: only detections at or before the alert's detection time, even when later alerts of the object are in the
same batch. An alert older than the kept part of its object's history (out of order by more than the margin) is
rejected as a ``late alert`` rather than classified with a partial curve. An object evicted from the book and seen
again starts from the history its next packet carries (30 days for ZTF, 12 months for LSST).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd

from deeprubin.lightcurves.tensorize import Curve
from deeprubin.schema import flux_to_mag
from deeprubin.serving.alerts.packets import Alert

TRIM_MARGIN_DAYS = 30.0


class LateAlert(Exception):
    """The alert is older than the part of its object's history the book still keeps."""


@dataclass
class _Track:
    t: np.ndarray
    band: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    n_trimmed: int = 0  # detections dropped by trimming (still counted in n_det)
    trimmed_before: float = -math.inf  # detections before this time (except the first) are not kept


def _time_key(t: np.ndarray) -> np.ndarray:
    """Times as integer micro-days (0.09 s): equal detections compare equal after float round trips."""
    return np.round(np.asarray(t) * 1e6).astype(np.int64)


class LightCurveBook:
    """Per-object detections merged from alerts, deduplicated on (time, band), LRU-bounded to ``max_objects``.

    ``keep_days``: detections older than this before an object's latest one are dropped, except its first (which
    fixes the window); None keeps everything. :func:`keep_days_for` gives the value at which the tensors cannot
    change."""

    def __init__(self, max_objects: int = 1_000_000, keep_days: float | None = None):
        if max_objects < 1:
            raise ValueError(f"max_objects must be at least 1, got {max_objects}")
        self.max_objects, self.keep_days = int(max_objects), keep_days
        self._tracks: OrderedDict[str, _Track] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._tracks)

    def __contains__(self, oid: object) -> bool:
        return oid in self._tracks

    def n_points(self, oid: str) -> int:
        """Detections kept for ``oid`` (0 when unknown)."""
        track = self._tracks.get(oid)
        return 0 if track is None else len(track.t)

    def update(self, alert: Alert) -> _Track | None:
        """Merge the alert's detections into its object; the object becomes the most recently used."""
        track = self._tracks.get(alert.oid)
        t, band, flux, err = alert.t, alert.band, alert.flux, alert.flux_err
        if track is not None:
            if len(t) and track.trimmed_before > -math.inf:
                # History re-sent by later alerts: what lies before the trim horizon was counted already.
                keep = (t >= track.trimmed_before) | (t <= track.t[0])
                t, band, flux, err = t[keep], band[keep], flux[keep], err[keep]
            t = np.concatenate([track.t, t])
            band = np.concatenate([track.band, band])
            flux = np.concatenate([track.flux, flux])
            err = np.concatenate([track.flux_err, err])
        if len(t) == 0:
            return track
        key = _time_key(t)
        order = np.lexsort((np.arange(len(t)), band, key))  # stable: a point already kept wins over a re-sent one
        key_s, band_s = key[order], band[order]
        first = np.r_[True, (key_s[1:] != key_s[:-1]) | (band_s[1:] != band_s[:-1])]
        order = order[first]
        t, band, flux, err = t[order], band[order], flux[order], err[order]
        if track is None:
            track = _Track(t, band, flux, err)
            self._tracks[alert.oid] = track
            while len(self._tracks) > self.max_objects:
                self._tracks.popitem(last=False)
                self.evicted += 1
        else:
            track.t, track.band, track.flux, track.flux_err = t, band, flux, err
            self._tracks.move_to_end(alert.oid)
        if self.keep_days is not None and len(t) > 1:
            horizon = float(t[-1]) - float(self.keep_days)
            drop = t < horizon
            drop[0] = False
            if drop.any():
                keep = ~drop
                track.n_trimmed += int(drop.sum())
                track.t, track.band, track.flux, track.flux_err = t[keep], band[keep], flux[keep], err[keep]
            track.trimmed_before = max(track.trimmed_before, horizon)
        return track

    def as_of(self, oid: str, mjd: float, key: str | None = None, needed_days: float | None = None
              ) -> tuple[Curve, int]:
        """(curve, n_det) of ``oid`` with only the detections at or before ``mjd``; the curve is named ``key``.

        Raises LateAlert when detections the window needs (``needed_days`` before ``mjd``) were trimmed."""
        track = self._tracks.get(oid)
        name = key if key is not None else oid
        if track is None:
            empty = np.zeros(0)
            return Curve(name, empty, empty.astype(np.int64), empty, empty), 0
        if needed_days is not None and track.n_trimmed and mjd - needed_days < track.trimmed_before:
            raise LateAlert(f"alert at mjd {mjd:.5f} is older than the kept history of {oid} (detections before "
                            f"mjd {track.trimmed_before:.5f} were trimmed)")
        n = int(np.searchsorted(track.t, mjd + 0.5e-6, side="right"))  # same rounding as the dedupe key
        curve = Curve(name, track.t[:n].copy(), track.band[:n].copy(), track.flux[:n].copy(),
                      track.flux_err[:n].copy())
        return curve, n + (track.n_trimmed if n else 0)

    def detections(self, oid: str) -> pd.DataFrame:
        """The kept detections of ``oid`` as contract columns (mag from |flux|)."""
        track = self._tracks[oid]
        mag, mag_err = flux_to_mag(track.flux, track.flux_err)
        return pd.DataFrame({"oid": oid, "mjd": track.t, "band": np.where(track.band == 0, "g", "r"), "mag": mag,
                             "mag_err": mag_err, "flux": track.flux, "flux_err": track.flux_err,
                             "mag_corr": np.nan, "mag_corr_err": np.nan, "source": "alerts"})


def window_days(grid_days: int, fit_context_days: float) -> float:
    """Days before a curve's last detection that its tensor can depend on (besides its first detection)."""
    return float(grid_days - 1) + float(fit_context_days)


def keep_days_for(grid_days: int, fit_context_days: float, margin_days: float = TRIM_MARGIN_DAYS) -> float:
    """The book's trim horizon: the window policy's reach plus a margin for alerts that arrive out of order."""
    return window_days(grid_days, fit_context_days) + float(margin_days)
