"""Evaluation metrics checked against scikit-learn and hand-computed cases."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
)

from deeprubin.evaluation.metrics import (
    bootstrap_ci,
    classification_metrics,
    confusion_rows,
    early_classification_curve,
    encode_labels,
    expected_calibration_error,
    macro_f1,
    reliability_curve,
    scalar_metrics,
    write_metrics_json,
    write_plot_csv,
)
from deeprubin.evaluation.figures import plot_confusion_matrix, plot_early_curve, plot_reliability
from deeprubin.schema import CLASSES

K = len(CLASSES)


def random_case(n: int, seed: int, skill: float = 2.0):
    """Labels 0..K-1 and softmax probabilities that favour the true class by ``skill``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, size=n)
    logits = rng.normal(size=(n, K))
    logits[np.arange(n), y] += skill
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


FIXED_Y = np.array(["QSO", "QSO", "CEP", "CEP", "SNIa", "SNIa", "SNIa", "SNII", "SNII", "SNII"])
FIXED_P = np.array([
    [0.7, 0.1, 0.1, 0.1],   # QSO  -> QSO
    [0.2, 0.5, 0.2, 0.1],   # QSO  -> CEP
    [0.1, 0.8, 0.05, 0.05],  # CEP  -> CEP
    [0.1, 0.6, 0.2, 0.1],   # CEP  -> CEP
    [0.0, 0.0, 0.9, 0.1],   # SNIa -> SNIa
    [0.0, 0.1, 0.3, 0.6],   # SNIa -> SNII
    [0.05, 0.05, 0.6, 0.3],  # SNIa -> SNIa
    [0.0, 0.0, 0.4, 0.6],   # SNII -> SNII
    [0.0, 0.0, 0.7, 0.3],   # SNII -> SNIa
    [1.0, 0.0, 0.0, 0.0],   # SNII -> QSO (and p(true) = 0: clipped in log loss)
])


def check_against_sklearn(y_names, p, labels=None):
    y = encode_labels(y_names)
    pred = p.argmax(axis=1)
    m = classification_metrics(y_names, p, labels=labels)
    lab = sorted(set(y.tolist())) if labels is None else encode_labels(labels).tolist()
    assert m["labels"] == [CLASSES[i] for i in lab]
    assert m["n"] == len(y)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, labels=lab, average="macro", zero_division=0))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=lab, zero_division=0)
    for j, i in enumerate(lab):
        pc = m["per_class"][CLASSES[i]]
        assert pc["precision"] == pytest.approx(prec[j])
        assert pc["recall"] == pytest.approx(rec[j])
        assert pc["f1"] == pytest.approx(f1[j])
        assert pc["support"] == sup[j]
    if labels is None:
        with warnings.catch_warnings():  # sklearn warns when a predicted class has no true rows
            warnings.simplefilter("ignore")
            assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    full_cm = confusion_matrix(y, pred, labels=list(range(K)))
    assert np.array_equal(np.array(m["confusion_matrix"]["counts"]), full_cm[lab])
    assert m["confusion_matrix"]["columns"] == list(CLASSES)
    row = full_cm[lab].sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):  # an empty row (class absent from y_true) is NaN
        assert np.allclose(np.array(m["confusion_matrix"]["normalised"]), full_cm[lab] / row, equal_nan=True)
    assert m["log_loss"] == pytest.approx(log_loss(y, p, labels=list(range(K))))
    assert macro_f1(y_names, p, labels=labels) == pytest.approx(m["macro_f1"])
    return m


