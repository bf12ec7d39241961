"""Gaussian-process interpolation of g/r light curves onto a daily grid.

One cohesive thing, kept in one module: the kernel, its exact likelihoods (Kalman filter and dense), the batched
fit and the prediction share the private curve layout and the numerics; split, each part would expose them.

Model (per object, in flux space, zero mean: alert fluxes are difference fluxes whose baseline is 0)::

    f_b(t) = sigma * (L u)(t)_b,    u_1, u_2 independent Matérn-3/2 processes with length scale rho,
    L = [[1, 0], [c, sqrt(1 - c^2)]]   so   cov(f_b(t), f_b'(t')) = sigma^2 B[b, b'] k_32(|t - t'|; rho),
    B = [[1, c], [c, 1]],   y_i = f_{b_i}(t_i) + eps_i,  eps_i ~ N(0, flux_err_i^2)

i.e. one time kernel shared by both bands (amplitude ``sigma`` and length scale ``rho`` shared) with a fixed
cross-band correlation ``c`` (an intrinsic-coregionalisation kernel: the separable cousin of avocado's 2-D
time x wavelength Matérn kernel). ``c = 0`` is "independent bands with shared hyperparameters". The choice of
``c`` (:data:`CROSS_BAND_CORRELATION`) was made on held-out accuracy on real BTS curves, see ``docs/gp.md``.

Fluxes are divided by a per-object scale (max |flux|) before fitting, so ``sigma`` is relative; times are shifted
to start at 0. Hyperparameters are fitted by maximum likelihood (optionally with a weak log-normal prior on rho)
inside bounds: rho in [1, 1000] d, sigma in [0.01, 10] x scale.

How it is fast
--------------
* The likelihood is evaluated with an exact Kalman filter (the Matérn-3/2 kernel is a 2-state linear SDE, so the
  2-band model is a 4-state one): O(N) per evaluation, vectorised with numpy across *many curves and many
  hyperparameter candidates at once* (the Python loop runs over time steps, not over objects).
* The optimiser is batched: a coarse 5x4 grid in (log rho, log sigma), then 3 rounds of a 3x3 stencil around
  each curve's best point, a least-squares quadratic through it and a Newton step (50 likelihood evaluations per
  curve, all curves of a chunk in the same numpy calls). No per-object scipy calls.
* A curve or two alone (the HTTP service, the alert consumer) gets the same likelihood by dense Cholesky
  (:func:`dense_loglik`): the filter's per-time-step Python loop costs the same for one curve as for a thousand.
* The prediction on the grid (and the leave-one-out residuals used for outlier clipping) is one dense float64
  solve per object at the fitted hyperparameters (N is small; the O(N^3) cost is paid once, not per evaluation),
  stacked with curves of the same N only (never padded).

Batch invariance: with :data:`BATCH_INVARIANT` settings and one BLAS thread, a curve's result is the same to the bit
whatever other curves share its call (the Kalman filter is exact under padding; the prediction is never padded).
With the default settings a tiny batch takes the dense likelihood instead, which agrees to ~1e-12 relative only.

Robustness: every oddity is either repaired (sorted, duplicates kept, non-finite points dropped: ``n_dropped``),
clipped (a point > 10x every other |flux|, then leave-one-out |z| > 5 with one refit: ``n_clipped``) or handled by
a fallback whose reason is in ``GPResult.status``; only an object with nothing usable raises
:class:`GPInputError`; :func:`interpolate_batch` never raises and never returns NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
from scipy.linalg import cho_solve, solve_triangular

from deeprubin.schema import BANDS

BAND_ORDER = BANDS  # row order of the (2, G) mean and std

LENGTH_SCALE_BOUNDS = (1.0, 1000.0)  # days
AMPLITUDE_BOUNDS = (0.01, 10.0)  # x the object's flux scale
DEFAULT_LENGTH_SCALE = 20.0  # days: used when the data cannot constrain it (one point, one night)
DEFAULT_AMPLITUDE = 1.0  # x scale
CROSS_BAND_CORRELATION = 0.9  # c, chosen on held-out BTS accuracy (docs/gp.md)
SPIKE_FACTOR = 10.0  # a point > 10x brighter (|flux|) than every other point of the object is a huge outlier
LOO_CLIP_Z = 5.0  # leave-one-out |z| above which a point is clipped (one refit); BTS: 99.9th pct of |z| is 3.7
ONE_NIGHT_DAYS = 1.0


class GPInputError(ValueError):
    """The object cannot be interpolated at all (e.g. no finite points); the message names the problem."""


@dataclass(frozen=True)
class GPResult:
    mean: np.ndarray  # (2, G) float64 flux (µJy) at the grid times, rows g, r
    std: np.ndarray  # (2, G) float64 GP standard deviation, > 0 and finite everywhere
    status: str  # "ok" or "fallback: <reason>"
    params: dict  # fitted hyperparameters, log_likelihood, n_points, ...


@dataclass(frozen=True)
class GPSettings:
    """Knobs of the fit (defaults are the production choice; the benchmark and docs vary them)."""

    correlation: float = CROSS_BAND_CORRELATION
    n_rho: int = 5  # coarse grid size in log rho
    n_sigma: int = 4  # coarse grid size in log sigma
    n_refine: int = 3  # rounds of 3x3 stencil + quadratic Newton step (step halves each round)
    rho_prior: tuple[float, float] | None = None  # (median days, sd in ln) of a log-normal prior on rho, or None
    clip: bool = True  # spike + leave-one-out outlier clipping
    chunk: int = 1024  # curves per vectorised Kalman chunk (at most; chunks also split where lengths double)
    # "auto": the dense likelihood for a tiny batch (curves x points <= DENSE_MAX_POINTS: the HTTP service, the alert
    # consumer), the Kalman filter otherwise; "kalman": the filter always. The two agree to ~1e-12 relative, not to
    # the bit, so under "auto" a curve's fit depends on how many curves share its call; under "kalman" it never does.
    likelihood: Literal["auto", "kalman"] = "auto"


DEFAULT_SETTINGS = GPSettings()
# What the preprocess stage uses: each curve's result is a function of that curve alone, to the bit, whatever else
# is in its batch (so partitions, workers, executors and incremental runs cannot change a stored tensor).
BATCH_INVARIANT = GPSettings(likelihood="kalman")


# --------------------------------------------------------------------------------------------------------------
# Input preparation
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _Curve:
    t: np.ndarray  # days from t0, sorted
    y: np.ndarray  # flux / scale
    e: np.ndarray  # flux_err / scale
    b: np.ndarray  # 0 = g, 1 = r
    grid: np.ndarray  # days from t0
    scale: float
    t0: float
    notes: list = field(default_factory=list)  # fallback reasons
    fixed_rho: float | None = None
    fixed_sigma: float | None = None
    n_clipped: int = 0
    n_dropped: int = 0
    n_g: int = 0
    n_r: int = 0


def _prepare(t, flux, flux_err, band, grid) -> _Curve:
    try:
        t = np.asarray(t, dtype=float).ravel()
        y = np.asarray(flux, dtype=float).ravel()
        e = np.asarray(flux_err, dtype=float).ravel()
        b = np.asarray(band).ravel()
        grid = np.asarray(grid, dtype=float).ravel()
    except (TypeError, ValueError) as exc:
        raise GPInputError(f"inputs are not numeric arrays: {exc}") from None
    if not (len(t) == len(y) == len(e) == len(b)):
        raise GPInputError(f"t, flux, flux_err and band differ in length ({len(t)}, {len(y)}, {len(e)}, {len(b)})")
    if grid.size == 0 or not np.isfinite(grid).all():
        raise GPInputError("grid is empty or not finite")
    if b.dtype.kind in "USO":  # band names are accepted too: "g" -> 0, "r" -> 1, anything else is dropped
        b = np.array([BAND_ORDER.index(x) if x in BAND_ORDER else -1 for x in b.tolist()], dtype=np.int64)
    elif b.dtype.kind not in "iub":
        try:
            b = b.astype(float)
        except (TypeError, ValueError):
            raise GPInputError("band must be integers 0 (g) or 1 (r)") from None
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(t + y) & np.isfinite(e) & (e > 0) & ((b == 0) | (b == 1))
    n_ok = int(ok.sum())
    n_dropped = len(t) - n_ok
    if n_ok == 0:
        raise GPInputError(f"no usable points: {len(t)} given, none with finite time, flux, flux_err > 0 "
                           "and band 0/1")
    if n_dropped:
        t, y, e, b = t[ok], y[ok], e[ok], b[ok]
    b = b.astype(np.int8)
    order = np.lexsort((b, t))
    t, y, e, b = t[order], y[order], e[order], b[order]
    n_clipped = 0
    # Huge outlier: one point brighter than SPIKE_FACTOR x every other point (only one can be).
    a = np.abs(y)
    i = int(np.argmax(a))
    if len(y) >= 4:
        second = np.partition(a, len(a) - 2)[-2]
        if a[i] > SPIKE_FACTOR * second and a[i] > 5 * e[i]:
            keep = np.ones(len(y), bool)
            keep[i] = False
            t, y, e, b = t[keep], y[keep], e[keep], b[keep]
            n_clipped = 1
            a = np.abs(y)
    scale = float(a.max())
    if not scale > 0:
        scale = float(np.median(e))
    t0 = float(t[0])
    c = _Curve(t=t - t0, y=y / scale, e=e / scale, b=b, grid=grid - t0, scale=scale, t0=t0, n_clipped=n_clipped,
               n_dropped=n_dropped)
    # Fallbacks: fixed hyperparameters where the data cannot constrain them.
    if len(c.y) == 1:
        c.notes.append("single point, fixed hyperparameters")
        c.fixed_rho, c.fixed_sigma = DEFAULT_LENGTH_SCALE, DEFAULT_AMPLITUDE
    elif c.y.max() == c.y.min():
        c.notes.append("flat curve, fixed hyperparameters")
        c.fixed_rho, c.fixed_sigma = LENGTH_SCALE_BOUNDS[1] / 10, DEFAULT_AMPLITUDE
    elif c.t[-1] < ONE_NIGHT_DAYS:
        c.notes.append("all points in one night, fixed length scale")
        c.fixed_rho = DEFAULT_LENGTH_SCALE
    c.n_r = int(c.b.sum())
    c.n_g = len(c.b) - c.n_r
    if c.n_g == 0:
        c.notes.append("no g detections")
    if c.n_r == 0:
        c.notes.append("no r detections")
    return c


# --------------------------------------------------------------------------------------------------------------
# Kernel (dense) and Kalman filter
# --------------------------------------------------------------------------------------------------------------
def matern32(tau: np.ndarray, rho: float) -> np.ndarray:
    x = np.sqrt(3.0) * np.abs(tau) / rho
    return (1.0 + x) * np.exp(-x)


def dense_kernel(t1, b1, t2, b2, sigma: float, rho: float, correlation: float) -> np.ndarray:
    """sigma^2 B[b1, b2] k_32(|t1 - t2|; rho), the model's covariance between (t1, band b1) and (t2, band b2)."""
    bmat = np.where(np.asarray(b1)[:, None] == np.asarray(b2)[None, :], 1.0, correlation)
    return sigma**2 * bmat * matern32(np.asarray(t1)[:, None] - np.asarray(t2)[None, :], rho)


