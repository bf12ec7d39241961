"""Classification with a registered (or local) model: light curves -> one row of probabilities per object.

The model is loaded once (:func:`load_model`, default ``models:/deeprubin-tcn@champion``); light curves go through
:func:`deeprubin.stages.preprocess.tensorize_curves` (the window policy and GP of training) in bounded batches, so
memory does not grow with the input. Objects the GP cannot interpolate are returned as rejections (oid, reason,
detail) and never stop the run.

Output columns (the contract in DESIGN.md): ``oid``, ``predicted_class``, ``p_QSO``, ``p_CEP``, ``p_SNIa``,
``p_SNII``, ``n_det``, ``days_since_first_detection``, ``model_name``, ``model_version``, ``classified_at``.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from deeprubin.schema import CLASSES

Progress = Callable[..., None]
COLUMNS = ["oid", "predicted_class", *[f"p_{c}" for c in CLASSES], "n_det", "days_since_first_detection",
           "model_name", "model_version", "classified_at"]
REJECTION_COLUMNS = ["oid", "reason", "detail"]


@dataclass
class ServingModel:
    """A loaded model: ``x (N, C, T) float32 -> probabilities (N, len(classes))``."""

    uri: str
    name: str
    version: str
    classes: tuple[str, ...]
    module: Any
    run_id: str | None = None

    def predict_proba(self, x: np.ndarray, batch: int = 1024) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(x), batch):
                chunk = torch.from_numpy(np.ascontiguousarray(x[i:i + batch], dtype=np.float32))
                out.append(np.asarray(self.module(chunk).detach().cpu().numpy(), dtype=np.float64))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))


def _parse_registry_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None); else None."""
    if not uri.startswith("models:/"):
        return None
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    name, _, version = rest.partition("/")
    return (name, version, None) if version.isdigit() else None


def load_model(uri: str, tracking_uri: str, default_classes: Iterable[str] = CLASSES) -> ServingModel:
    """Load ``uri`` (a registry URI or a local MLflow model directory) from ``tracking_uri``.

    The output classes come from the version's ``classes`` tag (written at training), else ``default_classes``.
    A registry alias that points nowhere gives a clear error."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    parsed = _parse_registry_uri(uri)
    name, version, run_id, tags = Path(uri).name or uri, "local", None, {}
    if parsed is not None:
        name, version_number, alias = parsed
        try:
            mv = (client.get_model_version_by_alias(name, alias) if alias
                  else client.get_model_version(name, version_number))
        except MlflowException as exc:
            what = f"alias @{alias}" if alias else f"version {version_number}"
            raise LookupError(f"{uri}: the registry at {tracking_uri} has no {what} of {name} ({exc.message})") \
                from None
        version, run_id, tags = str(mv.version), mv.run_id, dict(mv.tags)
        uri = f"models:/{name}/{version}"  # pin the version: an alias may move while we classify
    from deeprubin.tracking import using

    with using(tracking_uri):
        module = mlflow.pytorch.load_model(uri)
    classes = tuple(tags["classes"].split(",")) if tags.get("classes") else tuple(default_classes)
    return ServingModel(uri=uri, name=name, version=version, classes=classes, module=module, run_id=run_id)


def classify_curves(curves: list, model: ServingModel, grid_days: int = 100, fit_context_days: float = 100.0,
                    batch_size: int = 1024, progress: Progress | None = None
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(classifications, rejections)`` of ``curves`` (:class:`deeprubin.stages.preprocess.Curve`), batch by batch."""
    from deeprubin.stages.preprocess import tensorize_curves

    step = progress or (lambda *_a, **_k: None)
    frames, rejected = [], []
    stamp = pd.Timestamp.now(tz="UTC")
    for start in range(0, len(curves), batch_size):
        batch = curves[start:start + batch_size]
        n_det = {c.oid: int(len(c.mjd)) for c in batch}
        t = tensorize_curves(batch, grid_days, fit_context_days)
        rejected.extend(t.skipped)
        if len(t.rows):
            frames.append(_rows(t, model.predict_proba(t.x, batch_size), model, n_det, stamp))
        step("classifying", completed=min(start + batch_size, len(curves)), total=len(curves))
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    return out[COLUMNS], pd.DataFrame(rejected, columns=REJECTION_COLUMNS)


def _rows(t, proba: np.ndarray, model: ServingModel, n_det: dict[str, int], stamp) -> pd.DataFrame:
    frame = pd.DataFrame({"oid": [r["oid"] for r in t.rows]})
    classes = list(model.classes)
    frame["predicted_class"] = np.asarray(classes)[proba.argmax(axis=1)]
    for c in CLASSES:  # every contract column, 0 for a class the model does not know
        frame[f"p_{c}"] = proba[:, classes.index(c)] if c in classes else 0.0
    frame["n_det"] = [n_det[o] for o in frame["oid"]]
    frame["days_since_first_detection"] = [float(r["last_mjd"] - r["first_mjd"]) for r in t.rows]
    frame["model_name"] = model.name
    frame["model_version"] = model.version
    frame["classified_at"] = stamp
    return frame


def write_atomically(frame: pd.DataFrame, path: Path) -> Path:
    """Write Parquet to a temporary file beside ``path`` and rename it in: a failed run leaves the old file whole,
    and a rerun replaces rather than duplicates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


@dataclass
class ClassifyResult:
    output: Path
    rejections: Path | None
    n_classified: int
    n_rejected: int
    model_uri: str
    model_version: str
    per_class: dict[str, int]
    seconds: float

    def report(self) -> dict[str, Any]:
        return {"output": str(self.output), "rejections": None if self.rejections is None else str(self.rejections),
                "n_classified": self.n_classified, "n_rejected": self.n_rejected, "model_uri": self.model_uri,
                "model_version": self.model_version, "per_class": self.per_class, "seconds": round(self.seconds, 3)}


def run(params, detections: pd.DataFrame, output: Path, model: ServingModel | None = None,
        progress: Progress | None = None, upsert: bool = False) -> ClassifyResult:
    """Classify every object of ``detections`` (contract columns) with ``params.classify.model_uri`` (or ``model``);
    write ``output`` (Parquet) and ``<output stem>.rejected.csv`` when objects were rejected.

    ``upsert``: keep the rows of an existing ``output`` for objects not classified now (a night's file rerun replaces
    its rows and never duplicates them); the result then counts the whole file."""
    from deeprubin.stages.preprocess import curves_from_detections

    started = time.perf_counter()
    model = model or load_model(params.classify.model_uri, params.train.tracking_uri, params.base.classes)
    curves = curves_from_detections(detections)
    out, rejected = classify_curves(curves, model, params.preprocess.grid_days, params.preprocess.fit_context_days,
                                    params.classify.batch_size, progress)
    if upsert and Path(output).exists():
        previous = pd.read_parquet(output)
        kept = previous.loc[~previous["oid"].isin(set(out["oid"]))]
        out = pd.concat([kept, out], ignore_index=True).sort_values("oid", kind="stable").reset_index(drop=True)
    write_atomically(out, Path(output))
    side = Path(output).with_suffix(".rejected.csv")
    if len(rejected):
        rejected.to_csv(side, index=False)
    else:
        side.unlink(missing_ok=True)
    return ClassifyResult(output=Path(output), rejections=side if len(rejected) else None, n_classified=len(out),
                          n_rejected=len(rejected), model_uri=model.uri, model_version=model.version,
                          per_class={str(k): int(v) for k, v in out["predicted_class"].value_counts().items()},
                          seconds=time.perf_counter() - started)
