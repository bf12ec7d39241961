"""Stage ``baseline``: the balanced random forest (:mod:`deeprubin.models.forest`) trained on the TCN's training split.

The split is the TCN's own (:class:`deeprubin.data.ProcessedDataModule` with the same fractions, seed, held-out
real objects and ``train.simulated_classes``), so the two models are compared on exactly the same test objects. The forest reads the light curves
from ``data/raw`` (its features are computed on the detections, not on the GP grid) and also trains on copies cut
``evaluate.forest_truncations`` days after the first detection. Output: ``<train.model_dir>/forest.joblib`` and
``forest.json`` (objects per class, features, seconds).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deeprubin.config import Params
from deeprubin.data import ProcessedDataModule
from deeprubin.evaluation.sets import holdout_oids
from deeprubin.models.forest import BaselineForest
from deeprubin.outputs import FOREST_MODEL, FOREST_REPORT
from deeprubin.processed import INDEX
from deeprubin.progress import Progress, or_silent
from deeprubin.store import RawStore


@dataclass(frozen=True)
class BaselinePaths:
    raw_dir: Path
    processed_dir: Path
    model_dir: Path

    @classmethod
    def from_params(cls, params: Params) -> "BaselinePaths":
        return cls(raw_dir=Path(params.ingest.raw_dir), processed_dir=Path(params.preprocess.processed_dir),
                   model_dir=Path(params.train.model_dir))


def run(params: Params, paths: BaselinePaths, progress: Progress | None = None) -> dict[str, Any]:
    """Train the forest on the training split and save it; returns the report written to ``forest.json``."""
    step = or_silent(progress)
    started = time.perf_counter()
    if not (paths.processed_dir / INDEX).exists():
        raise FileNotFoundError(f"no processed tensors in {paths.processed_dir}: run `deeprubin preprocess` first")
    step("splitting objects as the TCN does")
    # The same training objects as the TCN: simulated objects that train.simulated_classes leaves out stay out here too.
    keep = params.train.simulated_classes
    dm = ProcessedDataModule(paths.processed_dir, classes=params.base.classes,
                             val_fraction=params.train.val_fraction, test_fraction=params.train.test_fraction,
                             seed=params.base.seed, holdout=holdout_oids(params.evaluate.real, params.base),
                             simulated_classes=keep, raw_dir=paths.raw_dir if keep is not None else None)
    dm.setup("fit")
    train = dm.index.loc[dm.index["split"] == "train"]
    labels = train.set_index(train["oid"].astype(str))["label"]
    step(f"reading {paths.raw_dir}")
    det = RawStore(paths.raw_dir).read().detections
    det = det.loc[det["oid"].astype(str).isin(set(labels.index))].reset_index(drop=True)
    step(f"fitting {params.evaluate.forest_trees} trees on {len(labels)} objects")
    forest = BaselineForest(classes=tuple(params.base.classes), n_estimators=params.evaluate.forest_trees,
                            truncations=tuple(params.evaluate.forest_truncations), seed=params.base.seed)
    forest.fit(det, labels)
    paths.model_dir.mkdir(parents=True, exist_ok=True)
    forest.save(paths.model_dir / FOREST_MODEL)
    report = {"objects_per_class": {str(k): int(v) for k, v in labels.value_counts().sort_index().items()},
              "trees": params.evaluate.forest_trees, "truncations": list(params.evaluate.forest_truncations),
              "seconds": round(time.perf_counter() - started, 1), "model": str(paths.model_dir / FOREST_MODEL)}
    (paths.model_dir / FOREST_REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report
