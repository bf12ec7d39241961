"""The TCN: receptive field, causality, shapes, probabilities, pooling over observed days only."""

from __future__ import annotations

import math

import pytest
import torch

from deeprubin.models.tcn import SHAPE_FEATURES, TCN, TCNEnsemble, observed_mask, receptive_field, shape_features


def since_value(dt: float, grid_days: int = 100) -> float:
    return math.log1p(min(dt, grid_days)) / math.log1p(grid_days)


def young_object(n: int = 3, t: int = 100, last_day: int = 40, seed: int = 0) -> torch.Tensor:
    """Random GP channels; one detection per band at day 0.3 and at ``last_day - 0.4`` (since channels as
    preprocess writes them: 1 before the first detection, dt from the latest detection otherwise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, t, generator=g)
    x[:, 2:4] = x[:, 2:4].abs() + 0.01
    detections = [0.0, 5.3, last_day - 0.4]
    for day in range(t):
        past = [d for d in detections if d <= day]
        x[:, 4:6, day] = since_value(day - max(past)) if past else 1.0
    return x


def measured_receptive_field(model: TCN, t: int = 300) -> int:
    """Input days whose change reaches the output feature at the last day (gradients, several random inputs)."""
    model.eval()
    reached = torch.zeros(t, dtype=torch.bool)
    for seed in range(3):
        x = torch.randn(2, model.n_channels, t, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        model.features(x)[:, :, -1].sum().backward()
        reached |= (x.grad.abs().sum(dim=(0, 1)) > 0)
    days = torch.nonzero(reached).flatten()
    return int(t - days.min())


@pytest.mark.parametrize("kernel_size,levels", [(3, 5), (2, 3), (5, 4)])
def test_receptive_field_formula_matches_the_network(kernel_size, levels):
    torch.manual_seed(0)
    model = TCN(hidden=16, kernel_size=kernel_size, levels=levels, dropout=0.0)
    assert model.receptive_field == receptive_field(kernel_size, levels)
    assert measured_receptive_field(model) == receptive_field(kernel_size, levels)


def test_default_receptive_field_covers_the_window():
    model = TCN()
    assert receptive_field(model.kernel_size, model.levels) >= 100
    assert measured_receptive_field(model) >= 100


def test_receptive_field_formula():
    assert receptive_field(3, 5) == 1 + 2 * 2 * 31 == 125
    assert receptive_field(2, 1) == 3
    with pytest.raises(ValueError):
        receptive_field(0, 3)


@pytest.mark.parametrize("t0", [0, 17, 63, 98])
def test_features_are_causal(t0):
    torch.manual_seed(1)
    model = TCN(dropout=0.3).eval()
    x = torch.randn(2, 6, 100)
    changed = x.clone()
    changed[:, :, t0 + 1:] = torch.randn_like(changed[:, :, t0 + 1:]) * 5
    with torch.no_grad():
        a, b = model.features(x), model.features(changed)
    assert torch.equal(a[:, :, :t0 + 1], b[:, :, :t0 + 1])
    assert not torch.allclose(a[:, :, t0 + 1:], b[:, :, t0 + 1:])


def test_output_shape_and_probabilities():
    torch.manual_seed(2)
    model = TCN(n_classes=4).eval()
    x = young_object(n=5)
    logits = model(x)
    assert logits.shape == (5, 4) and torch.isfinite(logits).all()
    p = model.predict_proba(x)
    assert p.shape == (5, 4) and (p >= 0).all()
    torch.testing.assert_close(p.sum(dim=1), torch.ones(5))
    torch.testing.assert_close(p, torch.softmax(logits, dim=1))


def test_wrong_input_shape_is_an_error():
    with pytest.raises(ValueError, match=r"\(N, 6, T\)"):
        TCN()(torch.randn(2, 5, 100))


def test_observed_mask_ends_at_the_last_detection_day():
    x = young_object(n=2, last_day=40)
    mask = observed_mask(x)
    # last detection at 39.6 falls in day 40's interval (39, 40]
    assert mask[:, :41].all() and not mask[:, 41:].any()


def test_observed_mask_long_object_and_no_detection():
    x = torch.zeros(2, 6, 100)
    x[0, 4:6] = 0.5          # no day with dt < 1: pool over everything
    x[1, 4:6] = 0.5
    x[1, 4, 99] = 0.0         # a long object: its last detection on the last grid day
    mask = observed_mask(x)
    assert mask.all()


def test_pooling_ignores_days_after_the_last_detection():
    torch.manual_seed(3)
    model = TCN().eval()
    x = young_object(n=3, last_day=40)
    later = x.clone()
    later[:, 0:4, 41:] = torch.randn_like(later[:, 0:4, 41:]) * 10  # GP channels past the last detection
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(later))
        # ... whereas pooling over every day would see the change
        everything = torch.ones(3, 100, dtype=torch.bool)
        assert not torch.allclose(model(x, everything), model(later, everything))


def test_explicit_mask_is_used():
    torch.manual_seed(4)
    model = TCN().eval()
    x = young_object(n=2)
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[:, :10] = True
    with torch.no_grad():
        expected = model.head(model.features(x)[:, :, :10].mean(dim=2))
        torch.testing.assert_close(model(x, mask), expected)


def with_trained_film(model: TCN) -> TCN:
    """``film`` starts as the identity (zero last layer); give it weights, as training would."""
    if model.age_input == "film":
        with torch.no_grad():
            for p in model.film.parameters():
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("readout", ["mean", "last", "mean_last", "shape", "age_channel", "age_film"])
def test_every_readout_ignores_days_after_the_last_detection_and_exports(readout):
    torch.manual_seed(0)
    if readout.startswith("age_"):
        model = with_trained_film(TCN(shape=True, age_input=readout[4:])).eval()
    else:
        model = (TCN(shape=True) if readout == "shape" else TCN(readout=readout)).eval()
    x = young_object(last_day=40)
    changed = x.clone()
    changed[:, :4, 41:] += 5.0  # GP extrapolation after the last detection day
    out = model(x)
    assert out.shape == (3, 4)
    assert torch.allclose(out, model(changed), atol=1e-6)
    earlier = x.clone()
    earlier[:, :4, 10] += 5.0  # a day with data does matter
    assert not torch.allclose(out, model(earlier), atol=1e-4)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert torch.allclose(exported.module()(young_object(n=5, last_day=40)), model(young_object(n=5, last_day=40)),
                          atol=1e-5)


def test_last_readout_reads_the_feature_of_the_last_observed_day():
    torch.manual_seed(0)
    model = TCN(readout="last").eval()
    x = young_object(n=2, last_day=40)
    assert torch.allclose(model(x), model.head(model.features(x)[:, :, 40]), atol=1e-6)


@pytest.mark.parametrize("age_input", ["channel", "film"])
def test_age_input_makes_the_features_depend_on_the_age(age_input):
    """The same days 0-40, read as a 40-day-old curve and as a 60-day-old one: only an age-aware network's
    features of day 10 differ; the plain TCN's are causal."""
    torch.manual_seed(0)
    x = young_object(n=2, last_day=60)
    young, old = torch.zeros(2, 100, dtype=torch.bool), torch.zeros(2, 100, dtype=torch.bool)
    young[:, :41], old[:, :61] = True, True
    plain = TCN().eval()
    aware = with_trained_film(TCN(age_input=age_input)).eval()
    with torch.no_grad():
        assert torch.equal(plain.features(x, young)[:, :, 10], plain.features(x, old)[:, :, 10])
        assert not torch.allclose(aware.features(x, young)[:, :, 10], aware.features(x, old)[:, :, 10])
        # without a mask, the age is read from the input: its last detection day (60 here)
        assert torch.allclose(aware.features(x), aware.features(x, old))