def test_fixed_case_matches_sklearn():
    m = check_against_sklearn(FIXED_Y, FIXED_P)
    # Hand check: QSO P=1/2 R=1/2, CEP P=2/3 R=1, SNIa P=2/3 R=2/3, SNII P=1/2 R=1/3.
    assert m["per_class"]["CEP"]["recall"] == pytest.approx(1.0)
    assert m["per_class"]["SNII"]["recall"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(0.6)


@pytest.mark.parametrize("seed", range(5))
def test_random_cases_match_sklearn(seed):
    y, p = random_case(300, seed, skill=1.0 + seed * 0.5)
    check_against_sklearn(np.array(CLASSES)[y], p)
    check_against_sklearn(y, p)  # integer labels are accepted too


def test_integer_and_name_labels_agree():
    y, p = random_case(50, 7)
    assert classification_metrics(y, p) == classification_metrics(np.array(CLASSES)[y], p)


def test_absent_classes_restrict_to_present():
    """BTS-like: only SNIa and SNII are true classes; predictions may still fall on QSO/CEP."""
    rng = np.random.default_rng(3)
    y, p = random_case(200, 3)
    y = np.where(rng.random(200) < 0.5, 2, 3)
    p[np.arange(200), y] += 0.5
    p /= p.sum(axis=1, keepdims=True)
    names = np.array(CLASSES)[y]
    assert set(p.argmax(axis=1)) - {2, 3}  # some predictions outside the averaged labels
    m = check_against_sklearn(names, p)
    assert m["labels"] == ["SNIa", "SNII"]
    assert set(m["per_class"]) == {"SNIa", "SNII"}
    assert m["macro_f1"] == pytest.approx((m["per_class"]["SNIa"]["f1"] + m["per_class"]["SNII"]["f1"]) / 2)
    assert np.array(m["confusion_matrix"]["counts"]).shape == (2, 4)
    # Explicit labels give the same answer.
    assert classification_metrics(names, p, labels=["SNIa", "SNII"]) == m


def test_restrict_predictions_is_a_binary_decision():
    rng = np.random.default_rng(4)
    n = 150
    y = np.where(rng.random(n) < 0.4, 2, 3)
    _, p = random_case(n, 4)
    p[np.arange(n), y] += 0.3
    p /= p.sum(axis=1, keepdims=True)
    m = classification_metrics(y, p, labels=["SNIa", "SNII"], restrict_predictions=True)
    sub = p[:, [2, 3]] / p[:, [2, 3]].sum(axis=1, keepdims=True)
    yb = (y == 3).astype(int)
    pb = sub.argmax(axis=1)
    assert m["macro_f1"] == pytest.approx(f1_score(yb, pb, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(yb, pb))
    assert m["per_class"]["SNIa"]["recall"] == pytest.approx(np.mean(pb[yb == 0] == 0))
    assert m["per_class"]["SNII"]["recall"] == pytest.approx(np.mean(pb[yb == 1] == 1))
    assert np.array_equal(np.array(m["confusion_matrix"]["counts"]), confusion_matrix(yb, pb))
    assert m["confusion_matrix"]["columns"] == ["SNIa", "SNII"]
    assert m["log_loss"] == pytest.approx(log_loss(yb, sub))
    with pytest.raises(ValueError):
        classification_metrics(np.r_[y, 0], np.r_[p, p[:1]], labels=["SNIa", "SNII"], restrict_predictions=True)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        classification_metrics(["SNIa", "Kilonova"], np.full((2, K), 0.25))
    with pytest.raises(ValueError):
        classification_metrics(["SNIa"], np.full((1, 3), 1 / 3))


# --- calibration --------------------------------------------------------------------------------------------------


def calibrated_rows(conf: float, n: int, n_correct: int, true: int = 0):
    """``n`` rows with top probability ``conf`` on class 1 (or class 0); ``n_correct`` of them have true class 1."""
    rest = (1 - conf) / (K - 1)
    p = np.full((n, K), rest)
    p[:, 1] = conf
    y = np.full(n, 0)
    y[:n_correct] = 1
    return y, p


def test_ece_perfectly_calibrated_is_zero():
    parts = [calibrated_rows(0.4, 10, 4), calibrated_rows(0.6, 10, 6), calibrated_rows(0.9, 20, 18),
             calibrated_rows(1.0, 5, 5)]
    y = np.concatenate([a for a, _ in parts])
    p = np.vstack([b for _, b in parts])
    assert expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)


def test_ece_overconfident_known_value():
    # 20 rows at confidence 0.9 with accuracy 0.5, 10 rows at 0.7 with accuracy 0.7: ECE = 20/30 * 0.4.
    y1, p1 = calibrated_rows(0.9, 20, 10)
    y2, p2 = calibrated_rows(0.7, 10, 7)
    y, p = np.r_[y1, y2], np.vstack([p1, p2])
    assert expected_calibration_error(y, p) == pytest.approx(20 / 30 * 0.4)
    curve = reliability_curve(y, p, n_bins=10)
    assert list(curve.columns) == ["bin", "bin_lower", "bin_upper", "confidence", "accuracy", "count"]
    assert curve["count"].sum() == 30
    assert curve.loc[8, "count"] == 20 and curve.loc[8, "accuracy"] == pytest.approx(0.5)
    assert curve.loc[8, "confidence"] == pytest.approx(0.9)
    assert curve.loc[6, "count"] == 10 and curve.loc[6, "accuracy"] == pytest.approx(0.7)
    assert curve.loc[0, "count"] == 0 and math.isnan(curve.loc[0, "accuracy"])
    # With one bin ECE is |overall accuracy - mean confidence|.
    assert expected_calibration_error(y, p, n_bins=1) == pytest.approx(abs(17 / 30 - (20 * 0.9 + 10 * 0.7) / 30))


def test_ece_matches_bruteforce_on_random_data():
    y, p = random_case(500, 11)
    conf, correct = p.max(axis=1), p.argmax(axis=1) == y
    expected = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            expected += inside.sum() / len(y) * abs(correct[inside].mean() - conf[inside].mean())
    assert expected_calibration_error(y, p, n_bins=15) == pytest.approx(expected)


# --- bootstrap ----------------------------------------------------------------------------------------------------


def test_bootstrap_contains_estimate_and_is_reproducible():
    y, p = random_case(400, 21, skill=1.5)
    ci = bootstrap_ci(macro_f1, y, p, n_boot=300, seed=5)
    assert ci["low"] <= ci["estimate"] <= ci["high"]
    assert ci["estimate"] == pytest.approx(f1_score(y, p.argmax(axis=1), average="macro"))
    assert ci["n_boot"] == 300 and ci["n_valid"] == 300
    assert bootstrap_ci(macro_f1, y, p, n_boot=300, seed=5) == ci
    assert bootstrap_ci(macro_f1, y, p, n_boot=300, seed=6) != ci


def test_bootstrap_narrows_with_more_data():
    y_small, p_small = random_case(100, 31, skill=1.5)
    y_big, p_big = random_case(3000, 31, skill=1.5)
    small = bootstrap_ci(macro_f1, y_small, p_small, n_boot=300, seed=1)
    big = bootstrap_ci(macro_f1, y_big, p_big, n_boot=300, seed=1)
    assert (big["high"] - big["low"]) < 0.5 * (small["high"] - small["low"])


def test_bootstrap_respects_groups():
    n_groups, size = 40, 5
    groups = np.repeat([f"ZTF{i:03d}" for i in range(n_groups)], size)
    rows = np.arange(n_groups * size)
    seen = []

    def record(yy, pp):
        seen.append(np.asarray(yy).copy())
        return float(np.mean(pp))

    bootstrap_ci(record, rows, rows.astype(float), n_boot=50, seed=2, groups=groups)
    assert len(seen) == 51  # the estimate plus 50 replicates
    for rep in seen[1:]:
        assert len(rep) == n_groups * size
        mult = np.bincount(rep, minlength=len(rows)).reshape(n_groups, size)
        assert (mult == mult[:, :1]).all()  # every row of a group drawn equally often: groups move together
        assert mult[:, 0].sum() == n_groups

    # Whole groups right or wrong: the grouped interval is wider than the row-wise one.
    rng = np.random.default_rng(0)
    group_correct = rng.random(n_groups) < 0.6
    correct = np.repeat(group_correct, size).astype(float)
    acc = lambda yy, pp: float(np.mean(yy))
    rowwise = bootstrap_ci(acc, correct, correct, n_boot=500, seed=3)
    grouped = bootstrap_ci(acc, correct, correct, n_boot=500, seed=3, groups=groups)
    assert (grouped["high"] - grouped["low"]) > 1.5 * (rowwise["high"] - rowwise["low"])


# --- early classification -----------------------------------------------------------------------------------------


def test_early_curve_constructed_case():
    """Each object is predicted at days 5, 20, 100; it is right from day ``d_right`` on, wrong before."""
    n_obj = 40
    y = np.arange(n_obj) % K
    d_right = np.where(np.arange(n_obj) < 20, 5, 20)  # half right from day 5, the rest from day 20
    oids, days, ys, ps = [], [], [], []
    for i in range(n_obj):
        for d in (100, 5, 20):  # out of order on purpose
            wrong = (y[i] + 1) % K
            pred = y[i] if d >= d_right[i] else wrong
            row = np.full(K, 0.1)
            row[pred] = 0.7
            oids.append(f"ZTF{i:02d}")
            days.append(float(d))
            ys.append(CLASSES[y[i]])
            ps.append(row)
    p = np.vstack(ps)
    curve = early_classification_curve(oids, days, ys, p, days=(2, 5, 10, 20, 30, 100), n_boot=200, seed=0)
    assert list(curve["days"]) == [2, 5, 10, 20, 30, 100]
    assert list(curve["n_objects"]) == [0, 40, 40, 40, 40, 40]
    assert math.isnan(curve.loc[0, "macro_f1"])
    at5 = np.array(ys)[np.array(days) == 5]
    pred5 = p[np.array(days) == 5]
    expected5 = f1_score(encode_labels(at5), pred5.argmax(axis=1), average="macro")
    assert curve.loc[1, "macro_f1"] == pytest.approx(expected5)
    assert curve.loc[2, "macro_f1"] == pytest.approx(expected5)  # day 10 reuses each object's day-5 prediction
    assert curve.loc[1, "accuracy"] == pytest.approx(0.5)
    assert curve.loc[3, "macro_f1"] == pytest.approx(1.0) and curve.loc[5, "macro_f1"] == pytest.approx(1.0)
    ok = curve["n_objects"] > 0
    assert (curve.loc[ok, "macro_f1_low"] <= curve.loc[ok, "macro_f1"]).all()
    assert (curve.loc[ok, "macro_f1"] <= curve.loc[ok, "macro_f1_high"]).all()
    assert curve.loc[1, "macro_f1_high"] - curve.loc[1, "macro_f1_low"] > 0


# --- files and plots ----------------------------------------------------------------------------------------------


def test_metrics_json_round_trip(tmp_path):
    m = classification_metrics(FIXED_Y, FIXED_P)
    m["ece"] = np.float64("nan")
    m["inf"] = float("inf")
    m["count"] = np.int64(3)
    out = write_metrics_json(tmp_path / "metrics" / "test.json", m)
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)
    assert back["ece"] is None and back["inf"] is None and back["count"] == 3
    assert back["macro_f1"] == pytest.approx(m["macro_f1"])
    assert back["per_class"]["SNIa"]["support"] == 3
    assert list(back) == sorted(back)
    # Deterministic: the same metrics in another insertion order give the same bytes.
    shuffled = dict(reversed(list(m.items())))
    assert write_metrics_json(tmp_path / "again.json", shuffled).read_text() == text
    scal = scalar_metrics(m)
    assert "confusion_matrix" not in scal and "labels" not in scal
    assert scal["per_class"]["QSO"]["f1"] == m["per_class"]["QSO"]["f1"]


