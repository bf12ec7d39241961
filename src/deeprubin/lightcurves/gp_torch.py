"""The GP of :mod:`deeprubin.lightcurves.gp`, batched in torch (float64) on any device: the GPU path of issue 18.

The same model, inputs and answers as ``gp.interpolate_batch(curves, settings=gp.BATCH_INVARIANT)``, to ~1e-10
(tested to 1e-6 in normalised flux on simulated and real BTS curves): what a curve becomes is decided by the numpy
module's own code, reused here, and only the two numerical kernels are rewritten for a device.

* Input preparation (sorting, dropped points, the spike clip, the flux scale, the fixed hyperparameters of the
  one-point / flat / one-night cases and their status notes) is :func:`gp._prepare` itself, run on the CPU.
* The fit is :func:`gp._fit_chunk`'s search, step for step: the same 5x4 grid of (ln rho, ln sigma) candidates,
  the same 3 rounds of a 3x3 stencil, least-squares quadratic and clipped Newton step, the same "best of previous,
  stencil and Newton point, first on ties" rule and the same bounds. Its likelihood is the exact one, by a dense
  batched Cholesky per candidate (``likelihood="dense"``: one LAPACK/cuSOLVER call for a chunk of curves x
  candidates instead of a Python loop over time steps) or by the same Kalman filter as the numpy module, ported
  (``likelihood="kalman"``). The two agree to ~1e-12 relative; a candidate whose dense Cholesky fails (numerically
  not positive definite) takes the filter's value, as the numpy module's filter would have given it.
* The prediction (and the leave-one-out residuals of the outlier clip) is the dense solve of :func:`gp._predict`
  (the numpy module now predicts with a Kalman smoother, equal to it to ~1e-9; on a device the dense solve is one
  batched call), batched over curves of different lengths: a shorter curve is padded with identity rows and
  columns, zero data and zero cross-covariance, which the factorisation carries through without touching the real
  block, so padding cannot change a result.
* The clip (leave-one-out |z| > 5, at most 10 % of the points, one refit), the std floor, the non-finite guard and
  every fallback follow :func:`gp._finish` and :func:`gp._result`; the rare curve whose dense prediction fails on the
  device is handed to the numpy module's own prediction, and a failed fit to its :func:`gp._fallback_prior`.

Batch invariance: each matrix is factored on its own and the candidates' values do not mix across curves, so a
curve's result does not depend on its batch beyond the last bits of a padded factorisation (~1e-15).

Curves travel as one :class:`Packed` batch (flat arrays and offsets): cheap to send from the CPU worker processes
that prepare them to the process that owns the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from deeprubin.lightcurves import gp
from deeprubin.lightcurves.gp import AMPLITUDE_BOUNDS, LENGTH_SCALE_BOUNDS, LOO_CLIP_Z, GPInputError, GPResult, \
    GPSettings

Likelihood = Literal["dense", "kalman"]
DTYPE = torch.float64
SQRT3 = math.sqrt(3.0)
# Elements of the largest 4-D (curves x candidates x points x points) array one fit call builds; the prediction's
# chunks hold as many. About 8 bytes each, a few temporaries alive at once.
MAX_ELEMENTS = {"cpu": 2**21, "cuda": 2**26}
LENGTH_RATIO = 1.25  # a chunk's longest curve is at most this x its shortest + LENGTH_SLACK points (little padding)
LENGTH_SLACK = 8


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` or None: cuda when torch sees one, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("the torch GP was asked for a CUDA device but torch sees none")
    return dev


def _budget(device: torch.device, max_elements: int | None) -> int:
    return int(max_elements or MAX_ELEMENTS.get(device.type, MAX_ELEMENTS["cuda"]))


# --------------------------------------------------------------------------------------------------------------
# A batch of prepared curves as flat arrays
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Packed:
    """Prepared curves (:class:`gp._Curve`, from :func:`gp._prepare`) as flat arrays: curve i's points are
    ``offsets[i]:offsets[i + 1]``. All curves share the grid length G; ``grid`` (n, G) is in days from each curve's
    t0, as ``_Curve.grid``."""

    t: np.ndarray
    y: np.ndarray
    e: np.ndarray
    b: np.ndarray  # int8, 0 = g, 1 = r
    offsets: np.ndarray  # (n + 1,) int64
    grid: np.ndarray  # (n, G)
    scale: np.ndarray  # (n,)
    t0: np.ndarray  # (n,)
    fixed_rho: np.ndarray  # (n,), NaN where fitted
    fixed_sigma: np.ndarray  # (n,), NaN where fitted
    n_clipped: np.ndarray  # (n,) int64
    n_dropped: np.ndarray  # (n,) int64
    notes: list = field(default_factory=list)  # per curve: the fallback notes of _prepare

    @property
    def n(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def curve(self, i: int) -> "gp._Curve":
        """Curve ``i`` as the numpy module's :class:`gp._Curve` (for its fallbacks)."""
        a, z = int(self.offsets[i]), int(self.offsets[i + 1])
        b = self.b[a:z]
        return gp._Curve(t=self.t[a:z].copy(), y=self.y[a:z].copy(), e=self.e[a:z].copy(), b=b.copy(),
                         grid=self.grid[i].copy(), scale=float(self.scale[i]), t0=float(self.t0[i]),
                         notes=list(self.notes[i]),
                         fixed_rho=None if np.isnan(self.fixed_rho[i]) else float(self.fixed_rho[i]),
                         fixed_sigma=None if np.isnan(self.fixed_sigma[i]) else float(self.fixed_sigma[i]),
                         n_clipped=int(self.n_clipped[i]), n_dropped=int(self.n_dropped[i]),
                         n_g=int(len(b) - b.sum()), n_r=int(b.sum()))

    def subset(self, idx: np.ndarray) -> "Packed":
        idx = np.asarray(idx, dtype=np.int64)
        lens = self.lengths[idx]
        points = _ranges(self.offsets[idx], lens)
        return Packed(t=self.t[points], y=self.y[points], e=self.e[points], b=self.b[points],
                      offsets=np.r_[0, np.cumsum(lens)].astype(np.int64), grid=self.grid[idx],
                      scale=self.scale[idx], t0=self.t0[idx], fixed_rho=self.fixed_rho[idx],
                      fixed_sigma=self.fixed_sigma[idx], n_clipped=self.n_clipped[idx].copy(),
                      n_dropped=self.n_dropped[idx], notes=[self.notes[i] for i in idx])

    @staticmethod
    def concat(parts: Sequence["Packed"]) -> "Packed":
        """One batch of several (all with the same grid length), in order."""
        parts = [q for q in parts if q.n] or list(parts[:1])
        if len(parts) == 1:
            return parts[0]
        shift = np.cumsum([0] + [len(q.t) for q in parts[:-1]])
        return Packed(t=np.concatenate([q.t for q in parts]), y=np.concatenate([q.y for q in parts]),
                      e=np.concatenate([q.e for q in parts]), b=np.concatenate([q.b for q in parts]),
                      offsets=np.concatenate([[0]] + [q.offsets[1:] + s for q, s in zip(parts, shift)]
                                             ).astype(np.int64),
                      grid=np.concatenate([q.grid for q in parts]), scale=np.concatenate([q.scale for q in parts]),
                      t0=np.concatenate([q.t0 for q in parts]),
                      fixed_rho=np.concatenate([q.fixed_rho for q in parts]),
                      fixed_sigma=np.concatenate([q.fixed_sigma for q in parts]),
                      n_clipped=np.concatenate([q.n_clipped for q in parts]),
                      n_dropped=np.concatenate([q.n_dropped for q in parts]),
                      notes=[x for q in parts for x in q.notes])

    def keep_points(self, keep: np.ndarray) -> "Packed":
        """The same curves with only the points where ``keep`` (flat, bool) is true."""
        counts = np.add.reduceat(keep.astype(np.int64), self.offsets[:-1]) if len(keep) else np.zeros(self.n, int)
        counts = np.where(self.lengths > 0, counts, 0)
        return Packed(t=self.t[keep], y=self.y[keep], e=self.e[keep], b=self.b[keep],
                      offsets=np.r_[0, np.cumsum(counts)].astype(np.int64), grid=self.grid, scale=self.scale,
                      t0=self.t0, fixed_rho=self.fixed_rho, fixed_sigma=self.fixed_sigma,
                      n_clipped=self.n_clipped.copy(), n_dropped=self.n_dropped, notes=self.notes)


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + l)`` for each (s, l), vectorised."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.r_[0, np.cumsum(lens)[:-1]]
    return np.repeat(starts - first, lens) + np.arange(total)


