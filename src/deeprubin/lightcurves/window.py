"""The window policy: which 100 days of a light curve the model sees. Written once, used by training, evaluation,
classification and the plots alike.

Rule (one formula, decided from the light curve itself, never from its label, which classification does not know)::

    start = max(first_mjd, last_mjd - (grid_days - 1))        grid = start + 0, 1, ..., grid_days - 1  (days)

- A curve whose detections span less than ``grid_days`` (a young transient, or any early partial curve) has day 0
  at its first detection. Its grid runs past its last detection.
- A longer curve (a long-lived variable, an old supernova) takes the latest ``grid_days`` days, ending exactly at its
  last detection.
- The two cases meet continuously: as a curve grows night by night its window stays anchored at the first detection
  until the span reaches ``grid_days - 1`` days, then slides with the last detection. No class, no threshold.
- Nothing past the last detection given is ever used: callers that classify early (or train on early epochs) cut
  the curve with :func:`truncate` first, and the window is computed from what remains.

Grid points after the last detection (only when the span is shorter than the window) hold the GP *prediction* from
the detections seen so far: the GP mean relaxes towards its prior and the GP standard deviation grows, and the
time-since-detection channels grow towards 1. Why not zeros: a zero means "flux at the reference level" in the
mean channels, which is a real, common value (a quasar at its reference flux); the GP prediction is a function of
the past only (no leakage), says honestly "unknown" through its growing standard deviation, and is the same thing
at training time and at inference time.

The GP is fitted to the detections from ``fit_context_days`` before the window start up to the last detection:
earlier data constrains the curve at the window's left edge without making long curves slow to fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

DEFAULT_GRID_DAYS = 100


@dataclass(frozen=True)
class Window:
    """A daily grid of ``grid_days`` points from ``start_mjd``; ``last_mjd`` is the last detection it may use."""

    start_mjd: float
    grid_days: int
    first_mjd: float
    last_mjd: float

    @property
    def end_mjd(self) -> float:
        """The last grid point (== last_mjd for a curve longer than the window)."""
        return self.start_mjd + (self.grid_days - 1)

    @property
    def anchored(self) -> str:
        """'first': day 0 is the first detection; 'last': the window ends at the last detection."""
        return "first" if self.start_mjd == self.first_mjd else "last"

    def grid(self) -> np.ndarray:
        """Grid points relative to ``start_mjd`` (days 0 .. grid_days-1), float64."""
        return np.arange(self.grid_days, dtype=np.float64)

    def grid_mjd(self) -> np.ndarray:
        return self.start_mjd + self.grid()

    def days_after_last(self) -> np.ndarray:
        """Days between the last detection and each grid point (<= 0 inside the observed span)."""
        return self.grid_mjd() - self.last_mjd


def window_for(first_mjd: float, last_mjd: float, grid_days: int = DEFAULT_GRID_DAYS) -> Window:
    """The window of a light curve whose (possibly truncated) detections run from ``first_mjd`` to ``last_mjd``.

    Depends on the light curve only: the same curve gets the same window in training, evaluation and
    classification. See the module docstring for the rule and why.
    """
    first_mjd, last_mjd = float(first_mjd), float(last_mjd)
    if not (np.isfinite(first_mjd) and np.isfinite(last_mjd)):
        raise ValueError(f"window needs finite times, got first={first_mjd} last={last_mjd}")
    if last_mjd < first_mjd:
        raise ValueError(f"last detection {last_mjd} is before the first {first_mjd}")
    if grid_days < 2:
        raise ValueError(f"grid_days must be at least 2, got {grid_days}")
    start = max(first_mjd, last_mjd - (grid_days - 1))
    return Window(start_mjd=start, grid_days=int(grid_days), first_mjd=first_mjd, last_mjd=last_mjd)


def truncate(detections: pd.DataFrame, until_mjd: float | None) -> pd.DataFrame:
    """Detections observed at or before ``until_mjd`` (all of them when None): an early or partial light curve.

    Classification of an alert stream and early-epoch evaluation cut here, before :func:`window_for`.
    """
    if until_mjd is None:
        return detections
    return detections.loc[detections["mjd"].to_numpy(dtype=float) <= float(until_mjd)]


def early_cut(mjd: np.ndarray, first_mjd: np.ndarray | float, days: float) -> np.ndarray:
    """Which detections an early light curve ``days`` after the first detection (at ``first_mjd``) keeps: the one
    definition of the early cut, for training views, early evaluation and the forest's truncations alike."""
    return np.asarray(mjd, dtype=float) <= np.asarray(first_mjd, dtype=float) + float(days)


def truncate_after_first(detections: pd.DataFrame, days: float) -> pd.DataFrame:
    """Detections of each object within ``days`` of that object's first detection (early-epoch curves)."""
    if detections.empty:
        return detections
    first = detections.groupby("oid")["mjd"].transform("min")
    return detections.loc[early_cut(detections["mjd"].to_numpy(dtype=float), first.to_numpy(dtype=float), days)]


def fit_start(window: Window, fit_context_days: float) -> float:
    """Earliest detection time handed to the GP for this window."""
    return window.start_mjd - float(fit_context_days)
