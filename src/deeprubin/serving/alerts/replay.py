"""Replay of labelled light curves through the consumer, alert by alert, and the early-classification metrics.

:func:`replay_detections` turns contract detections into one alert per detection, in time order across objects,
and classifies them in memory with :func:`deeprubin.serving.alerts.consume.consume` (book, as-of curves, batched
classification), so each alert is classified with only the detections up to it. :func:`early_metrics` scores those
rows against days since first detection (:data:`EARLY_BINS`), each labelled object counted once per bin: accuracy,
macro-F1, each class's recall and the expected calibration error; :func:`early_goal` says whether the goal is met
and :func:`early_markdown` writes the table for the README.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import pandas as pd

from deeprubin.evaluation.metrics import classification_metrics, expected_calibration_error
from deeprubin.lightcurves.tensorize import curves_from_detections
from deeprubin.models.served import ServingModel
from deeprubin.schema import CLASSES
from deeprubin.serving.alerts.consume import AlertClassifier, ConsumeProgress, ConsumeResult, consume
from deeprubin.serving.alerts.packets import Alert, _points

# Early-classification bins (days since first detection): [0, 2), [2, 5), ..., [50, 100].
EARLY_BINS: tuple[float, ...] = (0, 2, 5, 10, 20, 30, 50, 100)
#: The early-classification goal (:func:`early_goal`): from this many days on, no class swallowed by another (each
#: class's recall at least :data:`MIN_RECALL` in every bin) and calibrated probabilities (ECE at most :data:`MAX_ECE`).
RECALL_FROM_DAYS = 5.0
MIN_RECALL = 0.6
MAX_ECE = 0.05


def alerts_from_detections(detections: pd.DataFrame, max_days: float | None = None) -> Iterator[Alert]:
    """Contract detections -> one alert per detection (g/r only), in time order across objects; each alert carries
    the object's detections up to and including it (the history a broker would send). ``max_days``: no alerts
    later than this many days after the object's first detection."""
    if detections.empty:
        return
    curves = [c for c in curves_from_detections(detections)]
    events: list[tuple[float, int, int]] = []
    cleaned = []
    for ci, c in enumerate(curves):
        t, band, flux, err = _points(c.mjd, c.band, c.flux, c.flux_err)
        cleaned.append((c.oid, t, band, flux, err))
        for j in range(len(t)):
            if max_days is not None and t[j] - t[0] > max_days:
                break
            events.append((float(t[j]), ci, j))
    events.sort()
    for mjd, ci, j in events:
        oid, t, band, flux, err = cleaned[ci]
        yield Alert(alert_id=f"{oid}:{j}", oid=oid, mjd=mjd, format="replay", t=t[:j + 1], band=band[:j + 1],
                    flux=flux[:j + 1], flux_err=err[:j + 1], packet=f"replay:{oid}:{j}")


def replay_detections(detections: pd.DataFrame, model: ServingModel, grid_days: int = 100,
                      fit_context_days: float = 100.0, batch_alerts: int = 1024, batch_size: int = 1024,
                      max_days: float | None = None, progress: ConsumeProgress | None = None) -> ConsumeResult:
    """Replay labelled detections through the consumer (book, as-of curves, batched classification), in memory.

    Each detection becomes an alert classified with only the detections before it and itself; rows are in
    ``result.classifications`` (``oid``, ``days_since_first_detection``, ``p_*``...), rejections in
    ``result.rejections``."""
    classifier = AlertClassifier(model, grid_days, fit_context_days, batch_size,
                                 max_objects=max(1, int(detections["oid"].nunique()) if len(detections) else 1))
    return consume(alerts_from_detections(detections, max_days), classifier, None, batch_alerts, progress=progress)