def test_plot_csvs(tmp_path):
    rows = confusion_rows(FIXED_Y, FIXED_P)
    assert list(rows.columns) == ["actual", "predicted"] and len(rows) == len(FIXED_Y)
    cm = pd.crosstab(rows["actual"], rows["predicted"]).reindex(index=CLASSES, columns=CLASSES, fill_value=0)
    assert np.array_equal(cm.to_numpy(), confusion_matrix(encode_labels(FIXED_Y), FIXED_P.argmax(axis=1)))
    path = write_plot_csv(tmp_path / "plots" / "confusion.csv", rows)
    assert pd.read_csv(path).equals(rows)
    curve = reliability_curve(FIXED_Y, FIXED_P)
    back = pd.read_csv(write_plot_csv(tmp_path / "plots" / "reliability.csv", curve))
    assert np.allclose(back["accuracy"], curve["accuracy"], equal_nan=True)


def test_plots_write_pngs(tmp_path):
    m = classification_metrics(FIXED_Y, FIXED_P)
    cm = m["confusion_matrix"]
    y, p = random_case(200, 9)
    rng = np.random.default_rng(0)
    oids = np.repeat([f"o{i}" for i in range(50)], 3)
    days = np.tile([5.0, 20.0, 100.0], 50)
    early = early_classification_curve(oids, days, np.repeat(rng.integers(0, K, 50), 3), p[:150], n_boot=50)
    paths = [
        plot_confusion_matrix(cm["counts"], cm["rows"], tmp_path / "cm.png", columns=cm["columns"]),
        plot_reliability(reliability_curve(y, p), tmp_path / "rel.png"),
        plot_early_curve(early, tmp_path / "sub" / "early.png"),
    ]
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_confusion_matrix(np.zeros((2, 2)), CLASSES, tmp_path / "bad.png")


def test_explicit_labels_with_absent_class_count_as_zero_f1():
    y, p = random_case(100, 13)
    y = np.where(y == 0, 1, y)  # no QSO among the true classes
    m = check_against_sklearn(y, p, labels=list(CLASSES))
    assert m["per_class"]["QSO"]["recall"] == 0.0 and m["per_class"]["QSO"]["support"] == 0
    with warnings.catch_warnings():  # sklearn warns that QSO is predicted but never true
        warnings.simplefilter("ignore")
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(axis=1)))


def test_bootstrap_interval_is_the_percentile_interval_of_the_replicates():
    y, p = random_case(200, 17)
    values = []

    def metric(yy, pp):
        values.append(macro_f1(yy, pp))
        return values[-1]

    ci = bootstrap_ci(metric, y, p, n_boot=400, seed=8, alpha=0.1)
    reps = np.array(values[1:])
    assert ci["low"] == pytest.approx(np.percentile(reps, 5))
    assert ci["high"] == pytest.approx(np.percentile(reps, 95))
    assert ci["estimate"] == values[0]
