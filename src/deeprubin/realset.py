"""A real labelled set evaluated held out (``evaluate.real``; by default the BTS supernovae in ../shared/data).

The same objects are held out everywhere: :func:`holdout_oids` is a seeded, stratified hash of the oids
(:func:`deeprubin.data.holdout_by_hash`), so the training stage keeps them out of training even when
``ingest.mix_files`` put the set into ``data/raw``, and the evaluation stage scores exactly them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from deeprubin.config import BaseParams, FilesParams, IngestParams, RealSetParams
from deeprubin.schema import CLASS_ALIASES


@dataclass
class RealSet:
    name: str
    detections: pd.DataFrame  # contract detections of the held-out objects
    labels: pd.Series  # oid -> class, held-out objects only, sorted by oid
    dropped: dict[str, int]  # reason -> objects not scored


def _labelled(real: RealSetParams) -> tuple[pd.DataFrame, pd.Series, dict[str, int]]:
    from deeprubin.sources.files import load
    from deeprubin.stages.ingest import select_objects
    from deeprubin.schema import validate_detections

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
    from deeprubin.data import holdout_by_hash

    if not real.available:
        return np.array([], dtype=str)
    from deeprubin.sources.files import read_table
    from deeprubin.schema import map_labels

    labels = map_labels(read_table(real.labels)).drop_duplicates("oid", keep="last")
    labels = labels.assign(label=labels["label"].map(lambda v: CLASS_ALIASES.get(v, v)))
    labels = labels.loc[labels["label"].isin(real.classes)]
    return holdout_by_hash(labels["oid"].astype(str), labels["label"], real.test_fraction, base.seed)


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