def pack(curves: Sequence["gp._Curve"]) -> Packed:
    """Prepared curves (all with the same grid length) -> :class:`Packed`."""
    if not curves:
        return Packed(t=np.zeros(0), y=np.zeros(0), e=np.zeros(0), b=np.zeros(0, np.int8),
                      offsets=np.zeros(1, np.int64), grid=np.zeros((0, 0)), scale=np.zeros(0), t0=np.zeros(0),
                      fixed_rho=np.zeros(0), fixed_sigma=np.zeros(0), n_clipped=np.zeros(0, np.int64),
                      n_dropped=np.zeros(0, np.int64), notes=[])
    sizes = {len(c.grid) for c in curves}
    if len(sizes) != 1:
        raise ValueError(f"a packed batch needs one grid length, got {sorted(sizes)}")
    lens = np.array([len(c.t) for c in curves], dtype=np.int64)
    nan = float("nan")
    return Packed(t=np.concatenate([c.t for c in curves]).astype(np.float64),
                  y=np.concatenate([c.y for c in curves]).astype(np.float64),
                  e=np.concatenate([c.e for c in curves]).astype(np.float64),
                  b=np.concatenate([c.b for c in curves]).astype(np.int8),
                  offsets=np.r_[0, np.cumsum(lens)].astype(np.int64),
                  grid=np.stack([c.grid for c in curves]).astype(np.float64),
                  scale=np.array([c.scale for c in curves], dtype=np.float64),
                  t0=np.array([c.t0 for c in curves], dtype=np.float64),
                  fixed_rho=np.array([nan if c.fixed_rho is None else c.fixed_rho for c in curves], dtype=np.float64),
                  fixed_sigma=np.array([nan if c.fixed_sigma is None else c.fixed_sigma for c in curves],
                                       dtype=np.float64),
                  n_clipped=np.array([c.n_clipped for c in curves], dtype=np.int64),
                  n_dropped=np.array([c.n_dropped for c in curves], dtype=np.int64),
                  notes=[list(c.notes) for c in curves])