def _a_x_at(a, x00, x01, x10, x11, sym: bool):
    """a X a^T for 2x2 blocks given entry-wise; returns (00, 01, 11) when X is symmetric, else all four."""
    a00, a01, a10, a11 = a
    y00, y01 = a00 * x00 + a01 * x10, a00 * x01 + a01 * x11
    y10, y11 = a10 * x00 + a11 * x10, a10 * x01 + a11 * x11
    if sym:
        return y00 * a00 + y01 * a01, y00 * a10 + y01 * a11, y10 * a10 + y11 * a11
    return y00 * a00 + y01 * a01, y00 * a10 + y01 * a11, y10 * a00 + y11 * a01, y10 * a10 + y11 * a11


def kalman_loglik(t, y, e, b, obs, log_rho, log_sigma, correlation: float) -> np.ndarray:
    """Exact log-likelihood of the model for M padded sequences at once, O(L) in their length L.

    t, y, e, b, obs: (M, L) sorted times, normalised fluxes, errors, bands (0/1) and a 0/1 mask of real points
    (padding steps repeat the last time and carry obs = 0). log_rho, log_sigma: (M,). Returns (M,).

    State: [u1, u1', u2, u2'] for the two independent latent Matérn-3/2 processes (unit variance); band g observes
    sigma * u1, band r observes sigma * (c u1 + sqrt(1 - c^2) u2). The 4x4 covariance is kept as its 10 distinct
    entries, each an (M,) array, and propagated with the closed-form Matérn-3/2 transition (explicit element
    formulas are ~4x faster than batched 4x4 matmuls).
    """
    t, y, e, b, obs = (np.asarray(a) for a in (t, y, e, b, obs))
    log_rho, log_sigma = np.asarray(log_rho, float), np.asarray(log_sigma, float)
    squeeze = log_rho.ndim == 1
    if squeeze:  # one candidate per sequence
        log_rho, log_sigma = log_rho[:, None], log_sigma[:, None]
    L = y.shape[1]
    M = log_rho.shape  # (n, K): K candidates per sequence share its data (broadcast, not copied)
    tT = np.ascontiguousarray(t.T)[:, :, None]
    yT = np.ascontiguousarray(y.T)[:, :, None]
    rT = np.ascontiguousarray((e * e).T)[:, :, None]
    isrT = np.ascontiguousarray(b.T == 1)[:, :, None]
    oT = np.ascontiguousarray(obs.T)[:, :, None]
    lam = np.sqrt(3.0) * np.exp(-log_rho)
    sig = np.exp(log_sigma)
    lam2 = lam * lam
    cs = np.sqrt(max(0.0, 1.0 - correlation**2))
    hg0 = sig
    hr0 = sig * correlation
    hr2 = sig * cs
    zero = np.zeros(M)
    m0, m1, m2, m3 = zero, zero, zero, zero
    # Covariance entries p_ij (i <= j) of the state [u1, u1', u2, u2']; stationary start diag(1, lam^2, 1, lam^2).
    p00, p01, p11 = np.ones(M), zero, lam2 + zero
    p22, p23, p33 = np.ones(M), zero, lam2 + zero
    p02, p03, p12, p13 = zero, zero, zero, zero
    ll = np.zeros(M)
    c0 = np.log(2 * np.pi)
    for k in range(L):
        if k > 0:
            dt = tT[k] - tT[k - 1]
            x = lam * dt
            ex = np.exp(-x)
            a = (ex * (1 + x), ex * dt, -lam2 * ex * dt, ex * (1 - x))  # transition a00, a01, a10, a11
            e2 = ex * ex
            x2 = x * x
            q00 = 1.0 - e2 * (1 + 2 * x + 2 * x2)
            q01 = 2 * x2 * lam * e2
            q11 = lam2 * (1.0 - e2 * (1 - 2 * x + 2 * x2))
            m0, m1 = a[0] * m0 + a[1] * m1, a[2] * m0 + a[3] * m1
            m2, m3 = a[0] * m2 + a[1] * m3, a[2] * m2 + a[3] * m3
            p00, p01, p11 = _a_x_at(a, p00, p01, p01, p11, sym=True)
            p22, p23, p33 = _a_x_at(a, p22, p23, p23, p33, sym=True)
            p02, p03, p12, p13 = _a_x_at(a, p02, p03, p12, p13, sym=False)
            p00, p01, p11 = p00 + q00, p01 + q01, p11 + q11
            p22, p23, p33 = p22 + q00, p23 + q01, p33 + q11
        isr = isrT[k]
        h0 = np.where(isr, hr0, hg0)
        h2 = np.where(isr, hr2, 0.0)
        g0 = p00 * h0 + p02 * h2  # P h
        g1 = p01 * h0 + p12 * h2
        g2 = p02 * h0 + p22 * h2
        g3 = p03 * h0 + p23 * h2
        S = g0 * h0 + g2 * h2 + rT[k]
        v = yT[k] - (m0 * h0 + m2 * h2)
        iS = oT[k] / S  # 0 on padding steps: no update
        w = v * iS
        m0, m1, m2, m3 = m0 + g0 * w, m1 + g1 * w, m2 + g2 * w, m3 + g3 * w
        g0s, g1s, g2s = g0 * iS, g1 * iS, g2 * iS
        p00, p01, p02, p03 = p00 - g0s * g0, p01 - g0s * g1, p02 - g0s * g2, p03 - g0s * g3
        p11, p12, p13 = p11 - g1s * g1, p12 - g1s * g2, p13 - g1s * g3
        p22, p23, p33 = p22 - g2s * g2, p23 - g2s * g3, p33 - g3 * g3 * iS
        ll -= 0.5 * oT[k] * (c0 + np.log(S)) + 0.5 * v * w
    return ll[:, 0] if squeeze else ll