def test_film_starts_as_the_plain_network():
    torch.manual_seed(0)
    model = TCN(age_input="film").eval()
    x = young_object(n=2, last_day=40)
    with torch.no_grad():
        assert torch.equal(model.features(x), model.blocks(x))
    assert sum(p.numel() for p in model.film.parameters()) > 0


def test_age_input_survives_a_lightning_checkpoint(tmp_path):
    from deeprubin.models.lit import LitTCN

    torch.manual_seed(0)
    lit = LitTCN(shape=True, age_input="film")
    with_trained_film(lit.model)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": lit.state_dict(), "hyper_parameters": dict(lit.hparams),
                "pytorch-lightning_version": "2.0.0"}, path)
    loaded = LitTCN.load_from_checkpoint(path, map_location="cpu").eval()
    assert loaded.model.age_input == "film"
    x = young_object(n=2, last_day=40)
    assert torch.allclose(loaded(x), lit.eval()(x))


def test_unknown_age_input_is_an_error():
    with pytest.raises(ValueError, match="age_input"):
        TCN(age_input="token")


def test_unknown_readout_is_an_error():
    with pytest.raises(ValueError, match="readout"):
        TCN(readout="max")


def test_flux_compression_is_asinh_of_the_means_with_propagated_errors():
    model = TCN(flux_scale=10.0).eval()
    x = young_object(n=2)
    out = model.compress_flux(x)
    assert torch.allclose(out[:, 0:2], torch.asinh(10 * x[:, 0:2]))
    assert torch.allclose(out[:, 2:4], 10 * x[:, 2:4] / torch.sqrt(1 + (10 * x[:, 0:2]) ** 2))
    assert torch.equal(out[:, 4:], x[:, 4:])
    assert torch.equal(TCN().compress_flux(x), x)  # default: linear flux, the paper's input
    # A decline from 1 to 0.1 and one from 1 to 0.01 (2.5 and 5 magnitudes) stay far apart after compression.
    assert float(torch.asinh(torch.tensor(1.0)) - torch.asinh(torch.tensor(0.1))) > 0.7
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert torch.allclose(exported.module()(x), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="flux_scale"):
        TCN(flux_scale=0.0)


