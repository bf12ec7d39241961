"""Stage ``evaluate``: the trained TCN (and the random-forest baseline) scored on held-out data.

Data sets:

- ``test``: the test split of ``data/processed`` (the same stratified split by object as training; simulated
  objects by default), all configured classes.
- ``evaluate.real.name`` (``bts``): the real labelled set's held-out objects (:mod:`deeprubin.realset`), read from
  its files and interpolated by the same code as inference; scored on ``evaluate.real.classes`` (SNIa vs SNII) with
  the prediction restricted to those classes, as the published baselines are. Skipped, and said so, when absent.

Per model and data set: macro-F1 with a bootstrap 95% interval (objects resampled), per-class precision, recall
(with interval) and F1, balanced accuracy, log loss, expected calibration error, the confusion matrix, and macro-F1
against days since first detection (``evaluate.early_days``): the light curves are cut ``d`` days after their first
detection and interpolated again (the GP sees only what an alert stream would have shown by then).

Outputs under ``evaluate.metrics_dir``: ``evaluate.json`` (DVC metrics: numbers only), ``report.json`` (everything,
incl. confusion matrices), ``plots/*.csv`` (DVC plot data: early curves, confusion pairs, reliability, class
distribution), ``figures/*.png`` (confusion matrices, reliability, early curves, class distribution, mean GP profile
per class). The numbers and figures are also logged to the training run in MLflow and the registered version is
tagged with the headline numbers by ``deeprubin register``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from deeprubin.config import Params
from deeprubin.evaluate import (
    bootstrap_ci,
    classification_metrics,
    confusion_rows,
    expected_calibration_error,
    early_classification_curve,
    macro_f1,
    plot_confusion_matrix,
    plot_early_curve,
    plot_reliability,
    reliability_curve,
    scalar_metrics,
    write_metrics_json,
    write_plot_csv,
)

Progress = Callable[..., None]
METRICS = "evaluate.json"
REPORT = "report.json"


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
class EvalSet:
    """Objects to score: their labels, full-curve model input, and detections (for early cuts and the forest)."""

    name: str
    oids: np.ndarray
    labels: np.ndarray
    x: np.ndarray
    detections: pd.DataFrame
    scored_classes: list[str]
    restrict: bool
    note: str = ""


@dataclass
class EvaluateResult:
    metrics: dict[str, Any]
    metrics_path: Path
    report_path: Path
    figures: list[Path]
    skipped: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------------------------
# Models as probability functions.

class TCNScorer:
    """The best checkpoint of the train stage as ``x (N, C, T) -> probabilities (N, K)`` on the CPU or GPU."""

    def __init__(self, checkpoint: Path):
        from deeprubin.models.lit import LitTCN

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.module = LitTCN.load_from_checkpoint(checkpoint, map_location=self.device).eval()
        self.classes = tuple(self.module.classes)

    @torch.no_grad()
    def __call__(self, x: np.ndarray, batch: int = 1024) -> np.ndarray:
        out = [torch.softmax(self.module(torch.from_numpy(np.ascontiguousarray(x[i:i + batch])).to(self.device)),
                             dim=1).cpu().numpy() for i in range(0, len(x), batch)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))


def _cut_tensors(curves: list, days: float, grid_days: int, fit_context_days: float) -> tuple[np.ndarray, np.ndarray]:
    """(oids, x) of every curve cut ``days`` after its own first detection (objects the GP cannot do are left out)."""
    from deeprubin.stages.preprocess import Curve, tensorize_curves

    cut = []
    for c in curves:
        keep = c.mjd <= c.mjd.min() + days
        cut.append(Curve(c.oid, c.mjd[keep], c.band[keep], c.flux[keep], c.flux_err[keep]))
    t = tensorize_curves(cut, grid_days, fit_context_days)
    return np.asarray([r["oid"] for r in t.rows], dtype=str), t.x


# ----------------------------------------------------------------------------------------------------------------
# Scoring.

def _restricted(proba: np.ndarray, classes: tuple[str, ...], scored: list[str]) -> np.ndarray:
    idx = [classes.index(c) for c in scored]
    p = np.zeros_like(proba)
    sub = proba[:, idx]
    p[:, idx] = sub / np.clip(sub.sum(axis=1, keepdims=True), 1e-12, None)
    return p


def score(y: np.ndarray, proba: np.ndarray, oids: np.ndarray, early: pd.DataFrame, classes: tuple[str, ...],
          scored: list[str], restrict: bool, n_boot: int, bins: int, seed: int) -> tuple[dict[str, Any], dict]:
    """Metrics of one model on one data set; ``early``: rows (oid, days, proba...) of predictions on cut curves.
    Returns (metrics for evaluate.json, extras: confusion, reliability and early frames)."""
    p = _restricted(proba, classes, scored) if restrict else proba
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
        pe = _restricted(pe, classes, scored) if restrict else pe
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


def _early_rows(oids: np.ndarray, proba: np.ndarray, days: float, label_of: dict[str, str],
                classes: tuple[str, ...]) -> pd.DataFrame:
    frame = pd.DataFrame(proba, columns=list(classes))
    frame.insert(0, "oid", oids)
    frame.insert(1, "days", float(days))
    frame.insert(2, "label", [label_of[o] for o in oids])
    return frame


# ----------------------------------------------------------------------------------------------------------------
# Data sets.

def _test_split(params: Params, paths: EvaluatePaths, holdout: np.ndarray) -> EvalSet:
    from deeprubin.data import ProcessedDataModule
    from deeprubin.store import RawStore

    dm = ProcessedDataModule(paths.processed_dir, classes=params.base.classes,
                             val_fraction=params.train.val_fraction, test_fraction=params.train.test_fraction,
                             seed=params.base.seed, holdout=holdout)
    dm.setup("test")
    # The data module's test rows, in index order, minus the real held-out objects (scored as their own set).
    test = dm.index.loc[dm.index["split"] == "test"]
    keep = ~test["oid"].astype(str).isin(set(map(str, holdout))).to_numpy()
    oids = test["oid"].astype(str).to_numpy()[keep]
    x = dm.dataset("test").tensors[0].numpy()[keep]
    det = RawStore(paths.raw_dir).read().detections
    det = det.loc[det["oid"].astype(str).isin(set(oids))].reset_index(drop=True)
    return EvalSet(name="test", oids=oids, labels=test["label"].to_numpy()[keep].astype(str), x=x, detections=det,
                   scored_classes=list(params.base.classes), restrict=False)


def _real_set(params: Params, grid_days: int, fit_context_days: float) -> EvalSet | str:
    from deeprubin.realset import load_heldout
    from deeprubin.stages.preprocess import tensorize

    real = load_heldout(params.evaluate.real, params.base)
    if real is None:
        return f"files not found ({params.evaluate.real.detections}, {params.evaluate.real.labels})"
    t = tensorize(real.detections, grid_days, fit_context_days)
    oids = np.asarray([r["oid"] for r in t.rows], dtype=str)
    note = f"{len(real.labels)} held-out objects, {len(t.skipped)} not interpolable" if t.skipped else ""
    return EvalSet(name=real.name, oids=oids, labels=real.labels.reindex(oids).to_numpy().astype(str), x=t.x,
                   detections=real.detections, scored_classes=list(params.evaluate.real.classes), restrict=True,
                   note=note)


# ----------------------------------------------------------------------------------------------------------------

def run(params: Params, paths: EvaluatePaths, progress: Progress | None = None,
        log_to_mlflow: bool = True) -> EvaluateResult:
    """Score the TCN (and the forest) on every data set; write metrics, plot data and figures; see the module."""
    from deeprubin.realset import holdout_oids
    from deeprubin.stages.preprocess import curves_from_detections
    from deeprubin.stages.train import CHECKPOINT, REPORT as TRAIN_REPORT

    step = progress or (lambda *_a, **_k: None)
    started = time.perf_counter()
    ev = params.evaluate
    checkpoint = paths.model_dir / CHECKPOINT
    if not checkpoint.exists():
        raise FileNotFoundError(f"no trained model at {checkpoint}: run `deeprubin train` first")
    manifest = json.loads((paths.processed_dir / "manifest.json").read_text())
    grid_days = int(manifest["config"]["grid_days"])
    fit_context = float(manifest["config"]["fit_context_days"])

    tcn = TCNScorer(checkpoint)
    classes = tcn.classes
    models = ["tcn"]
    forest = None
    forest_path = paths.model_dir / "forest.joblib"
    skipped: dict[str, str] = {}
    if ev.baseline:
        if forest_path.exists():
            from deeprubin.baseline import BaselineForest

            forest = BaselineForest.load(forest_path)
            models.append("forest")
        else:
            skipped["forest"] = f"{forest_path} not found: run `deeprubin baseline`"

    step("reading the test split")
    holdout = holdout_oids(ev.real, params.base)
    sets = [_test_split(params, paths, holdout)]
    step(f"reading the held-out real set {ev.real.name}")
    real = _real_set(params, grid_days, fit_context)
    if isinstance(real, str):
        skipped[ev.real.name] = real
    else:
        sets.append(real)

    metrics: dict[str, Any] = {name: {} for name in models}
    report: dict[str, Any] = {name: {} for name in models}
    extras: dict[tuple[str, str], dict] = {}
    total = len(sets) * len(ev.early_days)
    done = 0
    step("scoring", completed=0, total=total)
    for k, s in enumerate(sets):
        label_of = dict(zip(s.oids, s.labels))
        probs = {"tcn": tcn(s.x)}
        early = {"tcn": []}
        if forest is not None:
            f_oids, f_p = forest.predict_proba(s.detections)
            probs["forest"] = _align(f_oids, f_p, s.oids, forest.classes, classes)
            early["forest"] = []
        curves = curves_from_detections(s.detections)
        for d in ev.early_days:
            cut_oids, cut_x = _cut_tensors(curves, d, grid_days, fit_context)
            keep = np.isin(cut_oids, s.oids)
            early["tcn"].append(_early_rows(cut_oids[keep], tcn(cut_x[keep]), d, label_of, classes))
            if forest is not None:
                f_oids, f_p = forest.predict_proba(s.detections, until_days=d)
                keep = np.isin(f_oids.astype(str), s.oids)
                early["forest"].append(_early_rows(f_oids[keep].astype(str),
                                                   _align(f_oids[keep], f_p[keep], f_oids[keep], forest.classes,
                                                          classes), d, label_of, classes))
            done += 1
            step(f"scoring {s.name}: {d:g} days", completed=done, total=total)
        for name in probs:
            m, extra = score(s.labels, probs[name], s.oids, pd.concat(early[name], ignore_index=True), classes,
                             s.scored_classes, s.restrict, ev.n_bootstrap, ev.calibration_bins,
                             params.base.seed + 100 * k)
            if s.note:
                m["note"] = s.note
            metrics[name][s.name] = m
            report[name][s.name] = {**extra["report"], "ece": m["ece"], "early": m.get("early", {}),
                                     "objects_hash": objects_hash(s.oids, s.labels)}
            extras[(name, s.name)] = extra

    step(f"writing {paths.metrics_dir}")
    figures = _write_outputs(paths, params, metrics, report, extras, sets, classes, skipped)
    metrics_path = paths.metrics_dir / METRICS
    report_path = paths.metrics_dir / REPORT
    result = EvaluateResult(metrics=metrics, metrics_path=metrics_path, report_path=report_path, figures=figures,
                            skipped=skipped)
    train_report = paths.model_dir / TRAIN_REPORT
    if log_to_mlflow and train_report.exists():
        step("logging to MLflow")
        result.run_id = _log_to_mlflow(json.loads(train_report.read_text()), params, metrics, figures, report_path)
    result.seconds = time.perf_counter() - started
    return result


def objects_hash(oids: np.ndarray, labels: np.ndarray) -> str:
    """Fingerprint of an evaluation set (its objects and labels): two models' numbers compare only when it matches."""
    import hashlib

    pairs = sorted(zip(map(str, oids), map(str, labels)))
    return "sha256:" + hashlib.sha256("\n".join(f"{o}\t{label}" for o, label in pairs).encode()).hexdigest()


