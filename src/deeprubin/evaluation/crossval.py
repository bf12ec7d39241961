"""Repeated stratified k-fold cross-validation on the real labelled set: the TCN and the forest on identical folds.

One held-out split of 500 objects gives macro-F1 intervals of about ±0.05, too wide to tell 0.87 from 0.90. Here
every real object is a test object once per repeat, so the numbers rest on all of them (``deeprubin evaluate --cv``,
settings ``evaluate.cv``).

- **Objects**: every labelled object of ``evaluate.real`` in its classes (the BTS SN Ia and SN II), whether or not
  ``evaluate.real.test_fraction`` holds it out, that ``data/processed`` holds (ingested with
  ``ingest.mix_files: true``) and whose whole curve the GP interpolates.
- **Folds**: scikit-learn's ``StratifiedKFold(evaluate.cv.folds, shuffle=True, random_state=base.seed + repeat)``
  over objects, for each of ``evaluate.cv.repeats`` repeats.
- **Training, per fold**: the ``train`` stage itself (handed in by the caller: evaluation does not import stages)
  on ``data/processed`` with ``holdout`` = the fold's test objects, which puts them in its test split, never trained
  or early-stopped on; everything else (the simulated objects, the other folds' real objects) goes through the
  stage's own recipe (``train.*``: its train/validation split, augmentation, early stopping, calibration), logged to
  MLflow as a child run of the cross-validation run. The forest (``evaluate.forest_trees``,
  ``evaluate.forest_truncations``) is trained on the same training objects (the data module's train split, less the
  simulated objects ``train.simulated_classes`` leaves out, as the train stage does); a fold whose TCN reports other
  training class counts stops the run.
- **Scoring**: both models on the fold's test objects, on whole curves and on curves cut ``evaluate.cv.days`` after
  the first detection (GP refitted on the cut curve; forest features from it), predictions restricted to the set's
  classes (SN Ia vs SN II), as ``evaluate`` scores the real set. An object whose cut curve the GP cannot interpolate
  is left out at that age for both models, so every comparison is paired.
- **Computed once, not per fold**: the GP tensors of every object, whole and at each age, and the forest features
  of every object (training rows: whole curves and their ``evaluate.forest_truncations`` cuts; test rows: whole and
  each age). The training stage's own augmentation views are the stage's business and are made per fold.
- **Numbers** per model and age: macro-F1, SN Ia and SN II recall per fold; their mean and standard deviation over
  the folds (of all repeats); and on the pooled out-of-fold predictions a bootstrap 95 % interval over objects (all
  of an object's predictions, one per repeat, are resampled together). Paired TCN - forest differences: per fold
  (mean, standard deviation, folds where the TCN is at or above the forest) and a paired bootstrap interval of the
  pooled difference (the same resampled objects for both models).

The standard deviation over folds understates the uncertainty of a k-fold mean (the training sets overlap; Bengio
and Grandvalet 2004): read it as the spread between folds, and the pooled interval as the uncertainty that the finite
number of objects leaves.

Outputs in ``evaluate.metrics_dir``: :data:`RESULTS` (settings, per-fold numbers and timings, summaries),
:data:`TABLE` (the Markdown tables, for the README), :data:`PREDICTIONS` (every out-of-fold prediction, so that two
recipes can be compared object by object) and an MLflow run in ``evaluate.cv.experiment`` with the means and
intervals as metrics and the three files as artifacts.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from deeprubin.config import Params
from deeprubin.data import ProcessedDataModule
from deeprubin.evaluation.metrics import bootstrap_ci, encode_labels, macro_f1, write_metrics_json
from deeprubin.evaluation.scoring import align, restricted
from deeprubin.evaluation.sets import load_labelled
from deeprubin.lightcurves.tensorize import curves_from_detections, cut_after_first, tensorize_curves
from deeprubin.models.forest import BaselineForest, extract_features
from deeprubin.models.served import load_checkpoint
from deeprubin.processed import INDEX, Preprocessing, preprocessing_of
from deeprubin.progress import Progress, or_silent
from deeprubin.store import RawStore

RESULTS = "real_cv.json"
TABLE = "real_cv.md"
PREDICTIONS = "real_cv_predictions.parquet"
WHOLE = "whole"  # the age of a whole light curve
MODELS = ("tcn", "forest")
MODEL_NAMES = {"tcn": "TCN", "forest": "forest"}


class TrainStage(Protocol):
    """What cross-validation uses of :mod:`deeprubin.stages.train` (the caller passes the module in): its
    ``TrainPaths`` (``from_params``, a dataclass with ``holdout``) and ``run``, whose result has ``checkpoint``,
    ``run_id``, ``epochs`` and ``class_counts``."""

    TrainPaths: Any

    def run(self, params: Params, paths: Any, progress: Progress | None = None) -> Any: ...


@dataclass(frozen=True)
class Fold:
    repeat: int
    fold: int
    test: np.ndarray  # sorted oids of the fold's test objects


def make_folds(oids: Sequence[str], labels: Sequence[str], folds: int, repeats: int = 1, seed: int = 42
               ) -> list[Fold]:
    """Stratified k-fold by object, ``repeats`` times (seed ``seed + repeat``); every object is a test object
    exactly once per repeat. Depends only on the set of (oid, label) pairs, not on their order."""
    from sklearn.model_selection import StratifiedKFold

    oids = np.asarray(oids, dtype=str)
    labels = np.asarray(labels, dtype=str)
    if len(set(oids)) != len(oids):
        raise ValueError("make_folds needs one row per object")
    order = np.argsort(oids, kind="stable")
    oids, labels = oids[order], labels[order]
    counts = pd.Series(labels).value_counts()
    if folds < 2 or (counts < folds).any():
        raise ValueError(f"{folds} folds need at least {max(folds, 2)} objects of every class; have "
                         f"{counts.to_dict()}")
    out = []
    for r in range(repeats):
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        for k, (_, test) in enumerate(splitter.split(oids, labels)):
            out.append(Fold(repeat=r, fold=k, test=np.sort(oids[test])))
    return out


def age_name(days: float | None) -> str:
    return WHOLE if days is None else f"{days:g}d"


@dataclass
class Inputs:
    """What no fold changes: the objects, their GP tensors and forest features at every age, and the forest's
    training rows of every labelled object in ``data/processed``."""

    labels: pd.Series  # oid -> class of the cross-validated objects (sorted)
    ages: list[tuple[str, float | None]]
    tensors: dict[str, tuple[np.ndarray, np.ndarray]]  # age -> (oids, x)
    test_features: dict[str, pd.DataFrame]  # age -> features of the cross-validated objects (index oid)
    train_features: pd.DataFrame  # index oid, repeated: whole curves and the forest's truncations
    train_labels: np.ndarray
    dropped: dict[str, int]
    seconds: float = 0.0


def prepare_inputs(params: Params, raw_dir: Path, processed_dir: Path, preprocessing: Preprocessing,
                   progress: Progress | None = None) -> Inputs:
    step = or_silent(progress)
    started = time.perf_counter()
    ev = params.evaluate
    real = load_labelled(ev.real)
    if real is None:
        raise FileNotFoundError(f"the real set's files are absent ({ev.real.detections}, {ev.real.labels}): "
                                "cross-validation folds its objects")
    step("reading the processed objects")
    processed = pd.read_parquet(Path(processed_dir) / INDEX, columns=["oid"])["oid"].astype(str)
    dropped = dict(real.dropped)
    present = real.labels.index.isin(set(processed))
    if not present.any():
        raise ValueError(f"none of the {len(real.labels)} objects of the real set {ev.real.name} is in "
                         f"{processed_dir}: the folds train on the other folds' real objects, so ingest them with "
                         "`ingest.mix_files: true` and preprocess first (`dvc repro preprocess`)")
    if (~present).sum():
        dropped["not in the processed data"] = int((~present).sum())
    labels = real.labels[present]
    det = real.detections.loc[real.detections["oid"].astype(str).isin(set(labels.index))]
    curves = curves_from_detections(det)
    ages = [(WHOLE, None)] + [(age_name(float(d)), float(d)) for d in ev.cv.days]
    tensors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, days in ages:
        step(f"GP of {len(curves)} objects, {name}")
        cut = curves if days is None else [cut_after_first(c, days) for c in curves]
        t = tensorize_curves(cut, preprocessing.grid_days, preprocessing.fit_context_days)
        tensors[name] = (np.asarray([r["oid"] for r in t.rows], dtype=str), t.x)
    whole = set(tensors[WHOLE][0])
    if len(whole) < len(labels):
        dropped["whole curve not interpolable"] = len(labels) - len(whole)
        labels = labels[labels.index.isin(whole)]
        det = det.loc[det["oid"].astype(str).isin(whole)]
    test_features = {}
    for name, days in ages:
        step(f"forest features of {len(labels)} objects, {name}")
        test_features[name] = extract_features(det, until_days=days, n_jobs=-1)
    step("forest training features of every labelled object")
    every = _processed_labels(params)
    forest = _forest(params)
    raw = RawStore(raw_dir).read().detections
    raw = raw.loc[raw["oid"].astype(str).isin(set(every.index))]
    train_features, train_labels = forest.training_features(raw, every)
    return Inputs(labels=labels.sort_index(), ages=ages, tensors=tensors, test_features=test_features,
                  train_features=train_features, train_labels=np.asarray(train_labels, dtype=str), dropped=dropped,
                  seconds=time.perf_counter() - started)


def _data_module(params: Params, holdout: Sequence[str], simulated_classes: bool = True) -> ProcessedDataModule:
    """The train stage's split (the same classes, fractions, seed, held-out objects and, with
    ``simulated_classes``, the simulated objects ``train.simulated_classes`` leaves out of training)."""
    keep = params.train.simulated_classes if simulated_classes else None
    dm = ProcessedDataModule(params.preprocess.processed_dir, classes=params.base.classes,
                             val_fraction=params.train.val_fraction, test_fraction=params.train.test_fraction,
                             seed=params.base.seed, holdout=holdout, simulated_classes=keep,
                             raw_dir=params.ingest.raw_dir if keep is not None else None)
    dm.setup("fit")
    return dm


def _processed_labels(params: Params) -> pd.Series:
    index = _data_module(params, (), simulated_classes=False).index
    return index.set_index(index["oid"].astype(str))["label"].astype(str).sort_index()


def _forest(params: Params) -> BaselineForest:
    # n_jobs only spreads the trees and features over the cores: the result is the same for any value.
    return BaselineForest(classes=tuple(params.base.classes), n_estimators=params.evaluate.forest_trees,
                          truncations=tuple(params.evaluate.forest_truncations), seed=params.base.seed, n_jobs=-1)


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def _predicted(p: np.ndarray, scored_idx: np.ndarray) -> np.ndarray:
    return scored_idx[p[:, scored_idx].argmax(axis=1)]


def metric_functions(classes: tuple[str, ...], scored: list[str]) -> dict[str, Callable[[Any, Any], float]]:
    """``macro_f1`` and ``recall_<class>`` of (integer labels, probabilities), predictions restricted to
    ``scored`` (the same definitions as ``evaluate``)."""
    idx = np.asarray([classes.index(c) for c in scored])

    def f1(y, p) -> float:
        return macro_f1(y, p, classes, labels=scored, restrict_predictions=True)

    def recall(c: int):
        def fn(y, p) -> float:
            rows = y == c
            return float(np.mean(_predicted(p[rows], idx) == c)) if rows.any() else float("nan")

        return fn

    return {"macro_f1": f1, **{f"recall_{classes[i]}": recall(int(i)) for i in idx}}


def _spread(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=float)
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            "min": float(np.min(v)), "max": float(np.max(v)), "per_fold": [float(x) for x in v]}


def summarise(predictions: pd.DataFrame, classes: tuple[str, ...], scored: list[str], n_boot: int, seed: int
              ) -> tuple[pd.DataFrame, dict, dict]:
    """(per-fold metrics, summary per model and age, paired TCN - forest differences per age) of the out-of-fold
    ``predictions`` (columns repeat, fold, model, age, oid, label and one per class)."""
    fns = metric_functions(classes, scored)
    cols = list(classes)
    k = len(cols)
    records = []
    for (model, age, r, f), g in predictions.groupby(["model", "age", "repeat", "fold"], sort=False):
        y, p = encode_labels(g["label"].to_numpy(), classes), restricted(g[cols].to_numpy(), classes, scored)
        records.append({"model": model, "age": age, "repeat": int(r), "fold": int(f), "n": len(g),
                        **{name: fn(y, p) for name, fn in fns.items()}})
    per_fold = pd.DataFrame.from_records(records)
    summary: dict[str, dict] = {}
    paired: dict[str, dict] = {}
    ages = list(dict.fromkeys(predictions["age"]))
    for model in MODELS:
        summary[model] = {}
        for a, age in enumerate(ages):
            rows = per_fold[(per_fold["model"] == model) & (per_fold["age"] == age)]
            g = predictions[(predictions["model"] == model) & (predictions["age"] == age)]
            if rows.empty:
                continue
            y, p = encode_labels(g["label"].to_numpy(), classes), restricted(g[cols].to_numpy(), classes, scored)
            out: dict[str, Any] = {"n_folds": len(rows), "n_predictions": len(g), "n_objects": int(g["oid"].nunique())}
            for j, (name, fn) in enumerate(fns.items()):
                ci = bootstrap_ci(fn, y, p, n_boot=n_boot, seed=seed + 10 * a + j, groups=g["oid"].to_numpy())
                out[name] = {**_spread(rows[name]), "pooled": ci["estimate"], "pooled_low": ci["low"],
                             "pooled_high": ci["high"]}
            summary[model][age] = out
    for a, age in enumerate(ages):
        t = predictions[(predictions["model"] == "tcn") & (predictions["age"] == age)]
        f = predictions[(predictions["model"] == "forest") & (predictions["age"] == age)]
        if t.empty or f.empty:
            continue
        key = ["repeat", "oid"]
        t, f = t.sort_values(key, kind="mergesort"), f.sort_values(key, kind="mergesort")
        if len(t) != len(f) or not (t[key].to_numpy() == f[key].to_numpy()).all():
            raise AssertionError(f"the TCN and the forest were not scored on the same objects at {age}")
        y = encode_labels(t["label"].to_numpy(), classes)
        both = np.hstack([restricted(t[cols].to_numpy(), classes, scored),
                          restricted(f[cols].to_numpy(), classes, scored)])
        rt = per_fold[(per_fold["model"] == "tcn") & (per_fold["age"] == age)].set_index(["repeat", "fold"])
        rf = per_fold[(per_fold["model"] == "forest") & (per_fold["age"] == age)].set_index(["repeat", "fold"])
        rf = rf.reindex(rt.index)
        out = {"n_folds": len(rt)}
        for j, (name, fn) in enumerate(fns.items()):
            diff = (rt[name] - rf[name]).to_numpy(dtype=float)

            def paired_fn(yy, pp, fn=fn):
                return fn(yy, pp[:, :k]) - fn(yy, pp[:, k:])

            ci = bootstrap_ci(paired_fn, y, both, n_boot=n_boot, seed=seed + 1000 + 10 * a + j,
                              groups=t["oid"].to_numpy())
            out[name] = {**_spread(diff), "pooled": ci["estimate"], "pooled_low": ci["low"],
                         "pooled_high": ci["high"], "folds_tcn_at_or_above": int(np.sum(diff >= -1e-12))}
        paired[age] = out
    return per_fold, summary, paired


# ----------------------------------------------------------------------------------------------------------------
# The table


def _pm(m: dict) -> str:
    return f"{m['mean']:.3f} ± {m['std']:.3f}"


def _ci(m: dict) -> str:
    return f"{m['pooled']:.3f} [{m['pooled_low']:.3f}, {m['pooled_high']:.3f}]"


def _signed(m: dict) -> str:
    return f"{m['mean']:+.3f} ± {m['std']:.3f}"


def _signed_ci(m: dict) -> str:
    return f"{m['pooled']:+.3f} [{m['pooled_low']:+.3f}, {m['pooled_high']:+.3f}]"


def markdown(results: dict[str, Any]) -> str:
    """The Markdown tables of :func:`run`'s results (what :data:`TABLE` holds)."""
    s = results["settings"]
    scored = s["scored_classes"]
    recalls = [f"recall_{c}" for c in scored]
    objects = ", ".join(f"{c} {n}" for c, n in s["objects"].items())
    lines = [
        (f"Cross-validation on the real set `{s['real_set']}` ({objects}): {s['folds']}-fold stratified by object, "
         f"{s['repeats']} repeat(s), seed {s['seed']}. Each fold's TCN (`train.*`: {s['train']['max_epochs']} epochs "
         f"at most, hidden {s['train']['hidden']}, truncations {s['train']['truncations']}) and forest "
         f"({s['forest']['trees']} trees) train on the same objects: the simulator's and the other folds' real "
         f"ones. {scored[0]} vs {scored[1]}, predictions restricted to the two. mean ± std over the "
         f"{s['folds'] * s['repeats']} folds; pooled: all out-of-fold predictions, bootstrap 95 % interval over "
         f"objects ({s['n_bootstrap']} resamples). Age: whole curves or cut that many days after the first "
         "detection."),
        "",
        "| model | age | n | macro-F1 (mean ± std) | macro-F1 pooled [95 % CI] | "
        + " | ".join(f"{c} recall (mean ± std)" for c in scored) + " | per-fold macro-F1 |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in scored) + " | --- |",
    ]
    for model in MODELS:
        for age, m in results["summary"].get(model, {}).items():
            folds = " ".join(f"{v:.3f}" for v in m["macro_f1"]["per_fold"])
            lines.append(f"| {MODEL_NAMES[model]} | {age} | {m['n_objects']} | {_pm(m['macro_f1'])} | "
                         f"{_ci(m['macro_f1'])} | " + " | ".join(_pm(m[r]) for r in recalls) + f" | {folds} |")
    lines += [
        "",
        "Paired, TCN − forest on identical folds (per fold: mean ± std; pooled: paired bootstrap over objects):",
        "",
        "| age | Δ macro-F1 (mean ± std) | Δ macro-F1 pooled [95 % CI] | folds TCN ≥ forest | "
        + " | ".join(f"Δ {c} recall (mean ± std)" for c in scored) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in scored) + " |",
    ]
    for age, m in results["paired"].items():
        lines.append(f"| {age} | {_signed(m['macro_f1'])} | {_signed_ci(m['macro_f1'])} | "
                     f"{m['macro_f1']['folds_tcn_at_or_above']}/{m['n_folds']} | "
                     + " | ".join(_signed(m[r]) for r in recalls) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class CVResult:
    results: dict[str, Any]
    predictions: pd.DataFrame
    table: str
    paths: dict[str, Path]
    run_id: str | None = None
    folds: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _class_counts(labels: pd.Series | np.ndarray, classes: Sequence[str]) -> dict[str, int]:
    values = pd.Series(np.asarray(labels, dtype=str)).value_counts()
    return {c: int(values.get(c, 0)) for c in classes}


def _fold_params(params: Params, model_dir: Path) -> Params:
    fold = params.model_copy(deep=True)
    fold.train.model_dir = model_dir
    fold.train.experiment = params.evaluate.cv.experiment
    return fold


def run(params: Params, train_stage: TrainStage, progress: Progress | None = None, log_to_mlflow: bool = True,
        on_fold: Callable[[dict[str, Any]], None] | None = None) -> CVResult:
    """Cross-validate the TCN (trained by ``train_stage``, i.e. :mod:`deeprubin.stages.train`) and the forest on the
    real set; write the outputs and the MLflow run. See the module docstring."""
    step = or_silent(progress)
    started = time.perf_counter()
    ev, base, cv = params.evaluate, params.base, params.evaluate.cv
    raw_dir, processed_dir = Path(params.ingest.raw_dir), Path(params.preprocess.processed_dir)
    if not (processed_dir / INDEX).exists():
        raise FileNotFoundError(f"no processed tensors in {processed_dir}: run `dvc repro preprocess` (or "
                                "`deeprubin ingest` and `deeprubin preprocess`) with ingest.mix_files: true first")
    classes = tuple(base.classes)
    scored = list(ev.real.classes)
    preprocessing = preprocessing_of(processed_dir)
    inputs = prepare_inputs(params, raw_dir, processed_dir, preprocessing, step)
    folds = make_folds(inputs.labels.index, inputs.labels.to_numpy(), cv.folds, cv.repeats, base.seed)
    label_of = inputs.labels.to_dict()

    client = parent = None
    if log_to_mlflow:
        client, parent = _start_mlflow_run(params)
    parts: list[pd.DataFrame] = []
    fold_reports: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="deeprubin-cv-") as scratch:
            for i, fold in enumerate(folds):
                name = f"repeat {fold.repeat + 1}/{cv.repeats}, fold {fold.fold + 1}/{cv.folds}"
                t0 = time.perf_counter()
                step(f"{name}: training the TCN", completed=i, total=len(folds))
                model_dir = Path(scratch) / f"r{fold.repeat}f{fold.fold}"
                fold_params = _fold_params(params, model_dir)
                # The stage's own paths for these params (model_dir: the fold's), the fold's test objects held out.
                paths = replace(train_stage.TrainPaths.from_params(fold_params), holdout=tuple(map(str, fold.test)))
                trained = train_stage.run(fold_params, paths)
                t1 = time.perf_counter()
                if client is not None:
                    client.set_tag(trained.run_id, "mlflow.parentRunId", parent)
                    client.set_tag(trained.run_id, "cv_fold", f"r{fold.repeat}f{fold.fold}")

                step(f"{name}: training the forest", completed=i, total=len(folds))
                index = _data_module(params, fold.test).index
                train = index.loc[index["split"] == "train"]
                if set(train["oid"].astype(str)) & set(map(str, fold.test)):  # never: held out means test split
                    raise AssertionError(f"{name}: test objects among the training objects")
                rows = inputs.train_features.index.isin(set(train["oid"].astype(str)))
                forest_counts = _class_counts(train["label"], classes)
                tcn_counts = getattr(trained, "class_counts", {}).get("train")
                if tcn_counts is not None and {c: int(tcn_counts.get(c, 0)) for c in classes} != forest_counts:
                    raise AssertionError(f"{name}: the TCN trained on {tcn_counts}, the forest on {forest_counts}: "
                                         "the train stage's split is not the data module's")
                forest = _forest(params).fit_features(inputs.train_features.loc[rows], inputs.train_labels[rows])
                t2 = time.perf_counter()

                step(f"{name}: scoring", completed=i, total=len(folds))
                tcn = load_checkpoint(trained.checkpoint, preprocessing)
                test = set(map(str, fold.test))
                for age, _ in inputs.ages:
                    oids, x = inputs.tensors[age]
                    keep = np.fromiter((o in test for o in oids), dtype=bool, count=len(oids))
                    oids = oids[keep]
                    p_tcn = align(oids, tcn.predict_proba(x[keep], dtype=np.float32), oids, tcn.classes, classes)
                    feats = inputs.test_features[age].reindex(oids)
                    p_forest = align(oids, forest.proba_from_features(feats), oids, forest.classes, classes)
                    for model, p in (("tcn", p_tcn), ("forest", p_forest)):
                        frame = pd.DataFrame(p, columns=list(classes))
                        frame.insert(0, "repeat", fold.repeat)
                        frame.insert(1, "fold", fold.fold)
                        frame.insert(2, "model", model)
                        frame.insert(3, "age", age)
                        frame.insert(4, "oid", oids)
                        frame.insert(5, "label", [label_of[o] for o in oids])
                        parts.append(frame)
                t3 = time.perf_counter()
                report = {"repeat": fold.repeat, "fold": fold.fold,
                          "test_objects": _class_counts(inputs.labels.reindex(fold.test), scored),
                          "train_objects": forest_counts, "tcn_run_id": getattr(trained, "run_id", None),
                          "tcn_epochs": getattr(trained, "epochs", None),
                          "seconds": {"tcn": round(t1 - t0, 1), "forest": round(t2 - t1, 1),
                                      "scoring": round(t3 - t2, 1), "total": round(t3 - t0, 1)}}
                fold_reports.append(report)
                if on_fold is not None:
                    on_fold(report)
        step("summarising", completed=len(folds), total=len(folds))
        predictions = pd.concat(parts, ignore_index=True)
        per_fold, summary, paired = summarise(predictions, classes, scored, ev.n_bootstrap, base.seed)
        results = {
            "settings": {"real_set": ev.real.name, "scored_classes": scored, "classes": list(classes),
                         "folds": cv.folds, "repeats": cv.repeats, "seed": base.seed,
                         "ages": [a for a, _ in inputs.ages], "n_bootstrap": ev.n_bootstrap,
                         "objects": _class_counts(inputs.labels, scored), "dropped": inputs.dropped,
                         "train": params.train.model_dump(mode="json"),
                         "forest": {"trees": ev.forest_trees, "truncations": list(ev.forest_truncations)},
                         "preprocessing": preprocessing.as_dict(), "processed_dir": str(processed_dir),
                         "experiment": cv.experiment, "mlflow_run_id": parent},
            "folds": fold_reports,
            "per_fold": {m: {a: g.drop(columns=["model", "age"]).to_dict("records")
                             for a, g in per_fold[per_fold["model"] == m].groupby("age", sort=False)}
                         for m in MODELS},
            "summary": summary,
            "paired": paired,
            "seconds": {"inputs": round(inputs.seconds, 1), "total": round(time.perf_counter() - started, 1)},
        }
        table = markdown(results)
        out = Path(ev.metrics_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths_out = {"results": write_metrics_json(out / RESULTS, results), "table": out / TABLE,
                     "predictions": out / PREDICTIONS}
        paths_out["table"].write_text(table)
        predictions.to_parquet(paths_out["predictions"], index=False)
        if client is not None:
            _finish_mlflow_run(client, parent, results, paths_out)
    except BaseException:
        if client is not None:
            client.set_terminated(parent, status="FAILED")
        raise
    return CVResult(results=results, predictions=predictions, table=table, paths=paths_out, run_id=parent,
                    folds=fold_reports, seconds=time.perf_counter() - started)


def _start_mlflow_run(params: Params) -> tuple[Any, str]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=params.train.tracking_uri)
    name = params.evaluate.cv.experiment
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(
        name, artifact_location=params.train.artifact_location)
    run = client.create_run(experiment_id, run_name=f"cv-{params.evaluate.real.name}-{params.evaluate.cv.folds}x"
                                                    f"{params.evaluate.cv.repeats}", tags={"stage": "crossval"})
    cv = params.evaluate.cv
    flat = {"cv.folds": cv.folds, "cv.repeats": cv.repeats, "cv.days": list(cv.days), "base.seed": params.base.seed,
            "evaluate.forest_trees": params.evaluate.forest_trees,
            "evaluate.forest_truncations": list(params.evaluate.forest_truncations),
            **{f"train.{k}": v for k, v in params.train.model_dump(mode="json").items()
               if k not in ("tracking_uri", "artifact_location", "model_dir")}}
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])
    return client, run.info.run_id


def _finish_mlflow_run(client: Any, run_id: str, results: dict, paths: dict[str, Path]) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    flat: dict[str, float] = {}
    for model, per_age in results["summary"].items():
        for age, m in per_age.items():
            for name, v in m.items():
                if isinstance(v, dict):
                    for key in ("mean", "std", "pooled", "pooled_low", "pooled_high"):
                        flat[f"cv/{model}/{age}/{name}_{key}"] = v[key]
    for age, m in results["paired"].items():
        for name, v in m.items():
            if isinstance(v, dict):
                for key in ("mean", "std", "pooled", "pooled_low", "pooled_high"):
                    flat[f"cv/tcn_minus_forest/{age}/{name}_{key}"] = v[key]
    metrics = [Metric(k, float(v), ts, 0) for k, v in flat.items() if v is not None and np.isfinite(v)]
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i:i + 500])
    for path in paths.values():
        client.log_artifact(run_id, str(path), artifact_path="cv")
    client.set_terminated(run_id)