def _padded(p: Packed, sel: np.ndarray, device: torch.device):
    """(T, Y, E, B, O) (n, L) of the selected curves as :func:`gp._pad` lays them out: padding repeats the last
    time, with y = 0, e = 1, band 0 and obs = 0."""
    lens = p.lengths[sel]
    L = max(1, int(lens.max()))
    col = np.arange(L)
    valid = col[None, :] < lens[:, None]
    starts = p.offsets[sel]
    idx = np.where(valid, starts[:, None] + col[None, :], (starts + np.maximum(lens, 1) - 1)[:, None])
    T = p.t[idx]
    Y = np.where(valid, p.y[idx], 0.0)
    E = np.where(valid, p.e[idx], 1.0)
    B = np.where(valid, p.b[idx], 0).astype(np.int64)
    O = valid.astype(np.float64)

    def dev(a, dtype=DTYPE):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    return dev(T), dev(Y), dev(E), dev(B, torch.int64), dev(O)


def _chunks(lengths: np.ndarray, per_curve: callable, budget: int) -> list[np.ndarray]:
    """Curves sorted by length, cut into chunks whose padded size ``sum per_curve(L_max)`` stays within ``budget``
    and whose longest curve is at most LENGTH_RATIO x the shortest + LENGTH_SLACK points."""
    order = np.argsort(lengths, kind="stable")
    out, start = [], 0
    n = len(order)
    for k in range(1, n + 1):
        if k == n:
            out.append(order[start:k])
            break
        lk, l0 = int(lengths[order[k]]), int(lengths[order[start]])
        if (k + 1 - start) * per_curve(max(lk, 1)) > budget or lk > LENGTH_RATIO * l0 + LENGTH_SLACK:
            out.append(order[start:k])
            start = k
    return out


# --------------------------------------------------------------------------------------------------------------
# Likelihoods
# --------------------------------------------------------------------------------------------------------------
def dense_loglik(T, Y, E, B, O, lr, ls, correlation: float):
    """Exact log-likelihood of (n, K) candidates by dense Cholesky; ``(ll, failed)`` with ``failed`` true where the
    factorisation broke down (ll is then meaningless). Inputs as :func:`gp.kalman_loglik`, as tensors."""
    n, L = Y.shape
    same = B[:, :, None] == B[:, None, :]
    base = torch.where(same, torch.ones((), dtype=DTYPE, device=Y.device),
                       torch.full((), correlation, dtype=DTYPE, device=Y.device)) * (O[:, :, None] * O[:, None, :])
    tau = (T[:, :, None] - T[:, None, :]).abs()
    lam = SQRT3 * torch.exp(-lr)  # (n, K)
    x = tau[:, None] * lam[:, :, None, None]  # (n, K, L, L)
    k = torch.exp(-x)
    k.mul_(x.add_(1.0))
    del x
    k.mul_(base[:, None]).mul_(torch.exp(2 * ls)[:, :, None, None])  # in place: no other (n, K, L, L) array
    e2 = E * E * O + (1.0 - O)
    k.diagonal(dim1=-2, dim2=-1).add_(e2[:, None, :])
    chol, info = torch.linalg.cholesky_ex(k)
    del k
    yo = (Y * O)[:, None, :, None].expand(n, lr.shape[1], L, 1)
    z = torch.linalg.solve_triangular(chol, yo, upper=False)
    quad = (z * z).sum(dim=(-2, -1))
    logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    ll = -0.5 * quad - logdet - 0.5 * math.log(2 * math.pi) * O.sum(1)[:, None]
    return ll, info != 0


def _a_x_at(a, x00, x01, x10, x11, sym: bool):
    a00, a01, a10, a11 = a
    y00, y01 = a00 * x00 + a01 * x10, a00 * x01 + a01 * x11
    y10, y11 = a10 * x00 + a11 * x10, a10 * x01 + a11 * x11
    if sym:
        return y00 * a00 + y01 * a01, y00 * a10 + y01 * a11, y10 * a10 + y11 * a11
    return y00 * a00 + y01 * a01, y00 * a10 + y01 * a11, y10 * a00 + y11 * a01, y10 * a10 + y11 * a11


