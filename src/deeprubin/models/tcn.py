"""A temporal convolutional network (Bai, Kolter & Koltun 2018) over the 100-day model input.

Architecture: ``levels`` residual blocks; block ``k`` holds two dilated *causal* 1-D convolutions (dilation ``2**k``,
padding on the left only, so the feature at day ``t`` depends on days ``<= t`` alone), each weight-normalised
(:func:`torch.nn.utils.parametrizations.weight_norm`) and followed by ReLU and dropout; a 1x1 convolution carries the
residual when the number of channels changes. The features are averaged over the *observed days* (below), and a
linear head gives one logit per class (QSO, CEP, SNIa, SNII in :data:`deeprubin.schema.CLASSES` order);
:meth:`TCN.predict_proba` is their softmax. With ``shape=True`` (the project's default, ``train.shape_features``) the
head also sees :data:`SHAPE_FEATURES`, the curve's rise, decline and colour in magnitudes measured on the GP means up
to the last observed day, through one hidden layer (measured in docs/model.md). With ``age_input`` the convolutions
themselves know the object's age (days from the first detection to the last observed day, :func:`observed_age`):
``channel`` adds it as a constant input channel, ``film`` scales and shifts every block's features by a function of it
(FiLM, Perez et al. 2018), so that a 10-day-old curve can be read with other filters than a 60-day-old one. The
per-day features then depend on that one number from the whole input besides the days up to ``t``.

Receptive field: ``1 + convs_per_block * (kernel_size - 1) * (2**levels - 1)`` days (:func:`receptive_field`); the
default (kernel 3, 5 levels) sees 125 days, so the feature at the last observed day sees the whole 100-day window.

Observed days (what the global average pooling averages over): the grid days from day 0 up to the *last day with a
detection*. Young objects' grids run past their last detection (:mod:`deeprubin.lightcurves.window`); those days hold the GP's
prediction, not data, and are left out of the pool. The last detection is read from the input itself, from the
time-since-detection channels (``since_g``, ``since_r``; preprocess writes ``log1p(dt) / log1p(grid_days)``):
day ``t`` is a detection day when some detection falls in ``(t - 1, t]``, i.e. ``min(since_g, since_r)`` at ``t`` is
below ``log1p(1) / log1p(grid_days)`` (``dt < 1``). Why not ``since == 0``: the grid is integer days from the
window start while detection times are fractional, so ``since`` is exactly 0 only where a detection falls on a grid
point (the first detection of a young object, the last of a long one); the ``dt < 1`` rule agrees with ``== 0`` there
and also finds the other detection days. An input with no detection day is pooled over all days. A caller may pass
its own ``mask`` (N, T) instead.

A network built with ``grid_days`` (training sets the preprocessing's window) reads the since channels and scales
its age and shape features by that window instead of by the input's length, so it may be given only the first days
of it: the days up to the last detection are all its output depends on (causal features, pooled over the observed
days). Serving does that (:func:`deeprubin.models.served.predict`); young curves need a fraction of the window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

#: How the per-day features become one vector: ``mean`` over the observed days (the paper's global average pooling),
#: ``last`` (the causal feature at the last observed day), or ``mean_last`` (both, concatenated).
READOUTS: tuple[str, ...] = ("mean", "last", "mean_last")

#: How the object's age reaches the convolutions: ``none`` (the paper), ``channel`` (a constant input channel) or
#: ``film`` (every block's features scaled and shifted by a small network of the age).
AGE_INPUTS: tuple[str, ...] = ("none", "channel", "film")

#: Indices of ``since_g`` and ``since_r`` in :data:`deeprubin.lightcurves.tensorize.CHANNELS`.
SINCE_CHANNELS: tuple[int, int] = (4, 5)


#: The light-curve shape the optional read-out adds (``shape_features=True``), measured on the input itself at the last
#: observed day: the age, per band the days since the GP mean's peak, the decline from the peak and the rise from day 0
#: in magnitudes, the decline rate, and the g - r colour at the peak and now. A feature forest's decisive features
#: (rise and decline times and rates, colours: :mod:`deeprubin.models.forest`) are magnitude differences; the pooled
#: features of flux normalised to the peak express them only indirectly.
SHAPE_FEATURES: tuple[str, ...] = (
    "age", "since_peak_g", "since_peak_r", "decline_mag_g", "decline_mag_r", "rise_mag_g", "rise_mag_r",
    "decline_rate_g", "decline_rate_r", "colour_peak", "colour_now")
SHAPE_FLOOR = 0.01  # GP means (peak = 1) below this count as 5 magnitudes below the peak: noise and negative flux


def shape_features(x: torch.Tensor, mask: torch.Tensor, grid_days: int | None = None) -> torch.Tensor:
    """(N, len(SHAPE_FEATURES)) from the GP mean channels of ``x`` (N, C, T) over the observed days ``mask``
    (N, T); magnitudes in units of 2.5 mag, days in units of the window (``grid_days``; None: T), so that every
    feature is of order 1."""
    t = x.shape[2] if grid_days is None else grid_days
    days = torch.arange(x.shape[2], device=x.device, dtype=x.dtype)
    m = mask.to(torch.bool)
    mean = x[:, 0:2]

    def mag(f: torch.Tensor) -> torch.Tensor:  # in units of 2.5 mag, relative to flux 1 (the object's peak)
        return -torch.log10(f.clamp_min(SHAPE_FLOOR))

    peak, peak_day = mean.masked_fill(~m.unsqueeze(1), float("-inf")).max(dim=2)  # (N, 2)
    last_day = torch.where(m, days, torch.zeros_like(days)).amax(dim=1)  # (N,)
    now = mean.gather(2, last_day.long().view(-1, 1, 1).expand(-1, 2, 1)).squeeze(2)
    since_peak = last_day.unsqueeze(1) - peak_day.to(x.dtype)  # days, >= 0
    decline = mag(now) - mag(peak)
    rise = mag(mean[:, :, 0]) - mag(peak)
    rate = decline / since_peak.clamp_min(1.0) * 10.0  # 2.5 mag per 10 days
    colour_peak = (mag(peak[:, 0]) - mag(peak[:, 1])).unsqueeze(1)
    colour_now = (mag(now[:, 0]) - mag(now[:, 1])).unsqueeze(1)
    return torch.cat([(last_day / t).unsqueeze(1), since_peak / t, decline, rise, rate, colour_peak, colour_now],
                     dim=1)


def observed_age(mask: torch.Tensor, grid_days: int | None = None) -> torch.Tensor:
    """(N, 2): the last observed day of ``mask`` (N, T) as a fraction of the window (``grid_days``; None: T) and as
    ``log1p(day) / log1p(window)`` (resolving the first days, where the classes separate fastest)."""
    t = mask.shape[1] if grid_days is None else grid_days
    days = torch.arange(mask.shape[1], device=mask.device, dtype=torch.float32)
    last = torch.where(mask.to(torch.bool), days, torch.zeros_like(days)).amax(dim=1)
    return torch.stack([last / t, torch.log1p(last) / math.log1p(t)], dim=1)


def receptive_field(kernel_size: int, levels: int, convs_per_block: int = 2) -> int:
    """Days of input that one output day depends on: ``1 + convs_per_block * (kernel_size - 1) * (2**levels - 1)``."""
    if kernel_size < 1 or levels < 0 or convs_per_block < 1:
        raise ValueError(f"bad TCN shape: kernel_size={kernel_size}, levels={levels}, convs={convs_per_block}")
    return 1 + convs_per_block * (kernel_size - 1) * (2 ** levels - 1)


def detection_threshold(grid_days: int) -> float:
    """``since`` values below this mean a detection within the day before the grid point (``dt < 1``)."""
    return math.log1p(1.0) / math.log1p(grid_days) - 1e-6


def age_days(x: torch.Tensor, since_channels: Sequence[int] = SINCE_CHANNELS, grid_days: int | None = None
             ) -> torch.Tensor:
    """(N,) float: days from the window start to the last detection, read from the input itself: at the last grid
    day ``T - 1``, ``dt = expm1(min(since_g, since_r) * log1p(T))`` days have passed since the latest detection, so
    the last detection is at day ``T - 1 - dt``. The window starts at the first detection unless the curve spans
    more than ``T - 1`` days (:mod:`deeprubin.lightcurves.window`), so this is the days since the first detection,
    capped at ``T - 1`` (exact to float32 rounding, not rounded to grid days). ``grid_days``: the window the since
    channels were written for, when ``x`` holds only its first T days (None: T)."""
    t = x.shape[2]
    since_last = x[:, list(since_channels), -1].amin(dim=1)
    window = t if grid_days is None else grid_days
    # dt >= 0 keeps the age <= T - 1 without a clamp on T (a symbolic T stays symbolic in an export)
    return ((t - 1) - torch.expm1(since_last * math.log1p(window)).clamp(min=0.0)).clamp(min=0.0)


def observed_mask(x: torch.Tensor, since_channels: Sequence[int] = SINCE_CHANNELS, grid_days: int | None = None
                  ) -> torch.Tensor:
    """(N, T) bool: days 0 .. last detection day of each object (all days when it has none); see the module doc.
    ``grid_days``: the window the since channels were written for (None: T)."""
    t = x.shape[2]
    since = x[:, list(since_channels)].amin(dim=1)
    detected = since < detection_threshold(t if grid_days is None else grid_days)
    days = torch.arange(t, device=x.device)
    last = torch.where(detected, days, torch.full_like(days, -1)).amax(dim=1)
    last = torch.where(last < 0, torch.full_like(last, t - 1), last)
    return days.unsqueeze(0) <= last.unsqueeze(1)


class TemporalBlock(nn.Module):
    """Two weight-normalised dilated causal convolutions with ReLU and dropout, plus a residual connection."""

    def __init__(self, n_in: int, n_out: int, kernel_size: int, dilation: int, dropout: float):
        super().__init__()
        self.left_pad = (kernel_size - 1) * dilation
        self.conv1 = weight_norm(nn.Conv1d(n_in, n_out, kernel_size, dilation=dilation))
        self.conv2 = weight_norm(nn.Conv1d(n_out, n_out, kernel_size, dilation=dilation))
        self.dropout = nn.Dropout(dropout)
        self.residual = nn.Conv1d(n_in, n_out, 1) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, C, T), or (N, C, 1, T) in channels-last layout (what :meth:`TCN.features` passes between blocks).

        The convolutions run as 2-D ones of height 1 on channels-last tensors, with the same weights: oneDNN's 2-D
        kernels in that layout took 1.5x less time than its 1-D ones for these 32-channel layers on one core
        (the same values to float32 rounding)."""
        if x.ndim == 3:
            return self.forward(as_rows(x)).squeeze(2)
        h = self.dropout(F.relu(self._conv(self.conv1, x)))
        h = self.dropout(F.relu(self._conv(self.conv2, h)))
        if isinstance(self.residual, nn.Identity):
            return F.relu(h + x)
        return F.relu(h + F.conv2d(x, self.residual.weight.unsqueeze(2), self.residual.bias))

    def _conv(self, conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.left_pad, 0)).contiguous(memory_format=torch.channels_last)  # causal: the left only
        return F.conv2d(x, conv.weight.unsqueeze(2), conv.bias, dilation=(1, conv.dilation[0]))


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, T) -> (N, C, 1, T), channels-last."""
    return x.unsqueeze(2).contiguous(memory_format=torch.channels_last)


class TCN(nn.Module):
    """``forward(x (N, C, T), mask (N, T) bool | None) -> logits (N, n_classes)``; see the module docstring."""

    def __init__(self, n_channels: int = 6, n_classes: int = 4, hidden: int = 32, kernel_size: int = 3,
                 levels: int = 5, dropout: float = 0.1, since_channels: Sequence[int] | None = SINCE_CHANNELS,
                 readout: str = "mean", flux_scale: float | None = None, shape: bool = False,
                 age_input: str = "none", grid_days: int | None = None):
        super().__init__()
        if hidden < 1 or levels < 1 or kernel_size < 2 or not 0 <= dropout < 1:
            raise ValueError(f"bad TCN shape: hidden={hidden}, levels={levels}, kernel_size={kernel_size}, "
                             f"dropout={dropout}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}; got {readout!r}")
        self.readout = readout
        # The window the input was made for. Set, the network reads the since channels and scales its features by it
        # rather than by the input's length, so it can be given only the first days up to the last detection (a
        # causal network's features there do not depend on later days): what serving does (served.predict).
        self.grid_days = grid_days
        if age_input not in AGE_INPUTS:
            raise ValueError(f"age_input must be one of {AGE_INPUTS}; got {age_input!r}")
        self.age_input = age_input
        if flux_scale is not None and not flux_scale > 0:
            raise ValueError(f"flux_scale must be positive or None; got {flux_scale}")
        self.flux_scale = flux_scale
        self.n_channels, self.n_classes = n_channels, n_classes
        self.kernel_size, self.levels = kernel_size, levels
        self.since_channels = tuple(since_channels) if since_channels is not None else None
        n_in = n_channels + (2 if age_input == "channel" else 0)
        self.blocks = nn.Sequential(*[
            TemporalBlock(n_in if k == 0 else hidden, hidden, kernel_size, 2 ** k, dropout)
            for k in range(levels)])
        if age_input == "film":  # per block, a scale and a shift of every channel; zero at start: the plain TCN
            self.film = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 2 * hidden * levels))
            nn.init.zeros_(self.film[2].weight)
            nn.init.zeros_(self.film[2].bias)
        pooled = hidden * (2 if readout == "mean_last" else 1)
        self.shape = bool(shape)
        if self.shape:  # pooled features and the shape of the curve, combined non-linearly
            self.head = nn.Sequential(nn.Linear(pooled + len(SHAPE_FEATURES), hidden), nn.ReLU(), nn.Dropout(dropout),
                                      nn.Linear(hidden, n_classes))
        else:
            self.head = nn.Linear(pooled, n_classes)

    @property
    def receptive_field(self) -> int:
        return receptive_field(self.kernel_size, self.levels)

    def features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-day features before pooling, (N, hidden, T); day ``t`` depends on input days ``<= t`` only (and, with
        ``age_input``, on the age: the last day of ``mask``, or of the observed days when it is None)."""
        self.check_input(x)
        h = self.compress_flux(x)
        if self.age_input == "none":
            return self.blocks(as_rows(h)).squeeze(2)
        age = observed_age(self.pool_mask(x) if mask is None else mask, self.grid_days).to(h.dtype)  # (N, 2)
        if self.age_input == "channel":
            return self.blocks(as_rows(torch.cat([h, age.unsqueeze(2).expand(-1, -1, h.shape[2])], dim=1))).squeeze(2)
        film = self.film(age).view(h.shape[0], self.levels, 2, -1, 1, 1)  # (N, level, scale/shift, hidden, 1, 1)
        h = as_rows(h)
        for k, block in enumerate(self.blocks):
            h = block(h) * (1 + film[:, k, 0]) + film[:, k, 1]
        return h.squeeze(2)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[1] != self.n_channels:
            raise ValueError(f"expected input (N, {self.n_channels}, T), got {tuple(x.shape)}")

    def compress_flux(self, x: torch.Tensor) -> torch.Tensor:
        """With ``flux_scale`` k: GP means m -> asinh(k m) (linear near 0, logarithmic above 1/k, like a magnitude
        but defined for the negative difference fluxes too) and their standard deviations s -> k s / sqrt(1 + (k m)^2)
        (propagated through the derivative), so declines of a few magnitudes stay visible; other channels as given."""
        if self.flux_scale is None:
            return x
        k = self.flux_scale
        mean, std, rest = x[:, 0:2] * k, x[:, 2:4], x[:, 4:]
        return torch.cat([torch.asinh(mean), std * k / torch.sqrt(1 + mean * mean), rest], dim=1)

    def pool_mask(self, x: torch.Tensor) -> torch.Tensor:
        if self.since_channels is None:
            return torch.ones(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device)
        return observed_mask(x, self.since_channels, self.grid_days)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x)
        observed = self.pool_mask(x) if mask is None else mask.bool()
        h = self.features(x, observed)
        m = observed.to(h.dtype).unsqueeze(1)
        mean = (h * m).sum(dim=2) / m.sum(dim=2).clamp_min(1.0)
        if self.readout == "mean":
            pooled = mean
        else:
            # The causal feature at the last observed day has seen the whole curve, in order: it knows the age.
            last_day = (m.squeeze(1) * torch.arange(h.shape[2], device=h.device, dtype=h.dtype)).amax(dim=1).long()
            last = h.gather(2, last_day.view(-1, 1, 1).expand(-1, h.shape[1], 1)).squeeze(2)
            pooled = last if self.readout == "last" else torch.cat([mean, last], dim=1)
        if self.shape:
            pooled = torch.cat([pooled, shape_features(x, m.squeeze(1) > 0, self.grid_days)], dim=1)
        return self.head(pooled)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities (N, n_classes), rows summing to 1."""
        return torch.softmax(self.forward(x, mask), dim=1)


class TCNEnsemble(nn.Module):
    """Networks of one architecture from different initialisations, trained side by side on the same batches, each on
    its own loss (:meth:`member_logits`). ``forward`` returns the log of their mean softmax probability: a logit vector
    whose softmax is the ensemble's probability, so temperature scaling and serving treat it as one network."""

    def __init__(self, members: Sequence[TCN]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members; got {len(members)}")
        self.members = nn.ModuleList(members)

    @property
    def receptive_field(self) -> int:
        return self.members[0].receptive_field

    @property
    def grid_days(self) -> int | None:
        return self.members[0].grid_days

    def member_logits(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(K members, N, n_classes)."""
        return torch.stack([m(x, mask) for m in self.members])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        log_p = torch.log_softmax(self.member_logits(x, mask), dim=2)
        return torch.logsumexp(log_p, dim=0) - math.log(len(self.members))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.softmax(self.forward(x, mask), dim=1)

