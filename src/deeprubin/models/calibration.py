"""Temperature scaling by age: calibrated probabilities, fitted after training, applied inside the served model.

A network's softmax is often over- or under-confident, and how much depends on how much of the light curve it has
seen: a 2-day-old supernova and a complete one are different problems. Temperature scaling (Guo et al. 2017)
divides the logits by a temperature ``T > 0`` fitted to minimise the negative log-likelihood (NLL) of held-out
labelled objects; here one temperature per *age bin* (days since the first detection, :data:`AGE_EDGES`), or a
single one (``global``). One positive scalar per object never changes its argmax: predictions, accuracy and F1 stay
as they were, only the confidence moves.

The age is read from the model input itself (:func:`deeprubin.models.tcn.age_days`: the time-since-detection
channels at the last grid day), so :class:`AgeTemperature` lives inside the exported model
(:class:`deeprubin.models.served.ProbabilityTCN`) and every path that runs the model (classify, consume,
serve-api, evaluation, the nightly flow) gets the calibrated probabilities with no code of its own.

- :class:`AgeTemperature`: ``(x, logits) -> logits / T(age(x))``, its edges and temperatures as buffers;
  :meth:`AgeTemperature.as_dict` / :meth:`AgeTemperature.from_dict` for checkpoints and MLmodel metadata.
- :func:`fit_temperature`: the NLL-minimising temperature of a set of logits (bounded 1-D search on ``log T``).
- :func:`fit_age_temperatures`: one temperature per age bin (bins with fewer than ``min_count`` rows get the
  global one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from torch import nn

from deeprubin.models.tcn import SINCE_CHANNELS, age_days

#: Lower edges of the age bins (days since first detection): [0, 5), [5, 10), [10, 20), [20, 50), [50, inf).
AGE_EDGES: tuple[float, ...] = (0.0, 5.0, 10.0, 20.0, 50.0)
#: ``train.calibration``: a temperature per age bin, one for all ages, or none (the network's own softmax).
MODES: tuple[str, ...] = ("per_age", "global", "none")
#: Search range of the temperature.
T_BOUNDS: tuple[float, float] = (0.05, 20.0)


def bin_labels(edges: Sequence[float]) -> list[str]:
    """``[0, 5, 50]`` -> ``["0-5", "5-50", "50+"]``."""
    return [f"{lo:g}-{hi:g}" for lo, hi in pairwise(edges)] + [f"{edges[-1]:g}+"]


def age_bin(ages: np.ndarray | torch.Tensor, edges: Sequence[float]) -> np.ndarray:
    """Index of the bin ``[edges[k], edges[k+1])`` of each age (the last bin open; ages below ``edges[0]`` go to
    bin 0), as :class:`AgeTemperature` computes it."""
    a = np.asarray(ages.detach().cpu().numpy() if isinstance(ages, torch.Tensor) else ages, dtype=np.float64)
    inner = np.asarray(edges[1:], dtype=np.float64)
    return (a[:, None] >= inner[None, :]).sum(axis=1).astype(np.int64) if len(inner) else np.zeros(len(a), np.int64)


class AgeTemperature(nn.Module):
    """``forward(x (N, C, T), logits (N, K)) -> logits / T_k`` with ``k`` the age bin of each object
    (:func:`deeprubin.models.tcn.age_days` of ``x``). One temperature (``edges == [0]``) is global scaling."""

    def __init__(self, edges: Sequence[float], temperatures: Sequence[float],
                 since_channels: Sequence[int] = SINCE_CHANNELS):
        super().__init__()
        edges, temperatures = [float(e) for e in edges], [float(t) for t in temperatures]
        if len(edges) != len(temperatures) or not edges:
            raise ValueError(f"{len(edges)} age edges for {len(temperatures)} temperatures")
        if any(b <= a for a, b in pairwise(edges)):
            raise ValueError(f"age edges must increase: {edges}")
        if not all(math.isfinite(t) and t > 0 for t in temperatures):
            raise ValueError(f"temperatures must be finite and positive: {temperatures}")
        self.since_channels = tuple(int(c) for c in since_channels)
        self.grid_days: int | None = None  # the network's window, when it is given only the first days (served.py)
        self.register_buffer("edges", torch.tensor(edges, dtype=torch.float32))
        self.register_buffer("temperatures", torch.tensor(temperatures, dtype=torch.float32))

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.temperatures.shape[0] == 1:
            return logits / self.temperatures[0]
        age = age_days(x, self.since_channels, self.grid_days)
        k = (age.unsqueeze(1) >= self.edges[1:].unsqueeze(0)).sum(dim=1)
        return logits / self.temperatures[k].unsqueeze(1)

    def as_dict(self) -> dict[str, Any]:
        return {"edges": [float(e) for e in self.edges.tolist()],
                "temperatures": [float(t) for t in self.temperatures.tolist()],
                "since_channels": list(self.since_channels)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> AgeTemperature | None:
        """The module of :meth:`as_dict` (extra keys ignored); None for None or an empty dict (no calibration)."""
        if not d:
            return None
        return cls(d["edges"], d["temperatures"], d.get("since_channels", SINCE_CHANNELS))


# ----------------------------------------------------------------------------------------------------------------
# Fitting (numpy, float64).

def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float | np.ndarray = 1.0) -> float:
    """Mean negative log-likelihood of integer targets ``y`` under ``softmax(logits / temperature)``
    (``temperature``: a scalar or one per row)."""
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return float("nan")
    t = np.asarray(temperature, dtype=np.float64).reshape(-1, 1) if np.ndim(temperature) else float(temperature)
    return float(-_log_softmax(logits / t)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The temperature in ``bounds`` that minimises :func:`nll` (bounded Brent search on ``log T``); 1.0 with no
    rows."""
    from scipy.optimize import minimize_scalar

    if len(y) == 0:
        return 1.0
    res = minimize_scalar(lambda s: nll(logits, y, math.exp(s)), bounds=(math.log(bounds[0]), math.log(bounds[1])),
                          method="bounded", options={"xatol": 1e-4})
    return float(math.exp(res.x))


