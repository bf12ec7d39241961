"""The ALeRCE-style balanced random forest baseline (deeprubin.models.forest) on the real BTS supernovae: SN Ia vs SN II.

    python bench/baseline_bts.py                 # train on 70 %, report the held-out 30 % (full, 20 d, 10 d)
    python bench/baseline_bts.py --cv-variants   # also: 5-fold CV on the training objects of a few feature sets
    python bench/baseline_bts.py --save models/baseline.joblib

Data: ../shared/data/bts (or $DEEPRUBIN_SHARED_DATA/bts): detections.parquet and labels.csv, read with the project's
``files`` source and validated like any ingest; objects labelled SNIa or SNII are kept (redshift and peakmag of
labels.csv are never read: they are not available in real time).

Protocol: 30 % of each class held out by a seeded hash of the oid (:func:`deeprubin.data.holdout_by_hash`, the objects
`deeprubin evaluate` holds out of the real set), the forest trained on the other 70 %.
The forest (default settings: 300 trees, truncated training copies at 10, 20, 30 and 50 days) is trained on the
70 %, once. On the held-out 30 % it classifies the full curves and the curves cut 20 and 10 days after the first
detection; predictions are restricted to SNIa/SNII (the argmax of the two), and macro-F1, SN Ia recall and SN II
recall are reported with percentile-bootstrap 95 % intervals over held-out objects
(:func:`deeprubin.evaluation.metrics.bootstrap_ci`, 1,000 resamples).

``--cv-variants`` compares feature sets by 5-fold cross-validation on the *training* objects only (the held-out
30 % plays no part in the choice): all features, without the Bazin fit, without the periodogram, without the colour
pairs, and without the simple transient descriptors (roughly ALeRCE's own feature families).

Timing: feature extraction (one core unless --n-jobs) of the held-out full curves, per 1,000 objects, and of the
whole training set (full curves + truncated copies).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from deeprubin.models.forest import BaselineForest, extract_features
from deeprubin.config import FilesParams
from deeprubin.data import holdout_by_hash
from deeprubin.evaluation.metrics import bootstrap_ci, classification_metrics, encode_labels, macro_f1
from deeprubin.schema import CLASSES, validate_detections
from deeprubin.sources import files

SN = ("SNIa", "SNII")
EPOCHS: tuple[float | None, ...] = (None, 20.0, 10.0)
VARIANTS = {
    "all features": None,
    "no Bazin fit": r"bazin",
    "no periodogram": r"periodogram",
    "no colour pairs": r"_pair",
    "no simple descriptors": r"^(mag_first|mag_last|t_peak|t_first|rise_rate|fall_rate|dt_after_peak|decline_30d|"
                             r"gr_t_peak|gr_first_pair|gr_last_pair|gr_pair_rate)",
}


def shared_data_dir() -> Path:
    env = os.environ.get("DEEPRUBIN_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def load_bts(root: Path) -> tuple[pd.DataFrame, pd.Series]:
    tables = files.load(FilesParams(detections=root / "detections.parquet", labels=root / "labels.csv",
                                    label_source="bts:spectroscopic"))
    det, report = validate_detections(tables.detections)
    print(report.summary())
    labels = tables.labels.drop_duplicates("oid").set_index("oid")["label"]
    labels = labels[labels.isin(SN)]
    det = det[det["oid"].isin(labels.index)].reset_index(drop=True)
    labels = labels[labels.index.isin(det["oid"].unique())].sort_index()
    return det, labels


def _recall(cls: str):
    k = CLASSES.index(cls)

    def fn(y, p) -> float:
        y = encode_labels(y, CLASSES)
        pred = np.asarray(SN_IDX)[np.asarray(p)[:, SN_IDX].argmax(axis=1)]
        mask = y == k
        return float((pred[mask] == k).mean()) if mask.any() else float("nan")

    return fn


SN_IDX = [CLASSES.index(c) for c in SN]


def _f1(y, p) -> float:
    return macro_f1(y, p, classes=CLASSES, labels=list(SN), restrict_predictions=True)


def evaluate(y: np.ndarray, proba: np.ndarray, n_boot: int, seed: int) -> dict[str, dict[str, float]]:
    m = classification_metrics(y, proba, classes=CLASSES, labels=list(SN), restrict_predictions=True)
    out = {"macro_f1": bootstrap_ci(_f1, y, proba, n_boot=n_boot, seed=seed)}
    for cls in SN:
        out[f"recall_{cls}"] = bootstrap_ci(_recall(cls), y, proba, n_boot=n_boot, seed=seed)
        assert abs(out[f"recall_{cls}"]["estimate"] - m["per_class"][cls]["recall"]) < 1e-12
    assert abs(out["macro_f1"]["estimate"] - m["macro_f1"]) < 1e-12
    return out


def fmt(ci: dict[str, float]) -> str:
    return f"{ci['estimate']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def cv_variants(forest_kwargs: dict, train_feats: pd.DataFrame, y_rows: np.ndarray, epoch_feats: dict,
                train_oids: np.ndarray, y_train: np.ndarray, seed: int) -> None:
    """5-fold CV over training objects: every row of an object (full and truncated copies) in the same fold."""
    from sklearn.model_selection import StratifiedKFold

    folds = list(StratifiedKFold(5, shuffle=True, random_state=seed).split(train_oids, y_train))
    print("\n5-fold CV on the training objects (macro-F1, SNIa/SNII), by feature set:")
    print(f"  {'variant':24s} {'n_feat':>6s} " + " ".join(f"{_epoch_name(d):>8s}" for d in EPOCHS))
    row_oids = train_feats.index.to_numpy()
    for name, pattern in VARIANTS.items():
        cols = [c for c in train_feats.columns if not (pattern and re.search(pattern, c))]
        proba = {d: np.zeros((len(train_oids), len(CLASSES))) for d in EPOCHS}
        for fit_idx, val_idx in folds:
            rows = np.isin(row_oids, train_oids[fit_idx])
            forest = BaselineForest(**forest_kwargs).fit_features(train_feats.loc[rows, cols], y_rows[rows])
            for d in EPOCHS:
                proba[d][val_idx] = forest.proba_from_features(epoch_feats[d].loc[train_oids[val_idx]])
        scores = [_f1(y_train, proba[d]) for d in EPOCHS]
        print(f"  {name:24s} {len(cols):6d} " + " ".join(f"{s:8.3f}" for s in scores), flush=True)


def _epoch_name(d: float | None) -> str:
    return "full" if d is None else f"{d:g} d"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="folder with detections.parquet and labels.csv")
    ap.add_argument("--seed", type=int, default=42, help="split and forest seed")
    ap.add_argument("--n-estimators", type=int, default=300)
    ap.add_argument("--n-jobs", type=int, default=None, help="feature extraction and forest threads (default 1)")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--cv-variants", action="store_true", help="also compare feature sets by CV on training objects")
    ap.add_argument("--save", type=Path, default=None, help="save the trained forest here (joblib)")
    args = ap.parse_args(argv)

    root = args.data or shared_data_dir() / "bts"
    if not (root / "detections.parquet").exists():
        sys.exit(f"no BTS data at {root} (set DEEPRUBIN_SHARED_DATA or --data)")
    det, labels = load_bts(root)
    # The objects `deeprubin evaluate` holds out (evaluate.real): the same 30 %, so the numbers compare directly.
    test_oids = holdout_by_hash(labels.index, labels.to_numpy(), 0.3, seed=args.seed)
    train_oids = np.sort(np.setdiff1d(labels.index.to_numpy(dtype=str), test_oids))
    print(f"objects: {len(labels)} ({labels.value_counts().to_dict()}); train {len(train_oids)}, "
          f"held out {len(test_oids)} ({labels.reindex(test_oids).value_counts().to_dict()})")
    det_train = det[det["oid"].isin(train_oids)]
    det_test = det[det["oid"].isin(test_oids)]

    forest_kwargs = {"classes": CLASSES, "n_estimators": args.n_estimators, "seed": args.seed, "n_jobs": args.n_jobs}
    forest = BaselineForest(**forest_kwargs)
    t0 = time.perf_counter()
    train_feats, y_rows = forest.training_features(det_train, labels)
    t_train_feats = time.perf_counter() - t0
    t0 = time.perf_counter()
    forest.fit_features(train_feats, y_rows)
    t_fit = time.perf_counter() - t0
    print(f"training rows: {len(train_feats)} (full + truncated at {list(forest.truncations)} d), "
          f"{train_feats.shape[1]} features; extraction {t_train_feats:.1f} s, forest fit {t_fit:.1f} s")

    epoch_feats, timings = {}, {}
    for d in EPOCHS:
        t0 = time.perf_counter()
        epoch_feats[d] = extract_features(det_test, until_days=d, n_jobs=args.n_jobs)
        timings[d] = time.perf_counter() - t0
    n_test = len(test_oids)
    print("feature extraction, held-out objects: " + ", ".join(
        f"{_epoch_name(d)} {timings[d]:.2f} s ({1000 * timings[d] / n_test:.2f} s per 1000 objects)" for d in EPOCHS))

    print(f"\nheld-out {n_test} objects, prediction restricted to SNIa/SNII, bootstrap 95 % intervals "
          f"({args.n_boot} resamples):")
    print(f"  {'epoch':8s} {'macro-F1':>24s} {'SN Ia recall':>24s} {'SN II recall':>24s}")
    for d in EPOCHS:
        feats = epoch_feats[d]
        proba = forest.proba_from_features(feats)
        y = labels.reindex(feats.index).to_numpy()
        r = evaluate(y, proba, args.n_boot, args.seed)
        print(f"  {_epoch_name(d):8s} {fmt(r['macro_f1']):>24s} {fmt(r['recall_SNIa']):>24s} "
              f"{fmt(r['recall_SNII']):>24s}", flush=True)

    print("\ntop 15 features (mean decrease in impurity):")
    for name, v in forest.feature_importances().head(15).items():
        print(f"  {name:36s} {v:.4f}")

    if args.save:
        print(f"saved to {forest.save(args.save)}")
    if args.cv_variants:
        train_epoch = {d: extract_features(det_train, until_days=d, n_jobs=args.n_jobs) for d in EPOCHS}
        cv_variants(forest_kwargs, train_feats, y_rows, train_epoch, train_oids,
                    labels.reindex(train_oids).to_numpy(), args.seed)


if __name__ == "__main__":
    main()
