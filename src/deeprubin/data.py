"""Training data: the processed tensors (:func:`deeprubin.processed.load_processed`) as a
LightningDataModule, with a stratified split by object and class-imbalance handling.

- Rows whose label is one of the configured ``classes`` are kept (labels are mapped through
  :data:`deeprubin.schema.CLASS_ALIASES` first, so ``Ceph`` counts as ``CEP``); the target of a row is the position
  of its label in ``classes`` (:data:`deeprubin.schema.CLASSES` order by default).
- :func:`split_objects` splits *objects* (oids), not rows, stratified by label with a fixed seed, so no object is in
  two splits even if it has several rows (e.g. early-epoch copies). It is a pure function of the set of
  (oid, label) pairs, independent of their order, for later stages (evaluation) to reuse.
- Imbalance (``imbalance``): ``"weights"`` gives the loss per-class weights (:func:`class_weights`, from the training
  split); ``"sampler"`` draws training batches with a balanced :class:`~torch.utils.data.WeightedRandomSampler`;
  ``"both"``; ``"none"``; ``"source_sampler"`` draws each (label source, class) group equally often (the label
  source is read from ``raw_dir``'s objects table), so real SN II weigh as much as simulated ones and as real SN Ia.
- Held-out objects (``holdout``, e.g. :func:`holdout_by_hash` of a real labelled set) go to the test split whatever
  the stratified split says, so they are never trained or early-stopped on.
- Early-classification augmentation (``truncations > 0``, needs ``raw_dir``): each training object also gets
  ``truncations`` copies cut at random times after its first detection (:func:`truncated_views`: the GP is refitted
  on the detections before the cut, exactly as at inference on a young alert); every epoch draws one view per object
  (:class:`ViewSampler`): the whole curve with probability ``full_view_probability``, else one of the cuts.
  Validation and test use the full curves.
- ``simulated_classes`` (e.g. ``["QSO", "CEP"]``): simulated training objects of other classes are left out of
  training (validation and test keep them), to train a class on real objects only.
- GP draws (``gp_draws > 0``): each training batch's GP means are redrawn within their uncertainty
  (:class:`GPDraws`), so the network cannot lean on details the data do not pin down.
- Redshift augmentation (``redshift_views > 0`` with ``redshifts``, oid -> spectroscopic redshift, e.g.
  :func:`redshifts_of` the BTS labels): each real training supernova also gets copies moved to a larger redshift
  (:mod:`deeprubin.augment`: dimmer, time-dilated, ZTF noise, 5-sigma detections), drawn as more views of the object.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Sampler, TensorDataset, WeightedRandomSampler, default_collate

from deeprubin.augment import redshifted_curves
from deeprubin.lightcurves.tensorize import curves_from_detections, cut_after_first, tensorize_curves
from deeprubin.processed import load_processed, preprocessing_of
from deeprubin.schema import CLASS_ALIASES, CLASSES, LABEL_ALIASES
from deeprubin.sources.files import read_table
from deeprubin.sources.simulate import LABEL_SOURCE as SIMULATED
from deeprubin.store import RawStore

SPLITS: tuple[str, ...] = ("train", "val", "test")
Imbalance = Literal["none", "weights", "sampler", "both", "source_sampler"]


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


def _oid_column(table: pd.DataFrame) -> str:
    name = next((c for c in LABEL_ALIASES["oid"] if c in table.columns), None)
    if name is None:
        raise ValueError(f"no object id column: expected one of {list(LABEL_ALIASES['oid'])}")
    return name


def _oid_seed(oid: str, seed: int) -> int:
    """A stable per-object seed (not hash(): that changes between Python processes)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{oid}".encode(), digest_size=8).digest(), "little")


