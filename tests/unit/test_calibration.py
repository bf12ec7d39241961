"""Temperature scaling by age (deeprubin.models.calibration): the age the model reads from its input, the
temperatures it applies, their fit, and the served model that carries them (in memory, exported, checkpoint)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deeprubin.lightcurves.tensorize import CHANNELS, time_since_detection
from deeprubin.models.calibration import (
    AGE_EDGES,
    AgeTemperature,
    age_bin,
    fit_age_temperatures,
    fit_temperature,
    nll,
    row_temperatures,
    softmax,
)
from deeprubin.models.served import ProbabilityTCN
from deeprubin.models.tcn import age_days
from deeprubin.schema import CLASSES
from tests.model_fixtures import served_tcn, sqlite_uri

GRID = 100


def _input(first: float, last: float, rng: np.random.Generator) -> np.ndarray:
    """A (C, GRID) input whose since channels are those of detections from ``first`` to ``last`` (days from the
    window start), alternating bands; the other channels are noise."""
    t = np.sort(np.r_[first, rng.uniform(first, last, size=5), last])
    band = np.arange(len(t)) % 2
    x = rng.normal(size=(len(CHANNELS), GRID))
    x[4:6] = time_since_detection(t, band, np.arange(GRID, dtype=np.float64), GRID)
    return x.astype(np.float32)


def test_the_age_is_read_from_the_since_channels():
    rng = np.random.default_rng(0)
    lasts = np.array([0.0, 0.4, 3.7, 5.0, 12.25, 49.9, 80.5, 99.0])
    x = torch.from_numpy(np.stack([_input(0.0, last, rng) for last in lasts]))
    np.testing.assert_allclose(age_days(x).numpy(), lasts, atol=2e-3)


def test_age_temperature_divides_each_objects_logits_by_its_bins_temperature():
    rng = np.random.default_rng(1)
    ages = np.array([1.0, 7.0, 15.0, 30.0, 70.0, 4.9])
    x = torch.from_numpy(np.stack([_input(0.0, a, rng) for a in ages]))
    temps = [0.5, 1.0, 2.0, 3.0, 4.0]
    logits = torch.from_numpy(rng.normal(size=(len(ages), 4)).astype(np.float32))
    out = AgeTemperature(AGE_EDGES, temps)(x, logits)
    want = logits.numpy() / np.array([0.5, 1.0, 2.0, 3.0, 4.0, 0.5])[:, None]
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-6)
    assert age_bin(ages, AGE_EDGES).tolist() == [0, 1, 2, 3, 4, 0]
    np.testing.assert_allclose(row_temperatures(AgeTemperature(AGE_EDGES, temps), ages), [0.5, 1, 2, 3, 4, 0.5])
    # One temperature: global scaling, whatever the age.
    np.testing.assert_allclose(AgeTemperature([0.0], [2.5])(x, logits).numpy(), logits.numpy() / 2.5, rtol=1e-6)
    with pytest.raises(ValueError):
        AgeTemperature(AGE_EDGES, [1.0, 1.0, 0.0, 1.0, 1.0])


def _labels_from(logits: np.ndarray, temperature: np.ndarray | float, rng: np.random.Generator) -> np.ndarray:
    """Labels drawn from softmax(logits / temperature): the temperature that generated them is the calibrated one."""
    p = softmax(logits, temperature)
    return np.array([rng.choice(p.shape[1], p=row) for row in p])


def test_a_fitted_temperature_lowers_the_nll_of_held_out_objects():
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3.0, size=(4000, 4))  # overconfident: the truth is softmax(logits / 2.5)
    y = _labels_from(logits, 2.5, rng)
    fit, held = slice(0, 2000), slice(2000, None)
    t = fit_temperature(logits[fit], y[fit])
    assert t == pytest.approx(2.5, rel=0.15)
    assert nll(logits[held], y[held], t) < nll(logits[held], y[held]) - 0.05


def test_per_age_temperatures_beat_one_temperature_when_calibration_depends_on_age():
    rng = np.random.default_rng(3)
    n = 8000
    lo, hi = np.array([0, 5, 10, 20, 50]), np.array([5, 10, 20, 50, 99])
    k = rng.integers(0, 5, size=n)  # as many objects in each age bin
    ages = rng.uniform(lo[k], hi[k])
    true_t = np.array([0.5, 1.0, 1.5, 2.5, 4.0])[age_bin(ages, AGE_EDGES)]
    logits = rng.normal(scale=2.0, size=(n, 4))
    y = _labels_from(logits, true_t, rng)
    fit, held = slice(0, n // 2), slice(n // 2, None)
    per_age = fit_age_temperatures(logits[fit], y[fit], ages[fit], "per_age")
    single = fit_age_temperatures(logits[fit], y[fit], ages[fit], "global")
    np.testing.assert_allclose(per_age.as_dict()["temperatures"], [0.5, 1.0, 1.5, 2.5, 4.0], rtol=0.2)
    assert len(single.as_dict()["temperatures"]) == 1
    nll_none = nll(logits[held], y[held])
    nll_global = nll(logits[held], y[held], row_temperatures(single, ages[held]))
    nll_per_age = nll(logits[held], y[held], row_temperatures(per_age, ages[held]))
    assert nll_per_age < nll_global < nll_none
    assert fit_age_temperatures(logits, y, ages, "none") is None
    # A bin with too few rows falls back to the global temperature.
    sparse = fit_age_temperatures(logits[fit], y[fit], np.where(ages[fit] >= 50, 10.0, ages[fit]), "per_age",
                                  min_count=10 ** 9)
    assert len(set(sparse.as_dict()["temperatures"])) == 1


def _young_and_old_inputs(n: int = 6, seed: int = 4) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([_input(0.0, a, rng) for a in np.linspace(1.0, 90.0, n)]))


def test_calibration_changes_confidence_not_predictions_and_none_is_the_plain_softmax():
    net = served_tcn().tcn
    x = _young_and_old_inputs()
    with torch.no_grad():
        logits = net(x)
        plain = ProbabilityTCN(net)(x)
        calibrated = ProbabilityTCN(net, AgeTemperature(AGE_EDGES, [0.3, 0.6, 1.0, 2.0, 3.0]))(x)
    assert torch.equal(plain, torch.softmax(logits, dim=1))  # no calibration: exactly the old served model
    assert torch.equal(plain.argmax(dim=1), calibrated.argmax(dim=1))
    assert not torch.allclose(plain, calibrated)
    want = softmax(logits.double().numpy(), row_temperatures(AgeTemperature(AGE_EDGES, [0.3, 0.6, 1.0, 2.0, 3.0]),
                                                             age_days(x).numpy()))
    np.testing.assert_allclose(calibrated.numpy(), want, atol=1e-6)


def test_the_exported_model_carries_its_temperatures(tmp_path):
    from deeprubin.models.served import load_exported, load_model, log_and_register

    calibration = AgeTemperature(AGE_EDGES, [0.3, 0.6, 1.0, 2.0, 3.0])
    model = ProbabilityTCN(served_tcn().tcn, calibration).eval()
    x = _young_and_old_inputs(8)
    with torch.no_grad():
        want = model(x).numpy()
    uri = sqlite_uri(tmp_path)
    log_and_register(model, uri, "calibrated", CLASSES, alias="champion", experiment="test-models",
                     artifact_location=(tmp_path / "artifacts").as_uri())
    served = load_model("models:/calibrated@champion", uri)
    np.testing.assert_allclose(served.predict_proba(x.numpy()), want, atol=1e-6)
    assert served.calibration == calibration.as_dict()
    with torch.no_grad():  # the bare pt2 graph of the worker processes too
        np.testing.assert_allclose(load_exported(served.local_path)(x).numpy(), want, atol=1e-6)
    uncalibrated = ProbabilityTCN(served_tcn().tcn).eval()
    with torch.no_grad():
        assert not np.allclose(uncalibrated(x).numpy(), want, atol=1e-3)  # the temperatures did something


def test_the_checkpoint_carries_the_same_temperatures(tmp_path):
    import pytorch_lightning as pl

    from deeprubin.models.lit import LitTCN, store_calibration
    from deeprubin.models.served import load_checkpoint

    lit = LitTCN(hidden=8, levels=3, dropout=0.0).eval()
    path = tmp_path / "tcn.ckpt"
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=0)
    trainer.strategy.connect(lit)
    trainer.save_checkpoint(path)
    x = _young_and_old_inputs(5)
    plain = load_checkpoint(path)
    assert plain.calibration is None
    with torch.no_grad():
        np.testing.assert_allclose(plain.predict_proba(x.numpy()), torch.softmax(lit.model(x), 1).numpy(), atol=1e-6)
    calibration = AgeTemperature(AGE_EDGES, [0.3, 0.6, 1.0, 2.0, 3.0])
    store_calibration(path, calibration.as_dict())
    loaded = load_checkpoint(path)
    assert loaded.calibration == calibration.as_dict()
    with torch.no_grad():
        want = ProbabilityTCN(lit.model, calibration).eval()(x).numpy()
    np.testing.assert_allclose(loaded.predict_proba(x.numpy()), want, atol=1e-6)
    store_calibration(path, None)
    assert load_checkpoint(path).calibration is None
    assert math.isclose(float(want.sum(axis=1).mean()), 1.0, rel_tol=1e-6)


def test_supernovae_are_calibrated_against_each_other_not_against_classes_they_never_are():
    """Two classes calibrated by construction (label drawn from the softmax of the two logits), plus two classes
    the network gives a little mass: over all four the NLL sharpens (drains that mass), over the two it does not."""
    rng = np.random.default_rng(3)
    n = 4000
    z = rng.normal(0.0, 2.0, n)
    y = np.where(rng.random(n) < 1 / (1 + np.exp(-z)), 3, 2)  # SNII (3) with probability sigmoid(z), else SNIa (2)
    logits = np.column_stack([np.full(n, -3.0), np.full(n, -3.0), np.zeros(n), z])
    ages = np.full(n, 30.0)
    over_all = fit_age_temperatures(logits, y, ages, "global").as_dict()["temperatures"][0]
    over_two = fit_age_temperatures(logits, y, ages, "global", among=[2, 3]).as_dict()["temperatures"][0]
    assert over_all < 0.85  # sharpened: over-confident SN Ia vs SN II
    assert over_two == pytest.approx(1.0, abs=0.08)
    per_age = fit_age_temperatures(logits, y, ages, "per_age", among=[3, 2]).as_dict()["temperatures"]
    assert per_age[3] == pytest.approx(over_two, abs=1e-3)  # the 20-50 d bin holds every row
    with pytest.raises(ValueError, match="among"):
        fit_age_temperatures(logits, y, ages, "global", among=[0, 3])