def kalman_loglik(T, Y, E, B, O, lr, ls, correlation: float):
    """:func:`gp.kalman_loglik` in torch, the same operations in the same order: (n, K) candidates, O(L) steps."""
    lam = SQRT3 * torch.exp(-lr)
    sig = torch.exp(ls)
    lam2 = lam * lam
    cs = math.sqrt(max(0.0, 1.0 - correlation**2))
    hg0, hr0, hr2 = sig, sig * correlation, sig * cs
    zero = torch.zeros_like(lam)
    one = torch.ones_like(lam)
    m0 = m1 = m2 = m3 = zero
    p00, p01, p11 = one, zero, lam2 + zero
    p22, p23, p33 = one, zero, lam2 + zero
    p02 = p03 = p12 = p13 = zero
    ll = torch.zeros_like(lam)
    c0 = math.log(2 * math.pi)
    tT, yT, rT = T.T[:, :, None], Y.T[:, :, None], (E * E).T[:, :, None]
    isrT, oT = (B == 1).T[:, :, None], O.T[:, :, None]
    for k in range(Y.shape[1]):
        if k > 0:
            dt = tT[k] - tT[k - 1]
            x = lam * dt
            ex = torch.exp(-x)
            a = (ex * (1 + x), ex * dt, -lam2 * ex * dt, ex * (1 - x))
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
        h0 = torch.where(isr, hr0, hg0)
        h2 = torch.where(isr, hr2, zero)
        g0 = p00 * h0 + p02 * h2
        g1 = p01 * h0 + p12 * h2
        g2 = p02 * h0 + p22 * h2
        g3 = p03 * h0 + p23 * h2
        S = g0 * h0 + g2 * h2 + rT[k]
        v = yT[k] - (m0 * h0 + m2 * h2)
        iS = oT[k] / S
        w = v * iS
        m0, m1, m2, m3 = m0 + g0 * w, m1 + g1 * w, m2 + g2 * w, m3 + g3 * w
        g0s, g1s, g2s = g0 * iS, g1 * iS, g2 * iS
        p00, p01, p02, p03 = p00 - g0s * g0, p01 - g0s * g1, p02 - g0s * g2, p03 - g0s * g3
        p11, p12, p13 = p11 - g1s * g1, p12 - g1s * g2, p13 - g1s * g3
        p22, p23, p33 = p22 - g2s * g2, p23 - g2s * g3, p33 - g3 * g3 * iS
        ll = ll - (0.5 * oT[k] * (c0 + torch.log(S)) + 0.5 * v * w)
    return ll


def _objective(data, lr, ls, settings: GPSettings, likelihood: Likelihood):
    """Log posterior of (n, K) candidates, non-finite -> -inf (as :func:`gp._objective`)."""
    T, Y, E, B, O = data
    if likelihood == "kalman":
        ll = kalman_loglik(T, Y, E, B, O, lr, ls, settings.correlation)
    else:
        ll, failed = dense_loglik(T, Y, E, B, O, lr, ls, settings.correlation)
        bad = failed | ~torch.isfinite(ll)
        rows = torch.nonzero(bad.any(1)).flatten()
        if len(rows):  # the filter's value where the dense factorisation broke down, as the numpy module has it
            sub = tuple(a[rows] for a in data)
            kal = kalman_loglik(*sub, lr[rows], ls[rows], settings.correlation)
            ll[rows] = torch.where(bad[rows], kal, ll[rows])
    ll = torch.where(torch.isfinite(ll), ll, torch.full((), -math.inf, dtype=DTYPE, device=ll.device))
    if settings.rho_prior is not None:
        med, sd = settings.rho_prior
        ll = ll - 0.5 * ((lr - math.log(med)) / sd) ** 2
    return ll


# --------------------------------------------------------------------------------------------------------------
# Fit: gp._fit_chunk's search, in torch
# --------------------------------------------------------------------------------------------------------------
def _clip(a, lo, hi):
    """np.clip(a, lo, hi) = minimum(maximum(a, lo), hi) for tensors or floats as bounds."""
    return torch.minimum(torch.maximum(a, _t(lo, a)), _t(hi, a))


def _t(v, like):
    return v if torch.is_tensor(v) else torch.full((), float(v), dtype=like.dtype, device=like.device)