def holdout_by_hash(oids: Sequence[str], labels: Sequence, fraction: float, seed: int = 42) -> np.ndarray:
    """Sorted oids held out: per label, the ``round(fraction * n)`` objects whose seeded hash comes first.

    Stratified and independent of every other object: the same objects are held out whether or not the set is
    mixed with simulated data, so evaluations of differently trained models share one test set."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must lie in (0, 1); got {fraction}")
    per_object = _object_labels(oids, labels)
    out: list[str] = []
    for _, members in per_object.groupby(per_object, sort=True):
        ranked = sorted(members.index, key=lambda o: _oid_seed(o, seed))
        out.extend(ranked[:int(round(fraction * len(ranked)))])
    return np.sort(np.asarray(out, dtype=str))


def truncated_views(detections: pd.DataFrame, oids: Sequence[str], n_views: int, min_days: float = 3.0,
                    seed: int = 42, grid_days: int = 100, fit_context_days: float = 100.0,
                    max_days: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x (M, C, G), owner oid (M,), cut days after first detection (M,))``: up to ``n_views`` cuts per object.

    Cut days are drawn log-uniform in ``[min_days, min(span, max_days))`` (seeded per object, so the same object gets the same
    cuts in every run and process); an object spanning less than ``min_days`` gets none, and a cut the GP cannot
    interpolate is left out. Tensors come from :func:`deeprubin.lightcurves.tensorize.tensorize_curves`, the path
    inference uses."""
    wanted = set(map(str, oids))
    det = detections.loc[detections["oid"].astype(str).isin(wanted)]
    curves, owners, days = [], [], []
    for full in curves_from_detections(det):
        oid = full.oid
        span = float(full.mjd.max() - full.mjd.min())
        if n_views <= 0 or span <= min_days:
            continue
        rng = np.random.default_rng(_oid_seed(str(oid), seed))
        upper = span if max_days is None else min(span, max_days)
        for k, cut in enumerate(np.exp(rng.uniform(np.log(min_days), np.log(upper), size=n_views))):
            curves.append(cut_after_first(full, float(cut), oid=f"{oid}#{k}"))
            owners.append(str(oid))
            days.append(float(cut))
    x, ok = _view_tensors(curves, grid_days, fit_context_days)
    return x, np.asarray(owners, dtype=str)[ok], np.asarray(days, dtype=np.float64)[ok]


def _view_tensors(curves: Sequence, grid_days: int, fit_context_days: float) -> tuple[np.ndarray, np.ndarray]:
    """``(x of the views the GP could interpolate, in order; bool per view: made)`` via the inference path."""
    tensors = tensorize_curves(curves, grid_days, fit_context_days)
    made = {row["oid"]: i for i, row in enumerate(tensors.rows)}
    pick = [made.get(c.oid) for c in curves]
    ok = np.array([p is not None for p in pick], dtype=bool)
    rows = np.array([p for p in pick if p is not None], dtype=np.int64)
    x = tensors.x[rows] if len(rows) else np.zeros((0, tensors.x.shape[1], grid_days), dtype=np.float32)
    return x, ok


def redshifts_of(labels: Path | str | None) -> dict[str, float]:
    """oid -> spectroscopic redshift from a labels table's ``redshift`` column (missing or unparsable values left
    out; none at all when there is no table or no such column). Training-time only: never a model input."""
    if labels is None or not Path(labels).exists():
        return {}
    table = read_table(labels)
    if "redshift" not in table.columns:
        return {}
    oid = table[_oid_column(table)].astype(str)
    z = pd.to_numeric(table["redshift"], errors="coerce")
    ok = z.notna() & (z > 0)
    return dict(zip(oid[ok], z[ok].astype(float)))


