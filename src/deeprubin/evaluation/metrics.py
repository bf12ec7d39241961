"""Evaluation metrics, bootstrap intervals and metric files (pure functions on arrays; no stage wiring; the
figures are in :mod:`deeprubin.evaluation.figures`).

Conventions shared by every function here:

* ``proba`` is an ``(n, len(classes))`` array of class probabilities whose columns follow ``classes``
  (default :data:`deeprubin.schema.CLASSES`); the predicted class of a row is the argmax of its row.
* ``y_true`` holds class names (``"SNIa"``) or integer column indices into ``classes``; both are accepted.
* ``labels`` selects the classes that metrics are *averaged over* (macro-F1, balanced accuracy). By default it is
  the classes present in ``y_true``, in ``classes`` order: on the real BTS hold-out (only SNIa and SNII) macro-F1
  is then the unweighted mean of the SNIa and SNII F1 scores. Predictions are still the argmax over *all* classes
  unless ``restrict_predictions=True``, so a SN Ia predicted as QSO counts as a missed SN Ia (and as a false positive
  of no averaged class). With ``restrict_predictions=True`` the probabilities are renormalised over ``labels`` and
  the argmax is taken among them (a pure SNIa-vs-SNII decision).
* Precision of a class that is never predicted is 0 (scikit-learn's ``zero_division=0``); so is recall of a class in
  ``labels`` that is absent from ``y_true`` (only possible when ``labels`` is given explicitly, or in a bootstrap
  resample).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deeprubin.schema import CLASSES

DEFAULT_DAYS: tuple[int, ...] = (5, 10, 20, 30, 50, 100)


# --------------------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------------------


def encode_labels(y: Iterable[Any], classes: Sequence[str] = CLASSES) -> np.ndarray:
    """Class names or integer indices -> integer indices into ``classes``; unknown names raise ValueError."""
    arr = np.asarray(list(y) if not isinstance(y, np.ndarray | pd.Series) else y)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        out = arr.astype(np.int64)
        if out.min() < 0 or out.max() >= len(classes):
            raise ValueError(f"class indices must lie in [0, {len(classes)}), got {out.min()}..{out.max()}")
        return out
    index = {str(c): i for i, c in enumerate(classes)}
    names = arr.astype(str)
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise ValueError(f"unknown class names {unknown}; expected some of {list(classes)}")
    return np.array([index[n] for n in names], dtype=np.int64)


def _check_proba(proba: Any, n: int, classes: Sequence[str]) -> np.ndarray:
    p = np.asarray(proba, dtype=float)
    if p.ndim != 2 or p.shape != (n, len(classes)):
        raise ValueError(f"proba must have shape ({n}, {len(classes)}), got {p.shape}")
    return p


def _label_indices(labels: Sequence[Any] | None, y: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    if labels is None:
        return np.unique(y)
    return encode_labels(labels, classes)


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """k x k confusion counts, rows true and columns predicted."""
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def _prf(cm: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support of classes ``idx`` from a full confusion matrix (zero_division=0)."""
    tp = np.diag(cm)[idx].astype(float)
    pred_pos = cm.sum(axis=0)[idx].astype(float)
    support = cm.sum(axis=1)[idx].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(pred_pos > 0, tp / pred_pos, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1.0), 0.0)
    return precision, recall, f1, support


def _predict(p: np.ndarray, idx: np.ndarray, restrict: bool) -> np.ndarray:
    if not restrict:
        return p.argmax(axis=1)
    return idx[p[:, idx].argmax(axis=1)]


# --------------------------------------------------------------------------------------------------------------
# Classification metrics
# --------------------------------------------------------------------------------------------------------------


def macro_f1(y_true: Any, proba: Any, classes: Sequence[str] = CLASSES, labels: Sequence[Any] | None = None,
             restrict_predictions: bool = False) -> float:
    """Unweighted mean F1 over ``labels`` (default: the classes present in ``y_true``); fast, for bootstraps."""
    y = encode_labels(y_true, classes)
    p = _check_proba(proba, len(y), classes)
    if len(y) == 0:
        return float("nan")
    idx = _label_indices(labels, y, classes)
    cm = _confusion(y, _predict(p, idx, restrict_predictions), len(classes))
    return float(_prf(cm, idx)[2].mean())