def _align(src_oids: np.ndarray, proba: np.ndarray, oids: np.ndarray, src_classes, classes) -> np.ndarray:
    """Rows of ``proba`` (columns ``src_classes``) reordered to ``oids`` and columns to ``classes``."""
    pos = {str(o): i for i, o in enumerate(src_oids)}
    out = np.zeros((len(oids), len(classes)))
    col = {c: i for i, c in enumerate(src_classes)}
    rows = np.asarray([pos[str(o)] for o in oids], dtype=np.int64)
    for j, c in enumerate(classes):
        if c in col and len(rows):
            out[:, j] = proba[rows, col[c]]
    return out


def _write_outputs(paths, params, metrics, report, extras, sets, classes, skipped) -> list[Path]:
    import shutil

    from deeprubin import figures as figs
    from deeprubin.stages.preprocess import load_processed
    from deeprubin.store import RawStore

    root = paths.metrics_dir
    plots, images = root / "plots", root / "figures"
    for d in (plots, images):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    out: list[Path] = []
    summary = {**metrics, "skipped": skipped} if skipped else metrics
    write_metrics_json(root / METRICS, summary)
    write_metrics_json(root / REPORT, {**report, "skipped": skipped})
    for s in sets:
        tcn = extras[("tcn", s.name)]
        write_plot_csv(plots / f"confusion_{s.name}.csv", tcn["confusion"])
        write_plot_csv(plots / f"reliability_{s.name}.csv", tcn["reliability"])
        cm = tcn["report"]["confusion_matrix"]
        out.append(plot_confusion_matrix(cm["counts"], cm["rows"], images / f"confusion_tcn_{s.name}.png",
                                         columns=cm["columns"], title=f"TCN on {s.name} (n={len(s.oids)})"))
        if ("forest", s.name) in extras:
            cmf = extras[("forest", s.name)]["report"]["confusion_matrix"]
            out.append(plot_confusion_matrix(cmf["counts"], cmf["rows"], images / f"confusion_forest_{s.name}.png",
                                             columns=cmf["columns"], title=f"Random forest on {s.name}"))
        out.append(plot_reliability(tcn["reliability"], images / f"reliability_{s.name}.png",
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
            out.append(plot_early_curve(extras[("tcn", s.name)]["early"], images / f"early_tcn_{s.name}.png",
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