def redshifted_views(detections: pd.DataFrame, oids: Sequence[str], redshifts: Mapping[str, float], n_views: int,
                     seed: int = 42, grid_days: int = 100, fit_context_days: float = 100.0,
                     max_peak_mag: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """``(x (M, C, G), owner oid (M,))``: up to ``n_views`` redshifted copies (:mod:`deeprubin.augment`) of each of
    ``oids`` with a known redshift, seeded per object; tensors from the inference path."""
    wanted = {o for o in map(str, oids) if o in redshifts}
    det = detections.loc[detections["oid"].astype(str).isin(wanted)]
    curves, owners = redshifted_curves(curves_from_detections(det), redshifts, n_views,
                                       lambda oid: _oid_seed(f"z:{oid}", seed), max_peak_mag)
    x, ok = _view_tensors(curves, grid_days, fit_context_days)
    return x, np.asarray(owners, dtype=str)[ok] if len(owners) else np.array([], dtype=str)


class GPDraws:
    """A training batch's collate function that replaces each GP mean by a random curve within its uncertainty:
    ``mean + scale * std * n``, ``n`` a unit-variance Gaussian noise smoothed over ``smooth_days`` (a cheap stand-in
    for a draw from the GP posterior, whose neighbouring days are correlated). Channels: :data:`CHANNELS` order
    (means 0-1, standard deviations 2-3). Days past the last detection change too, but the network's pooling ignores
    them."""

    def __init__(self, scale: float, seed: int, smooth_days: float = 3.0):
        if scale < 0:
            raise ValueError(f"GP draw scale must be >= 0; got {scale}")
        self.scale = scale
        self.generator = torch.Generator().manual_seed(seed)
        half = int(np.ceil(3 * smooth_days))
        kernel = torch.exp(-0.5 * (torch.arange(-half, half + 1, dtype=torch.float32) / smooth_days) ** 2)
        self.kernel = (kernel / kernel.pow(2).sum().sqrt()).view(1, 1, -1)  # unit variance after smoothing

    def __call__(self, batch):
        x, y = default_collate(batch)
        n, _, t = x.shape
        white = torch.randn(n * 2, 1, t + self.kernel.shape[2] - 1, generator=self.generator)
        smooth = torch.nn.functional.conv1d(white, self.kernel).view(n, 2, t)
        x = x.clone()
        x[:, 0:2] += self.scale * x[:, 2:4] * smooth
        return x, y


class ViewSampler(Sampler[int]):
    """One dataset row per object per epoch: objects in random order (or drawn by ``object_weights`` with
    replacement, for balanced batches), each represented by one of its rows (views) chosen at random.

    ``full_probability``: the first row of a group (the whole light curve) is chosen with this probability and a
    cut otherwise (None: every view equally likely). Whole curves stay frequent, so augmentation for early
    classification does not cost much accuracy on complete light curves."""

    def __init__(self, groups: Sequence[np.ndarray], object_weights: np.ndarray | None = None, seed: int = 42,
                 full_probability: float | None = None):
        self.groups = [torch.as_tensor(np.asarray(g, dtype=np.int64)) for g in groups]
        if any(len(g) == 0 for g in self.groups):
            raise ValueError("every object needs at least one view")
        if full_probability is not None and not 0 <= full_probability <= 1:
            raise ValueError(f"full_probability must lie in [0, 1]; got {full_probability}")
        self.full_probability = full_probability
        self.weights = None if object_weights is None else torch.as_tensor(object_weights, dtype=torch.double)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        n = len(self.groups)
        if self.weights is None:
            order = torch.randperm(n, generator=self.generator)
        else:
            order = torch.multinomial(self.weights, n, replacement=True, generator=self.generator)
        for i in order.tolist():
            group = self.groups[i]
            if self.full_probability is None or len(group) == 1:
                yield int(group[torch.randint(len(group), (1,), generator=self.generator)])
            elif torch.rand(1, generator=self.generator).item() < self.full_probability:
                yield int(group[0])
            else:
                yield int(group[1 + torch.randint(len(group) - 1, (1,), generator=self.generator)])


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
                 imbalance: Imbalance = "weights", num_workers: int = 0, holdout: Sequence[str] = (),
                 raw_dir: Path | str | None = None, truncations: int = 0, truncation_min_days: float = 3.0,
                 truncation_max_days: float | None = None,
                 full_view_probability: float | None = None, redshift_views: int = 0,
                 redshifts: Mapping[str, float] | None = None, redshift_max_peak_mag: float = 20.0,
                 shuffle_seed: int | None = None, simulated_classes: Sequence[str] | None = None,
                 gp_draws: float = 0.0, selection_views: int = 0, selection_objects: str = "all"):
        super().__init__()
        self.gp_draws = gp_draws
        if selection_objects not in ("all", "real"):
            raise ValueError(f"selection_objects must be all or real; got {selection_objects!r}")
        if selection_objects == "real" and raw_dir is None:
            raise ValueError("selection_objects real reads each object's label source from raw_dir: it needs raw_dir")
        self.selection_objects = selection_objects
        self.selection_real: bool = False  # the validation loader holds the real objects only (selection_objects)
        if selection_views and raw_dir is None:
            raise ValueError("selection_views refit the GP on cut validation curves: they need raw_dir")
        self.selection_views = selection_views
        self._selection: TensorDataset | None = None  # whole validation curves + their cuts (val_dataloader)
        if simulated_classes is not None and raw_dir is None:
            raise ValueError("simulated_classes reads each object's label source from raw_dir: it needs raw_dir")
        self.simulated_classes = None if simulated_classes is None else frozenset(simulated_classes)
        self.shuffle_seed = seed if shuffle_seed is None else shuffle_seed  # batch order; splits stay on seed
        if (truncations or redshift_views) and raw_dir is None:
            raise ValueError("truncation and redshift augmentation refit the GP on new light curves: they need raw_dir")
        self.redshift_views, self.redshifts = redshift_views, dict(redshifts or {})
        self.redshift_max_peak_mag = redshift_max_peak_mag
        self.holdout = frozenset(map(str, holdout))
        self.raw_dir = None if raw_dir is None else Path(raw_dir)
        self.truncations, self.truncation_min_days = truncations, truncation_min_days
        if truncation_max_days is not None and not truncation_max_days > truncation_min_days:
            raise ValueError(f"truncation_max_days ({truncation_max_days}) must exceed truncation_min_days "
                             f"({truncation_min_days})")
        self.truncation_max_days = truncation_max_days
        self.full_view_probability = full_view_probability
        self.train_views: pd.DataFrame | None = None  # owner oid and cut day of each augmented training row
        if imbalance not in ("none", "weights", "sampler", "both", "source_sampler"):
            raise ValueError(f"imbalance must be none, weights, sampler, both or source_sampler; got {imbalance!r}")
        if imbalance == "source_sampler" and raw_dir is None:
            raise ValueError("imbalance source_sampler reads each object's label source from raw_dir: it needs raw_dir")
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
        self._train_groups: list[np.ndarray] | None = None
        self._train_object_weights: np.ndarray | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        x, index = load_processed(self.processed_dir)
        label = index["label"].map(lambda v: CLASS_ALIASES.get(v, v) if isinstance(v, str) else None)
        keep = label.isin(self.classes).to_numpy()
        if not keep.any():
            raise ValueError(f"no objects of classes {list(self.classes)} in {self.processed_dir}")
        index = index.loc[keep].reset_index(drop=True)
        index["label"] = label[keep].to_numpy()
        index["target"] = index["label"].map({c: i for i, c in enumerate(self.classes)}).astype(np.int64)
        x = np.asarray(x[keep], dtype=np.float32)
        held = index["oid"].astype(str).isin(self.holdout).to_numpy()
        splits = split_objects(index["oid"][~held], index["label"][~held], self.val_fraction, self.test_fraction,
                               self.seed)
        splits["test"] = np.sort(np.concatenate([splits["test"], index["oid"][held].to_numpy(dtype=str)]))
        if self.simulated_classes is not None:
            source = self._label_sources()
            train = pd.Series(splits["train"])
            label_of = index.set_index(index["oid"].astype(str))["label"]
            simulated_out = (train.map(source) == SIMULATED) & ~train.map(label_of).isin(self.simulated_classes)
            splits["train"] = np.sort(train[~simulated_out].to_numpy(dtype=str))
        self.splits = splits
        split_of = {oid: name for name, ids in self.splits.items() for oid in ids}
        index["split"] = index["oid"].astype(str).map(split_of)
        if index["split"].isna().any():  # simulated objects of classes not trained on
            rows = index["split"].notna().to_numpy()
            index, x = index.loc[rows].reset_index(drop=True), x[rows]
        self.index, self.n_channels = index, x.shape[1]
        for name in SPLITS:
            rows = np.flatnonzero((index["split"] == name).to_numpy())
            self._data[name] = TensorDataset(torch.from_numpy(x[rows]),
                                             torch.from_numpy(index["target"].to_numpy()[rows]))
        if self.imbalance in ("weights", "both"):
            self.class_weights = torch.as_tensor(class_weights(self.targets("train"), len(self.classes)),
                                                 dtype=torch.float32)
        if self.imbalance == "source_sampler":
            self._train_object_weights = self._source_class_weights(index)
        if self.truncations > 0 or (self.redshift_views > 0 and self.redshifts):
            self._add_truncated_views(index)
        if self.selection_views > 0:
            self._add_selection_views(index)
        if self.selection_objects == "real":
            self._keep_real_selection(index)

    def _label_sources(self) -> pd.Series:
        """oid -> label source (``simulated``, ``bts:spectroscopic``, ...) from ``raw_dir``'s objects table."""
        objects = RawStore(self.raw_dir).read().objects
        return objects.assign(oid=objects["oid"].astype(str)).drop_duplicates("oid", keep="last") \
            .set_index("oid")["label_source"].astype(str)

    def _source_class_weights(self, index: pd.DataFrame) -> np.ndarray:
        """Per training object, 1 / (objects of its label source and class): each (source, class) group, e.g.
        simulated SN II or spectroscopic SN II, is drawn equally often, so a scarce real class is not outweighed by
        the plentiful real class or by the simulation."""
        source_of = self._label_sources()
        train = index.loc[index["split"] == "train"]
        group = train["oid"].astype(str).map(source_of).fillna("unknown") + "/" + train["label"].astype(str)
        return (1.0 / group.map(group.value_counts())).to_numpy(dtype=np.float64, copy=True)

    def _add_truncated_views(self, index: pd.DataFrame) -> None:
        settings = preprocessing_of(self.processed_dir)
        train = index.loc[index["split"] == "train"].reset_index(drop=True)
        detections = RawStore(self.raw_dir).read().detections
        xv, owners, days = truncated_views(detections, train["oid"].astype(str), self.truncations,
                                           self.truncation_min_days, self.seed,
                                           settings.grid_days, settings.fit_context_days, self.truncation_max_days)
        if self.redshift_views > 0 and self.redshifts:
            xz, z_owners = redshifted_views(detections, train["oid"].astype(str), self.redshifts,
                                            self.redshift_views, self.seed, settings.grid_days,
                                            settings.fit_context_days, self.redshift_max_peak_mag)
            xv, owners = np.concatenate([xv, xz]), np.concatenate([owners, z_owners])
            days = np.concatenate([days, np.full(len(z_owners), np.nan)])  # NaN: a redshifted whole curve
        position = {oid: i for i, oid in enumerate(train["oid"].astype(str))}
        owner_pos = np.array([position[o] for o in owners], dtype=np.int64)
        full_x, full_y = self._data["train"].tensors
        self._data["train"] = TensorDataset(torch.cat([full_x, torch.from_numpy(xv)]),
                                            torch.cat([full_y, full_y[torch.from_numpy(owner_pos)]]))
        groups: list[list[int]] = [[i] for i in range(len(train))]
        for row, pos in enumerate(owner_pos):
            groups[pos].append(len(train) + row)
        self._train_groups = [np.asarray(g) for g in groups]
        self.train_views = pd.DataFrame({"oid": owners, "days": days})

    def _add_selection_views(self, index: pd.DataFrame) -> None:
        """The validation loader's set: every validation object's whole curve, then its cuts (``dataset("val")``
        keeps the whole curves only, one row per object, for calibration and reports)."""
        settings = preprocessing_of(self.processed_dir)
        val = index.loc[index["split"] == "val"].reset_index(drop=True)
        detections = RawStore(self.raw_dir).read().detections
        xv, owners, _ = truncated_views(detections, val["oid"].astype(str), self.selection_views,
                                        self.truncation_min_days, self.seed + 1, settings.grid_days,
                                        settings.fit_context_days, self.truncation_max_days)
        target = dict(zip(val["oid"].astype(str), val["target"].to_numpy()))
        full_x, full_y = self._data["val"].tensors
        yv = torch.as_tensor(np.array([target[o] for o in owners], dtype=np.int64))
        self._selection = TensorDataset(torch.cat([full_x, torch.from_numpy(xv)]), torch.cat([full_y, yv]))
        self._selection_owners = np.asarray(owners, dtype=str)

    def real_objects(self, split: str) -> int:
        """How many objects of ``split`` are real (label source not the simulator; needs ``raw_dir``)."""
        oids = self.index.loc[self.index["split"] == split, "oid"].astype(str)
        return int((oids.map(self._label_sources()) != SIMULATED).sum())

    def _keep_real_selection(self, index: pd.DataFrame) -> None:
        """The validation loader's set restricted to the real objects (label source not the simulator): early
        stopping and the best checkpoint are then chosen on the objects the model is for. No real validation object:
        all of them, as with ``all``."""
        val = index.loc[index["split"] == "val"].reset_index(drop=True)
        real = (val["oid"].astype(str).map(self._label_sources()) != SIMULATED).to_numpy()
        if not real.any():
            return
        whole_x, whole_y = self._data["val"].tensors
        keep = torch.from_numpy(real.copy())
        if self._selection is not None:  # whole curves first, then cuts (``_add_selection_views``)
            sel_x, sel_y = self._selection.tensors
            owners = np.concatenate([val["oid"].astype(str).to_numpy(), self._selection_owners])
            real_oids = set(val["oid"].astype(str)[real])
            keep = torch.from_numpy(np.array([o in real_oids for o in owners]))
            self._selection = TensorDataset(sel_x[keep], sel_y[keep])
        else:
            self._selection = TensorDataset(whole_x[keep], whole_y[keep])
        self.selection_real = True

    def targets(self, split: str) -> np.ndarray:
        """One target per object of the split (augmented views of training objects are not counted again)."""
        y = self._data[split].tensors[1].numpy()
        return y[:len(self._train_groups)] if split == "train" and self._train_groups is not None else y

    def dataset(self, split: str) -> TensorDataset:
        return self._data[split]

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        kwargs = {}
        if train and self._train_groups is not None:
            weights = self._train_object_weights
            if self.imbalance in ("sampler", "both"):
                y = self.targets(split)
                weights = 1.0 / np.bincount(y)[y]
            kwargs["sampler"] = ViewSampler(self._train_groups, weights, self.shuffle_seed, self.full_view_probability)
        elif train and self._train_object_weights is not None:
            kwargs["sampler"] = WeightedRandomSampler(
                torch.as_tensor(self._train_object_weights, dtype=torch.double), len(self._train_object_weights),
                replacement=True, generator=torch.Generator().manual_seed(self.shuffle_seed))
        elif train and self.imbalance in ("sampler", "both"):
            kwargs["sampler"] = balanced_sampler(self.targets(split), self.shuffle_seed)
        elif train:
            kwargs.update(shuffle=True, generator=torch.Generator().manual_seed(self.shuffle_seed))
        if train and self.gp_draws > 0:
            kwargs["collate_fn"] = GPDraws(self.gp_draws, self.shuffle_seed)
        return DataLoader(self._data[split], batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        if self._selection is not None:
            return DataLoader(self._selection, batch_size=self.batch_size, num_workers=self.num_workers,
                              persistent_workers=self.num_workers > 0)
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
