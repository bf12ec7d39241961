"""The torch GP (deeprubin.lightcurves.gp_torch) against the numpy GP with its batch-invariant settings: the same GP
mean and std on the grid (normalised by the object's flux scale, as the model input has them) within 1e-6, the same
status and parameters, on simulated and real BTS curves and every robustness case; the classify path with the torch
GP; and the GPU, where there is one (skipped otherwise: the CPU tests always run)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from deeprubin.config import load_params
from deeprubin.lightcurves import gp, gp_torch
from deeprubin.lightcurves import tensorize as tz
from deeprubin.lightcurves import tensorize_device as td
from deeprubin.schema import CLASSES
from tests.real_curves import bts_rows, contract

GRID = np.arange(100.0)
TOL = 1e-6
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small matrices: more threads only wait for each other (and the machine may be shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _curve(seed=0, n=30, span=80.0, amp=100.0):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, span, n))
    b = rng.integers(0, 2, n).astype(np.int8)
    f = amp * np.exp(-0.5 * ((t - 30) / 12) ** 2) * np.where(b == 0, 1.0, 0.8)
    e = rng.uniform(0.03, 0.1, n) * amp
    return t, f + rng.normal(0, e), e, b


def assert_same(args, want, got, tol=TOL) -> float:
    """Each answer equal: the same error or the same status, parameters (1e-6 relative) and GP mean and std within
    ``tol`` of the object's flux scale. Returns the largest difference seen."""
    assert len(want) == len(got)
    worst = 0.0
    for i, (a, b) in enumerate(zip(want, got)):
        if isinstance(a, Exception):
            assert type(a) is type(b) and str(a) == str(b), i
            continue
        assert b.status == a.status, (i, a.status, b.status)
        assert b.params.keys() == a.params.keys()
        for k, v in a.params.items():
            assert b.params[k] == pytest.approx(v, rel=1e-6, abs=1e-9, nan_ok=True), (i, k)
        assert b.mean.shape == a.mean.shape and b.std.shape == a.std.shape
        scale = a.params["flux_scale"]
        d = max(np.abs(a.mean - b.mean).max(), np.abs(a.std - b.std).max()) / scale
        assert d <= tol, (i, d, a.status)
        assert np.isfinite(b.mean).all() and (b.std > 0).all()
        worst = max(worst, d)
    return worst


def _prepared_args(curves) -> list[tuple]:
    out = []
    for c in curves:
        try:
            out.append(tz.prepare(c).gp_args())
        except tz.Skip:
            pass
    return out


@pytest.fixture(scope="module")
def simulated_args():
    from deeprubin.sources import simulate

    sim = simulate.simulate(load_params(None).ingest.simulator.model_copy(update={"n_per_class": 50}), seed=5)
    curves = tz.curves_from_detections(sim.detections)
    # early cuts too: 1-2 points, one band
    return _prepared_args(curves + [tz.cut_after_first(c, d) for c in curves[::8] for d in (0.5, 3.0)])


@pytest.fixture(scope="module")
def bts_args(shared_data):
    """~300 real BTS curves: a random 200, the 20 longest, and early cuts (1-2 points, a band missing)."""
    curves = tz.curves_from_detections(contract(bts_rows(shared_data), "bts"))
    rng = np.random.default_rng(18)
    pick = [curves[i] for i in rng.choice(len(curves), 200, replace=False)]
    longest = sorted(curves, key=lambda c: len(c.mjd))[-20:]
    cuts = [tz.cut_after_first(c, d) for c in pick[:40] for d in (0.0, 2.0)]
    return _prepared_args(pick + longest + cuts)


@pytest.mark.parametrize("likelihood", ["dense", "kalman"])
def test_torch_gp_equals_numpy_gp_on_simulated_curves(simulated_args, likelihood):
    want = gp.interpolate_batch(simulated_args, settings=gp.BATCH_INVARIANT)
    got = gp_torch.interpolate_batch(simulated_args, likelihood=likelihood)
    worst = assert_same(simulated_args, want, got)
    assert worst < TOL
    statuses = {r.status for r in want}
    assert "ok" in statuses and any("single point" in s for s in statuses) and any("no r" in s or "no g" in s
                                                                                  for s in statuses)


def test_torch_gp_equals_numpy_gp_on_real_bts_curves(bts_args):
    want = gp.interpolate_batch(bts_args, settings=gp.BATCH_INVARIANT)
    got = gp_torch.interpolate_batch(bts_args)
    assert_same(bts_args, want, got)
    assert max(len(a[0]) for a in bts_args) > 300  # very long curves are in
    assert min(len(a[0]) for a in bts_args) == 1