# --------------------------------------------------------------------------------------------------------------
# Fitting: batched coarse-to-fine grid search
# --------------------------------------------------------------------------------------------------------------
def _pad(curves: list[_Curve]):
    L = max(len(c.t) for c in curves)
    n = len(curves)
    T = np.zeros((n, L))
    Y = np.zeros((n, L))
    E = np.ones((n, L))
    B = np.zeros((n, L), np.int8)
    O = np.zeros((n, L))
    for i, c in enumerate(curves):
        k = len(c.t)
        T[i, :k], Y[i, :k], E[i, :k], B[i, :k], O[i, :k] = c.t, c.y, c.e, c.b, 1.0
        T[i, k:] = c.t[-1]
    return T, Y, E, B, O


DENSE_MAX_POINTS = 200  # curves x padded length up to which the dense likelihood beats the Kalman filter


def dense_loglik(t, y, e, b, obs, log_rho, log_sigma, correlation: float) -> np.ndarray:
    """:func:`kalman_loglik` by dense Cholesky: equal to it to ~1e-12 relative, and 3-10x faster for one curve
    (the Kalman filter's cost is a Python loop over time steps, paid whatever the batch; this is O(L^3) per
    candidate in LAPACK). Inputs as :func:`kalman_loglik`, candidates (M, K).

    One Cholesky per candidate gives both terms: of ``[[K, y], [y^T, c]]`` with ``c > y^T K^-1 y`` (true for
    ``c = 1.01 sum(y_i^2 / e_i^2) + 1``, since ``K >= diag(e^2)``), the last pivot squared is ``c - y^T K^-1 y``
    and the others give ``log|K|``. Padding steps get an identity row and y = 0: they add nothing."""
    t, y, e, b, obs = (np.asarray(a, dtype=float) for a in (t, y, e, b, obs))
    log_rho, log_sigma = np.asarray(log_rho, float), np.asarray(log_sigma, float)
    squeeze = log_rho.ndim == 1
    if squeeze:
        log_rho, log_sigma = log_rho[:, None], log_sigma[:, None]
    n, L = y.shape
    k = log_rho.shape[1]
    tau = np.abs(t[:, :, None] - t[:, None, :])
    base = np.where(b[:, :, None] == b[:, None, :], 1.0, correlation) * (obs[:, :, None] * obs[:, None, :])
    x = tau[:, None] * (np.sqrt(3.0) * np.exp(-log_rho))[:, :, None, None]
    m = np.empty((n, k, L + 1, L + 1))
    m[:, :, :L, :L] = (np.exp(2 * log_sigma)[:, :, None, None] * base[:, None]) * ((1.0 + x) * np.exp(-x))
    idx = np.arange(L)
    e2 = e * e * obs + (1.0 - obs)
    m[:, :, idx, idx] += e2[:, None, :]
    yo = y * obs
    c = (yo * yo / e2).sum(axis=1) * 1.01 + 1.0
    m[:, :, :L, L] = yo[:, None, :]
    m[:, :, L, :L] = yo[:, None, :]
    m[:, :, L, L] = c[:, None]
    d = np.diagonal(np.linalg.cholesky(m), axis1=-2, axis2=-1)
    ll = -0.5 * (c[:, None] - d[..., L] ** 2) - np.log(d[..., :L]).sum(axis=-1) \
        - 0.5 * np.log(2 * np.pi) * obs.sum(axis=1)[:, None]
    return ll[:, 0] if squeeze else ll


