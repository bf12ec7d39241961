"""The batched per-curve work of classification (issue 18) changes no bit: ``prepare_many`` equals ``prepare`` curve
by curve, and ``tensorize_curves`` (which uses it) gives the same tensors as the one-curve path, whatever the
batch-mates, with the same skips in the same order."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from deeprubin.config import load_params
from deeprubin.lightcurves.tensorize import Curve, PreparedCurve, curves_from_detections, prepare, prepare_many, \
    tensorize_curves
from deeprubin.sources import simulate


@pytest.fixture(scope="module")
def curves() -> list[Curve]:
    sim = simulate.simulate(load_params(None).ingest.simulator.model_copy(update={"n_per_class": 12}), seed=3)
    out = curves_from_detections(sim.detections)
    rng = np.random.default_rng(0)
    odd = []
    c = out[0]
    odd.append(replace(c, oid="nan-point", flux=np.where(np.arange(len(c.mjd)) == 1, np.nan, c.flux)))
    odd.append(replace(c, oid="zero-error", flux_err=np.where(np.arange(len(c.mjd)) == 0, 0.0, c.flux_err)))
    odd.append(replace(c, oid="band-i", band=np.where(np.arange(len(c.mjd)) == 2, 2, c.band)))
    odd.append(replace(c, oid="jd", mjd=c.mjd + 2400000.5))
    odd.append(replace(c, oid="sentinel", flux=np.where(np.arange(len(c.mjd)) == 0, 1e-9, c.flux),
                       flux_err=np.where(np.arange(len(c.mjd)) == 0, 1e-9, c.flux_err)))
    odd.append(Curve("empty", np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0)))
    odd.append(Curve("lists", list(c.mjd), list(c.band), list(c.flux), list(c.flux_err)))  # type: ignore[arg-type]
    odd.append(Curve("all-bad", c.mjd, c.band, c.flux * np.nan, c.flux_err))
    one = Curve("one-point", c.mjd[:1], c.band[:1], c.flux[:1], c.flux_err[:1])
    odd.append(one)
    shuffled = rng.permutation(len(c.mjd))
    odd.append(Curve("unsorted", c.mjd[shuffled], c.band[shuffled], c.flux[shuffled], c.flux_err[shuffled]))
    twin = np.r_[c.mjd[:5], c.mjd[:5]]
    odd.append(Curve("same-times", twin, np.r_[c.band[:5], 1 - c.band[:5]], np.r_[c.flux[:5], c.flux[:5] * 0.9],
                     np.r_[c.flux_err[:5], c.flux_err[:5]]))
    odd.append(Curve("int32-band", c.mjd, c.band.astype(np.int32), c.flux, c.flux_err))
    long = out[-1]
    odd.append(Curve("long", np.r_[long.mjd, long.mjd + 400.0], np.r_[long.band, long.band],
                     np.r_[long.flux, long.flux], np.r_[long.flux_err, long.flux_err]))
    mixed = out[:20] + odd + out[20:]
    return mixed


def _same(a: PreparedCurve, b: PreparedCurve) -> None:
    assert a.oid == b.oid and a.window == b.window and a.flux_scale == b.flux_scale
    for name in ("t", "flux", "flux_err", "band", "in_window"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name


@pytest.mark.parametrize("until", [None, 58_400.0])
@pytest.mark.parametrize("grid, context", [(100, 100.0), (60, 30.0)])
def test_prepare_many_equals_prepare_curve_by_curve(curves, until, grid, context):
    many = prepare_many(curves, grid, context, until)
    assert len(many) == len(curves)
    n_plain = 0
    for curve, got in zip(curves, many):
        try:
            want = prepare(curve, grid, context, until)
        except Exception as exc:  # noqa: BLE001
            assert type(got) is type(exc) and str(got) == str(exc), curve.oid
            continue
        assert isinstance(got, PreparedCurve), curve.oid
        _same(got, want)
        n_plain += 1
    assert n_plain > 20


def test_tensorize_curves_is_the_same_per_curve_whatever_the_batch(curves):
    whole = tensorize_curves(curves)
    by_oid = {r["oid"]: x for r, x in zip(whole.rows, whole.x)}
    alone_skips = []
    for curve in curves:
        alone = tensorize_curves([curve])
        alone_skips += alone.skipped
        for r, x in zip(alone.rows, alone.x):
            np.testing.assert_allclose(by_oid[r["oid"]], x, rtol=1e-6, atol=1e-7)
    assert whole.skipped == alone_skips