def _edge_cases():
    t, f, e, b = _curve(3, 40)
    outlier = f.copy()
    outlier[10] += 80 * e[10]
    rng = np.random.default_rng(1)
    long_t = np.sort(rng.uniform(-100, 99, 700))
    return [
        ([5.0], [3.0], [1.0], [1], GRID),  # one point
        (np.array([0.0, 40.0]), np.array([1.0, 2.0]), np.array([0.1, 0.1]), np.array([1, 1]), GRID),  # 2 points
        (np.array([0.0, 0.0]), np.array([1.0, 2.0]), np.array([0.1, 0.1]), np.array([0, 1]), GRID),  # one per band
        (t, f, e, np.zeros(40, int), GRID),  # no r
        (t, f, e, np.ones(40, int), GRID),  # no g
        (t / 200, f, e, b, GRID),  # one night
        (np.arange(5.0), np.full(5, 7.0), np.ones(5), np.zeros(5, int), GRID),  # flat
        (np.arange(5.0), np.zeros(5), np.ones(5), np.zeros(5, int), GRID),  # all zero
        (np.arange(6.0), [1e30, 1, 2, 3, 2, 1], np.ones(6), np.zeros(6, int), GRID),  # huge outlier (spike clip)
        (np.arange(6.0), np.arange(6.0), np.full(6, 1e-30), np.zeros(6, int), GRID),  # absurdly small errors
        (t, outlier, e, b, GRID),  # moderate outlier: leave-one-out clip and refit
        (t, -f, e, b, GRID),  # negative
        (t[::-1], f[::-1], e[::-1], b[::-1], GRID),  # unsorted
        (np.r_[t, t[5]], np.r_[f, f[5] + 1], np.r_[e, e[5]], np.r_[b, b[5]], GRID),  # duplicate time
        (np.r_[t, np.nan], np.r_[f, 1.0], np.r_[e, 1.0], np.r_[b, 0], GRID),  # a dropped point
        (t, f, e, np.where(b == 0, "g", "r"), GRID),  # band names
        (long_t, 100 * np.sin(long_t / 15) + rng.normal(0, 5, 700), np.full(700, 5.0), rng.integers(0, 2, 700),
         GRID),  # very long
        ([], [], [], [], GRID),  # nothing
        ([1.0], [np.nan], [1.0], [0], GRID),  # nothing finite
        ("not", "a", "curve"),  # malformed
        (np.arange(4.0), ["a", "b", "c", "d"], np.ones(4), np.zeros(4), GRID),  # non-numeric
        *[(*_curve(i, n=n), GRID) for i, n in enumerate([2, 3, 5, 8, 30, 60])],
    ]


@pytest.mark.parametrize("likelihood", ["dense", "kalman"])
def test_every_robustness_case_is_answered_as_the_numpy_gp_answers_it(likelihood):
    cases = _edge_cases()
    want = gp.interpolate_batch(cases, settings=gp.BATCH_INVARIANT)
    got = gp_torch.interpolate_batch(cases, likelihood=likelihood)
    assert_same(cases, want, got)
    assert sum(isinstance(r, gp.GPInputError) for r in got) == 4
    assert got[10].params["n_clipped"] == 1 and got[8].params["n_clipped"] == 1  # both clips exercised


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the numpy filter's own
def test_a_failed_factorisation_takes_the_filter_and_the_numpy_prediction(monkeypatch):
    """A duplicated time in one band with errors ~1e-30 of the scale: the dense Cholesky of the fit fails, and the
    Kalman filter's value stands in; the prediction fails on the device too and the numpy module's prediction (its
    Kalman smoother takes the duplicate in its stride) decides, here to clip one point. With errors of 1e-30 the
    refit's likelihood is ill-conditioned, so the two modules may settle on other hyperparameters: what is asserted
    is the path taken and an answer that goes through the points."""
    calls = {"kalman": 0, "numpy": 0}
    kalman, numpy_predict = gp_torch.kalman_loglik, gp_torch._numpy_predict

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(gp_torch, "kalman_loglik", count("kalman", kalman))
    monkeypatch.setattr(gp_torch, "_numpy_predict", count("numpy", numpy_predict))
    t, f = np.array([0.0, 0, 1, 2, 3, 4, 5]), np.array([1.0, 1, 2, 3, 2, 1, 0.5])
    case = [(t, f, np.full(7, 1e-30), np.zeros(7, int), GRID)]
    want = gp.interpolate_batch(case, settings=gp.BATCH_INVARIANT)[0]
    got = gp_torch.interpolate_batch(case)[0]
    assert calls["kalman"] > 0 and calls["numpy"] > 0
    for res in (want, got):
        assert res.status == "fallback: no r detections" and res.params["n_clipped"] == 1
        assert np.isfinite(res.mean).all() and (res.std > 0).all()
        through = np.isclose(res.mean[0, :6], [1.0, 2, 3, 2, 1, 0.5], rtol=1e-4)  # grid cell = day of the point
        assert through.sum() == 5, res.mean[0, :6]  # every point but the clipped one