def fit_age_temperatures(logits: np.ndarray, y: np.ndarray, ages: np.ndarray, mode: str = "per_age",
                         edges: Sequence[float] = AGE_EDGES, min_count: int = 30,
                         among: Sequence[int] | None = None) -> AgeTemperature | None:
    """The calibration of ``mode`` fitted on ``(logits, y)`` with each row's age (days since first detection):
    ``per_age`` one temperature per bin of ``edges`` (a bin with fewer than ``min_count`` rows gets the global
    temperature), ``global`` one temperature, ``none`` None.

    ``among``: fit the likelihood of the softmax over these classes only (the rows' labels must be among them). Real
    supernovae are told apart from each other, not from the quasars and Cepheids the network rarely gives them:
    over all classes, the NLL would reward draining that small mass by sharpening, which makes the SN Ia vs SN II
    probabilities over-confident."""
    if mode not in MODES:
        raise ValueError(f"calibration must be one of {MODES}; got {mode!r}")
    if mode == "none":
        return None
    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y, dtype=np.int64)
    if among is not None:
        among = np.asarray(sorted(set(int(c) for c in among)), dtype=np.int64)
        if not np.isin(y, among).all():
            raise ValueError(f"calibration among classes {among.tolist()}, but rows are labelled {np.unique(y)}")
        logits, y = logits[:, among], np.searchsorted(among, y)
    overall = fit_temperature(logits, y)
    if mode == "global":
        return AgeTemperature([0.0], [overall])
    k = age_bin(ages, edges)
    temps = [fit_temperature(logits[k == b], y[k == b]) if (k == b).sum() >= min_count else overall
             for b in range(len(edges))]
    return AgeTemperature(edges, temps)


def row_temperatures(calibration: AgeTemperature | None, ages: np.ndarray) -> np.ndarray:
    """The temperature :class:`AgeTemperature` applies to a row of each age (1 without calibration)."""
    ages = np.asarray(ages, dtype=np.float64)
    if calibration is None:
        return np.ones(len(ages))
    d = calibration.as_dict()
    return np.asarray(d["temperatures"], dtype=np.float64)[age_bin(ages, d["edges"])]


def softmax(logits: np.ndarray, temperature: float | np.ndarray = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` row by row (``temperature``: a scalar or one per row), float64."""
    t = np.asarray(temperature, dtype=np.float64).reshape(-1, 1) if np.ndim(temperature) else float(temperature)
    return np.exp(_log_softmax(np.asarray(logits, dtype=np.float64) / t))
