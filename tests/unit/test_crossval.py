"""Cross-validation helpers (deeprubin.evaluation.crossval): the folds (stratified, disjoint, every object tested
once per repeat, independent of row order) and the summary (per-fold numbers equal to the project's metrics on
each fold, pooled bootstrap intervals, paired differences), on synthetic predictions whose answers are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deeprubin.evaluation import crossval as cvm
from deeprubin.evaluation.metrics import classification_metrics

CLASSES = ("QSO", "CEP", "SNIa", "SNII")


def _objects(n_ia=37, n_ii=13):
    oids = np.array([f"ZTF{i:04d}" for i in range(n_ia + n_ii)])
    labels = np.array(["SNIa"] * n_ia + ["SNII"] * n_ii)
    return oids, labels


def test_folds_are_stratified_disjoint_and_cover_every_object_once_per_repeat():
    oids, labels = _objects()
    folds = cvm.make_folds(oids, labels, folds=5, repeats=3, seed=7)
    assert [(f.repeat, f.fold) for f in folds] == [(r, k) for r in range(3) for k in range(5)]
    label_of = dict(zip(oids, labels))
    for r in range(3):
        tests = [f.test for f in folds if f.repeat == r]
        joined = np.concatenate(tests)
        assert len(joined) == len(set(joined)) == len(oids)  # disjoint, and together every object
        assert set(joined) == set(oids)
        for t in tests:  # stratified: 13 SN II over 5 folds -> 2 or 3 in each
            n_ii = sum(label_of[o] == "SNII" for o in t)
            assert n_ii in (2, 3)
    first = {tuple(f.test) for f in folds if f.repeat == 0}
    second = {tuple(f.test) for f in folds if f.repeat == 1}
    assert first != second  # a repeat is a new split


def test_folds_do_not_depend_on_row_order():
    oids, labels = _objects()
    order = np.random.default_rng(0).permutation(len(oids))
    a = cvm.make_folds(oids, labels, folds=4, seed=3)
    b = cvm.make_folds(oids[order], labels[order], folds=4, seed=3)
    assert [list(f.test) for f in a] == [list(f.test) for f in b]


def test_too_few_objects_of_a_class_for_the_folds_is_an_error():
    oids, labels = _objects(n_ia=10, n_ii=3)
    with pytest.raises(ValueError, match="4 folds need at least 4 objects"):
        cvm.make_folds(oids, labels, folds=4)
    with pytest.raises(ValueError, match="one row per object"):
        cvm.make_folds(np.r_[oids, oids[:1]], np.r_[labels, labels[:1]], folds=2)


def _predictions(oids, labels, folds, quality: dict[str, float], seed=0) -> pd.DataFrame:
    """Out-of-fold rows: model ``m`` gives the true class the higher SN probability with chance ``quality[m]``."""
    rng = np.random.default_rng(seed)
    label_of = dict(zip(oids, labels))
    parts = []
    for f in folds:
        for age in (cvm.WHOLE, "10d"):
            for model, q in quality.items():
                y = np.array([label_of[o] for o in f.test])
                right = rng.random(len(y)) < q
                p = np.zeros((len(y), 4))
                p[:, 0] = 0.5  # QSO: the largest, ignored by the restriction to SN Ia vs SN II
                ia = (y == "SNIa") == right
                p[:, 2] = np.where(ia, 0.3, 0.2)
                p[:, 3] = np.where(ia, 0.2, 0.3)
                frame = pd.DataFrame(p, columns=list(CLASSES))
                frame.insert(0, "repeat", f.repeat)
                frame.insert(1, "fold", f.fold)
                frame.insert(2, "model", model)
                frame.insert(3, "age", age)
                frame.insert(4, "oid", f.test)
                frame.insert(5, "label", y)
                parts.append(frame)
    return pd.concat(parts, ignore_index=True)


def test_summary_per_fold_pooled_and_paired():
    oids, labels = _objects(200, 60)
    folds = cvm.make_folds(oids, labels, folds=4, repeats=2, seed=1)
    pred = _predictions(oids, labels, folds, {"tcn": 1.0, "forest": 0.7})
    per_fold, summary, paired = cvm.summarise(pred, CLASSES, ["SNIa", "SNII"], n_boot=200, seed=0)
    assert len(per_fold) == 2 * 2 * len(folds)  # model x age x fold
    # Per fold: the project's own metrics (prediction restricted to SN Ia vs SN II), fold by fold.
    for row in per_fold.itertuples():
        g = pred[(pred["model"] == row.model) & (pred["age"] == row.age) & (pred["repeat"] == row.repeat)
                 & (pred["fold"] == row.fold)]
        m = classification_metrics(g["label"], g[list(CLASSES)].to_numpy(), CLASSES, labels=["SNIa", "SNII"],
                                   restrict_predictions=True)
        assert row.macro_f1 == pytest.approx(m["macro_f1"])
        assert row.recall_SNII == pytest.approx(m["per_class"]["SNII"]["recall"])
        assert row.n == len(g)
    tcn, forest = summary["tcn"][cvm.WHOLE], summary["forest"][cvm.WHOLE]
    assert tcn["macro_f1"]["mean"] == tcn["macro_f1"]["pooled"] == 1.0 and tcn["macro_f1"]["std"] == 0.0
    assert tcn["n_folds"] == 8 and tcn["n_objects"] == 260 and tcn["n_predictions"] == 520
    f1 = forest["macro_f1"]
    assert f1["pooled_low"] < f1["pooled"] < f1["pooled_high"] < 1.0 and 0.55 < f1["pooled"] < 0.85
    assert f1["std"] > 0 and len(f1["per_fold"]) == 8 and f1["mean"] == pytest.approx(np.mean(f1["per_fold"]))
    d = paired[cvm.WHOLE]["macro_f1"]
    assert d["folds_tcn_at_or_above"] == 8
    assert d["mean"] == pytest.approx(1.0 - f1["mean"]) and d["pooled"] == pytest.approx(1.0 - f1["pooled"])
    assert 0 < d["pooled_low"] < d["pooled"] < d["pooled_high"]
    # Swapped: the TCN below the forest on every fold.
    swapped = pred.assign(model=pred["model"].map({"tcn": "forest", "forest": "tcn"}))
    _, _, paired2 = cvm.summarise(swapped, CLASSES, ["SNIa", "SNII"], n_boot=50, seed=0)
    assert paired2[cvm.WHOLE]["macro_f1"]["folds_tcn_at_or_above"] == 0
    assert paired2[cvm.WHOLE]["macro_f1"]["pooled_high"] < 0


def test_unpaired_predictions_are_refused():
    oids, labels = _objects()
    folds = cvm.make_folds(oids, labels, folds=2)
    pred = _predictions(oids, labels, folds, {"tcn": 0.9, "forest": 0.9})
    pred = pred.drop(index=pred.index[(pred["model"] == "forest")][:1])
    with pytest.raises(AssertionError, match="same objects"):
        cvm.summarise(pred, CLASSES, ["SNIa", "SNII"], n_boot=10, seed=0)


def test_markdown_tables_have_their_columns():
    oids, labels = _objects()
    folds = cvm.make_folds(oids, labels, folds=2)
    pred = _predictions(oids, labels, folds, {"tcn": 0.9, "forest": 0.8})
    _, summary, paired = cvm.summarise(pred, CLASSES, ["SNIa", "SNII"], n_boot=20, seed=0)
    results = {"settings": {"real_set": "bts", "scored_classes": ["SNIa", "SNII"], "objects": {"SNIa": 37, "SNII": 13},
                            "folds": 2, "repeats": 1, "seed": 42, "n_bootstrap": 20,
                            "train": {"max_epochs": 50, "hidden": 32, "truncations": 4}, "forest": {"trees": 300}},
               "summary": summary, "paired": paired}
    text = cvm.markdown(results)
    rows = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header == ["model", "age", "n", "macro-F1 (mean ± std)", "macro-F1 pooled [95 % CI]",
                      "SNIa recall (mean ± std)", "SNII recall (mean ± std)", "per-fold macro-F1"]
    body = [r for r in rows[2:] if r.startswith(("| TCN", "| forest"))]
    assert [r.split("|")[1:3] for r in body] == [[" TCN ", " whole "], [" TCN ", " 10d "], [" forest ", " whole "],
                                                 [" forest ", " 10d "]]
    assert all(len(r.strip("|").split("|")) == len(header) for r in body)
    paired_header = next(r for r in rows if r.startswith("| age"))
    assert "folds TCN ≥ forest" in paired_header and "Δ macro-F1 pooled [95 % CI]" in paired_header