def loglik(t, y, e, b, obs, log_rho, log_sigma, correlation: float, method: str = "auto") -> np.ndarray:
    """The exact log-likelihood by whichever path is faster for this many points: dense for a curve or two (what
    the HTTP service and the alert consumer see), the Kalman filter for a batch. A dense Cholesky that fails
    (numerically not positive definite) falls back to the filter. ``method="kalman"``: the filter always (its value
    for one sequence is the same to the bit whatever other sequences and padding share the call)."""
    if method == "auto" and np.shape(y)[0] * np.shape(y)[1] <= DENSE_MAX_POINTS:
        try:
            return dense_loglik(t, y, e, b, obs, log_rho, log_sigma, correlation)
        except np.linalg.LinAlgError:
            pass
    return kalman_loglik(t, y, e, b, obs, log_rho, log_sigma, correlation)


def _objective(T, Y, E, B, O, lr, ls, settings: GPSettings) -> np.ndarray:
    """Log posterior (log-likelihood + optional log-normal prior on rho) for (n, K) candidates."""
    ll = loglik(T, Y, E, B, O, lr, ls, settings.correlation, settings.likelihood)
    ll[~np.isfinite(ll)] = -np.inf
    if settings.rho_prior is not None:
        med, sd = settings.rho_prior
        ll = ll - 0.5 * ((lr - np.log(med)) / sd) ** 2
    return ll


