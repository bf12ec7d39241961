"""Training data: the processed tensors (:func:`deeprubin.stages.preprocess.load_processed`) as a
LightningDataModule, with a stratified split by object and class-imbalance handling.

- Rows whose label is one of the configured ``classes`` are kept (labels are mapped through
  :data:`deeprubin.schema.CLASS_ALIASES` first, so ``Ceph`` counts as ``CEP``); the target of a row is the position
  of its label in ``classes`` (:data:`deeprubin.schema.CLASSES` order by default).
- :func:`split_objects` splits *objects* (oids), not rows, stratified by label with a fixed seed, so no object is in
  two splits even if it has several rows (e.g. early-epoch copies). It is a pure function of the set of
  (oid, label) pairs, independent of their order, for later stages (evaluation) to reuse.
- Imbalance (``imbalance``): ``"weights"`` gives the loss per-class weights (:func:`class_weights`, from the training
  split); ``"sampler"`` draws training batches with a balanced :class:`~torch.utils.data.WeightedRandomSampler`;
  ``"both"``; ``"none"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from deeprubin.schema import CLASS_ALIASES, CLASSES

SPLITS: tuple[str, ...] = ("train", "val", "test")
Imbalance = Literal["none", "weights", "sampler", "both"]


def _object_labels(oids: Sequence[str], labels: Sequence) -> pd.Series:
    frame = pd.DataFrame({"oid": np.asarray(oids).astype(str), "label": np.asarray(labels)})
    per_object = frame.groupby("oid", sort=True)["label"].agg(lambda s: set(s.tolist()))
    conflicting = per_object[per_object.map(len) > 1]
    if len(conflicting):
        oid = conflicting.index[0]
        raise ValueError(f"{len(conflicting)} object(s) have more than one label, e.g. {oid}: "
                         f"{sorted(map(str, conflicting.iloc[0]))}")
    return per_object.map(lambda s: next(iter(s)))


def split_objects(oids: Sequence[str], labels: Sequence, val_fraction: float = 0.15, test_fraction: float = 0.15,
                  seed: int = 42) -> dict[str, np.ndarray]:
    """Stratified train/val/test split of objects: ``{"train", "val", "test"}`` -> sorted arrays of oids.

    ``oids`` and ``labels`` are parallel (one entry per row; repeated oids must repeat the same label). The result
    depends only on the set of (oid, label) pairs, the fractions and the seed. A fraction of 0 gives an empty split.
    Raises ValueError when a class has too few objects to appear in every requested split.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"bad split fractions: val={val_fraction}, test={test_fraction}")
    per_object = _object_labels(oids, labels)
    ids, y = per_object.index.to_numpy(dtype=str), per_object.to_numpy()
    empty = np.array([], dtype=str)

    def cut(ids_, y_, fraction, name):
        if fraction == 0:
            return ids_, y_, empty
        try:
            keep, out, y_keep, _ = train_test_split(ids_, y_, test_size=fraction, random_state=seed, stratify=y_)
        except ValueError as exc:
            counts = pd.Series(y_).value_counts().to_dict()
            raise ValueError(f"cannot split off a stratified {name} set of {fraction:.0%} from objects per class "
                             f"{counts}: {exc}") from exc
        return keep, y_keep, out

    rest, y_rest, test = cut(ids, y, test_fraction, "test")
    rest_val_fraction = val_fraction / (1 - test_fraction)
    train, _, val = cut(rest, y_rest, rest_val_fraction, "validation")
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def class_weights(labels: Sequence[int], n_classes: int) -> np.ndarray:
    """Inverse-frequency weights, normalised as scikit-learn's ``"balanced"``: ``n / (k * n_c)`` for the ``k``
    classes present (all 1 when balanced; the weighted mean over the samples is 1). Absent classes get 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    if len(counts) > n_classes:
        raise ValueError(f"label index {len(counts) - 1} out of range for {n_classes} classes")
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def balanced_sampler(labels: Sequence[int], seed: int = 42) -> WeightedRandomSampler:
    """Draws ``len(labels)`` samples per epoch with replacement, each class equally likely, reproducibly."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True,
                                 generator=torch.Generator().manual_seed(seed))


class ProcessedDataModule(pl.LightningDataModule):
    """``data/processed`` as train/val/test loaders of ``(x float32 (B, C, T), y int64 (B,))``.

    After :meth:`setup`: ``splits`` (oids per split), ``index`` (the kept rows of the processed index, with
    ``target`` and ``split`` columns), ``class_weights`` (tensor or None) and ``n_channels``. ``predict_dataloader``
    yields the test split.
    """

    def __init__(self, processed_dir: Path | str, classes: Sequence[str] = CLASSES, batch_size: int = 32,
                 val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 42,
                 imbalance: Imbalance = "weights", num_workers: int = 0):
        super().__init__()
        if imbalance not in ("none", "weights", "sampler", "both"):
            raise ValueError(f"imbalance must be none, weights, sampler or both; got {imbalance!r}")
        self.processed_dir = Path(processed_dir)
        self.classes = tuple(classes)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.imbalance = imbalance
        self.splits: dict[str, np.ndarray] | None = None
        self.index: pd.DataFrame | None = None
        self.class_weights: torch.Tensor | None = None
        self.n_channels: int | None = None
        self._data: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        from deeprubin.stages.preprocess import load_processed

        x, index = load_processed(self.processed_dir)
        label = index["label"].map(lambda v: CLASS_ALIASES.get(v, v) if isinstance(v, str) else None)
        keep = label.isin(self.classes).to_numpy()
        if not keep.any():
            raise ValueError(f"no objects of classes {list(self.classes)} in {self.processed_dir}")
        index = index.loc[keep].reset_index(drop=True)
        index["label"] = label[keep].to_numpy()
        index["target"] = index["label"].map({c: i for i, c in enumerate(self.classes)}).astype(np.int64)
        x = np.asarray(x[keep], dtype=np.float32)
        self.splits = split_objects(index["oid"], index["label"], self.val_fraction, self.test_fraction, self.seed)
        split_of = {oid: name for name, ids in self.splits.items() for oid in ids}
        index["split"] = index["oid"].astype(str).map(split_of)
        self.index, self.n_channels = index, x.shape[1]
        for name in SPLITS:
            rows = np.flatnonzero((index["split"] == name).to_numpy())
            self._data[name] = TensorDataset(torch.from_numpy(x[rows]),
                                             torch.from_numpy(index["target"].to_numpy()[rows]))
        if self.imbalance in ("weights", "both"):
            self.class_weights = torch.as_tensor(class_weights(self.targets("train"), len(self.classes)),
                                                 dtype=torch.float32)

    def targets(self, split: str) -> np.ndarray:
        return self._data[split].tensors[1].numpy()

    def dataset(self, split: str) -> TensorDataset:
        return self._data[split]

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        kwargs = {}
        if train and self.imbalance in ("sampler", "both"):
            kwargs["sampler"] = balanced_sampler(self.targets(split), self.seed)
        elif train:
            kwargs.update(shuffle=True, generator=torch.Generator().manual_seed(self.seed))
        return DataLoader(self._data[split], batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
