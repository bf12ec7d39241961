"""Stage ``evaluate``: the trained TCN (and the random-forest baseline) scored on held-out data.

Data sets:

- ``test``: the test split of ``data/processed`` (the same stratified split by object as training; simulated
  objects by default), all configured classes.
- ``evaluate.real.name`` (``bts``): the real labelled set's held-out objects (:mod:`deeprubin.evaluation.sets`), read from
  its files and interpolated by the same code as inference; scored on ``evaluate.real.classes`` (SNIa vs SNII) with
  the prediction restricted to those classes, as the published baselines are. Skipped, and said so, when absent.
- ``<evaluate.ogle.name>_alert_stream`` (``ogle_alert_stream``): real OGLE-II quasars and Cepheids presented as a ZTF
  alert stream (:mod:`deeprubin.evaluation.ogle`: alternate epochs as g and r, difference flux against the
  whole-curve median, 5 σ detections, the last ``evaluate.ogle.alert_days`` days); scored on QSO and CEP with
  predictions over every class, so a class's recall is the fraction called that class. ``<name>_apparent``: the same
  epochs as plain apparent fluxes (a diagnostic). Skipped, and said so, when the file is absent.

Per model and data set: macro-F1 with a bootstrap 95% interval (objects resampled), per-class precision, recall
(with interval) and F1, balanced accuracy, log loss, expected calibration error, the confusion matrix, and macro-F1
against days since first detection (``evaluate.early_days``): the light curves are cut ``d`` days after their first
detection and interpolated again (the GP sees only what an alert stream would have shown by then).

Outputs under ``evaluate.metrics_dir``: ``headline.json`` (the DVC metrics: a dozen headline numbers,
:func:`headline_metrics`), ``evaluate.json`` (every number above, per model and set), ``report.json`` (everything,
incl. confusion matrices), ``plots/*.csv`` (DVC plot data: early curves, confusion pairs with each class's position in
``base.classes``, reliability, class distribution), ``figures/*.png`` (confusion matrices, reliability, early
curves, class distribution, mean GP profile per class). The numbers and figures are also logged to the training run in
MLflow, and ``deeprubin register`` writes the headline numbers into the registered version's description.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deeprubin.config import Params
from deeprubin.evaluation import figures as figs
from deeprubin.evaluation.metrics import confusion_plot_rows, write_metrics_json, write_plot_csv
from deeprubin.evaluation.ogle import ogle_sets
from deeprubin.evaluation.scoring import align, early_rows, score
from deeprubin.evaluation.sets import EvalSet, holdout_oids, objects_hash, real_set, split_test_set
from deeprubin.lightcurves.tensorize import curves_from_detections, cut_after_first, tensorize_curves
from deeprubin.models.forest import BaselineForest
from deeprubin.models.served import ServingModel, load_checkpoint
from deeprubin.outputs import CHECKPOINT, EVALUATION_REPORT, FOREST_MODEL, HEADLINE, METRICS, TRAIN_REPORT
from deeprubin.processed import Preprocessing, load_processed, preprocessing_of
from deeprubin.progress import Progress, or_silent
from deeprubin.store import RawStore


@dataclass(frozen=True)
class EvaluatePaths:
    raw_dir: Path
    processed_dir: Path
    model_dir: Path
    metrics_dir: Path

    @classmethod
    def from_params(cls, params: Params) -> "EvaluatePaths":
        return cls(raw_dir=Path(params.ingest.raw_dir), processed_dir=Path(params.preprocess.processed_dir),
                   model_dir=Path(params.train.model_dir), metrics_dir=Path(params.evaluate.metrics_dir))


@dataclass
class EvaluateResult:
    metrics: dict[str, Any]
    metrics_path: Path
    report_path: Path
    figures: list[Path]
    skipped: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    seconds: float = 0.0
    headline_path: Path | None = None


#: The early-classification point of the headline numbers (the registered version's description uses it too).
HEADLINE_EARLY = "20d"


def _rounded(value: Any) -> float | None:
    return round(float(value), 4) if isinstance(value, (int, float)) and np.isfinite(value) else None


def headline_metrics(metrics: dict[str, Any], real_set: str) -> dict[str, dict[str, float | None]]:
    """The DVC metrics (``headline.json``): per evaluated set, each model's macro-F1 (``tcn_macro_f1``,
    ``forest_macro_f1``); on the real held-out set ``real_set`` also the TCN's recall per class and its macro-F1
    :data:`HEADLINE_EARLY` after the first detection. About a dozen numbers to 4 decimals, two levels (set, then
    number): ``dvc metrics show`` prints them as one readable row, ``dvc metrics diff`` and ``dvc exp show`` compare
    them. Every number (intervals, precision, calibration, early curves) stays in ``evaluate.json``."""
    out: dict[str, dict[str, float | None]] = {}
    for model in sorted(metrics):
        per_set = metrics[model]
        if not isinstance(per_set, dict):
            continue
        for name, m in per_set.items():
            if not isinstance(m, dict) or "macro_f1" not in m:
                continue
            row = out.setdefault(name, {})
            row[f"{model}_macro_f1"] = _rounded(m["macro_f1"])
            if model == "tcn" and name == real_set:
                for c, pc in (m.get("per_class") or {}).items():
                    row[f"tcn_recall_{c}"] = _rounded(pc.get("recall"))
                early = (m.get("early") or {}).get(HEADLINE_EARLY)
                if early:
                    row[f"tcn_macro_f1_{HEADLINE_EARLY}"] = _rounded(early.get("macro_f1"))
    return out


def _cut_tensors(curves: list, days: float, preprocessing: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """(oids, x) of every curve cut ``days`` after its own first detection (objects the GP cannot do are left out)."""
    t = tensorize_curves([cut_after_first(c, days) for c in curves], preprocessing.grid_days,
                         preprocessing.fit_context_days)
    return np.asarray([r["oid"] for r in t.rows], dtype=str), t.x


def _probabilities(model: ServingModel, x: np.ndarray) -> np.ndarray:
    # The network's own float32: the numbers of every earlier evaluation stay comparable bit for bit.
    return model.predict_proba(x, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------

def run(params: Params, paths: EvaluatePaths, progress: Progress | None = None,
        log_to_mlflow: bool = True) -> EvaluateResult:
    """Score the TCN (and the forest) on every data set; write metrics, plot data and figures; see the module."""
    step = or_silent(progress)
    started = time.perf_counter()
    ev = params.evaluate
    checkpoint = paths.model_dir / CHECKPOINT
    if not checkpoint.exists():
        raise FileNotFoundError(f"no trained model at {checkpoint}: run `deeprubin train` first")
    preprocessing = preprocessing_of(paths.processed_dir)

    tcn = load_checkpoint(checkpoint, preprocessing)
    classes = tcn.classes
    models = ["tcn"]
    forest = None
    forest_path = paths.model_dir / FOREST_MODEL
    skipped: dict[str, str] = {}
    if ev.baseline:
        if forest_path.exists():
            forest = BaselineForest.load(forest_path)
            models.append("forest")
        else:
            skipped["forest"] = f"{forest_path} not found: run `deeprubin baseline`"

    step("reading the test split")
    holdout = holdout_oids(ev.real, params.base)
    sets: list[EvalSet] = [split_test_set(params, paths.raw_dir, paths.processed_dir, holdout)]
    step(f"reading the held-out real set {ev.real.name}")
    real = real_set(params, preprocessing)
    if isinstance(real, str):
        skipped[ev.real.name] = real
    else:
        sets.append(real)
    step("reading the OGLE quasars and Cepheids as an alert stream")
    ogle, why = ogle_sets(params, preprocessing)
    sets += ogle
    skipped.update(why)

    metrics: dict[str, Any] = {name: {} for name in models}
    report: dict[str, Any] = {name: {} for name in models}
    extras: dict[tuple[str, str], dict] = {}
    total = len(sets) * len(ev.early_days)
    done = 0
    step("scoring", completed=0, total=total)
    for k, s in enumerate(sets):
        label_of = dict(zip(s.oids, s.labels))
        probs = {"tcn": _probabilities(tcn, s.x)}
        early = {"tcn": []}
        if forest is not None:
            f_oids, f_p = forest.predict_proba(s.detections)
            probs["forest"] = align(f_oids, f_p, s.oids, forest.classes, classes)
            early["forest"] = []
        curves = curves_from_detections(s.detections)
        for d in ev.early_days:
            cut_oids, cut_x = _cut_tensors(curves, d, preprocessing)
            keep = np.isin(cut_oids, s.oids)
            early["tcn"].append(early_rows(cut_oids[keep], _probabilities(tcn, cut_x[keep]), d, label_of, classes))
            if forest is not None:
                f_oids, f_p = forest.predict_proba(s.detections, until_days=d)
                keep = np.isin(f_oids.astype(str), s.oids)
                early["forest"].append(early_rows(f_oids[keep].astype(str),
                                                  align(f_oids[keep], f_p[keep], f_oids[keep], forest.classes,
                                                        classes), d, label_of, classes))
            done += 1
            step(f"scoring {s.name}: {d:g} days", completed=done, total=total)
        for name in probs:
            m, extra = score(s.labels, probs[name], s.oids, pd.concat(early[name], ignore_index=True), classes,
                             s.scored_classes, s.restrict, ev.n_bootstrap, ev.calibration_bins,
                             params.base.seed + 100 * k)
            if s.note:
                m["note"] = s.note
            m.update(s.counts)
            metrics[name][s.name] = m
            report[name][s.name] = {**extra["report"], "ece": m["ece"], "early": m.get("early", {}),
                                     "objects_hash": objects_hash(s.oids, s.labels)}
            extras[(name, s.name)] = extra

    step(f"writing {paths.metrics_dir}")
    figures = _write_outputs(paths, params, metrics, report, extras, sets, classes, skipped)
    metrics_path = paths.metrics_dir / METRICS
    report_path = paths.metrics_dir / EVALUATION_REPORT
    result = EvaluateResult(metrics=metrics, metrics_path=metrics_path, report_path=report_path, figures=figures,
                            skipped=skipped, headline_path=paths.metrics_dir / HEADLINE)
    train_report = paths.model_dir / TRAIN_REPORT
    if log_to_mlflow and train_report.exists():
        step("logging to MLflow")
        result.run_id = _log_to_mlflow(json.loads(train_report.read_text()), params, metrics, figures, report_path)
    result.seconds = time.perf_counter() - started
    return result


def _write_outputs(paths, params, metrics, report, extras, sets, classes, skipped) -> list[Path]:
    root = paths.metrics_dir
    plots, images = root / "plots", root / "figures"
    for d in (plots, images):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    out: list[Path] = []
    summary = {**metrics, "skipped": skipped} if skipped else metrics
    write_metrics_json(root / HEADLINE, headline_metrics(metrics, params.evaluate.real.name))
    write_metrics_json(root / METRICS, summary)
    write_metrics_json(root / EVALUATION_REPORT, {**report, "skipped": skipped})
    for s in sets:
        tcn = extras[("tcn", s.name)]
        write_plot_csv(plots / f"confusion_{s.name}.csv", confusion_plot_rows(tcn["confusion"], classes))
        write_plot_csv(plots / f"reliability_{s.name}.csv", tcn["reliability"])
        cm = tcn["report"]["confusion_matrix"]
        out.append(figs.plot_confusion_matrix(cm["counts"], cm["rows"], images / f"confusion_tcn_{s.name}.png",
                                         columns=cm["columns"], title=f"TCN on {s.name} (n={len(s.oids)})"))
        if ("forest", s.name) in extras:
            cmf = extras[("forest", s.name)]["report"]["confusion_matrix"]
            out.append(figs.plot_confusion_matrix(cmf["counts"], cmf["rows"], images / f"confusion_forest_{s.name}.png",
                                             columns=cmf["columns"], title=f"Random forest on {s.name}"))
        out.append(figs.plot_reliability(tcn["reliability"], images / f"reliability_{s.name}.png",
                                    title=f"TCN reliability on {s.name}"))
        curves = []
        for model in ("tcn", "forest"):
            if (model, s.name) in extras and len(extras[(model, s.name)]["early"]):
                c = extras[(model, s.name)]["early"].rename(columns={
                    "macro_f1": model, "macro_f1_low": f"{model}_low", "macro_f1_high": f"{model}_high",
                    "n_objects": f"{model}_n"}).drop(columns=["accuracy"])
                curves.append(c.set_index("days"))
        if curves:
            early = pd.concat(curves, axis=1).reset_index()
            write_plot_csv(plots / f"early_{s.name}.csv", early)
            out.append(figs.plot_early_curve(extras[("tcn", s.name)]["early"], images / f"early_tcn_{s.name}.png",
                                        title=f"TCN early classification on {s.name}"))
    # The paper's exploratory figures for this dataset version.
    objects = RawStore(paths.raw_dir).read().objects
    dist = figs.class_distribution(objects[["oid", "label", "source"]], classes=list(classes))
    write_plot_csv(plots / "class_distribution.csv", dist)
    out.append(figs.plot_class_distribution(dist, images / "class_distribution.png",
                                            title="Objects per class and source"))
    x, index = load_processed(paths.processed_dir)
    profiles = figs.mean_profiles(x, index["label"].astype(str).tolist(), classes=list(classes))
    write_plot_csv(plots / "mean_profiles.csv", profiles)
    out.append(figs.plot_mean_profiles(profiles, images / "mean_profiles.png",
                                       title="Mean GP light curve per class (±1σ across objects)"))
    return out


def _log_to_mlflow(train_report: dict, params: Params, metrics: dict, figures: list[Path], report: Path) -> str:
    import mlflow

    run_id = train_report["run_id"]
    client = mlflow.MlflowClient(tracking_uri=params.train.tracking_uri)
    flat = {}
    for model, per_set in metrics.items():
        for name, m in per_set.items():
            for key in ("macro_f1", "macro_f1_low", "macro_f1_high", "balanced_accuracy", "ece"):
                flat[f"eval/{model}/{name}/{key}"] = m[key]
            for c, pc in m["per_class"].items():
                flat[f"eval/{model}/{name}/recall_{c}"] = pc["recall"]
            for d, e in m.get("early", {}).items():
                flat[f"eval/{model}/{name}/macro_f1_at_{d}"] = e["macro_f1"]
    ts = int(time.time() * 1000)
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in flat.items()
                                      if v is not None and np.isfinite(v)])
    for path in figures:
        client.log_artifact(run_id, str(path), artifact_path="evaluation")
    client.log_artifact(run_id, str(report), artifact_path="evaluation")
    return run_id