def test_shape_features_measure_rise_decline_and_colour_in_magnitudes():
    """A curve built to known numbers: g peaks at day 10 (flux 1), r at day 14 (0.8); 40 days old, when g has
    declined by 2.5 mag (flux 0.1) and r by 1 mag; day 0 at 0.5 of the peak in g."""
    x = young_object(n=1, last_day=40)  # last detection at day 39.6: the last observed day is 40
    days = torch.arange(100, dtype=torch.float32)
    g = torch.where(days <= 10, 0.5 + 0.05 * days, 1.0 - 0.9 * (days - 10) / 30)
    r = torch.where(days <= 14, 0.8 * (0.5 + days / 28), 0.8 - 0.8 * (1 - 10 ** -0.4) * (days - 14) / 26)
    x[0, 0], x[0, 1] = g, r
    f = dict(zip(SHAPE_FEATURES, shape_features(x, observed_mask(x))[0].tolist()))
    assert f["age"] == pytest.approx(0.40)
    assert f["since_peak_g"] == pytest.approx(0.30) and f["since_peak_r"] == pytest.approx(0.26)
    assert f["decline_mag_g"] == pytest.approx(1.0, abs=1e-4)  # 2.5 mag, in units of 2.5 mag
    assert f["decline_mag_r"] == pytest.approx(0.4, abs=1e-4)
    assert f["decline_rate_g"] == pytest.approx(1.0 / 30 * 10, abs=1e-4)
    assert f["rise_mag_g"] == pytest.approx(-math.log10(0.5), abs=1e-4)
    assert f["colour_peak"] == pytest.approx(math.log10(0.8), abs=1e-4)  # g - r = -0.24 mag: blue at peak
    assert f["colour_now"] == pytest.approx(-math.log10(0.1) + math.log10(0.8 * 10 ** -0.4), abs=1e-4)


def test_shape_features_are_finite_for_negative_and_zero_flux():
    x = young_object(n=2, last_day=30)
    x[:, 0:2] = -0.5  # a difference flux below the reference
    x[1, 0:2] = 0.0
    f = shape_features(x, observed_mask(x))
    assert torch.isfinite(f).all()
    assert f.shape == (2, len(SHAPE_FEATURES))


def test_ensemble_probability_is_the_mean_of_its_members_and_exports():
    torch.manual_seed(0)
    members = [TCN(shape=True).eval() for _ in range(3)]
    ensemble = TCNEnsemble(members).eval()
    x = young_object(n=4, last_day=40)
    mean = torch.stack([torch.softmax(m(x), dim=1) for m in members]).mean(dim=0)
    assert torch.allclose(torch.softmax(ensemble(x), dim=1), mean, atol=1e-6)
    assert torch.allclose(ensemble(x).exp().sum(dim=1), torch.ones(4), atol=1e-5)  # log-probabilities
    assert not torch.allclose(members[0](x), members[1](x))  # different initialisations
    assert ensemble.receptive_field == members[0].receptive_field
    exported = torch.export.export(ensemble, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    y = young_object(n=5, last_day=30)
    assert torch.allclose(exported.module()(y), ensemble(y), atol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        TCNEnsemble(members[:1])


def test_each_member_of_a_trained_ensemble_learns_on_its_own_loss():
    """LitTCN(members=2): the training loss is the mean of the members' losses (each gets its own gradient), the
    logged metric is the ensemble's."""
    from deeprubin.models.lit import LitTCN

    torch.manual_seed(0)
    lit = LitTCN(members=2, hidden=8, levels=3, dropout=0.0)
    x, y = young_object(n=8, last_day=40), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    loss = lit._step((x, y), "train", lit.train_f1)
    per_member = [torch.nn.functional.cross_entropy(m(x), y) for m in lit.model.members]
    assert torch.allclose(loss, torch.stack(per_member).mean())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in lit.model.members for p in m.head.parameters())
    with pytest.raises(ValueError, match="members"):
        LitTCN(members=0)
