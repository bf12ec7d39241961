"""Evaluation sets: the objects a model is scored on, with their labels, model input and detections.

- :func:`split_test_set`: the test split of ``data/processed`` (the training split's own, by object), all classes;
  supernovae labelled by a classifier are left out when spectroscopic ones exist (:func:`classifier_supernovae`).
- :func:`real_set`: a real labelled set evaluated held out (``evaluate.real``; by default the BTS supernovae),
  read from its files and interpolated by the model-input path, scored on its own classes.
- :func:`frozen_set`: the set promotion scores champion and challenger on (``promote.evaluation_set``).
- :func:`objects_hash`: the fingerprint of a set; two models' numbers compare only when it matches.

The same real objects are held out everywhere: :func:`holdout_oids` is a seeded, stratified hash of the oids
(:func:`deeprubin.data.holdout_by_hash`), so the training stage keeps them out of training even when
``ingest.mix_files`` put the set into ``data/raw``, and the evaluation stage scores exactly them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from deeprubin.config import BaseParams, FilesParams, IngestParams, Params, RealSetParams
from deeprubin.data import ProcessedDataModule, holdout_by_hash
from deeprubin.lightcurves.tensorize import tensorize
from deeprubin.processed import Preprocessing, preprocessing_of
from deeprubin.schema import CLASS_ALIASES, SPECTROSCOPIC, TRUE_LABEL_SOURCES, map_labels, validate_detections
from deeprubin.sources.batch import select_objects
from deeprubin.sources.files import load, read_table
from deeprubin.store import RawStore

SUPERNOVAE = ("SNIa", "SNII")


@dataclass
class RealSet:
    name: str
    detections: pd.DataFrame  # contract detections of the held-out objects
    labels: pd.Series  # oid -> class, held-out objects only, sorted by oid
    dropped: dict[str, int]  # reason -> objects not scored


def _labelled(real: RealSetParams) -> tuple[pd.DataFrame, pd.Series, dict[str, int]]:
    mapped = load(FilesParams(detections=real.detections, labels=real.labels, label_source=real.name))
    detections, _ = validate_detections(mapped.detections)
    labels = mapped.labels.drop_duplicates("oid", keep="last")
    labels = labels.assign(label=labels["label"].map(lambda v: CLASS_ALIASES.get(v, v)))
    detections, dropped = select_objects(detections, labels, list(real.classes),
                                         IngestParams().min_detections, keep_unlabelled=False)
    reasons: dict[str, int] = {}
    for r in dropped:
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
    kept = sorted(detections["oid"].astype(str).unique())
    label_of = labels.set_index(labels["oid"].astype(str))["label"].reindex(kept)
    return detections, label_of, reasons


def holdout_oids(real: RealSetParams, base: BaseParams) -> np.ndarray:
    """The held-out oids of the real set (empty when its files are absent)."""
    if not real.available:
        return np.array([], dtype=str)
    labels = map_labels(read_table(real.labels)).drop_duplicates("oid", keep="last")
    labels = labels.assign(label=labels["label"].map(lambda v: CLASS_ALIASES.get(v, v)))
    labels = labels.loc[labels["label"].isin(real.classes)]
    return holdout_by_hash(labels["oid"].astype(str), labels["label"], real.test_fraction, base.seed)


def load_labelled(real: RealSetParams) -> RealSet | None:
    """Every labelled object of the real set in its scored classes (held out or not: cross-validation folds them
    all), or None when the set's files are absent."""
    if not real.available:
        return None
    detections, labels, dropped = _labelled(real)
    return RealSet(name=real.name, detections=detections.reset_index(drop=True), labels=labels.sort_index(),
                   dropped=dropped)


def load_heldout(real: RealSetParams, base: BaseParams) -> RealSet | None:
    """The held-out objects' detections and labels, or None when the set's files are absent."""
    if not real.available:
        return None
    held = set(holdout_oids(real, base))
    detections, labels, dropped = _labelled(real)
    keep = labels.index.isin(held)
    labels = labels[keep].sort_index()
    detections = detections.loc[detections["oid"].astype(str).isin(set(labels.index))].reset_index(drop=True)
    return RealSet(name=real.name, detections=detections, labels=labels, dropped=dropped)


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
    counts: dict[str, int] = field(default_factory=dict)  # numbers about the set, beside its scores in evaluate.json


def objects_hash(oids: np.ndarray, labels: np.ndarray) -> str:
    """Fingerprint of an evaluation set (its objects and labels): two models' numbers compare only when it matches."""
    pairs = sorted(zip(map(str, oids), map(str, labels)))
    return "sha256:" + hashlib.sha256("\n".join(f"{o}\t{label}" for o, label in pairs).encode()).hexdigest()


