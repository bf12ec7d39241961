"""The exploratory figures: tidy frames checked on hand-made inputs, and PNGs that are written and valid."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from deeprubin.evaluation.figures import (
    DEFAULT_CHANNELS,
    class_distribution,
    mean_profiles,
    plot_class_distribution,
    plot_mean_profiles,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC


def objects_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "oid": ["s1", "s2", "s3", "s4", "b1", "b2", "b2", "a1", "a2", "u1"],
        "label": ["SNIa", "SNIa", "QSO", "CEP", "SNII", "SNIa", "SNIa", "SNIa", None, np.nan],
        "source": ["simulator", "simulator", "simulator", "simulator", "bts", "bts", "bts", "alerce", "alerce",
                   "alerce"],
    })


# --------------------------------------------------------------------------------------------------------------
# class_distribution
# --------------------------------------------------------------------------------------------------------------


def test_class_distribution_counts_full_grid_sorted():
    dist = class_distribution(objects_frame(), classes=["QSO", "CEP", "SNIa", "SNII"])
    assert list(dist.columns) == ["label", "source", "count"]
    assert dist["count"].dtype == np.int64
    # Full grid: 4 classes x 3 sources, class order as given, then sources alphabetically.
    assert len(dist) == 12
    assert list(dist["label"]) == ["QSO"] * 3 + ["CEP"] * 3 + ["SNIa"] * 3 + ["SNII"] * 3
    assert list(dist["source"]) == ["alerce", "bts", "simulator"] * 4
    got = {(r.label, r.source): r.count for r in dist.itertuples()}
    assert got[("SNIa", "simulator")] == 2
    assert got[("SNIa", "bts")] == 1  # b2 is listed twice: counted once
    assert got[("SNIa", "alerce")] == 1
    assert got[("SNII", "bts")] == 1 and got[("QSO", "simulator")] == 1 and got[("CEP", "simulator")] == 1
    assert got[("QSO", "bts")] == 0 and got[("SNII", "alerce")] == 0
    assert dist["count"].sum() == 7  # unlabelled a2, u1 are not counted


def test_class_distribution_keeps_empty_classes():
    objects = objects_frame()
    objects = objects.loc[objects["label"] != "QSO"]
    dist = class_distribution(objects, classes=["QSO", "CEP", "SNIa", "SNII"])
    qso = dist.loc[dist["label"] == "QSO"]
    assert len(qso) == 3 and (qso["count"] == 0).all()
    # Without classes, only observed labels, in CLASSES order.
    assert list(pd.unique(class_distribution(objects)["label"])) == ["CEP", "SNIa", "SNII"]


def test_class_distribution_default_order_and_unknown_labels():
    objects = pd.DataFrame({"oid": ["1", "2", "3", "4"], "label": ["SNII", "Blazar", "QSO", "AGN"],
                            "source": ["files", "files", "files", None]})
    dist = class_distribution(objects)  # no classes: known first (CLASSES order), then others alphabetically
    assert list(dist["label"]) == ["QSO", "QSO", "SNII", "SNII", "AGN", "AGN", "Blazar", "Blazar"]
    assert list(pd.unique(dist["source"])) == ["files", "unknown"]

    with pytest.warns(UserWarning, match=r"labels outside classes.*'AGN': 1.*'Blazar': 1"):
        dist = class_distribution(objects, classes=["QSO", "SNII"])
    assert set(dist["label"]) == {"QSO", "SNII"} and dist["count"].sum() == 2


def test_class_distribution_without_oid_counts_rows_and_needs_columns():
    dist = class_distribution(pd.DataFrame({"label": ["QSO", "QSO"], "source": ["s", "s"]}))
    assert dist.to_dict("records") == [{"label": "QSO", "source": "s", "count": 2}]
    with pytest.raises(KeyError, match="source"):
        class_distribution(pd.DataFrame({"label": ["QSO"]}))


def test_class_distribution_empty():
    empty = pd.DataFrame({"oid": pd.Series(dtype=str), "label": pd.Series(dtype=str),
                          "source": pd.Series(dtype=str)})
    dist = class_distribution(empty, classes=["QSO"])
    assert list(dist.columns) == ["label", "source", "count"] and dist.empty


def test_plot_class_distribution_writes_png(tmp_path):
    dist = class_distribution(objects_frame(), classes=["QSO", "CEP", "SNIa", "SNII"])
    out = plot_class_distribution(dist, tmp_path / "sub" / "classes.png", title="Classes")
    assert out == tmp_path / "sub" / "classes.png"
    assert_png(out)
    empty = class_distribution(pd.DataFrame({"label": [None], "source": ["s"]}))
    assert_png(plot_class_distribution(empty, tmp_path / "empty.png"))


# --------------------------------------------------------------------------------------------------------------
# mean_profiles
# --------------------------------------------------------------------------------------------------------------


def constant_tensor(gp_mean_g: float, gp_mean_r: float, gp_std: float = 0.1, days: int = 5) -> np.ndarray:
    x = np.zeros((len(DEFAULT_CHANNELS), days), dtype=np.float32)
    x[0], x[1], x[2], x[3] = gp_mean_g, gp_mean_r, gp_std, 2 * gp_std
    x[4], x[5] = 0.5, 1.0
    return x


def test_mean_profiles_known_values():
    x = np.stack([constant_tensor(1.0, -2.0, 0.1), constant_tensor(3.0, -2.0, 0.3), constant_tensor(0.5, 0.25)])
    prof = mean_profiles(x, ["SNIa", "SNIa", "QSO"], classes=["QSO", "SNIa"])
    assert list(prof.columns) == ["label", "band", "day", "mean", "std", "gp_std_mean", "n"]
    assert len(prof) == 2 * 2 * 5
    assert list(pd.unique(prof["label"])) == ["QSO", "SNIa"]
    assert list(prof["day"][:5]) == [0, 1, 2, 3, 4] and list(prof["band"][:10]) == ["g"] * 5 + ["r"] * 5

    sn_g = prof.loc[(prof["label"] == "SNIa") & (prof["band"] == "g")]
    np.testing.assert_allclose(sn_g["mean"], 2.0)
    np.testing.assert_allclose(sn_g["std"], 1.0)  # population std of {1, 3}
    np.testing.assert_allclose(sn_g["gp_std_mean"], 0.2, rtol=1e-6)
    sn_r = prof.loc[(prof["label"] == "SNIa") & (prof["band"] == "r")]
    np.testing.assert_allclose(sn_r["mean"], -2.0)
    np.testing.assert_allclose(sn_r["std"], 0.0)
    np.testing.assert_allclose(sn_r["gp_std_mean"], 0.4, rtol=1e-6)
    assert (prof.loc[prof["label"] == "SNIa", "n"] == 2).all()

    qso = prof.loc[prof["label"] == "QSO"]
    assert (qso["n"] == 1).all() and (qso["std"] == 0).all()  # a single object: spread 0, not NaN
    np.testing.assert_allclose(qso.loc[qso["band"] == "r", "mean"], 0.25)


def test_mean_profiles_varying_curve_per_day():
    days = 4
    a, b = constant_tensor(0, 0, days=days), constant_tensor(0, 0, days=days)
    a[0] = [0, 1, 2, 3]
    b[0] = [0, 3, 4, 5]
    prof = mean_profiles(np.stack([a, b]), ["CEP", "CEP"])
    g = prof.loc[prof["band"] == "g"]
    np.testing.assert_allclose(g["mean"], [0, 2, 3, 4])
    np.testing.assert_allclose(g["std"], [0, 1, 1, 1])


def test_mean_profiles_empty_class_and_unknown_labels():
    x = np.stack([constant_tensor(1, 1), constant_tensor(2, 2), constant_tensor(5, 5)])
    with pytest.warns(UserWarning, match=r"labels outside classes.*'Blazar': 1"):
        prof = mean_profiles(x, ["SNII", "Blazar", None], classes=["QSO", "SNII"])
    assert list(pd.unique(prof["label"])) == ["QSO", "SNII"]
    qso = prof.loc[prof["label"] == "QSO"]
    assert len(qso) == 10 and (qso["n"] == 0).all()
    assert qso[["mean", "std", "gp_std_mean"]].isna().all().all()
    sn = prof.loc[prof["label"] == "SNII"]
    assert (sn["n"] == 1).all()
    np.testing.assert_allclose(sn["mean"], 1.0)  # the Blazar and the unlabelled object are not averaged in

    # Missing labels alone raise no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prof = mean_profiles(x[:1], [None])
    assert prof.empty and list(prof.columns) == ["label", "band", "day", "mean", "std", "gp_std_mean", "n"]


def test_mean_profiles_zero_objects_and_bad_shapes():
    empty = np.zeros((0, len(DEFAULT_CHANNELS), 7), dtype=np.float32)
    prof = mean_profiles(empty, [], classes=["SNIa"])
    assert len(prof) == 14 and (prof["n"] == 0).all()
    with pytest.raises(ValueError, match="labels"):
        mean_profiles(np.zeros((2, 6, 3)), ["QSO"])
    with pytest.raises(ValueError, match="channels"):
        mean_profiles(np.zeros((1, 5, 3)), ["QSO"])
    with pytest.raises(ValueError, match="gp_mean_r"):
        mean_profiles(np.zeros((1, 2, 3)), ["QSO"], channels=["gp_mean_g", "x"])
    with pytest.raises(ValueError, match=r"\(N, C, G\)"):
        mean_profiles(np.zeros((6, 3)), ["QSO"])


def test_mean_profiles_without_gp_std_channels():
    x = np.ones((2, 2, 3), dtype=np.float32)
    prof = mean_profiles(x, ["QSO", "QSO"], channels=["gp_mean_g", "gp_mean_r"])
    np.testing.assert_allclose(prof["mean"], 1.0)
    assert prof["gp_std_mean"].isna().all()


@pytest.mark.parametrize("classes", [["QSO", "CEP", "SNIa", "SNII"], ["SNIa", "SNII", "QSO"], ["SNIa"],
                                     ["QSO", "CEP", "SNIa", "SNII", "Blazar"]])
@pytest.mark.filterwarnings("ignore:mean_profiles. ignoring:UserWarning")
def test_plot_mean_profiles_writes_png(tmp_path, classes):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, len(DEFAULT_CHANNELS), 100)).astype(np.float32)
    labels = ["QSO", "CEP", "SNIa"] * 4  # SNII (and Blazar) have no objects: empty panels
    prof = mean_profiles(x, labels, classes=classes)
    out = plot_mean_profiles(prof, tmp_path / "sub" / "profiles.png", title="Mean inputs")
    assert out == tmp_path / "sub" / "profiles.png"
    assert_png(out)


def test_plot_mean_profiles_empty_frame(tmp_path):
    prof = mean_profiles(np.zeros((0, 6, 5)), [])
    assert_png(plot_mean_profiles(prof, tmp_path / "empty.png"))


# --------------------------------------------------------------------------------------------------------------
# reliability
# --------------------------------------------------------------------------------------------------------------


def test_reliability_lines_show_what_their_labels_say():
    """The line labelled "mean confidence" traces each bin's mean confidence (it used to trace accuracy); the bars
    labelled "accuracy" are each bin's accuracy; both at the centres of the bins that hold objects."""
    import matplotlib.pyplot as plt
    from matplotlib.container import BarContainer

    from deeprubin.evaluation.figures import reliability_figure
    from deeprubin.evaluation.metrics import reliability_curve

    rng = np.random.default_rng(3)
    classes = ["QSO", "CEP", "SNIa", "SNII"]
    p = rng.dirichlet(np.full(4, 0.6), size=400)
    y = np.where(rng.random(400) < 0.6, p.argmax(axis=1), rng.integers(0, 4, 400))  # over-confident
    curve = reliability_curve([classes[i] for i in y], p, n_bins=10, classes=classes)
    used = curve["count"] > 0
    assert (curve.loc[used, "confidence"] - curve.loc[used, "accuracy"]).abs().max() > 0.05  # they differ
    centres = ((curve["bin_lower"] + curve["bin_upper"]) / 2)[used].to_numpy()
    fig = reliability_figure(curve)
    try:
        ax = fig.axes[0]
        lines = {line.get_label(): line for line in ax.get_lines()}
        confidence = lines["mean confidence"]
        np.testing.assert_allclose(confidence.get_ydata(), curve.loc[used, "confidence"])
        np.testing.assert_allclose(confidence.get_xdata(), centres)
        bars = next(c for c in ax.containers if isinstance(c, BarContainer) and c.get_label() == "accuracy")
        np.testing.assert_allclose([b.get_height() for b in bars], curve.loc[used, "accuracy"])
        np.testing.assert_allclose([b.get_x() + b.get_width() / 2 for b in bars], centres)
        assert ax.get_ylabel() == "accuracy / mean confidence"
        assert {t.get_text() for t in ax.get_legend().get_texts()} == {"perfectly calibrated", "accuracy",
                                                                      "mean confidence"}
    finally:
        plt.close(fig)
