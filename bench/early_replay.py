"""Early classification, measured: the served model on the real BTS supernovae, replayed alert by alert.

    python bench/early_replay.py                          # models:/deeprubin-tcn@champion in sqlite:///mlflow.db
    python bench/early_replay.py --model models:/deeprubin-tcn/3 --tracking-uri http://127.0.0.1:5000
    python bench/early_replay.py --max-objects 200        # a quicker stratified subset
    python bench/early_replay.py --objects all            # every SN Ia / SN II, not only the held-out ones
    python bench/early_replay.py --markdown docs/early.md # also write the Markdown table (for the README)

Data: data/bts (shipped; else ../shared/data/bts or $DEEPRUBIN_SHARED_DATA/bts; or --data). By default the objects ``deeprubin evaluate``
holds out of the real set (:func:`deeprubin.evaluation.sets.load_heldout`: 30 % of each class by a seeded hash of the oid),
which no training run sees even with ``ingest.mix_files``; ``--objects all`` takes every SN Ia and SN II.

Protocol: every detection of every object becomes an alert carrying the object's detections up to it, the alerts of
all objects in time order go through the alert consumer (:func:`deeprubin.serving.alerts.replay_detections`: the light-curve
book, the as-of curve of each alert, batched GP + TCN), so each alert is classified with only the history before it.
Predictions are restricted to SNIa/SNII (argmax of the two, probabilities renormalised), as the evaluation scores
BTS. For each bin of days since first detection, every object counts once, with its latest alert in the bin
(:func:`deeprubin.serving.alerts.early_metrics`); accuracy, macro-F1 (mean of the SN Ia and SN II F1), each class's
recall and the expected calibration error (ECE, top label, on the SNIa/SNII-renormalised probabilities; ``ece_all_classes``
on the model's own four-class probabilities) are printed with the counts. From 5 days on a bin where a class's recall
is below 0.6 is flagged, and ``goal`` says whether every such bin has each recall >= 0.6 and ECE <= 0.05
(:func:`deeprubin.serving.alerts.early_goal`). Reference row: the same model on each object's complete light curve
(``classify_curves``, as ``deeprubin classify`` does). Output: a table and its Markdown (printed; ``--markdown PATH``
writes it), and ``--output`` (default metrics/early_replay.json) with the figures.

Needs a trained model: if the registry has no champion, run ``make run`` first (or give --model).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
# Worker processes import this checkout too (a forkserver ignores sys.path; an editable install elsewhere would win)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from deeprubin.serving.alerts import EARLY_BINS, early_goal, early_markdown, early_metrics, replay_detections
from deeprubin.config import DEFAULT_PARAMS, BaseParams, FilesParams, RealSetParams, load_params

SN = ("SNIa", "SNII")


def shared_data_dir() -> Path:
    env = os.environ.get("DEEPRUBIN_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def default_bts_dir() -> Path:
    """The BTS set shipped in the repository, else the shared one."""
    shipped = REPO / "data" / "bts"
    return shipped if (shipped / "detections.parquet").exists() else shared_data_dir() / "bts"


def load_objects(root: Path, which: str, base: BaseParams, test_fraction: float) -> tuple[pd.DataFrame, pd.Series]:
    """Contract detections and labels (oid -> SNIa/SNII) of the held-out BTS objects, or of all of them."""
    real = RealSetParams(detections=root / "detections.parquet", labels=root / "labels.csv", classes=list(SN),
                         test_fraction=test_fraction)
    if which == "heldout":
        from deeprubin.evaluation.sets import load_heldout

        held = load_heldout(real, base)
        return held.detections, held.labels
    from deeprubin.schema import validate_detections
    from deeprubin.sources import files

    tables = files.load(FilesParams(detections=real.detections, labels=real.labels, label_source="bts"))
    det, _ = validate_detections(tables.detections)
    labels = tables.labels.drop_duplicates("oid").set_index("oid")["label"]
    labels = labels[labels.isin(SN)]
    det = det[det["oid"].isin(labels.index)].reset_index(drop=True)
    return det, labels[labels.index.isin(det["oid"].unique())].sort_index()


def subsample(labels: pd.Series, n: int, seed: int) -> pd.Series:
    """At most ``n`` objects, each class in proportion (at least one of each), seeded."""
    if n >= len(labels):
        return labels
    rng = np.random.default_rng(seed)
    keep = []
    for cls, group in labels.groupby(labels):
        k = max(1, round(n * len(group) / len(labels)))
        keep += list(rng.choice(group.index.to_numpy(), size=min(k, len(group)), replace=False))
    return labels.loc[sorted(keep)]


def full_curve_row(det: pd.DataFrame, labels: pd.Series, model, grid_days: int, fit_context_days: float,
                   batch_size: int) -> dict:
    """Accuracy and macro-F1 of the model on the complete light curves (the reference for the early bins)."""
    from deeprubin.serving.classify import classify_curves
    from deeprubin.lightcurves.tensorize import curves_from_detections

    rows, _ = classify_curves(curves_from_detections(det), model, grid_days, fit_context_days, batch_size)
    rows = rows.assign(alert_mjd=0.0, days_since_first_detection=0.0)
    m = early_metrics(rows, labels, SN, bins=(0.0, 0.0)).iloc[0].to_dict()
    m.update(bin="full curve", lo=None, hi=None)
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model URI (default: classify.model_uri of params.yaml)")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI (default: train.tracking_uri)")
    ap.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params.yaml (grid, fit context, split)")
    ap.add_argument("--data", type=Path, default=None, help="folder with detections.parquet and labels.csv")
    ap.add_argument("--objects", choices=("heldout", "all"), default="heldout")
    ap.add_argument("--max-objects", type=int, default=None, help="stratified subset of at most this many objects")
    ap.add_argument("--seed", type=int, default=42, help="subset seed")
    ap.add_argument("--bins", type=float, nargs="+", default=list(EARLY_BINS), help="bin edges, days")
    ap.add_argument("--batch-alerts", type=int, default=None, help="alerts per batch (default: alerts.batch_alerts)")
    ap.add_argument("--output", type=Path, default=Path("metrics/early_replay.json"))
    ap.add_argument("--markdown", type=Path, default=None, help="also write the Markdown table to this file")
    args = ap.parse_args(argv)

    params = load_params(args.params if args.params.exists() else None)
    uri = args.model or params.model_uri()
    tracking = args.tracking_uri or params.train.tracking_uri
    root = args.data or default_bts_dir()
    if not (root / "detections.parquet").exists():
        sys.exit(f"no BTS data at {root} (set DEEPRUBIN_SHARED_DATA or --data)")

    from deeprubin.models.served import load_model

    try:
        model = load_model(uri, tracking, params.base.classes)
    except (LookupError, OSError) as exc:
        sys.exit(f"cannot load the model: {exc}\nTrain and promote one first (`make run`), or give --model and "
                 "--tracking-uri.")
    missing = [c for c in SN if c not in model.classes]
    if missing:
        sys.exit(f"{model.uri} does not predict {missing} (its classes: {list(model.classes)})")
    print(f"model {model.name} version {model.version} ({model.uri}, {tracking})")

    det, labels = load_objects(root, args.objects, params.base, params.evaluate.real.test_fraction)
    if args.max_objects:
        labels = subsample(labels, args.max_objects, args.seed)
        det = det[det["oid"].isin(labels.index)].reset_index(drop=True)
    grid, ctx = params.preprocess.grid_days, params.preprocess.fit_context_days
    max_days = float(max(args.bins))
    first = det.groupby("oid")["mjd"].transform("min")
    n_alerts = int((det["mjd"] - first <= max_days).sum())
    print(f"objects: {len(labels)} {args.objects} ({labels.value_counts().to_dict()}); {len(det)} detections, "
          f"{n_alerts} alerts within {max_days:g} d of the first detection")

    def progress(r) -> None:
        if r.batches % 5 == 0:
            print(f"  {r.alerts_read}/{n_alerts} alerts, {r.seconds:.0f} s", flush=True)

    batch = args.batch_alerts or params.alerts.batch_alerts
    result = replay_detections(det, model, grid, ctx, batch_alerts=batch, batch_size=params.classify.batch_size,
                               max_days=max_days, progress=progress)
    rows, rejected = result.classifications, result.rejections
    table = early_metrics(rows, labels, SN, bins=args.bins)
    t0 = time.perf_counter()
    full = full_curve_row(det, labels, model, grid, ctx, params.classify.batch_size)
    t_full = time.perf_counter() - t0

    print(f"\nreplay: {result.alerts_read} alerts, {result.classified} classified, {result.rejected} rejected, "
          f"{result.seconds:.1f} s ({result.alerts_per_s:.1f} alerts/s, batches of {batch}); full curves "
          f"{len(labels)} objects in {t_full:.1f} s")
    if len(rejected):
        print("rejected: " + ", ".join(f"{k} ({v})" for k, v in rejected["reason"].value_counts().items()))
    print("\nprediction restricted to SNIa/SNII; each object counted once per bin (its latest alert in the bin)")
    print(f"  {'days':>10s} {'objects':>8s} {'SN Ia':>6s} {'SN II':>6s} {'alerts':>7s} {'accuracy':>9s} "
          f"{'macro-F1':>9s} {'rec Ia':>7s} {'rec II':>7s} {'ECE':>6s} {'ECE(4)':>7s}")
    for r in [*table.to_dict("records"), full]:
        flag = "  <- recall < 0.6: " + ", ".join(r["low_recall"]) if r.get("low_recall") else ""
        print(f"  {r['bin']:>10s} {r['n_objects']:8d} {r['n_SNIa']:6d} {r['n_SNII']:6d} {r.get('n_alerts', 0):7d} "
              f"{r['accuracy']:9.3f} {r['macro_f1']:9.3f} {r['recall_SNIa']:7.3f} {r['recall_SNII']:7.3f} "
              f"{r['ece']:6.3f} {r['ece_all_classes']:7.3f}{flag}")
    goal = early_goal(table, SN)
    print(f"\ngoal from {goal['recall_from_days']:g} d (each recall >= {goal['min_recall']:g}, ECE <= "
          f"{goal['max_ece']:g}): {'met' if goal['met'] else 'NOT met'}"
          + "".join(f"\n  {f['bin']}: {f['why']}" for f in goal["failing"]))
    markdown = early_markdown(table, SN, full)
    print("\n" + markdown)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown)
        print(f"wrote {args.markdown}")

    from deeprubin.evaluation.metrics import write_metrics_json

    out = write_metrics_json(args.output, {
        "model": {"uri": model.uri, "name": model.name, "version": model.version, "tracking_uri": tracking},
        "data": {"objects": args.objects, "n_objects": len(labels), "per_class": labels.value_counts().to_dict(),
                 "max_objects": args.max_objects, "seed": args.seed},
        "protocol": "alert-by-alert replay through deeprubin.serving.alerts; prediction restricted to SNIa/SNII; each "
                    "object once per bin, its latest alert in the bin",
        "replay": {"alerts": result.alerts_read, "classified": result.classified, "rejected": result.rejected,
                   "rejection_reasons": rejected["reason"].value_counts().to_dict() if len(rejected) else {},
                   "seconds": result.seconds, "alerts_per_s": result.alerts_per_s, "batch_alerts": batch},
        "model_calibration": model.calibration,
        "bins": table.to_dict("records"),
        "full_curve": full,
        "goal": goal,
    })
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