def classification_metrics(y_true: Any, proba: Any, classes: Sequence[str] = CLASSES,
                           labels: Sequence[Any] | None = None, restrict_predictions: bool = False) -> dict[str, Any]:
    """Macro-F1, per-class precision/recall/F1/support, balanced and plain accuracy, confusion matrix, log loss.

    Returns a dict::

        n, labels (averaged classes), macro_f1, balanced_accuracy, accuracy, log_loss,
        per_class: {class: {precision, recall, f1, support}}   (classes in ``labels``)
        confusion_matrix: {rows, columns, counts, normalised}

    ``macro_f1`` and ``balanced_accuracy`` are unweighted means over ``labels`` (see the module docstring).
    The confusion matrix has one row per class in ``labels`` (true class) and one column per predicted class:
    all of ``classes`` normally, only ``labels`` with ``restrict_predictions``; ``normalised`` divides each row by
    its total (so its diagonal is the recall), NaN for an empty row. ``log_loss`` is the mean of
    ``-log p(true class)`` with the probabilities clipped to [eps, 1] (scikit-learn's ``log_loss`` on rows that sum
    to 1; renormalised over ``labels`` with ``restrict_predictions``). ``restrict_predictions`` requires every true
    class to be in ``labels``.
    """
    y = encode_labels(y_true, classes)
    p = _check_proba(proba, len(y), classes)
    if len(y) == 0:
        raise ValueError("no rows to evaluate")
    idx = _label_indices(labels, y, classes)
    if restrict_predictions:
        if not np.isin(y, idx).all():
            raise ValueError("restrict_predictions needs every true class to be in labels")
        p = p[:, idx] / p[:, idx].sum(axis=1, keepdims=True)
        p_full = np.zeros((len(y), len(classes)))
        p_full[:, idx] = p
        p = p_full
    pred = _predict(p, idx, restrict_predictions)
    k = len(classes)
    cm = _confusion(y, pred, k)
    precision, recall, f1, support = _prf(cm, idx)
    present = support > 0
    eps = np.finfo(p.dtype).eps
    p_true = np.clip(p[np.arange(len(y)), y], eps, 1.0)
    cols = idx if restrict_predictions else np.arange(k)
    counts = cm[np.ix_(idx, cols)]
    row_tot = cm[idx].sum(axis=1, keepdims=True).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(row_tot > 0, counts / np.where(row_tot > 0, row_tot, 1.0), np.nan)
    return {
        "n": len(y),
        "labels": [str(classes[i]) for i in idx],
        "macro_f1": float(f1.mean()),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
        "accuracy": float(np.mean(pred == y)),
        "log_loss": float(-np.mean(np.log(p_true))),
        "per_class": {
            str(classes[i]): {"precision": float(precision[j]), "recall": float(recall[j]), "f1": float(f1[j]),
                              "support": int(support[j])}
            for j, i in enumerate(idx)
        },
        "confusion_matrix": {
            "rows": [str(classes[i]) for i in idx],
            "columns": [str(classes[i]) for i in cols],
            "counts": counts.astype(int).tolist(),
            "normalised": normalised.tolist(),
        },
    }


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The part of :func:`classification_metrics` that belongs in a DVC metrics file: numbers and per-class numbers
    (the confusion matrix goes to a plots file instead, see :func:`confusion_rows`)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating | Mapping):
            continue
        if isinstance(value, Mapping):
            nested = scalar_metrics(value)
            if nested:
                out[key] = nested
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------


