"""Serving gives a network that knows its window only the days up to each curve's last detection (issue 18): the
same probabilities as the whole window, from the in-process network and from its export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deeprubin.config import TrainParams, load_params
from deeprubin.lightcurves.tensorize import CHANNELS, Curve, curves_from_detections, tensorize_curves
from deeprubin.models import served
from deeprubin.models.calibration import AgeTemperature
from deeprubin.models.tcn import observed_mask
from deeprubin.processed import Preprocessing
from deeprubin.schema import CLASSES
from deeprubin.sources import simulate
from tests.model_fixtures import sqlite_uri

GRID = 100


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    """Whole simulated curves and cuts of them (as an alert stream gives them): young and old curves mixed."""
    sim = simulate.simulate(load_params(None).ingest.simulator.model_copy(update={"n_per_class": 12}), seed=4)
    curves = curves_from_detections(sim.detections)
    rng = np.random.default_rng(1)
    cuts = []
    for c in curves:
        order = np.argsort(c.mjd)
        for k in rng.choice(len(order), size=min(3, len(order)), replace=False):
            keep = order[:k + 1]
            cuts.append(Curve(c.oid, c.mjd[keep], c.band[keep], c.flux[keep], c.flux_err[keep]))
    x = tensorize_curves(cuts + curves, GRID, 100.0).x
    assert len(x) > 150
    return x


def pair(seed: int = 0, calibrated: bool = True) -> tuple[served.ProbabilityTCN, served.ProbabilityTCN]:
    """The same weights twice: a network that knows its window, and one that reads its input's length."""
    params = TrainParams(hidden=8, levels=5, dropout=0.0, age_input="film")  # film: the age enters every block
    knows = served.untrained_served_model(params, seed, len(CLASSES), grid_days=GRID)
    plain = served.untrained_served_model(params, seed, len(CLASSES))
    with torch.no_grad():
        for p in knows.tcn.film.parameters():
            p.normal_(0, 0.3)
    if calibrated:  # temperatures per age bin: the age read from a cut input must be the same
        knows.calibration = AgeTemperature([0, 5, 20, 50], [1.3, 0.7, 1.6, 0.9])
        knows.calibration.grid_days = GRID
        plain.calibration = AgeTemperature([0, 5, 20, 50], [1.3, 0.7, 1.6, 0.9])
    plain.load_state_dict(knows.state_dict())
    return knows.eval(), plain.eval()


def test_the_days_each_curve_needs_are_the_networks_observed_days(inputs):
    lengths = served.observed_lengths(inputs)
    mask = observed_mask(torch.from_numpy(inputs), grid_days=GRID)
    last = GRID - 1 - torch.flip(mask, dims=[1]).int().argmax(dim=1).numpy()
    np.testing.assert_array_equal(lengths, np.maximum(last + 1, served.MIN_CUT_DAYS))
    assert lengths.mean() < 0.8 * GRID  # the test cuts: young curves need a fraction of the window


def test_a_cut_input_gives_the_whole_windows_probabilities(inputs):
    knows, plain = pair()
    assert served.time_cut(knows) and not served.time_cut(plain)
    whole = served.predict(plain, inputs, 64, "cpu", len(CLASSES))
    cut = served.predict(knows, inputs, 64, "cpu", len(CLASSES))
    assert np.abs(cut - whole).max() < 1e-6
    assert np.abs(whole - served.predict(plain, inputs[::-1], 64, "cpu", len(CLASSES))[::-1]).max() < 1e-6
    # the network itself: the first days up to the last detection, or all of them
    x = torch.from_numpy(inputs[:8])
    n = int(served.observed_lengths(inputs[:8]).max())
    with torch.no_grad():
        assert torch.allclose(knows(x[:, :, :n]), knows(x), atol=1e-6)


def test_the_export_takes_any_number_of_days_and_the_loader_knows(inputs, tmp_path):
    knows, plain = pair(calibrated=False)
    uri = sqlite_uri(tmp_path)
    prep = Preprocessing(grid_days=GRID, channels=CHANNELS)
    version = served.log_and_register(knows, uri, "cut", CLASSES, experiment="cut",
                                      artifact_location=(tmp_path / "artifacts").as_uri(), preprocessing=prep)
    model = served.load_model(f"models:/cut/{version}", uri)
    assert served.time_cut(model.module)
    whole = served.predict(plain, inputs, 64, "cpu", len(CLASSES))
    assert np.abs(model.predict_proba(inputs, 64) - whole).max() < 1e-6
    # a network that reads its input's length exports a fixed window, and is given all of it
    version = served.log_and_register(plain, uri, "whole", CLASSES, experiment="cut",
                                      artifact_location=(tmp_path / "artifacts").as_uri(), preprocessing=prep)
    assert not served.time_cut(served.load_model(f"models:/whole/{version}", uri).module)
    # a window that is not the preprocessing's is refused before anything is logged
    with pytest.raises(ValueError, match="window"):
        served.log_and_register(knows, uri, "cut", CLASSES, experiment="cut",
                                preprocessing=Preprocessing(grid_days=60, channels=CHANNELS))
