"""The retraining policy of the nightly loop: when new data justifies training a new model."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from deeprubin.config import Params
from deeprubin.outputs import TRAIN_REPORT
from deeprubin.processed import INDEX
from deeprubin.registry import CHAMPION, Registry
from deeprubin.sources.bts import label_changes_since


def should_retrain(params: Params, force: bool = False) -> tuple[bool, str]:
    """Retrain when forced, when no model was trained yet, when the registry has no champion, or when at least
    ``flows.retrain_min_new_labelled`` labelled objects arrived, or changed label, since the last training.

    New spectroscopic labels of new objects count as new labelled objects; a spectroscopic label that changed a
    stored object's label (a re-typed object, or a BTS type replacing the classifier's guess) counts as a change,
    as recorded by the BTS pull (:func:`deeprubin.sources.bts.label_changes_since`) after the last training
    (:func:`trained_at`)."""
    if force:
        return True, "retraining forced"
    report_path = Path(params.train.model_dir) / TRAIN_REPORT
    if not report_path.exists():
        return True, "no model trained yet"
    if Registry(params.train.tracking_uri, params.base.model_name).alias(CHAMPION) is None:
        return True, f"the registry at {params.train.tracking_uri} has no champion"
    report = json.loads(report_path.read_text())
    then = int(report.get("extra", {}).get("tags", {}).get("n_labelled_objects")
               or sum(report.get("split_sizes", {}).values()))
    index = pd.read_parquet(Path(params.preprocess.processed_dir) / INDEX, columns=["oid", "label"])
    now = int(index.loc[index["label"].isin(params.base.classes), "oid"].nunique())
    changed = label_changes_since(Path(params.ingest.raw_dir), trained_at(report, report_path))
    new, need = now - then, params.flows.retrain_min_new_labelled
    changes = f" and {changed} labels changed (spectroscopic types)" if changed else ""
    if new + changed >= need:
        return True, f"{new} labelled objects arrived{changes} since the last training (threshold {need})"
    return False, f"only {new} new labelled objects{changes} since the last training (threshold {need})"


def trained_at(report: dict, report_path: Path) -> pd.Timestamp:
    """When the model of ``train.json`` was trained: its ``trained_at`` (UTC, written by the train stage), or, for
    a report written before the stage recorded it (or with a value that does not parse), the file's modification time. The
    recorded time is what counts: a checkout (``git``, ``dvc checkout``, a copy) rewrites the file and its mtime,
    which would hide the label changes made between the training and the checkout."""
    recorded = report.get("trained_at")
    if recorded:
        try:
            at = pd.Timestamp(recorded)
            return at.tz_localize("UTC") if at.tzinfo is None else at.tz_convert("UTC")
        except (TypeError, ValueError):
            pass
    return pd.Timestamp(report_path.stat().st_mtime, unit="s", tz="UTC")
