"""Splits by object (no leakage, stratified, reproducible), class weights and the balanced sampler."""

from __future__ import annotations

import numpy as np
import pytest

from deeprubin.data import balanced_sampler, class_weights, split_objects
from deeprubin.schema import CLASSES


def catalogue(per_class=(40, 25, 12, 8), copies=1):
    oids, labels = [], []
    for cls, n in zip(CLASSES, per_class):
        for i in range(n):
            for _ in range(copies):
                oids.append(f"ZTF{cls}{i:04d}")
                labels.append(cls)
    return np.array(oids), np.array(labels)


def test_no_object_in_two_splits_and_every_object_in_one():
    oids, labels = catalogue(copies=3)  # several rows per object: split by object, not by row
    splits = split_objects(oids, labels, 0.2, 0.2, seed=7)
    sets = {k: set(v) for k, v in splits.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert set().union(*sets.values()) == set(oids)
    assert sum(len(v) for v in splits.values()) == len(set(oids))


def test_stratified_each_class_in_every_split_with_its_share():
    oids, labels = catalogue()
    splits = split_objects(oids, labels, 0.2, 0.2, seed=1)
    label_of = dict(zip(oids, labels))
    for name, ids in splits.items():
        present = {label_of[o] for o in ids}
        assert present == set(CLASSES), name
    test_qso = sum(label_of[o] == "QSO" for o in splits["test"])
    assert test_qso == pytest.approx(0.2 * 40, abs=1)
    assert len(splits["test"]) == pytest.approx(0.2 * 85, abs=2)
    assert len(splits["val"]) == pytest.approx(0.2 * 85, abs=2)


def test_same_seed_same_split_whatever_the_order():
    oids, labels = catalogue()
    a = split_objects(oids, labels, 0.15, 0.15, seed=3)
    perm = np.random.default_rng(0).permutation(len(oids))
    b = split_objects(list(oids[perm]), list(labels[perm]), 0.15, 0.15, seed=3)
    c = split_objects(oids, labels, 0.15, 0.15, seed=4)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(set(a[k]) != set(c[k]) for k in a)


def test_zero_fraction_gives_an_empty_split():
    oids, labels = catalogue()
    splits = split_objects(oids, labels, 0.2, 0.0, seed=0)
    assert len(splits["test"]) == 0 and len(splits["train"]) + len(splits["val"]) == 85


def test_conflicting_labels_and_too_few_objects_are_errors():
    with pytest.raises(ValueError, match="more than one label"):
        split_objects(["a", "a", "b", "c"], ["QSO", "CEP", "QSO", "CEP"])
    oids, labels = catalogue(per_class=(10, 10, 10, 1))
    with pytest.raises(ValueError, match="stratified"):
        split_objects(oids, labels, 0.2, 0.2)
    with pytest.raises(ValueError, match="fractions"):
        split_objects(oids, labels, 0.6, 0.5)


def test_class_weights_inverse_frequency_normalised():
    y = np.array([0] * 60 + [1] * 30 + [2] * 10)
    w = class_weights(y, 4)
    # n / (k * n_c) over the 3 present classes; absent class 3 gets 0
    np.testing.assert_allclose(w, [100 / 180, 100 / 90, 100 / 30, 0.0])
    assert w[y].mean() == pytest.approx(1.0)
    np.testing.assert_allclose(class_weights([0, 1, 2, 3] * 5, 4), np.ones(4))
    with pytest.raises(ValueError):
        class_weights([0, 4], 4)


def test_balanced_sampler_draws_classes_equally_and_reproducibly():
    y = np.array([0] * 900 + [1] * 90 + [2] * 10)
    draws = np.array(list(balanced_sampler(y, seed=5)))
    assert len(draws) == len(y)
    shares = np.bincount(y[draws], minlength=3) / len(draws)
    np.testing.assert_allclose(shares, [1 / 3] * 3, atol=0.06)
    np.testing.assert_array_equal(draws, np.array(list(balanced_sampler(y, seed=5))))