def _fit_chunk(data, fixed_rho, fixed_sigma, settings: GPSettings, likelihood: Likelihood):
    """(log_rho, log_sigma, objective) of the curves of one chunk, as :func:`gp._fit_chunk`."""
    T = data[0]
    dev = T.device
    n = T.shape[0]
    lo_r, hi_r = np.log(LENGTH_SCALE_BOUNDS)
    lo_s, hi_s = np.log(AMPLITUDE_BOUNDS)
    gr = np.linspace(lo_r, hi_r, settings.n_rho)
    gs = np.linspace(lo_s, hi_s, settings.n_sigma)
    lr0, ls0 = np.meshgrid(gr, gs, indexing="ij")
    lo_r, hi_r, lo_s, hi_s = float(lo_r), float(hi_r), float(lo_s), float(hi_s)  # numpy scalars would take over
    fix_r_np, fix_s_np = ~np.isnan(fixed_rho), ~np.isnan(fixed_sigma)
    lr_np = np.tile(lr0.ravel(), (n, 1))
    ls_np = np.tile(ls0.ravel(), (n, 1))
    lr_np[fix_r_np] = np.log(fixed_rho[fix_r_np])[:, None]
    ls_np[fix_s_np] = np.log(fixed_sigma[fix_s_np])[:, None]

    def tt(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(dev)

    lr, ls = tt(lr_np), tt(ls_np)
    fix_r = torch.from_numpy(fix_r_np).to(dev)
    fix_s = torch.from_numpy(fix_s_np).to(dev)
    obj = _objective(data, lr, ls, settings, likelihood)
    best = torch.argmax(obj, dim=1, keepdim=True)
    br, bs, bo = lr.gather(1, best)[:, 0], ls.gather(1, best)[:, 0], obj.gather(1, best)[:, 0]
    step_r = float((gr[1] - gr[0]) / 2) if settings.n_rho > 1 else 0.5
    step_s = float((gs[1] - gs[0]) / 2) if settings.n_sigma > 1 else 0.5
    sx = tt(np.repeat([-1.0, 0.0, 1.0], 3))
    sy = tt(np.tile([-1.0, 0.0, 1.0], 3))
    zero, m_one = _t(0.0, lr), _t(-1.0, lr)
    for _ in range(settings.n_refine):
        sr = torch.where(fix_r, zero, _t(step_r, lr))
        ss = torch.where(fix_s, zero, _t(step_s, lr))
        cr0 = _clip(br, lo_r + sr, hi_r - sr)
        cs0 = _clip(bs, lo_s + ss, hi_s - ss)
        cr = cr0[:, None] + sr[:, None] * sx[None, :]
        cs = cs0[:, None] + ss[:, None] * sy[None, :]
        o = _objective(data, cr, cs, settings, likelihood)
        f = o.reshape(n, 3, 3)
        b1 = (_sum3(f[:, 2, :]) - _sum3(f[:, 0, :])) / 6
        b2 = (_sum3(f[:, :, 2]) - _sum3(f[:, :, 0])) / 6
        c11 = (_sum3(f[:, 2, :]) + _sum3(f[:, 0, :]) - 2 * _sum3(f[:, 1, :])) / 6
        c22 = (_sum3(f[:, :, 2]) + _sum3(f[:, :, 0]) - 2 * _sum3(f[:, :, 1])) / 6
        c12 = (f[:, 2, 2] - f[:, 2, 0] - f[:, 0, 2] + f[:, 0, 0]) / 4
        h11 = torch.where(fix_r, m_one, 2 * c11)
        h22 = torch.where(fix_s, m_one, 2 * c22)
        h12 = torch.where(fix_r | fix_s, zero, c12)
        g1, g2 = torch.where(fix_r, zero, b1), torch.where(fix_s, zero, b2)
        det = h11 * h22 - h12 * h12
        concave = (h11 < 0) & (det > 0) & torch.isfinite(det) & torch.isfinite(g1) & torch.isfinite(g2)
        d1 = torch.where(concave, -(h22 * g1 - h12 * g2) / det, zero)
        d2 = torch.where(concave, -(h11 * g2 - h12 * g1) / det, zero)
        nr = _clip(cr0 + sr * _clip(d1, -2.0, 2.0), lo_r, hi_r)
        ns = _clip(cs0 + ss * _clip(d2, -2.0, 2.0), lo_s, hi_s)
        on = _objective(data, nr[:, None], ns[:, None], settings, likelihood)[:, 0]
        allr = torch.cat([br[:, None], cr, nr[:, None]], dim=1)
        alls = torch.cat([bs[:, None], cs, ns[:, None]], dim=1)
        allo = torch.cat([bo[:, None], o, on[:, None]], dim=1)
        j = torch.argmax(allo, dim=1, keepdim=True)  # first of equal maxima, as np.argmax
        br, bs, bo = allr.gather(1, j)[:, 0], alls.gather(1, j)[:, 0], allo.gather(1, j)[:, 0]
        step_r /= 2
        step_s /= 2
    return br, bs, bo


def _sum3(a):
    """Sum of the 3 entries along the last axis, left to right (numpy's order for 3 elements)."""
    return (a[..., 0] + a[..., 1]) + a[..., 2]


def fit(p: Packed, settings: GPSettings = gp.BATCH_INVARIANT, device="cpu", likelihood: Likelihood = "dense",
        max_elements: int | None = None):
    """Maximum-likelihood (log rho, log sigma, objective) per curve of ``p``, numpy arrays (n,)."""
    dev = resolve_device(device)
    n = p.n
    lr, ls, lo = np.zeros(n), np.zeros(n), np.full(n, -np.inf)
    k = settings.n_rho * settings.n_sigma
    per_curve = (lambda L: max(k, 9) * L * L) if likelihood == "dense" else (lambda L: 64 * max(k, 9) * L)
    for sel in _chunks(p.lengths, per_curve, _budget(dev, max_elements)):
        data = _padded(p, sel, dev)
        r, s, o = _fit_chunk(data, p.fixed_rho[sel], p.fixed_sigma[sel], settings, likelihood)
        lr[sel], ls[sel], lo[sel] = r.cpu().numpy(), s.cpu().numpy(), o.cpu().numpy()
    return lr, ls, lo


# --------------------------------------------------------------------------------------------------------------
# Prediction: gp._predict's dense solve, batched and padded
# --------------------------------------------------------------------------------------------------------------
def _matern32(tau, rho):
    x = SQRT3 * tau.abs() / rho
    return (1.0 + x) * torch.exp(-x)


def _predict_chunk(data, TG, rho, sigma, correlation: float, loo: bool):
    """Posterior mean and variance (n, 2, G) in normalised units, leave-one-out |z| (n, L) and a failure flag (n,)
    for curves padded to a common length (identity padding: the real block's factor is untouched)."""
    T, Y, E, B, O = data
    n, N = T.shape
    G = TG.shape[1]
    dev = T.device
    one, corr = torch.ones((), dtype=DTYPE, device=dev), torch.full((), correlation, dtype=DTYPE, device=dev)
    s2 = (sigma**2)[:, None, None]
    rr = rho[:, None, None]
    K = s2 * torch.where(B[:, :, None] == B[:, None, :], one, corr) * _matern32(T[:, :, None] - T[:, None, :], rr)
    K = K * (O[:, :, None] * O[:, None, :])
    K.diagonal(dim1=-2, dim2=-1).add_(E**2 * O + (1.0 - O))
    base = _matern32(TG[:, :, None] - T[:, None, :], rr) * s2 * O[:, None, :]  # (n, G, N)
    Ks = torch.cat([base * torch.where(B == 0, one, corr)[:, None, :],
                    base * torch.where(B == 1, one, corr)[:, None, :]], dim=1)  # (n, 2G, N)
    chol, info = torch.linalg.cholesky_ex(K)
    failed = info != 0
    if bool(failed.any()):  # keep the batch finite: the failed curves get an identity factor (redone on numpy)
        eye = torch.eye(N, dtype=DTYPE, device=dev).expand(n, N, N)
        chol = torch.where(failed[:, None, None], eye, chol)
    V = torch.linalg.solve_triangular(chol, Ks.transpose(1, 2), upper=False)  # (n, N, 2G)
    w = torch.linalg.solve_triangular(chol, (Y * O)[:, :, None], upper=False)  # (n, N, 1)
    mean = (V * w).sum(1)
    var = (sigma**2)[:, None] - (V * V).sum(1)
    Z = None
    if loo:
        Li = torch.linalg.solve_triangular(chol, torch.eye(N, dtype=DTYPE, device=dev).expand(n, N, N), upper=False)
        alpha = (Li * w).sum(1)  # Li^T w
        kinv_diag = (Li * Li).sum(1)
        Z = alpha.abs() / torch.sqrt(kinv_diag)
    return mean.reshape(n, 2, G), var.reshape(n, 2, G), Z, failed


def predict(p: Packed, rho: np.ndarray, sigma: np.ndarray, correlation: float, loo: bool, device="cpu",
            max_elements: int | None = None):
    """Mean and variance (n, 2, G) tensors on ``device`` (normalised units); with ``loo``, the leave-one-out |z| of
    the curves whose |z| are all finite and one exceeds :data:`gp.LOO_CLIP_Z` (the clip's candidates), by index; and
    the indices of the curves whose factorisation failed."""
    dev = resolve_device(device)
    n, G = p.n, p.grid.shape[1]
    mean = torch.zeros((n, 2, G), dtype=DTYPE, device=dev)
    var = torch.zeros((n, 2, G), dtype=DTYPE, device=dev)
    flagged: dict[int, np.ndarray] = {}
    failed: list[int] = []
    per_curve = (lambda L: L * L * (3 if loo else 1) + 6 * G * L)
    for sel in _chunks(p.lengths, per_curve, _budget(dev, max_elements)):
        data = _padded(p, sel, dev)
        TG = torch.from_numpy(np.ascontiguousarray(p.grid[sel])).to(dev)
        m, v, Z, bad = _predict_chunk(data, TG, torch.from_numpy(rho[sel]).to(dev),
                                      torch.from_numpy(sigma[sel]).to(dev), correlation, loo)
        where = torch.from_numpy(sel).to(dev)
        mean[where], var[where] = m, v
        if loo:
            real = data[4] > 0
            finite = (torch.isfinite(Z) | ~real).all(1)
            big = (torch.where(real, Z, torch.zeros((), dtype=DTYPE, device=dev)) > LOO_CLIP_Z).any(1)
            rows = torch.nonzero(finite & big & ~bad).flatten().cpu().numpy()
            if len(rows):
                Zn = Z[torch.from_numpy(rows).to(dev)].cpu().numpy()
                for k, r in enumerate(rows):
                    i = int(sel[r])
                    flagged[i] = Zn[k, :p.lengths[i]]
        failed.extend(int(i) for i in sel[bad.cpu().numpy()])
    return mean, var, flagged, sorted(failed)


# --------------------------------------------------------------------------------------------------------------
# gp._finish and gp._result, batched
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Output:
    """What :func:`finish` gives for a :class:`Packed` batch: mean and std (n, 2, G) in µJy (tensors on the
    device), status per curve and the fitted parameters (numpy columns, as ``GPResult.params``)."""

    mean: torch.Tensor
    std: torch.Tensor
    status: list
    params: dict

    def results(self) -> list[GPResult]:
        """One :class:`gp.GPResult` per curve (numpy, on the host), as :func:`gp.interpolate_batch` gives them."""
        mean, std = self.mean.cpu().numpy(), self.std.cpu().numpy()
        cols = {k: np.asarray(v).tolist() for k, v in self.params.items()}
        ints = ("n_points", "n_g", "n_r", "n_clipped", "n_dropped")
        out = []
        for i in range(len(self.status)):
            params = {k: (int(v[i]) if k in ints else float(v[i])) for k, v in cols.items()}
            out.append(GPResult(mean=mean[i], std=std[i], status=self.status[i], params=params))
        return out


def finish(p: Packed, settings: GPSettings = gp.BATCH_INVARIANT, device="cpu", likelihood: Likelihood = "dense",
           max_elements: int | None = None) -> Output:
    """Fit, clip leave-one-out outliers (one refit of the curves that lost points), predict: :func:`gp._finish` for a
    packed batch, on ``device``. Never raises for one curve: its fallback is the numpy module's."""
    dev = resolve_device(device)
    corr = settings.correlation
    lr, ls, lo = fit(p, settings, dev, likelihood, max_elements)
    rho, sigma = np.exp(lr), np.exp(ls)
    mean, var, flagged, failed = predict(p, rho, sigma, corr, settings.clip, dev, max_elements)
    errors: dict[int, Exception] = {}
    for i in failed:  # the device's factorisation failed: the numpy module's own prediction decides
        _numpy_predict(p, i, rho, sigma, corr, settings.clip, mean, var, flagged, errors)
    lens = p.lengths
    refit: list[int] = []
    keep = np.ones(len(p.t), dtype=bool)
    n_clipped = p.n_clipped.copy()
    if settings.clip:
        for i in sorted(flagged):
            if i in errors or lens[i] < 5 or not np.isnan(p.fixed_rho[i]):
                continue
            z = flagged[i]
            if z is not None and np.all(np.isfinite(z)) and np.max(z) > LOO_CLIP_Z:
                bad = z > LOO_CLIP_Z
                n_max = max(1, len(z) // 10)
                if bad.sum() > n_max:
                    bad = z >= np.sort(z)[-n_max]
                keep[p.offsets[i]:p.offsets[i + 1]] = ~bad
                n_clipped[i] += int(bad.sum())
                refit.append(i)
    if refit:
        p = p.keep_points(keep)
        p.n_clipped = n_clipped
        sub = p.subset(np.array(refit))
        lr2, ls2, lo2 = fit(sub, settings, dev, likelihood, max_elements)
        rho2, sigma2 = np.exp(lr2), np.exp(ls2)
        mean2, var2, _, failed2 = predict(sub, rho2, sigma2, corr, False, dev, max_elements)
        errors2: dict[int, Exception] = {}
        for k in failed2:
            _numpy_predict(sub, k, rho2, sigma2, corr, False, mean2, var2, None, errors2)
        where = torch.from_numpy(np.array(refit)).to(dev)
        mean[where], var[where] = mean2, var2
        for k, i in enumerate(refit):
            rho[i], sigma[i], lo[i] = rho2[k], sigma2[k], lo2[k]
            errors.pop(i, None)
            if k in errors2:
                errors[i] = errors2[k]
    return _outputs(p, mean, var, rho, sigma, lo, errors, corr)


def _numpy_predict(p: Packed, i: int, rho, sigma, corr, loo, mean, var, flagged, errors) -> None:
    """Curve ``i``'s prediction by :func:`gp._predict_batch` (its own fallbacks included), written into the batch."""
    res = gp._predict_batch([p.curve(i)], rho[i:i + 1], sigma[i:i + 1], corr, loo)[0]
    if isinstance(res, Exception):
        errors[i] = res
        return
    m, v, z = res
    mean[i] = torch.from_numpy(np.asarray(m, dtype=np.float64)).to(mean.device)
    var[i] = torch.from_numpy(np.asarray(v, dtype=np.float64)).to(var.device)
    if flagged is not None and z is not None:
        flagged[i] = z


def _outputs(p: Packed, mean, var, rho, sigma, lo, errors, corr) -> Output:
    """:func:`gp._result` for every curve at once (the rare curve that needs a fallback goes through the numpy
    module's own code)."""
    dev = mean.device
    n = p.n
    sig = torch.from_numpy(sigma).to(dev)
    scale = torch.from_numpy(p.scale).to(dev)[:, None, None]
    floor = (1e-6 * torch.clamp_min(sig, AMPLITUDE_BOUNDS[0])) ** 2
    var = torch.maximum(var, floor[:, None, None])
    mean_f = mean * scale
    std_f = torch.sqrt(var) * scale
    ok = (torch.isfinite(mean_f).flatten(1).all(1) & torch.isfinite(std_f).flatten(1).all(1)
          & (std_f > 0).flatten(1).all(1)).cpu().numpy()
    status = ["ok" if not notes else "fallback: " + "; ".join(notes) for notes in p.notes]
    lens = p.lengths
    n_r = np.add.reduceat(p.b.astype(np.int64), p.offsets[:-1]) if len(p.b) else np.zeros(n, np.int64)
    n_r = np.where(lens > 0, n_r, 0)
    params = {"amplitude": sigma * p.scale, "amplitude_rel": sigma.copy(), "length_scale": rho.copy(),
              "correlation": np.full(n, float(corr)), "flux_scale": p.scale.copy(), "log_likelihood": lo.copy(),
              "n_points": lens.copy(), "n_g": lens - n_r, "n_r": n_r, "n_clipped": p.n_clipped.copy(),
              "n_dropped": p.n_dropped.copy()}
    special = sorted(set(np.flatnonzero(~ok).tolist()) | set(errors) | set(np.flatnonzero(~np.isfinite(lo)).tolist()))
    for i in special:
        c = p.curve(i)
        if i in errors or not np.isfinite(lo[i]):
            reason = type(errors[i]).__name__ if i in errors else "no finite likelihood"
            r = gp._fallback_prior(c, f"optimiser failed ({reason})", corr)
        else:
            r = gp._result(c, mean[i].cpu().numpy(), var[i].cpu().numpy(), float(rho[i]), float(sigma[i]), lo[i],
                           c.notes, corr)
        mean_f[i] = torch.from_numpy(r.mean).to(dev)
        std_f[i] = torch.from_numpy(r.std).to(dev)
        status[i] = r.status
        for k, v in r.params.items():
            params[k][i] = v
    return Output(mean=mean_f, std=std_f, status=status, params=params)


# --------------------------------------------------------------------------------------------------------------
# Public API: gp.interpolate_batch on a device
# --------------------------------------------------------------------------------------------------------------
def prepare(curves: Sequence[tuple]) -> tuple[list, list[int], dict[int, GPInputError]]:
    """:func:`gp._prepare` of each ``(t, flux, flux_err, band, grid)``: ``(prepared curves, their positions, errors
    by position)``, as :func:`gp.interpolate_batch` sorts them."""
    good, where, errors = [], [], {}
    for i, item in enumerate(curves):
        try:
            t, flux, flux_err, band, grid = item
            good.append(gp._prepare(t, flux, flux_err, band, grid))
            where.append(i)
        except GPInputError as exc:
            errors[i] = exc
        except Exception as exc:  # noqa: BLE001
            errors[i] = GPInputError(f"malformed curve: {type(exc).__name__}: {exc}")
    return good, where, errors


def interpolate_batch(curves: Sequence[tuple], *, settings: GPSettings = gp.BATCH_INVARIANT, device="cpu",
                      likelihood: Likelihood = "dense", max_elements: int | None = None
                      ) -> list[GPResult | GPInputError]:
    """:func:`gp.interpolate_batch` with the fit and prediction batched in torch on ``device`` (``cpu``, ``cuda``,
    ``cuda:1``, ``auto``); the same answers as ``gp.interpolate_batch(curves, settings=gp.BATCH_INVARIANT)``."""
    good, where, errors = prepare(curves)
    out: list = [errors.get(i) for i in range(len(curves))]
    by_grid: dict[int, list[int]] = {}
    for k, c in enumerate(good):
        by_grid.setdefault(len(c.grid), []).append(k)
    for members in by_grid.values():
        results = finish_curves([good[k] for k in members], settings, device, likelihood, max_elements)
        for k, r in zip(members, results):
            out[where[k]] = r
    return out


def finish_curves(curves: list, settings: GPSettings = gp.BATCH_INVARIANT, device="cpu",
                  likelihood: Likelihood = "dense", max_elements: int | None = None) -> list[GPResult]:
    """GP results of prepared curves (one grid length); a failure of the batched path falls back to the numpy
    module for these curves, so one bad batch never loses its curves."""
    try:
        return finish(pack(curves), settings, device, likelihood, max_elements).results()
    except Exception:  # noqa: BLE001 - never lose a batch: the numpy module's answer, curve by curve
        return [gp._finish([c], settings)[0] for c in curves]


__all__ = ["Packed", "Output", "pack", "fit", "predict", "finish", "finish_curves", "interpolate_batch",
           "dense_loglik", "kalman_loglik", "resolve_device"]