def _fit_chunk(curves: list[_Curve], settings: GPSettings):
    """ML (or MAP) hyperparameters for curves of similar length. Returns (log_rho, log_sigma, objective)."""
    T, Y, E, B, O = _pad(curves)
    lo_r, hi_r = np.log(LENGTH_SCALE_BOUNDS)
    lo_s, hi_s = np.log(AMPLITUDE_BOUNDS)
    gr = np.linspace(lo_r, hi_r, settings.n_rho)
    gs = np.linspace(lo_s, hi_s, settings.n_sigma)
    lr0, ls0 = np.meshgrid(gr, gs, indexing="ij")
    n = len(curves)
    lr = np.tile(lr0.ravel(), (n, 1))
    ls = np.tile(ls0.ravel(), (n, 1))
    fix_r = np.array([c.fixed_rho is not None for c in curves])
    fix_s = np.array([c.fixed_sigma is not None for c in curves])
    for i, c in enumerate(curves):
        if c.fixed_rho is not None:
            lr[i] = np.log(c.fixed_rho)
        if c.fixed_sigma is not None:
            ls[i] = np.log(c.fixed_sigma)
    obj = _objective(T, Y, E, B, O, lr, ls, settings)
    best = np.argmax(obj, axis=1)
    idx = np.arange(n)
    br, bs, bo = lr[idx, best], ls[idx, best], obj[idx, best]
    step_r = (gr[1] - gr[0]) / 2 if settings.n_rho > 1 else 0.5
    step_s = (gs[1] - gs[0]) / 2 if settings.n_sigma > 1 else 0.5
    sx = np.repeat([-1.0, 0.0, 1.0], 3)  # 3x3 stencil in units of the step, rho index major
    sy = np.tile([-1.0, 0.0, 1.0], 3)
    for _ in range(settings.n_refine):
        # A 3x3 stencil around the best point (shifted inside the bounds), a least-squares quadratic through its
        # 9 values, and a Newton step to the quadratic's maximum (at most 2 steps away): the best of the stencil,
        # the Newton point and the previous best is kept; the step halves each round.
        sr = np.where(fix_r, 0.0, step_r)
        ss = np.where(fix_s, 0.0, step_s)
        cr0 = np.clip(br, lo_r + sr, hi_r - sr)
        cs0 = np.clip(bs, lo_s + ss, hi_s - ss)
        cr = cr0[:, None] + sr[:, None] * sx[None, :]
        cs = cs0[:, None] + ss[:, None] * sy[None, :]
        o = _objective(T, Y, E, B, O, cr, cs, settings)
        f = o.reshape(n, 3, 3)  # [rho index, sigma index]
        b1 = (f[:, 2, :].sum(1) - f[:, 0, :].sum(1)) / 6
        b2 = (f[:, :, 2].sum(1) - f[:, :, 0].sum(1)) / 6
        c11 = (f[:, 2, :].sum(1) + f[:, 0, :].sum(1) - 2 * f[:, 1, :].sum(1)) / 6
        c22 = (f[:, :, 2].sum(1) + f[:, :, 0].sum(1) - 2 * f[:, :, 1].sum(1)) / 6
        c12 = (f[:, 2, 2] - f[:, 2, 0] - f[:, 0, 2] + f[:, 0, 0]) / 4
        with np.errstate(all="ignore"):
            h11 = np.where(fix_r, -1.0, 2 * c11)
            h22 = np.where(fix_s, -1.0, 2 * c22)
            h12 = np.where(fix_r | fix_s, 0.0, c12)
            g1, g2 = np.where(fix_r, 0.0, b1), np.where(fix_s, 0.0, b2)
            det = h11 * h22 - h12 * h12
            concave = (h11 < 0) & (det > 0) & np.isfinite(det) & np.isfinite(g1) & np.isfinite(g2)
            d1 = np.where(concave, -(h22 * g1 - h12 * g2) / det, 0.0)
            d2 = np.where(concave, -(h11 * g2 - h12 * g1) / det, 0.0)
        nr = np.clip(cr0 + sr * np.clip(d1, -2, 2), lo_r, hi_r)
        ns = np.clip(cs0 + ss * np.clip(d2, -2, 2), lo_s, hi_s)
        on = _objective(T, Y, E, B, O, nr[:, None], ns[:, None], settings)[:, 0]
        allr = np.concatenate([br[:, None], cr, nr[:, None]], axis=1)
        alls = np.concatenate([bs[:, None], cs, ns[:, None]], axis=1)
        allo = np.concatenate([bo[:, None], o, on[:, None]], axis=1)
        j = np.argmax(allo, axis=1)
        br, bs, bo = allr[idx, j], alls[idx, j], allo[idx, j]
        step_r /= 2
        step_s /= 2
    return br, bs, bo


