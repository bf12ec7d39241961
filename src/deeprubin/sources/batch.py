"""What ingestion does with any source's mapped tables: validate them, keep the target objects, build the objects
table, and report (:class:`IngestResult`) what was kept and what was dropped, naming every object."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deeprubin import __version__
from deeprubin.config import BaseParams, IngestParams
from deeprubin.progress import Progress
from deeprubin.schema import (
    LightCurves,
    Rejection,
    ValidationReport,
    build_objects,
    validate_detections,
    validate_non_detections,
)
from deeprubin.sources.files import MappedTables
from deeprubin.store import UpsertCounts


@dataclass
class IngestResult:
    source: str
    raw_dir: Path
    objects_per_class: dict[str, int]
    detections: int
    non_detections: int
    reports: list[ValidationReport]
    objects_dropped: list[Rejection] = field(default_factory=list)
    counts: UpsertCounts | None = None
    seconds: float = 0.0
    per_class: dict[str, dict[str, Any]] | None = None  # alerce: listed, fetched, failures, watermarks, ...
    complete: bool = True
    missing: list[dict[str, Any]] | None = None  # alerce: what a rerun should still store (empty when complete)
    extra: dict[str, Any] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        return {
            "deeprubin_version": __version__,
            "source": self.source,
            "objects_per_class": self.objects_per_class,
            "detections": self.detections,
            "non_detections": self.non_detections,
            "validation": [
                {"table": r.table, "rows_in": r.rows_in, "rows_out": r.rows_out, "dropped_by_reason": r.by_reason()}
                for r in self.reports
            ],
            "objects_dropped_by_reason": _count_reasons(self.objects_dropped),
            "upsert": self.counts.as_dict() if self.counts else None,
            "complete": self.complete,
            **({"missing": self.missing} if self.missing is not None else {}),
            **({"classes": self.per_class} if self.per_class is not None else {}),
            **self.extra,
        }


    def rejections_frame(self) -> pd.DataFrame:
        """Every object and reason that validation or selection dropped (rows = rows dropped, 0 when re-sorted)."""
        rows = [(r.oid, rep.table, r.reason, r.rows) for rep in self.reports for r in rep.rejections]
        rows += [(r.oid, "objects", r.reason, r.rows) for r in self.objects_dropped]
        return pd.DataFrame(rows, columns=["oid", "table", "reason", "rows"])


def _count_reasons(rejections: list[Rejection]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rejections:
        out[r.reason] = out.get(r.reason, 0) + 1
    return out


def select_objects(detections: pd.DataFrame, labels: pd.DataFrame | None, classes: list[str],
                   min_detections: int, keep_unlabelled: bool) -> tuple[pd.DataFrame, list[Rejection]]:
    """Keep objects of the target classes with at least ``min_detections`` detections; name every one dropped."""
    dropped: list[Rejection] = []
    n_det = detections.groupby("oid").size()
    if labels is not None and not keep_unlabelled:
        label_of = labels.drop_duplicates("oid", keep="last").set_index("oid")["label"]
        label_of = label_of.reindex(n_det.index)
        off_target = ~label_of.isin(classes).to_numpy()
        for oid, label in label_of[off_target].items():
            reason = "no label" if pd.isna(label) else f"label {label!r} is not a target class"
            dropped.append(Rejection(oid=str(oid), reason=reason, rows=int(n_det[oid])))
        n_det = n_det[~off_target]
    too_few = n_det < min_detections
    for oid, n in n_det[too_few].items():
        dropped.append(Rejection(oid=str(oid), reason=too_few_reason(min_detections), rows=int(n)))
    keep = n_det.index[~too_few.to_numpy()]
    return detections.loc[detections["oid"].isin(keep)].reset_index(drop=True), dropped


def too_few_reason(min_detections: int) -> str:
    return f"fewer than {min_detections} valid detections"


def merge_dropped(blocks: list[list[Rejection]], min_detections: int) -> list[Rejection]:
    """The objects :func:`select_objects` dropped from consecutive blocks of one table, in the order it names them
    for the whole table (off-target objects first, then those with too few detections, each in table order)."""
    few = too_few_reason(min_detections)
    merged = [r for block in blocks for r in block]
    return [r for r in merged if r.reason != few] + [r for r in merged if r.reason == few]


def prepare_batch(mapped: MappedTables, params: IngestParams, base: BaseParams, ingested_at: pd.Timestamp,
                  step: Progress, keep_unlabelled: bool | None = None
                  ) -> tuple[LightCurves, list[ValidationReport], list[Rejection]]:
    """Validate mapped tables, keep the target objects with enough detections, build the objects table.

    ``keep_unlabelled`` (default: ``files.keep_unlabelled`` for the files source) keeps objects whose label is
    missing or outside the target classes (the BTS source stores its other spectroscopic types)."""
    step("validating detections")
    detections, det_report = validate_detections(mapped.detections, on_unsorted=params.on_unsorted)
    if keep_unlabelled is None:
        keep_unlabelled = params.source == "files" and params.files.keep_unlabelled
    detections, dropped = select_objects(detections, mapped.labels, base.classes, params.min_detections,
                                         keep_unlabelled=keep_unlabelled)
    step("validating non-detections")
    non_det, nd_report = validate_non_detections(mapped.non_detections)
    non_det = non_det.loc[non_det["oid"].isin(detections["oid"].unique())].reset_index(drop=True)
    objects = build_objects(detections, mapped.labels, source=mapped.source, label_source=mapped.label_source,
                            ingested_at=ingested_at)
    return LightCurves(objects=objects, detections=detections, non_detections=non_det), [det_report, nd_report], \
        dropped


def shared_oids(first: LightCurves, second: LightCurves) -> set[str]:
    return set(first.objects["oid"]) & set(second.objects["oid"])


def shared_oids_error(shared: set[str]) -> ValueError:
    return ValueError(f"{len(shared)} oid(s) come from both sources, e.g. {sorted(shared)[0]}: "
                      "rename one source's objects (e.g. ingest.simulator.oid_prefix)")


def concat_batches(first: LightCurves, second: LightCurves, check: bool = True) -> LightCurves:
    """Two sources' objects in one store; an oid in both would mix two light curves, so it is an error (``check``
    False: the caller checks, :func:`shared_oids`)."""
    if check and (shared := shared_oids(first, second)):
        raise shared_oids_error(shared)
    objects = pd.concat([first.objects, second.objects], ignore_index=True).sort_values("oid", kind="mergesort")
    frames = {}
    for name in ("detections", "non_detections"):
        a, b = getattr(first, name), getattr(second, name)
        frame = pd.concat([f for f in (a, b) if len(f)] or [a], ignore_index=True)
        frames[name] = frame.sort_values(["oid", "mjd", "band"], kind="mergesort").reset_index(drop=True)
    return LightCurves(objects=objects.reset_index(drop=True), **frames)


def oid_range(lcs: LightCurves, low: str | None, high: str | None) -> LightCurves:
    """The rows of ``lcs`` whose oid is in [low, high) (None: unbounded)."""
    def part(frame: pd.DataFrame) -> pd.DataFrame:
        keep = np.ones(len(frame), dtype=bool)
        if low is not None:
            keep &= (frame["oid"] >= low).to_numpy()
        if high is not None:
            keep &= (frame["oid"] < high).to_numpy()
        return frame.loc[keep].reset_index(drop=True)
    return LightCurves(objects=part(lcs.objects), detections=part(lcs.detections),
                       non_detections=part(lcs.non_detections))


def class_counts(lcs: LightCurves) -> dict[str, int]:
    labels = lcs.objects["label"].fillna("(none)")
    return {str(k): int(v) for k, v in labels.value_counts().sort_index().items()}