def early_metrics(rows: pd.DataFrame, labels: Mapping[str, str] | pd.Series, classes: Sequence[str] = ("SNIa", "SNII"),
                  bins: Sequence[float] = EARLY_BINS, restrict: bool = True, calibration_bins: int = 10,
                  min_recall: float = MIN_RECALL, recall_from_days: float = RECALL_FROM_DAYS) -> pd.DataFrame:
    """Accuracy, macro-F1, each class's recall and the calibration error against days since first detection, from
    per-alert classification rows.

    In each bin ``[lo, hi)`` (the last one closed) every labelled object counts once, with its latest alert in the
    bin (so densely observed objects do not outweigh the others). ``restrict``: the prediction is the argmax over
    ``classes`` only and the probabilities are renormalised over them, as :mod:`deeprubin.stages.evaluate` scores
    BTS. Objects whose label is not in ``classes`` are left out. Metrics are those of
    :func:`deeprubin.evaluation.metrics.classification_metrics` and
    :func:`~deeprubin.evaluation.metrics.expected_calibration_error` (top label, ``calibration_bins`` equal bins):
    ``ece`` on the scored probabilities (renormalised over ``classes`` when ``restrict``), ``ece_all_classes`` on
    the model's own probabilities over every class. ``low_recall``: the classes (present in the bin) whose recall
    is below ``min_recall`` in a bin starting at ``recall_from_days`` or later (a class swallowed by another).

    Columns: ``bin, lo, hi, n_objects, n_alerts, n_<class>..., accuracy, macro_f1, recall_<class>..., ece,
    ece_all_classes, low_recall``."""
    label_of = pd.Series(labels).astype(str) if not isinstance(labels, pd.Series) else labels.astype(str)
    label_of.index = label_of.index.astype(str)
    frame = rows.assign(oid=rows["oid"].astype(str))
    frame = frame.assign(label=frame["oid"].map(label_of))
    frame = frame.loc[frame["label"].isin(list(classes))]
    days = frame["days_since_first_detection"].to_numpy(dtype=float)
    idx = [CLASSES.index(c) for c in classes]
    records = []
    edges = list(bins)
    for k, (lo, hi) in enumerate(pairwise(edges)):
        last = k == len(edges) - 2
        inside = (days >= lo) & ((days <= hi) if last else (days < hi))
        sub = frame.loc[inside]
        sub = sub.sort_values(["oid", "days_since_first_detection", "alert_mjd"], kind="mergesort")
        latest = sub.drop_duplicates("oid", keep="last")
        rec: dict[str, Any] = {"bin": f"{lo:g}-{hi:g}", "lo": float(lo), "hi": float(hi),
                               "n_objects": len(latest), "n_alerts": len(sub)}
        for c in classes:
            rec[f"n_{c}"] = int((latest["label"] == c).sum())
        rec.update(accuracy=float("nan"), macro_f1=float("nan"), **{f"recall_{c}": float("nan") for c in classes},
                   ece=float("nan"), ece_all_classes=float("nan"), low_recall=[])
        if len(latest):
            proba = latest[[f"p_{c}" for c in CLASSES]].to_numpy(dtype=float)
            y = latest["label"].to_numpy()
            m = classification_metrics(y, proba, classes=CLASSES, labels=list(classes), restrict_predictions=restrict)
            rec["accuracy"], rec["macro_f1"] = m["accuracy"], m["macro_f1"]
            for c in classes:
                if rec[f"n_{c}"]:
                    rec[f"recall_{c}"] = m["per_class"][c]["recall"]
            scored = proba[:, idx] / proba[:, idx].sum(axis=1, keepdims=True) if restrict else proba
            rec["ece"] = expected_calibration_error(y, scored, calibration_bins, list(classes) if restrict else CLASSES)
            rec["ece_all_classes"] = expected_calibration_error(y, proba, calibration_bins, CLASSES)
            if lo >= recall_from_days:
                rec["low_recall"] = [c for c in classes if rec[f"n_{c}"] and rec[f"recall_{c}"] < min_recall]
        records.append(rec)
    return pd.DataFrame.from_records(records)


def early_goal(table: pd.DataFrame, classes: Sequence[str] = ("SNIa", "SNII"), min_recall: float = MIN_RECALL,
               recall_from_days: float = RECALL_FROM_DAYS, max_ece: float = MAX_ECE) -> dict[str, Any]:
    """Whether an :func:`early_metrics` table meets the early-classification goal: from ``recall_from_days`` on,
    every class's recall at least ``min_recall`` (``low_recall`` empty) and ``ece`` at most ``max_ece`` in every
    bin with objects. Returns ``{"met", "recall_met", "ece_met", "failing": [{"bin", "why"}...], and the
    thresholds}``."""
    failing = []
    scored = table.loc[(table["lo"] >= recall_from_days) & (table["n_objects"] > 0)]
    for r in scored.to_dict("records"):
        for c in r["low_recall"]:
            failing.append({"bin": r["bin"], "why": f"recall {c} {r[f'recall_{c}']:.2f} < {min_recall:g}"})
        if not r["ece"] <= max_ece:
            failing.append({"bin": r["bin"], "why": f"ECE {r['ece']:.3f} > {max_ece:g}"})
    recall_met = not any(w["why"].startswith("recall") for w in failing)
    ece_met = not any(w["why"].startswith("ECE") for w in failing)
    return {"met": recall_met and ece_met and len(scored) > 0, "recall_met": recall_met, "ece_met": ece_met,
            "failing": failing, "min_recall": min_recall, "recall_from_days": recall_from_days, "max_ece": max_ece,
            "classes": list(classes)}


def early_markdown(table: pd.DataFrame, classes: Sequence[str] = ("SNIa", "SNII"),
                   full_curve: Mapping[str, Any] | None = None, min_recall: float = MIN_RECALL) -> str:
    """A Markdown table of :func:`early_metrics` (and the ``full_curve`` row, when given) for the README: days since
    first detection, objects per class, accuracy, macro-F1, each class's recall, ECE; a bin whose ``low_recall`` is
    not empty is flagged."""
    def num(v: Any, fmt: str = ".2f") -> str:
        return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)

    head = (["days since first detection", "objects"] + [f"{c}" for c in classes]
            + ["accuracy", "macro-F1"] + [f"recall {c}" for c in classes] + ["ECE", f"recall < {min_recall:g}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]
    records = table.to_dict("records") + ([dict(full_curve)] if full_curve is not None else [])
    for r in records:
        flag = ", ".join(r.get("low_recall") or []) or ""
        cells = ([str(r["bin"]), str(int(r["n_objects"]))] + [str(int(r[f"n_{c}"])) for c in classes]
                 + [num(r["accuracy"]), num(r["macro_f1"])] + [num(r.get(f"recall_{c}")) for c in classes]
                 + [num(r.get("ece"), ".3f"), f"**{flag}**" if flag else ""])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