def _chunks(lengths: np.ndarray, max_size: int, min_size: int = 128, max_ratio: float = 2.0) -> list[np.ndarray]:
    """Curves sorted by length, cut into chunks of <= max_size that pad little (longest <= 2 x shortest, unless
    the chunk would be smaller than min_size)."""
    order = np.argsort(lengths, kind="stable")
    out, start = [], 0
    for k in range(1, len(order) + 1):
        if k == len(order) or k - start >= max_size or (
                k - start >= min_size and lengths[order[k]] > max_ratio * max(1, lengths[order[start]])):
            out.append(order[start:k])
            start = k
    return out


def _fit(curves: list[_Curve], settings: GPSettings):
    n = len(curves)
    lr, ls, lo = np.zeros(n), np.zeros(n), np.full(n, -np.inf)
    for sel in _chunks(np.array([len(c.t) for c in curves]), settings.chunk):
        r, s, o = _fit_chunk([curves[i] for i in sel], settings)
        lr[sel], ls[sel], lo[sel] = r, s, o
    return lr, ls, lo


# --------------------------------------------------------------------------------------------------------------
# Prediction (dense, once per object)
# --------------------------------------------------------------------------------------------------------------
def _predict(c: _Curve, rho: float, sigma: float, correlation: float, loo: bool):
    """Posterior mean and variance (normalised units) at the grid for both bands, and leave-one-out |z|.

    One curve, scipy Cholesky: the reference path (used for single fallbacks; the batch path is
    :func:`_predict_batch`)."""
    K = dense_kernel(c.t, c.b, c.t, c.b, sigma, rho, correlation)
    K[np.diag_indices_from(K)] += c.e**2
    G = len(c.grid)
    tg = np.concatenate([c.grid, c.grid])
    bg = np.repeat(np.array([0, 1], np.int8), G)
    Ks = dense_kernel(tg, bg, c.t, c.b, sigma, rho, correlation)  # (2G, N)
    Lc = np.linalg.cholesky(K)
    alpha = cho_solve((Lc, True), c.y)
    mean = Ks @ alpha
    V = solve_triangular(Lc, Ks.T, lower=True)
    var = sigma**2 - np.einsum("ij,ij->j", V, V)
    z = None
    if loo:
        Li = solve_triangular(Lc, np.eye(len(c.y)), lower=True)
        kinv_diag = np.einsum("ij,ij->j", Li, Li)
        z = np.abs(alpha) / np.sqrt(kinv_diag)
    return mean.reshape(2, G), var.reshape(2, G), z


PREDICT_CHUNK_ELEMENTS = 2_000_000  # curves x N^2 per dense prediction chunk (memory bound, ~16 MB)
PREDICT_CHUNK_CURVES = 64