def test_a_failure_of_the_batched_path_falls_back_to_the_numpy_gp(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("forced")

    monkeypatch.setattr(gp_torch, "finish", boom)
    cases = [(*_curve(i, n=20), GRID) for i in range(3)]
    assert_same(cases, gp.interpolate_batch(cases, settings=gp.BATCH_INVARIANT), gp_torch.interpolate_batch(cases))


def test_padding_and_chunking_cannot_change_a_result():
    """A curve alone and in a batch with longer curves (padded to their length, in one chunk): the same to ~1e-13."""
    curves = [(*_curve(seed=s, n=n), GRID) for s, n in enumerate([12, 15, 40, 90])]
    together = gp_torch.interpolate_batch(curves, max_elements=10**9)  # one chunk: every curve padded to 90
    for i, c in enumerate(curves):
        alone = gp_torch.interpolate_batch([c])[0]
        assert alone.status == together[i].status
        assert alone.params["length_scale"] == pytest.approx(together[i].params["length_scale"], rel=1e-12)
        np.testing.assert_allclose(together[i].mean, alone.mean, rtol=0, atol=1e-13 * np.abs(alone.mean).max())
        np.testing.assert_allclose(together[i].std, alone.std, rtol=1e-12)


@pytest.mark.parametrize("n,length", [(1, 12), (1, 140), (3, 40)])
def test_torch_likelihoods_equal_the_numpy_filter_with_padding_and_candidates(n, length):
    rng = np.random.default_rng(n * 1000 + length)
    t = np.sort(rng.uniform(0, 150, (n, length)), axis=1)
    t[:, 5] = t[:, 4]  # a duplicate time
    b = rng.integers(0, 2, (n, length)).astype(np.int8)
    y, e = rng.normal(size=(n, length)), rng.uniform(0.01, 0.5, (n, length))
    obs = np.ones((n, length))
    obs[0, -4:] = 0.0
    t[0, -4:] = t[0, -5]
    y[0, -4:], e[0, -4:], b[0, -4:] = 0.0, 1.0, 0
    lr, ls = rng.uniform(0.0, 6.9, (n, 9)), rng.uniform(-4.6, 2.3, (n, 9))
    tt = [torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in (t, y, e)]
    data = (tt[0], tt[1], tt[2], torch.from_numpy(b.astype(np.int64)), torch.from_numpy(obs))
    for c in (0.0, 0.9):
        want = gp.kalman_loglik(t, y, e, b, obs, lr, ls, c)
        dense, failed = gp_torch.dense_loglik(*data, torch.from_numpy(lr), torch.from_numpy(ls), c)
        assert not failed.any()
        np.testing.assert_allclose(dense.numpy(), want, rtol=1e-9)
        kal = gp_torch.kalman_loglik(*data, torch.from_numpy(lr), torch.from_numpy(ls), c)
        np.testing.assert_allclose(kal.numpy(), want, rtol=1e-13)


def test_tensorize_halves_equal_tensorize_curves(simulated_args):
    """prepare_batch (CPU) + tensorize_prepared (device) = tensorize_curves: the same rows, skips and model input."""
    from deeprubin.sources import simulate

    sim = simulate.simulate(load_params(None).ingest.simulator.model_copy(update={"n_per_class": 10}), seed=9)
    curves = tz.curves_from_detections(sim.detections)
    curves += [tz.Curve("bad-time", np.array([2.4e6]), np.array([0]), np.array([1.0]), np.array([1.0])),
               tz.Curve("no-band", np.array([59000.0]), np.array([-1]), np.array([1.0]), np.array([1.0]))]
    want = tz.tensorize_curves(curves, interpolator=tz.interpolate_batch_invariant)
    batch = td.PreparedBatch.concat([td.prepare_batch(curves[:15]), td.prepare_batch(curves[15:])])
    got, x = td.tensorize_prepared(batch, "cpu")
    assert [r["oid"] for r in got.rows] == [r["oid"] for r in want.rows]
    assert got.rows == want.rows
    key = lambda s: s["oid"]  # noqa: E731
    assert sorted(got.skipped, key=key) == sorted(want.skipped, key=key) and len(want.skipped) == 2
    assert x.dtype == torch.float32 and x.shape == want.x.shape
    np.testing.assert_allclose(x.numpy(), want.x, rtol=0, atol=TOL)


def _classify(params_overrides, src, out, model):
    from deeprubin.serving import classify as clf

    params = load_params(None, ["classify.batch_size=16", "classify.workers=1", *params_overrides])
    return clf.run_file(params, src, out, model=model, workers=1)


@pytest.fixture(scope="module")
def classify_input(tmp_path_factory):
    from deeprubin.models.served import ServingModel
    from deeprubin.sources import simulate
    from tests.model_fixtures import served_tcn

    sim = simulate.simulate(load_params(None).ingest.simulator.model_copy(update={"n_per_class": 15}), seed=3)
    det = sim.detections.sort_values(["oid", "mjd"], kind="stable").reset_index(drop=True)
    det = pd.concat([det, det[det["oid"] == det["oid"].iloc[0]].assign(oid="ZZZ-early").head(2)])
    src = tmp_path_factory.mktemp("classify") / "in.parquet"
    det.to_parquet(src, index=False)
    return src, ServingModel(uri="local:test", name="test", version="0", classes=tuple(CLASSES), module=served_tcn())


@pytest.mark.filterwarnings("ignore:local.test records no preprocessing settings")
def test_classify_with_the_torch_gp_on_cpu_gives_the_default_path_probabilities(classify_input, tmp_path):
    src, model = classify_input
    default = _classify([], src, tmp_path / "default.parquet", model)
    torch_cpu = _classify(["classify.gp_device=torch-cpu", "classify.device_batch_size=40"], src,
                          tmp_path / "torch.parquet", model)
    a, b = (pd.read_parquet(r.output).drop(columns="classified_at") for r in (default, torch_cpu))
    assert len(a) == 61 and default.n_rejected == torch_cpu.n_rejected
    probs = [f"p_{c}" for c in CLASSES]
    np.testing.assert_allclose(b[probs].to_numpy(), a[probs].to_numpy(), rtol=0, atol=1e-5)
    pd.testing.assert_frame_equal(a.drop(columns=probs), b.drop(columns=probs))


@pytest.mark.filterwarnings("ignore:local.test records no preprocessing settings")
def test_the_device_path_on_a_worker_pool_equals_it_in_process(classify_input, tmp_path):
    """Workers prepare the batches (window, GP input), this process merges them and runs the GP and the TCN."""
    from deeprubin.serving import classify as clf

    src, model = classify_input
    params = load_params(None, ["classify.batch_size=8", "classify.gp_device=torch-cpu",
                                "classify.device_batch_size=20"])
    one = clf.run_file(params, src, tmp_path / "one.parquet", model=model, workers=1)
    pool = clf.run_file(params, src, tmp_path / "pool.parquet", model=model, workers=2, min_rows_for_pool=0)
    a, b = (pd.read_parquet(r.output).drop(columns="classified_at") for r in (one, pool))
    pd.testing.assert_frame_equal(a, b, rtol=1e-6)


def test_gp_device_setting():
    from deeprubin.serving.classify import resolve_gp_device

    assert load_params(None).classify.gp_device == "cpu"  # the numpy GP stays the default
    assert resolve_gp_device("cpu") is None and resolve_gp_device("torch-cpu") == "cpu"
    assert resolve_gp_device("auto") == ("cuda" if torch.cuda.is_available() else None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_gp_device("cuda")


@CUDA
def test_torch_gp_on_cuda_equals_the_numpy_gp(simulated_args):
    want = gp.interpolate_batch(simulated_args, settings=gp.BATCH_INVARIANT)
    assert_same(simulated_args, want, gp_torch.interpolate_batch(simulated_args, device="cuda"))
    cases = _edge_cases()
    assert_same(cases, gp.interpolate_batch(cases, settings=gp.BATCH_INVARIANT),
                gp_torch.interpolate_batch(cases, device="cuda"))


@CUDA
@pytest.mark.filterwarnings("ignore:local.test records no preprocessing settings")
def test_classify_on_cuda_gives_the_default_path_probabilities(classify_input, tmp_path):
    src, model = classify_input
    default = _classify(["classify.device=cpu"], src, tmp_path / "default.parquet", model)
    cuda = _classify(["classify.gp_device=cuda", "classify.device=cuda"], src, tmp_path / "cuda.parquet", model)
    a, b = (pd.read_parquet(r.output).drop(columns="classified_at") for r in (default, cuda))
    probs = [f"p_{c}" for c in CLASSES]
    np.testing.assert_allclose(b[probs].to_numpy(), a[probs].to_numpy(), rtol=0, atol=1e-5)
    model.to("cpu")
