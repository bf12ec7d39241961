"""GP interpolation (deeprubin.lightcurves.gp): exactness against a dense float64 GP, held-out accuracy on real curves against
scikit-learn's GaussianProcessRegressor, and one asserted outcome per robustness case."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from deeprubin.lightcurves import gp
from deeprubin.lightcurves.gp import GPInputError, GPResult, interpolate, interpolate_batch
from tests.conftest import shared_data_dir

GRID = np.arange(100.0)
N_HELD_OUT = 40


def _curve(seed=0, n=30, span=80.0, amp=100.0):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, span, n))
    b = rng.integers(0, 2, n).astype(np.int8)
    f = amp * np.exp(-0.5 * ((t - 30) / 12) ** 2) * np.where(b == 0, 1.0, 0.8)
    e = rng.uniform(0.03, 0.1, n) * amp
    return t, f + rng.normal(0, e), e, b


def _dense_gp(t, f, e, b, grid, amplitude, rho, c):
    """Textbook dense GP in float64 (np.linalg.solve, no Cholesky): mean and variance on grid for g and r."""
    def k(t1, b1, t2, b2):
        x = np.sqrt(3) * np.abs(t1[:, None] - t2[None, :]) / rho
        corr = np.where(b1[:, None] == b2[None, :], 1.0, c)
        return amplitude**2 * corr * (1 + x) * np.exp(-x)

    K = k(t, b, t, b) + np.diag(e**2)
    out_m, out_v = [], []
    for band in (0, 1):
        bg = np.full(len(grid), band)
        Ks = k(grid, bg, t, b)
        out_m.append(Ks @ np.linalg.solve(K, f))
        out_v.append(amplitude**2 - np.einsum("ij,ji->i", Ks, np.linalg.solve(K, Ks.T)))
    return np.array(out_m), np.array(out_v)


def _assert_clean(r):
    assert isinstance(r, GPResult)
    assert r.mean.shape == r.std.shape == (2, len(GRID))
    assert np.all(np.isfinite(r.mean)) and np.all(np.isfinite(r.std)) and np.all(r.std > 0)


# ---------------------------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [0.0, 0.9])
@pytest.mark.parametrize("rho,sigma", [(2.0, 0.3), (25.0, 1.0), (800.0, 3.0)])
def test_kalman_likelihood_matches_dense(c, rho, sigma):
    t, f, e, b = _curve(1, n=40)
    t[7] = t[6]  # a duplicate time
    y, err = f / 100, e / 100
    K = sigma**2 * np.where(b[:, None] == b[None, :], 1.0, c) * gp.matern32(t[:, None] - t[None, :], rho)
    K += np.diag(err**2)
    dense = -0.5 * (y @ np.linalg.solve(K, y) + np.linalg.slogdet(K)[1] + len(y) * np.log(2 * np.pi))
    kal = gp.kalman_loglik(t[None], y[None], err[None], b[None], np.ones((1, len(t))),
                           np.log([rho]), np.log([sigma]), c)[0]
    assert kal == pytest.approx(dense, rel=1e-10)


@pytest.mark.parametrize("n,length", [(1, 12), (1, 140), (3, 40)])
def test_dense_likelihood_equals_the_kalman_filter_with_padding_and_candidates(n, length):
    rng = np.random.default_rng(n * 1000 + length)
    t = np.sort(rng.uniform(0, 150, (n, length)), axis=1)
    t[:, 5] = t[:, 4]  # a duplicate time
    b = rng.integers(0, 2, (n, length)).astype(np.int8)
    y, e = rng.normal(size=(n, length)), rng.uniform(0.01, 0.5, (n, length))
    obs = np.ones((n, length))
    obs[0, -4:] = 0.0  # padding of the first curve
    t[0, -4:] = t[0, -5]
    lr, ls = rng.uniform(0.0, 6.9, (n, 9)), rng.uniform(-4.6, 2.3, (n, 9))  # the fit's bounds
    for c in (0.0, 0.9):
        kal = gp.kalman_loglik(t, y, e, b, obs, lr, ls, c)
        np.testing.assert_allclose(gp.dense_loglik(t, y, e, b, obs, lr, ls, c), kal, rtol=1e-9)


def test_kalman_padding_is_neutral():
    t, f, e, b = _curve(2, n=20)
    pad = 7
    T = np.concatenate([t, np.full(pad, t[-1])])[None]
    Y = np.concatenate([f, np.zeros(pad)])[None] / 100
    E = np.concatenate([e, np.ones(pad)])[None] / 100
    B = np.concatenate([b, np.zeros(pad, np.int8)])[None]
    O = np.concatenate([np.ones(len(t)), np.zeros(pad)])[None]
    a = gp.kalman_loglik(t[None], f[None] / 100, e[None] / 100, b[None], np.ones((1, len(t))), [3.0], [0.0], 0.9)
    p = gp.kalman_loglik(T, Y, E, B, O, [3.0], [0.0], 0.9)
    assert p[0] == pytest.approx(a[0], rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prediction_matches_dense_gp_with_same_hyperparameters(seed):
    t, f, e, b = _curve(seed, n=25 + 10 * seed)
    # One call and a batch must both agree with the textbook GP at the hyperparameters they report.
    for r in (interpolate(t, f, e, b, GRID), interpolate_batch([(t, f, e, b, GRID)] * 3)[1]):
        assert r.status == "ok"
        p = r.params
        m, v = _dense_gp(t, f, e, b, GRID, p["amplitude"], p["length_scale"], p["correlation"])
        np.testing.assert_allclose(r.mean, m, rtol=1e-6, atol=1e-6 * np.abs(m).max())
        np.testing.assert_allclose(r.std**2, v, rtol=1e-6)


def test_fit_is_maximum_likelihood():
    """No (rho, sigma) on a fine grid around the fitted point beats it by more than the search tolerance."""
    t, f, e, b = _curve(5, n=40)
    r = interpolate(t, f, e, b, GRID)
    s = r.params["flux_scale"]
    lr0, ls0 = np.log(r.params["length_scale"]), np.log(r.params["amplitude_rel"])
    d = np.linspace(-0.5, 0.5, 21)
    LR, LS = np.meshgrid(lr0 + d, ls0 + d, indexing="ij")
    LR, LS = LR.ravel(), LS.ravel()
    n = len(LR)
    ll = gp.kalman_loglik(np.repeat(t[None], n, 0), np.repeat(f[None] / s, n, 0), np.repeat(e[None] / s, n, 0),
                          np.repeat(b[None], n, 0), np.ones((n, len(t))), LR, LS, r.params["correlation"])
    assert ll.max() - r.params["log_likelihood"] < 0.1


# ---------------------------------------------------------------------------------------------------------------
# Held-out accuracy on real BTS curves against scikit-learn
# ---------------------------------------------------------------------------------------------------------------
def _sklearn_band(t, y, err, tq):
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    kernel = ConstantKernel(1.0, (1e-4, 1e2)) * Matern(20.0, (1.0, 1000.0), nu=1.5) + WhiteKernel(1e-3, (1e-8, 10))
    reg = GaussianProcessRegressor(kernel, alpha=err**2, normalize_y=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg.fit(t[:, None], y)
        m, s = reg.predict(tq[:, None], return_std=True)
    return m, s


@pytest.mark.real_data
def test_held_out_bts_no_worse_than_sklearn():
    """Every 4th interior point (time order) of 40 random BTS curves (>= 3 training points per band) is left out.

    Metrics on the left-out points, in units of the curve's max |flux|: mean negative log predictive density
    (predictive N(mu, std^2 + flux_err^2)) and median |residual|. Ours must be no worse than sklearn's
    GaussianProcessRegressor(C * Matern(nu=1.5) + WhiteKernel, alpha=flux_err^2), fitted per band."""
    from deeprubin.schema import map_detections, validate_detections

    path = shared_data_dir() / "bts" / "detections.parquet"
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set DEEPRUBIN_SHARED_DATA)")
    det, _ = validate_detections(map_detections(pd.read_parquet(path), source="bts"))
    rng = np.random.default_rng(3)
    nlpd = {"ours": [], "sklearn": []}
    res = {"ours": [], "sklearn": []}
    used = 0
    for oid in rng.permutation(det["oid"].unique()):
        d = det[det["oid"] == oid]
        d = d[d["mjd"] < d["mjd"].min() + 100]
        t, f, e = d["mjd"].to_numpy(), d["flux"].to_numpy(), d["flux_err"].to_numpy()
        b = (d["band"].to_numpy() == "r").astype(np.int8)
        out = np.zeros(len(t), bool)
        out[np.argsort(t, kind="stable")[1:-1][3::4]] = True
        tr = ~out
        if out.sum() == 0 or min(np.sum(tr & (b == 0)), np.sum(tr & (b == 1))) < 3:
            continue
        used += 1
        scale = np.abs(f[tr]).max()
        r = interpolate(t[tr], f[tr], e[tr], b[tr], t[out])
        idx = np.arange(out.sum())
        preds = {"ours": (r.mean[b[out], idx], r.std[b[out], idx])}
        mu, sd = np.zeros(out.sum()), np.zeros(out.sum())
        for band in (0, 1):
            q = b[out] == band
            if q.any():
                sel = tr & (b == band)
                m, s = _sklearn_band(t[sel] - t.min(), f[sel] / scale, e[sel] / scale, t[out][q] - t.min())
                mu[q], sd[q] = m * scale, s * scale
        preds["sklearn"] = (mu, sd)
        for name, (m, s) in preds.items():
            var = (s**2 + e[out] ** 2) / scale**2
            z2 = ((f[out] - m) / scale) ** 2
            nlpd[name].extend(0.5 * (np.log(2 * np.pi * var) + z2 / var))
            res[name].extend(np.sqrt(z2))
        if used == N_HELD_OUT:
            break
    assert used >= 20
    ours, base = np.mean(nlpd["ours"]), np.mean(nlpd["sklearn"])
    assert ours <= base + 0.01, (ours, base)
    # The median residual of 40 curves moves by ~8 % from sample to sample (on 138 curves ours is 10 % lower,
    # docs/gp.md); the tolerance covers that noise, NLPD above is the strict criterion.
    assert np.median(res["ours"]) <= 1.10 * np.median(res["sklearn"]), (np.median(res["ours"]),
                                                                       np.median(res["sklearn"]))


# ---------------------------------------------------------------------------------------------------------------
# Robustness: one asserted outcome per case
# ---------------------------------------------------------------------------------------------------------------
def test_single_point_uses_fixed_hyperparameters():
    r = interpolate([10.0], [50.0], [5.0], [0], GRID)
    _assert_clean(r)
    assert r.status.startswith("fallback: single point, fixed hyperparameters")
    assert "no r detections" in r.status
    assert r.params["length_scale"] == pytest.approx(gp.DEFAULT_LENGTH_SCALE)
    assert r.mean[0, 10] == pytest.approx(50.0, rel=0.05)
    assert r.std[0, 99] > r.std[0, 10]  # uncertainty grows away from the point


@pytest.mark.parametrize("missing,name", [(1, "r"), (0, "g")])
def test_one_band_missing(missing, name):
    t, f, e, b = _curve(3)
    keep = b != missing
    r = interpolate(t[keep], f[keep], e[keep], b[keep], GRID)
    _assert_clean(r)
    assert r.status == f"fallback: no {name} detections"
    present = 1 - missing
    # The missing band is predicted through the cross-band correlation, with a larger uncertainty.
    assert np.median(r.std[missing]) > np.median(r.std[present])


def test_all_points_in_one_night_fix_length_scale():
    t = 58000.1 + np.array([0.0, 0.01, 0.02, 0.05, 0.06])
    r = interpolate(t, [10.0, 11, 10.5, 20, 21], [1.0] * 5, [0, 0, 0, 1, 1], 58000 + GRID)
    _assert_clean(r)
    assert r.status == "fallback: all points in one night, fixed length scale"
    assert r.params["length_scale"] == pytest.approx(gp.DEFAULT_LENGTH_SCALE)


def test_huge_outlier_is_clipped():
    t, f, e, b = _curve(4, n=40)
    keep = np.arange(len(t)) != 17
    clean = interpolate(t[keep], f[keep], e[keep], b[keep], GRID)  # the same curve without that point
    f2 = f.copy()
    f2[17] = 1000 * np.abs(f).max()
    r = interpolate(t, f2, e, b, GRID)
    _assert_clean(r)
    assert r.status == "ok" and r.params["n_clipped"] == 1
    np.testing.assert_allclose(r.mean, clean.mean, atol=1e-6 * np.abs(clean.mean).max())


def test_moderate_outlier_clipped_by_leave_one_out():
    t, f, e, b = _curve(6, n=40)
    f2 = f.copy()
    f2[20] += 5 * np.abs(f).max()  # 5x the peak: not a "spike" by the 10x rule; leave-one-out |z| ~ 6 > 5
    r = interpolate(t, f2, e, b, GRID)
    _assert_clean(r)
    assert r.params["n_clipped"] >= 1
    assert np.abs(r.mean).max() < 2 * np.abs(f).max()


def test_flat_curve():
    r = interpolate(np.arange(10.0), np.full(10, 7.0), np.ones(10), np.arange(10) % 2, GRID)
    _assert_clean(r)
    assert r.status == "fallback: flat curve, fixed hyperparameters"
    assert r.mean[0, 5] == pytest.approx(7.0, rel=0.05)


def test_all_zero_flux_is_flat_not_nan():
    r = interpolate(np.arange(10.0), np.zeros(10), np.ones(10), np.arange(10) % 2, GRID)
    _assert_clean(r)
    assert r.status.startswith("fallback: flat curve")
    assert np.all(np.abs(r.mean) < 1e-9)


def test_negative_fluxes():
    t, f, e, b = _curve(7)
    pos = interpolate(t, f, e, b, GRID)
    neg = interpolate(t, -f, e, b, GRID)
    _assert_clean(neg)
    assert neg.status == "ok"
    np.testing.assert_allclose(neg.mean, -pos.mean, atol=1e-9 * np.abs(pos.mean).max())
    np.testing.assert_allclose(neg.std, pos.std, rtol=1e-9)


def test_unsorted_and_duplicate_times():
    t, f, e, b = _curve(8)
    ref = interpolate(t, f, e, b, GRID)
    perm = np.random.default_rng(0).permutation(len(t))
    shuffled = interpolate(t[perm], f[perm], e[perm], b[perm], GRID)
    np.testing.assert_allclose(shuffled.mean, ref.mean, rtol=1e-9, atol=1e-9)
    # A duplicated point (same time, band, flux) is kept: it counts as a second measurement.
    td, fd, ed, bd = (np.concatenate([a, a[:3]]) for a in (t, f, e, b))
    dup = interpolate(td, fd, ed, bd, GRID)
    _assert_clean(dup)
    assert dup.status == "ok" and dup.params["n_points"] == len(t) + 3


def test_bad_points_dropped_and_counted():
    t, f, e, b = _curve(9)
    f = f.copy()
    e = e.copy()
    f[0], e[1] = np.nan, 0.0
    b = b.astype(int)
    b[2] = 5
    r = interpolate(t, f, e, b, GRID)
    _assert_clean(r)
    assert r.params["n_dropped"] == 3 and r.params["n_points"] == len(t) - 3
    assert r.status == "ok"  # a repair, not a fallback: counted in params["n_dropped"]


@pytest.mark.parametrize("args,match", [
    (([], [], [], [], GRID), "no usable points"),
    (([1.0, 2.0], [np.nan, np.inf], [1.0, 1.0], [0, 1], GRID), "no usable points"),
    (([1.0, 2.0], [1.0, 2.0], [1.0], [0, 1], GRID), "differ in length"),
    (([1.0], [1.0], [1.0], [0], []), "grid"),
])
def test_nothing_usable_raises(args, match):
    with pytest.raises(GPInputError, match=match):
        interpolate(*args)


def test_batch_never_raises_never_nan():
    rng = np.random.default_rng(11)
    curves = []
    for i in range(40):
        t, f, e, b = _curve(i, n=int(rng.integers(2, 60)))
        curves.append((t, f, e, b, GRID))
    curves += [
        ([], [], [], [], GRID),  # empty
        ([1.0], [np.nan], [1.0], [0], GRID),  # nothing finite
        ([5.0], [3.0], [1.0], [1], GRID),  # one point
        (np.zeros(5), np.arange(5.0), np.ones(5), np.zeros(5, int), GRID),  # same time
        (np.arange(5.0), np.zeros(5), np.ones(5), np.zeros(5, int), GRID),  # zero flux
        (np.arange(6.0), [1e30, 1, 2, 3, 2, 1], np.ones(6), np.zeros(6, int), GRID),  # absurd value
        (np.arange(6.0), np.arange(6.0), np.full(6, 1e-30), np.zeros(6, int), GRID),  # absurdly small errors
        ("not", "a", "curve"),  # malformed tuple
        (np.arange(4.0), ["a", "b", "c", "d"], np.ones(4), np.zeros(4), GRID),  # non-numeric flux
    ]
    res = interpolate_batch(curves)
    assert len(res) == len(curves)
    for r in res:
        if isinstance(r, GPInputError):
            continue
        _assert_clean(r)
        assert r.status == "ok" or r.status.startswith("fallback: ")
    errors = [r for r in res if isinstance(r, GPInputError)]
    assert len(errors) == 4
    # A batch answers each curve as the single call does.
    one = interpolate(*curves[3])
    np.testing.assert_allclose(res[3].mean, one.mean, rtol=1e-9, atol=1e-9)


def test_failed_fit_falls_back_without_nan(monkeypatch):
    def boom(*a, **k):
        raise FloatingPointError("forced")

    monkeypatch.setattr(gp, "kalman_loglik", boom)
    monkeypatch.setattr(gp, "dense_loglik", boom)
    t, f, e, b = _curve(12)
    res = interpolate_batch([(t, f, e, b, GRID), (t, f, e, b, GRID)])
    for r in res:
        _assert_clean(r)
        assert r.status.startswith("fallback: ") and "optimiser failed" in r.status


def test_batch_invariant_settings_give_each_curve_the_same_bits_alone_and_in_any_batch():
    """Issue 18: with BATCH_INVARIANT (and one BLAS thread) a curve's result does not depend on the other curves of
    its call. Before, a curve alone took the dense likelihood and a batch the Kalman filter (equal to ~1e-12 only),
    and the prediction was padded to the longest chunk-mate (LAPACK's blocking changed the last bits)."""
    from threadpoolctl import threadpool_limits

    curves = [(*_curve(seed=s, n=n, span=span), GRID) for s, (n, span) in
              enumerate([(3, 1.0), (8, 60.0), (25, 90.0), (40, 95.0), (70, 99.0), (25, 50.0), (1, 0.0), (130, 99.0)])]
    with threadpool_limits(limits=1):
        together = interpolate_batch(curves, settings=gp.BATCH_INVARIANT)
        reversed_half = interpolate_batch(curves[::-2], settings=gp.BATCH_INVARIANT)[::-1]
        for i, curve in enumerate(curves):
            alone = interpolate_batch([curve], settings=gp.BATCH_INVARIANT)[0]
            for other in (together[i], *([reversed_half[i // 2]] if i % 2 == 1 else [])):
                assert alone.status == other.status and alone.params == other.params, i
                assert np.array_equal(alone.mean, other.mean) and np.array_equal(alone.std, other.std), i
        # the default settings too: a curve alone (what the HTTP service sees) no longer takes a dense likelihood
        default_alone = interpolate_batch([curves[2]])[0]
    assert np.array_equal(default_alone.mean, together[2].mean) and np.array_equal(default_alone.std, together[2].std)


def test_kalman_loglik_of_a_sequence_is_the_same_to_the_bit_alone_and_among_others():
    rng = np.random.default_rng(5)
    n, length = 6, 30
    t = np.sort(rng.uniform(0, 100, (n, length)), axis=1)
    y, e = rng.normal(size=(n, length)), rng.uniform(0.05, 0.3, (n, length))
    b = rng.integers(0, 2, (n, length)).astype(np.int8)
    obs = np.ones((n, length))
    obs[2, 20:] = 0.0
    t[2, 20:] = t[2, 19]
    lr, ls = rng.uniform(0.0, 6.9, (n, 7)), rng.uniform(-4.6, 2.3, (n, 7))
    together = gp.kalman_loglik(t, y, e, b, obs, lr, ls, 0.9)
    for i in range(n):
        alone = gp.kalman_loglik(t[i:i + 1], y[i:i + 1], e[i:i + 1], b[i:i + 1], obs[i:i + 1], lr[i:i + 1],
                                 ls[i:i + 1], 0.9)
        assert np.array_equal(alone[0], together[i]), i
    # the padding of sequence 2 skipped, or not there at all: the same bits
    short = gp.kalman_loglik(t[2:3, :20], y[2:3, :20], e[2:3, :20], b[2:3, :20], obs[2:3, :20], lr[2:3], ls[2:3], 0.9)
    assert np.array_equal(short[0], together[2])
