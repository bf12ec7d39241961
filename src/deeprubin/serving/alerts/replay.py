"""Replay of labelled light curves through the consumer, alert by alert, and the early-classification metrics.

:func:`replay_detections` turns contract detections into one alert per detection, in time order across objects,
and classifies them in memory with :func:`deeprubin.serving.alerts.consume.consume` (book, as-of curves, batched
classification), so each alert is classified with only the detections up to it. :func:`early_metrics` scores those
rows against days since first detection (:data:`EARLY_BINS`), each labelled object counted once per bin.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import pandas as pd

from deeprubin.evaluation.metrics import macro_f1
from deeprubin.lightcurves.tensorize import curves_from_detections
from deeprubin.models.served import ServingModel
from deeprubin.schema import CLASSES
from deeprubin.serving.alerts.consume import AlertClassifier, ConsumeProgress, ConsumeResult, consume
from deeprubin.serving.alerts.packets import Alert, _points

# Early-classification bins (days since first detection): [0, 2), [2, 5), ..., [50, 100].
EARLY_BINS: tuple[float, ...] = (0, 2, 5, 10, 20, 30, 50, 100)


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
                  bins: Sequence[float] = EARLY_BINS, restrict: bool = True) -> pd.DataFrame:
    """Accuracy and macro-F1 against days since first detection, from per-alert classification rows.

    In each bin ``[lo, hi)`` (the last one closed) every labelled object counts once, with its latest alert in the
    bin (so densely observed objects do not outweigh the others). ``restrict``: the prediction is the argmax over
    ``classes`` only (probabilities renormalised), as :mod:`deeprubin.stages.evaluate` scores BTS. Objects whose
    label is not in ``classes`` are left out. Columns: ``bin, lo, hi, n_objects, n_alerts, n_<class>..., accuracy,
    macro_f1``."""
    label_of = pd.Series(labels).astype(str) if not isinstance(labels, pd.Series) else labels.astype(str)
    label_of.index = label_of.index.astype(str)
    frame = rows.assign(oid=rows["oid"].astype(str))
    frame = frame.assign(label=frame["oid"].map(label_of))
    frame = frame.loc[frame["label"].isin(list(classes))]
    days = frame["days_since_first_detection"].to_numpy(dtype=float)
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
        if len(latest):
            proba = latest[[f"p_{c}" for c in CLASSES]].to_numpy(dtype=float)
            y = latest["label"].to_numpy()
            idx = [CLASSES.index(c) for c in classes]
            scored = proba[:, idx] if restrict else proba
            names = np.asarray(classes if restrict else CLASSES)
            pred = names[scored.argmax(axis=1)]
            rec["accuracy"] = float(np.mean(pred == y))
            rec["macro_f1"] = macro_f1(y, proba, classes=CLASSES, labels=list(classes),
                                       restrict_predictions=restrict)
        else:
            rec["accuracy"] = rec["macro_f1"] = float("nan")
        records.append(rec)
    return pd.DataFrame.from_records(records)
