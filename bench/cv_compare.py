"""Two training recipes compared on identical cross-validation folds, object by object.

    python bench/cv_compare.py BASE.parquet OTHER.parquet [--model tcn] [--other-model tcn] [--name OTHER]

Inputs: the out-of-fold predictions `deeprubin evaluate --cv` writes (``metrics/real_cv_predictions.parquet``) for two
recipes run with the same ``base.seed``, ``evaluate.cv`` settings and data, so their folds are identical (checked:
the same objects in the same folds). For each age (whole curve, 5/10/20/30/50 days): macro-F1 (SN Ia vs SN II,
restricted to the two) of each, the paired per-fold difference (mean ± std, folds where OTHER is ahead) and a paired
bootstrap 95 % interval of the pooled difference over objects (the same resampled objects for both). An interval
that excludes 0 is a difference the folds can tell from noise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from deeprubin.evaluation.metrics import macro_f1  # noqa: E402

SCORED = ["SNIa", "SNII"]
AGES = ["whole", "5d", "10d", "20d", "30d", "50d"]


def f1(frame: pd.DataFrame) -> float:
    return macro_f1(frame["label"].to_numpy(), frame[SCORED].to_numpy(), classes=SCORED)


def compare(base: pd.DataFrame, other: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    key = ["repeat", "fold", "age", "oid"]
    merged = base.merge(other, on=key, suffixes=("_a", "_b"), validate="one_to_one")
    if len(merged) != len(base) or len(merged) != len(other):
        raise SystemExit("the two runs do not share their folds and objects: run both with the same seed, "
                         "evaluate.cv settings and data")
    rows = []
    rng = np.random.default_rng(seed)
    for age in [a for a in AGES if a in set(merged["age"])]:
        m = merged[merged["age"] == age]
        a = m[["label_a", *[f"{c}_a" for c in SCORED]]].set_axis(["label", *SCORED], axis=1)
        b = m[["label_a", *[f"{c}_b" for c in SCORED]]].set_axis(["label", *SCORED], axis=1)
        folds = m[["repeat", "fold"]].drop_duplicates().itertuples(index=False)
        deltas = []
        for r, k in folds:
            sel = ((m["repeat"] == r) & (m["fold"] == k)).to_numpy()
            deltas.append(f1(b[sel]) - f1(a[sel]))
        oids = m["oid"].unique()
        index = {o: np.flatnonzero(m["oid"].to_numpy() == o) for o in oids}
        boot = []
        for _ in range(n_boot):
            rows_ = np.concatenate([index[o] for o in rng.choice(oids, size=len(oids), replace=True)])
            boot.append(f1(b.iloc[rows_]) - f1(a.iloc[rows_]))
        rows.append({"age": age, "base": f1(a), "other": f1(b), "delta_mean": np.mean(deltas),
                     "delta_std": np.std(deltas, ddof=1) if len(deltas) > 1 else 0.0,
                     "folds_other_ahead": f"{sum(d > 0 for d in deltas)}/{len(deltas)}",
                     "delta_ci_low": np.percentile(boot, 2.5), "delta_ci_high": np.percentile(boot, 97.5)})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("other", type=Path)
    ap.add_argument("--model", default="tcn", help="model of BASE to compare (tcn or forest)")
    ap.add_argument("--other-model", default="tcn", help="model of OTHER to compare")
    ap.add_argument("--name", default="other")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args(argv)
    base = pd.read_parquet(args.base)
    other = pd.read_parquet(args.other)
    base = base[base["model"] == args.model].drop(columns="model")
    other = other[other["model"] == args.other_model].drop(columns="model")
    table = compare(base, other, args.n_boot)
    print(f"| age | base {args.model} | {args.name} | Δ per fold (mean ± std) | folds ahead | Δ pooled [95 % CI] |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in table.itertuples():
        print(f"| {r.age} | {r.base:.3f} | {r.other:.3f} | {r.delta_mean:+.3f} ± {r.delta_std:.3f} | "
              f"{r.folds_other_ahead} | {(r.other - r.base):+.3f} [{r.delta_ci_low:+.3f}, {r.delta_ci_high:+.3f}] |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
