"""Scoring a model on an evaluation set: the numbers of ``evaluate.json`` for one (model, set), with bootstrap
intervals per object, per-class recall intervals, calibration and the early-classification curve."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from deeprubin.evaluation.metrics import (
    bootstrap_ci,
    classification_metrics,
    confusion_rows,
    early_classification_curve,
    expected_calibration_error,
    macro_f1,
    reliability_curve,
    scalar_metrics,
)


def restricted(proba: np.ndarray, classes: tuple[str, ...], scored: list[str]) -> np.ndarray:
    idx = [classes.index(c) for c in scored]
    p = np.zeros_like(proba)
    sub = proba[:, idx]
    p[:, idx] = sub / np.clip(sub.sum(axis=1, keepdims=True), 1e-12, None)
    return p


def score(y: np.ndarray, proba: np.ndarray, oids: np.ndarray, early: pd.DataFrame, classes: tuple[str, ...],
          scored: list[str], restrict: bool, n_boot: int, bins: int, seed: int) -> tuple[dict[str, Any], dict]:
    """Metrics of one model on one data set; ``early``: rows (oid, days, proba...) of predictions on cut curves.
    Returns (metrics for evaluate.json, extras: confusion, reliability and early frames)."""
    p = restricted(proba, classes, scored) if restrict else proba
    full = classification_metrics(y, p, classes, labels=scored, restrict_predictions=restrict)

    def f1(yy, pp):
        return macro_f1(yy, pp, classes, labels=scored, restrict_predictions=restrict)

    ci = bootstrap_ci(f1, y, p, n_boot=n_boot, seed=seed, groups=oids)
    out = scalar_metrics({k: full[k] for k in ("n", "macro_f1", "balanced_accuracy", "accuracy", "log_loss")})
    out.update(macro_f1_low=ci["low"], macro_f1_high=ci["high"],
               ece=expected_calibration_error(y, p, n_bins=bins, classes=classes))
    # Predictions once; the recall interval resamples objects over (true, predicted) pairs.
    predicted = confusion_rows(y, p, classes, labels=scored, restrict_predictions=restrict)["predicted"].to_numpy()
    per_class = {}
    for c, m in full["per_class"].items():
        def recall(yy, pred, c=c):
            rows = yy == c
            return float(np.mean(pred[rows] == c)) if rows.any() else float("nan")

        rci = bootstrap_ci(recall, np.asarray(y, dtype=str), predicted.astype(str), n_boot=n_boot,
                           seed=seed + 1 + classes.index(c), groups=oids)
        per_class[c] = {**m, "recall_low": rci["low"], "recall_high": rci["high"]}
    out["per_class"] = per_class
    curve = pd.DataFrame()
    if len(early):
        pe = early[list(classes)].to_numpy()
        pe = restricted(pe, classes, scored) if restrict else pe
        curve = early_classification_curve(early["oid"], early["days"], early["label"], pe,
                                           days=sorted(early["days"].unique()), classes=classes, labels=scored,
                                           n_boot=n_boot, seed=seed)
        out["early"] = {f"{d:g}d": {"macro_f1": r.macro_f1, "macro_f1_low": r.macro_f1_low,
                                     "macro_f1_high": r.macro_f1_high, "n": int(r.n_objects)}
                        for d, r in zip(curve["days"], curve.itertuples())}
    extras = {"report": full, "confusion": confusion_rows(y, p, classes, labels=scored,
                                                           restrict_predictions=restrict),
              "reliability": reliability_curve(y, p, n_bins=bins, classes=classes), "early": curve}
    return out, extras


def early_rows(oids: np.ndarray, proba: np.ndarray, days: float, label_of: dict[str, str],
                classes: tuple[str, ...]) -> pd.DataFrame:
    frame = pd.DataFrame(proba, columns=list(classes))
    frame.insert(0, "oid", oids)
    frame.insert(1, "days", float(days))
    frame.insert(2, "label", [label_of[o] for o in oids])
    return frame


def align(src_oids: np.ndarray, proba: np.ndarray, oids: np.ndarray, src_classes, classes) -> np.ndarray:
    """Rows of ``proba`` (columns ``src_classes``) reordered to ``oids`` and columns to ``classes``."""
    pos = {str(o): i for i, o in enumerate(src_oids)}
    out = np.zeros((len(oids), len(classes)))
    col = {c: i for i, c in enumerate(src_classes)}
    rows = np.asarray([pos[str(o)] for o in oids], dtype=np.int64)
    for j, c in enumerate(classes):
        if c in col and len(rows):
            out[:, j] = proba[rows, col[c]]
    return out