def split_test_set(params: Params, raw_dir: Path, processed_dir: Path, holdout: np.ndarray) -> EvalSet:
    """The test split of ``processed_dir``, as the data module makes it, minus the real held-out objects (scored
    as their own set)."""
    dm = ProcessedDataModule(processed_dir, classes=params.base.classes,
                             val_fraction=params.train.val_fraction, test_fraction=params.train.test_fraction,
                             seed=params.base.seed, holdout=holdout)
    dm.setup("test")
    test = dm.index.loc[dm.index["split"] == "test"]
    keep = ~test["oid"].astype(str).isin(set(map(str, holdout))).to_numpy()
    stored = RawStore(raw_dir).read()
    guessed = classifier_supernovae(stored.objects, test["oid"].astype(str).to_numpy(),
                                    test["label"].to_numpy().astype(str))
    keep &= ~guessed
    oids = test["oid"].astype(str).to_numpy()[keep]
    x = dm.dataset("test").tensors[0].numpy()[keep]
    det = stored.detections
    det = det.loc[det["oid"].astype(str).isin(set(oids))].reset_index(drop=True)
    n_guessed = int(guessed.sum())
    return EvalSet(name="test", oids=oids, labels=test["label"].to_numpy()[keep].astype(str), x=x, detections=det,
                   scored_classes=list(params.base.classes), restrict=False,
                   note=(f"{n_guessed} supernovae labelled by a classifier left out (spectroscopic labels only)"
                         if n_guessed else ""),
                   counts={"supernovae_classifier_labelled_left_out": n_guessed} if n_guessed else {})


def classifier_supernovae(objects: pd.DataFrame, oids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Which of ``oids`` are left out of scoring: supernovae (SNIa, SNII) whose label is another classifier's guess
    (``label_source`` not in :data:`~deeprubin.schema.TRUE_LABEL_SOURCES`, e.g. ``alerce:lc_classifier``), when
    the store holds spectroscopically labelled supernovae to score instead. Evaluation and the promotion gate then
    measure supernovae against spectroscopic types only, never against the classifier a model may have imitated;
    a store with no spectroscopic supernova (an ALeRCE-only pull) keeps them, as the only supernovae it has."""
    source_of = objects.set_index(objects["oid"].astype(str))["label_source"]
    label_of = objects.set_index(objects["oid"].astype(str))["label"]
    spectroscopic_sn = ((source_of == SPECTROSCOPIC) & label_of.isin(SUPERNOVAE)).any()
    if not spectroscopic_sn:
        return np.zeros(len(oids), dtype=bool)
    source = pd.Series(oids).map(source_of).to_numpy()
    return np.isin(labels, SUPERNOVAE) & ~pd.Series(source).isin(TRUE_LABEL_SOURCES).to_numpy()


def real_set(params: Params, preprocessing: Preprocessing) -> EvalSet | str:
    """The real held-out set interpolated with ``preprocessing``, or why it is unavailable."""
    real = load_heldout(params.evaluate.real, params.base)
    if real is None:
        return f"files not found ({params.evaluate.real.detections}, {params.evaluate.real.labels})"
    t = tensorize(real.detections, preprocessing.grid_days, preprocessing.fit_context_days)
    oids = np.asarray([r["oid"] for r in t.rows], dtype=str)
    note = f"{len(real.labels)} held-out objects, {len(t.skipped)} not interpolable" if t.skipped else ""
    return EvalSet(name=real.name, oids=oids, labels=real.labels.reindex(oids).to_numpy().astype(str), x=t.x,
                   detections=real.detections, scored_classes=list(params.evaluate.real.classes), restrict=True,
                   note=note)


def frozen_set(params: Params) -> EvalSet:
    """The evaluation set of ``promote.evaluation_set``: ``test`` or the real set's name."""
    raw_dir, processed_dir = Path(params.ingest.raw_dir), Path(params.preprocess.processed_dir)
    wanted = params.promote.evaluation_set
    if wanted == "test":
        return split_test_set(params, raw_dir, processed_dir, holdout_oids(params.evaluate.real, params.base))
    if wanted != params.evaluate.real.name:
        raise ValueError(f"promote.evaluation_set is {wanted!r}: use `test` or the real set's name "
                         f"{params.evaluate.real.name!r} (evaluate.real.name)")
    real = real_set(params, preprocessing_of(processed_dir))
    if isinstance(real, str):
        raise FileNotFoundError(f"promotion set {wanted} is unavailable: {real}")
    return real