def _predict_batch(curves: list[_Curve], rho: np.ndarray, sigma: np.ndarray, correlation: float, loo: bool):
    """:func:`_predict` for many curves: batched Cholesky and triangular inverse (numpy's stacked linalg).

    A chunk holds curves of the same number of points and grid length only, so nothing is padded: LAPACK's
    blocking (and so the last bits of a factor) depends on the matrix size, and a curve padded to its longest
    chunk-mate's size came out ~1e-14 different from the same curve alone. Each matrix of a stack is factored on
    its own, so a curve's prediction is the same to the bit whatever else is in the batch (with one BLAS thread:
    OpenBLAS's threaded Cholesky and inverse of a matrix above ~113 rows round differently from its serial ones).
    Returns a list of (mean, var, z) per curve, or an Exception for a curve whose chunk failed."""
    n = len(curves)
    out: list = [None] * n
    groups: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(curves):
        groups.setdefault((len(c.t), len(c.grid)), []).append(i)
    for (size_n, _), members in sorted(groups.items()):
        size = max(1, min(PREDICT_CHUNK_CURVES, PREDICT_CHUNK_ELEMENTS // (size_n * size_n)))
        for start in range(0, len(members), size):
            sel = np.array(members[start:start + size])
            try:
                res = _predict_chunk([curves[i] for i in sel], rho[sel], sigma[sel], correlation, loo)
            except Exception:  # noqa: BLE001 - one curve at a time (as alone: the same bits), then scipy's path
                res = []
                for i in sel:
                    try:
                        res.append(_predict_chunk([curves[i]], rho[i:i + 1], sigma[i:i + 1], correlation, loo)[0])
                    except Exception:  # noqa: BLE001
                        try:
                            res.append(_predict(curves[i], float(rho[i]), float(sigma[i]), correlation, loo))
                        except Exception as exc1:  # noqa: BLE001
                            res.append(exc1)
            for i, r in zip(sel, res):
                out[i] = r
    return out


def _predict_chunk(curves: list[_Curve], rho, sigma, correlation: float, loo: bool):
    T, Y, E, B, O = _pad(curves)
    n, N = T.shape
    G = max(len(c.grid) for c in curves)
    TG = np.empty((n, G))
    for i, c in enumerate(curves):
        TG[i, :len(c.grid)] = c.grid
        TG[i, len(c.grid):] = c.grid[-1]
    s2 = (sigma**2)[:, None, None]
    rr = rho[:, None, None]
    corr = np.where(B[:, :, None] == B[:, None, :], 1.0, correlation)
    K = s2 * corr * matern32(T[:, :, None] - T[:, None, :], rr)
    OO = O[:, :, None] * O[:, None, :]
    K *= OO
    idx = np.arange(N)
    K[:, idx, idx] += E**2 * O + (1.0 - O)
    # Cross-covariance grid (both bands) x data: (n, 2G, N)
    base = matern32(TG[:, :, None] - T[:, None, :], rr) * (sigma**2)[:, None, None] * O[:, None, :]
    Ks = np.concatenate([base * np.where(B[:, None, :] == 0, 1.0, correlation),
                         base * np.where(B[:, None, :] == 1, 1.0, correlation)], axis=1)
    Lc = np.linalg.cholesky(K)
    Li = np.linalg.inv(Lc)  # lower triangular
    w = np.einsum("nij,nj->ni", Li, Y * O)
    V = Li @ Ks.transpose(0, 2, 1)  # (n, N, 2G)
    mean = np.einsum("nij,ni->nj", V, w)
    var = (sigma**2)[:, None] - np.einsum("nij,nij->nj", V, V)
    if loo:
        alpha = np.einsum("nij,ni->nj", Li, w)
        kinv_diag = np.einsum("nij,nij->nj", Li, Li)
        Z = np.abs(alpha) / np.sqrt(kinv_diag)
    mean = mean.reshape(n, 2, G)
    var = var.reshape(n, 2, G)
    return [(mean[i, :, :len(c.grid)], var[i, :, :len(c.grid)], Z[i, :len(c.t)] if loo else None)
            for i, c in enumerate(curves)]


def _result(c: _Curve, mean, var, rho, sigma, ll, status_notes, correlation: float) -> GPResult:
    floor = (1e-6 * max(sigma, AMPLITUDE_BOUNDS[0])) ** 2
    var = np.maximum(var, floor)
    mean_f = mean * c.scale
    std_f = np.sqrt(var) * c.scale
    status = "ok" if not status_notes else "fallback: " + "; ".join(status_notes)
    if not (np.isfinite(mean_f).all() and np.isfinite(std_f).all() and (std_f > 0).all()):
        mean_f = np.zeros_like(mean_f)
        std_f = np.full_like(std_f, max(sigma, AMPLITUDE_BOUNDS[0]) * c.scale if np.isfinite(sigma) else c.scale)
        if not (np.isfinite(std_f) & (std_f > 0)).all():
            std_f = np.ones_like(std_f)
        status = "fallback: non-finite prediction, prior used"
    params = {
        "amplitude": float(sigma * c.scale),
        "amplitude_rel": float(sigma),
        "length_scale": float(rho),
        "correlation": float(correlation),
        "flux_scale": float(c.scale),
        "log_likelihood": float(ll),
        "n_points": int(len(c.t)),
        "n_g": int(len(c.b) - c.b.sum()),
        "n_r": int(c.b.sum()),
        "n_clipped": int(c.n_clipped),
        "n_dropped": int(c.n_dropped),
    }
    return GPResult(mean=mean_f, std=std_f, status=status, params=params)


def _finish(curves: list[_Curve], settings: GPSettings) -> list[GPResult]:
    """Fit, clip leave-one-out outliers (one refit of the curves that lost points), predict. Never raises."""
    lr, ls, lo = _fit(curves, settings)
    rho, sigma = np.exp(lr), np.exp(ls)
    preds = _predict_batch(curves, rho, sigma, settings.correlation, settings.clip)
    refit: list[int] = []
    for i, (c, p) in enumerate(zip(curves, preds)):
        if isinstance(p, Exception) or not settings.clip or len(c.t) < 5 or c.fixed_rho is not None:
            continue
        z = p[2]
        if z is not None and np.all(np.isfinite(z)) and np.max(z) > LOO_CLIP_Z:
            bad = z > LOO_CLIP_Z
            n_max = max(1, len(z) // 10)
            if bad.sum() > n_max:
                bad = z >= np.sort(z)[-n_max]
            keep = ~bad
            c.t, c.y, c.e, c.b = c.t[keep], c.y[keep], c.e[keep], c.b[keep]
            c.n_clipped += int(bad.sum())
            refit.append(i)
    if refit:
        sub = [curves[i] for i in refit]
        lr2, ls2, lo2 = _fit(sub, settings)
        preds2 = _predict_batch(sub, np.exp(lr2), np.exp(ls2), settings.correlation, False)
        for k, i in enumerate(refit):
            rho[i], sigma[i], lo[i], preds[i] = np.exp(lr2[k]), np.exp(ls2[k]), lo2[k], preds2[k]
    out: list[GPResult] = []
    for i, c in enumerate(curves):
        p = preds[i]
        if isinstance(p, Exception) or not np.isfinite(lo[i]):
            reason = type(p).__name__ if isinstance(p, Exception) else "no finite likelihood"
            out.append(_fallback_prior(c, f"optimiser failed ({reason})", settings.correlation))
            continue
        out.append(_result(c, p[0], p[1], float(rho[i]), float(sigma[i]), lo[i], c.notes, settings.correlation))
    return out


def _fallback_prior(c: _Curve, reason: str, correlation: float = CROSS_BAND_CORRELATION) -> GPResult:
    """Fixed default hyperparameters (log_likelihood NaN: not fitted); if even that fails, the prior (mean 0,
    std = scale)."""
    notes = c.notes + [reason]
    try:
        mean, var, _ = _predict(c, DEFAULT_LENGTH_SCALE, DEFAULT_AMPLITUDE, correlation, False)
        return _result(c, mean, var, DEFAULT_LENGTH_SCALE, DEFAULT_AMPLITUDE, np.nan, notes, correlation)
    except Exception:  # noqa: BLE001
        G = len(c.grid)
        return _result(c, np.zeros((2, G)), np.ones((2, G)), DEFAULT_LENGTH_SCALE, DEFAULT_AMPLITUDE, np.nan,
                       notes + ["prior used"], correlation)


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------
def interpolate(t, flux, flux_err, band, grid, *, settings: GPSettings = DEFAULT_SETTINGS) -> GPResult:
    """Fit the GP to one object and predict g and r on ``grid`` (days, same time axis as ``t``).

    Raises :class:`GPInputError` only when nothing usable remains; every other oddity is a fallback whose reason
    is in ``status``.
    """
    c = _prepare(t, flux, flux_err, band, grid)
    return _finish([c], settings)[0]


def interpolate_batch(curves: Sequence[tuple], *, settings: GPSettings = DEFAULT_SETTINGS
                      ) -> list[GPResult | GPInputError]:
    """:func:`interpolate` for many curves at once (vectorised fit); never raises for one bad curve.

    Each element of ``curves`` is ``(t, flux, flux_err, band, grid)``; the answer at the same position is a
    :class:`GPResult` or the :class:`GPInputError` that curve raised.
    """
    out: list[GPResult | GPInputError | None] = [None] * len(curves)
    good: list[_Curve] = []
    where: list[int] = []
    for i, item in enumerate(curves):
        try:
            t, flux, flux_err, band, grid = item
            good.append(_prepare(t, flux, flux_err, band, grid))
            where.append(i)
        except GPInputError as exc:
            out[i] = exc
        except Exception as exc:  # noqa: BLE001
            out[i] = GPInputError(f"malformed curve: {type(exc).__name__}: {exc}")
    if good:
        try:
            results = _finish(good, settings)
        except Exception:  # noqa: BLE001 - a vectorised failure: redo one by one so one curve cannot sink all
            results = []
            for c in good:
                try:
                    results.append(_finish([c], settings)[0])
                except Exception as exc:  # noqa: BLE001
                    results.append(_fallback_prior(c, f"optimiser failed ({type(exc).__name__})",
                                                   settings.correlation))
        for i, r in zip(where, results):
            out[i] = r
    return out  # type: ignore[return-value]


__all__ = ["BAND_ORDER", "GPInputError", "GPResult", "GPSettings", "DEFAULT_SETTINGS", "BATCH_INVARIANT",
           "interpolate", "interpolate_batch", "kalman_loglik", "dense_loglik", "loglik", "dense_kernel", "matern32"]