def reliability_curve(y_true: Any, proba: Any, n_bins: int = 10, classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    """Top-label reliability data in ``n_bins`` equal-width confidence bins on [0, 1].

    Bin ``b`` holds the rows whose top probability lies in ``(b/n_bins, (b+1)/n_bins]`` (0 goes to the first bin).
    Columns: ``bin, bin_lower, bin_upper, confidence`` (mean top probability), ``accuracy`` (fraction of rows whose
    argmax is the true class), ``count``. Empty bins have count 0 and NaN confidence and accuracy.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    y = encode_labels(y_true, classes)
    p = _check_proba(proba, len(y), classes)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(float)
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / count
        acc = np.bincount(b, weights=correct, minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return pd.DataFrame({"bin": np.arange(n_bins), "bin_lower": edges[:-1], "bin_upper": edges[1:],
                         "confidence": np.where(count > 0, mean_conf, np.nan),
                         "accuracy": np.where(count > 0, acc, np.nan), "count": count.astype(np.int64)})


def expected_calibration_error(y_true: Any, proba: Any, n_bins: int = 10, classes: Sequence[str] = CLASSES) -> float:
    """Top-label ECE: sum over equal-width bins of (bin count / n) * |accuracy - mean confidence|."""
    curve = reliability_curve(y_true, proba, n_bins=n_bins, classes=classes)
    n = curve["count"].sum()
    if n == 0:
        return float("nan")
    used = curve["count"] > 0
    gap = (curve.loc[used, "accuracy"] - curve.loc[used, "confidence"]).abs()
    return float((curve.loc[used, "count"] * gap).sum() / n)


# --------------------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------------------


def bootstrap_ci(metric_fn: Callable[[Any, Any], float], y_true: Any, proba: Any, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05, groups: Any = None) -> dict[str, float]:
    """Percentile bootstrap interval of ``metric_fn(y_true, proba)``.

    Rows are resampled with replacement; with ``groups`` (one key per row, e.g. the object id) whole groups are
    resampled instead, so all rows of a group enter or leave a replicate together. Replicates where the metric is NaN
    are ignored. Returns ``{"estimate", "low", "high", "n_boot", "n_valid"}``; ``estimate`` is the metric on the
    full data, ``low``/``high`` the ``alpha/2`` and ``1 - alpha/2`` percentiles of the replicates.
    """
    if not 0 < alpha < 1:
        raise ValueError("alpha must lie in (0, 1)")
    y = np.asarray(y_true)
    p = np.asarray(proba)
    n = len(y)
    if len(p) != n:
        raise ValueError("y_true and proba differ in length")
    estimate = float(metric_fn(y, p)) if n else float("nan")
    rng = np.random.default_rng(seed)
    if groups is not None:
        g = np.asarray(groups)
        if len(g) != n:
            raise ValueError("groups and y_true differ in length")
        _, codes = np.unique(g, return_inverse=True)
        order = np.argsort(codes, kind="stable")
        sizes = np.bincount(codes)
        starts = np.cumsum(sizes) - sizes
    values = np.full(n_boot, np.nan)
    if n:
        for i in range(n_boot):
            if groups is None:
                rows = rng.integers(0, n, size=n)
            else:
                pick = rng.integers(0, len(sizes), size=len(sizes))
                lengths = sizes[pick]
                offsets = np.cumsum(lengths) - lengths
                rows = order[np.repeat(starts[pick] - offsets, lengths) + np.arange(lengths.sum())]
            values[i] = metric_fn(y[rows], p[rows])
    valid = values[~np.isnan(values)]
    if valid.size:
        low, high = np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    else:
        low = high = float("nan")
    return {"estimate": estimate, "low": float(low), "high": float(high), "n_boot": int(n_boot),
            "n_valid": int(valid.size)}


# --------------------------------------------------------------------------------------------------------------
# Early classification
# --------------------------------------------------------------------------------------------------------------


def early_classification_curve(oids: Any, days_since_first: Any, y_true: Any, proba: Any,
                               days: Sequence[float] = DEFAULT_DAYS, classes: Sequence[str] = CLASSES,
                               labels: Sequence[Any] | None = None, n_boot: int = 1000, seed: int = 0,
                               alpha: float = 0.05) -> pd.DataFrame:
    """Macro-F1 (with bootstrap interval) against days since first detection.

    Rows are predictions of objects on light curves truncated at several epochs (``days_since_first`` is the
    truncation epoch of each row). At epoch ``d`` each object contributes its latest prediction made at or before
    ``d``; objects with no prediction by then are left out (``n_objects`` says how many remain). When predictions are
    made exactly at the epochs in ``days``, this is simply the rows of that epoch. Macro-F1 is averaged over
    ``labels`` (default: the classes present in the whole ``y_true``, the same set at every epoch); the interval
    resamples objects. Columns: ``days, n_objects, macro_f1, macro_f1_low, macro_f1_high, accuracy``.
    """
    oid = np.asarray(oids).astype(str)
    t = np.asarray(days_since_first, dtype=float)
    y = encode_labels(y_true, classes)
    p = _check_proba(proba, len(y), classes)
    if not (len(oid) == len(t) == len(y)):
        raise ValueError("oids, days_since_first, y_true and proba differ in length")
    idx = _label_indices(labels, y, classes)
    label_names = [classes[i] for i in idx]

    def metric(yy: np.ndarray, pp: np.ndarray) -> float:
        return macro_f1(yy, pp, classes=classes, labels=label_names)

    order = np.lexsort((t, oid))  # by object, then time
    oid_s, t_s = oid[order], t[order]
    records = []
    for k, d in enumerate(days):
        keep = t_s <= d
        if keep.any():
            sub = order[keep]
            o = oid_s[keep]
            last = np.r_[o[1:] != o[:-1], True]  # last (latest) row of each object among the kept ones
            rows = sub[last]
        else:
            rows = np.zeros(0, dtype=np.int64)
        if len(rows):
            ci = bootstrap_ci(metric, y[rows], p[rows], n_boot=n_boot, seed=seed + k, alpha=alpha)
            acc = float(np.mean(p[rows].argmax(axis=1) == y[rows]))
        else:
            ci = {"estimate": float("nan"), "low": float("nan"), "high": float("nan")}
            acc = float("nan")
        records.append({"days": d, "n_objects": len(rows), "macro_f1": ci["estimate"],
                        "macro_f1_low": ci["low"], "macro_f1_high": ci["high"], "accuracy": acc})
    return pd.DataFrame.from_records(records, columns=["days", "n_objects", "macro_f1", "macro_f1_low",
                                                       "macro_f1_high", "accuracy"])


# --------------------------------------------------------------------------------------------------------------
# Files for DVC
# --------------------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        v = float(value)
        return v if math.isfinite(v) else None
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"cannot write {type(value).__name__} to a metrics file")


def write_metrics_json(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics`` as JSON for ``dvc metrics``: keys sorted at every level, numpy numbers as plain numbers,
    NaN and infinities as ``null``; parent directories are created. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(metrics), indent=2, allow_nan=False) + "\n")
    return path


def write_plot_csv(path: str | Path, frame: pd.DataFrame) -> Path:
    """Write a plot-data table as CSV for ``dvc plots`` (no index, parent directories created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, lineterminator="\n")
    return path


def confusion_rows(y_true: Any, proba: Any, classes: Sequence[str] = CLASSES, labels: Sequence[Any] | None = None,
                   restrict_predictions: bool = False) -> pd.DataFrame:
    """One ``actual, predicted`` row per prediction (the long form that DVC's ``confusion`` template counts),
    with the same prediction rule as :func:`classification_metrics`."""
    y = encode_labels(y_true, classes)
    p = _check_proba(proba, len(y), classes)
    idx = _label_indices(labels, y, classes)
    pred = _predict(p, idx, restrict_predictions)
    names = np.asarray([str(c) for c in classes], dtype=object)
    return pd.DataFrame({"actual": names[y], "predicted": names[pred]})


def confusion_plot_rows(rows: pd.DataFrame, classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    """The ``actual, predicted`` rows of :func:`confusion_rows` as DVC plot data: with ``actual_order`` and
    ``predicted_order`` (each class's position in ``classes``) and sorted by them, so the interactive confusion matrix
    (``.dvc/plots/confusion_ordered.json``) lists the classes in the same order as the PNGs, not alphabetically."""
    order = {str(c): i for i, c in enumerate(classes)}
    extra = len(order)  # a class outside ``classes`` (none from confusion_rows) goes last

    def position(values: pd.Series) -> pd.Series:
        return values.astype(str).map(order).fillna(extra).astype("int64")

    out = rows.assign(actual_order=position(rows["actual"]), predicted_order=position(rows["predicted"]))
    return out.sort_values(["actual_order", "predicted_order"], kind="stable").reset_index(drop=True)
