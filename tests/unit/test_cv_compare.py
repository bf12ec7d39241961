"""bench/cv_compare.py: two recipes' out-of-fold predictions compared fold by fold and object by object."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SPEC = importlib.util.spec_from_file_location("cv_compare", Path(__file__).resolve().parents[2] / "bench" / "cv_compare.py")
cv_compare = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(cv_compare)


def predictions(correct: float, seed: int) -> pd.DataFrame:
    """200 objects in 4 folds, whole curves and 10 d, a fraction ``correct`` of them classified right."""
    rng = np.random.default_rng(seed)
    rows = []
    for age in ("whole", "10d"):
        for i in range(200):
            label = "SNII" if i % 4 == 0 else "SNIa"
            right = rng.random() < correct
            p_ii = 0.8 if (label == "SNII") == right else 0.2
            rows.append({"repeat": 0, "fold": i % 4, "age": age, "oid": f"o{i}", "label": label, "QSO": 0.0,
                         "CEP": 0.0, "SNIa": 1 - p_ii, "SNII": p_ii})
    return pd.DataFrame(rows)


def test_a_better_recipe_is_ahead_with_an_interval_above_zero():
    table = cv_compare.compare(predictions(0.6, 1), predictions(0.95, 2), n_boot=200).set_index("age")
    assert set(table.index) == {"whole", "10d"}
    assert (table["other"] > table["base"]).all()
    assert (table["delta_ci_low"] > 0).all() and (table["folds_other_ahead"] == "4/4").all()


def test_the_same_recipe_is_no_difference():
    table = cv_compare.compare(predictions(0.8, 1), predictions(0.8, 1), n_boot=50)
    assert np.allclose(table["delta_mean"], 0) and np.allclose(table[["delta_ci_low", "delta_ci_high"]], 0)


def test_runs_with_other_folds_are_refused():
    other = predictions(0.8, 1)
    other["fold"] = (other["fold"] + 1) % 4
    with pytest.raises(SystemExit, match="folds"):
        cv_compare.compare(predictions(0.8, 1), other, n_boot=10)
