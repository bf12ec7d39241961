"""Stage ``ingest``: light curves from a source -> validated contract tables in ``data/raw``.

Every source goes through the same checks: rows are mapped onto the contract, bad rows are dropped with a reason
naming the object, objects outside the configured classes or with too few detections are dropped and counted, and
the result is committed atomically to the raw store (replacing it, or upserted into it by key).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from deeprubin import __version__
from deeprubin.config import BaseParams, IngestParams
from deeprubin.schema import (
    LightCurves,
    Rejection,
    ValidationReport,
    build_objects,
    validate_detections,
    validate_non_detections,
)
from deeprubin.sources.files import MappedTables
from deeprubin.store import RawStore, UpsertCounts, upsert

# progress(message, completed=None, total=None): a step name, optionally with a count of units done.
Progress = Callable[..., None]


@dataclass(frozen=True)
class IngestPaths:
    raw_dir: Path

    @classmethod
    def from_params(cls, params: IngestParams) -> "IngestPaths":
        return cls(raw_dir=Path(params.raw_dir))


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


def _from_source(params: IngestParams, base: BaseParams) -> MappedTables:
    if params.source == "simulator":
        from deeprubin.sources.simulate import simulate

        sim = simulate(params.simulator, classes=base.classes, seed=params.simulator.seed or base.seed)
        return MappedTables(detections=sim.detections, non_detections=sim.non_detections,
                            labels=sim.objects[["oid", "label", "label_probability"]], source="simulator",
                            label_source="simulated")
    if params.source == "files":
        from deeprubin.sources.files import load

        return load(params.files)
    raise ValueError(f"unknown ingest source {params.source!r}")


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
        dropped.append(Rejection(oid=str(oid), reason=f"fewer than {min_detections} valid detections", rows=int(n)))
    keep = n_det.index[~too_few.to_numpy()]
    return detections.loc[detections["oid"].isin(keep)].reset_index(drop=True), dropped


def prepare_batch(mapped: MappedTables, params: IngestParams, base: BaseParams, ingested_at: pd.Timestamp,
                  step: Progress) -> tuple[LightCurves, list[ValidationReport], list[Rejection]]:
    """Validate mapped tables, keep the target objects with enough detections, build the objects table."""
    step("validating detections")
    detections, det_report = validate_detections(mapped.detections, on_unsorted=params.on_unsorted)
    detections, dropped = select_objects(detections, mapped.labels, base.classes, params.min_detections,
                                         keep_unlabelled=params.source == "files" and params.files.keep_unlabelled)
    step("validating non-detections")
    non_det, nd_report = validate_non_detections(mapped.non_detections)
    non_det = non_det.loc[non_det["oid"].isin(detections["oid"].unique())].reset_index(drop=True)
    objects = build_objects(detections, mapped.labels, source=mapped.source, label_source=mapped.label_source,
                            ingested_at=ingested_at)
    return LightCurves(objects=objects, detections=detections, non_detections=non_det), [det_report, nd_report], \
        dropped


def concat_batches(first: LightCurves, second: LightCurves) -> LightCurves:
    """Two sources' objects in one store; an oid in both would mix two light curves, so it is an error."""
    shared = set(first.objects["oid"]) & set(second.objects["oid"])
    if shared:
        raise ValueError(f"{len(shared)} oid(s) come from both sources, e.g. {sorted(shared)[0]}: "
                         "rename one source's objects (e.g. ingest.simulator.oid_prefix)")
    objects = pd.concat([first.objects, second.objects], ignore_index=True).sort_values("oid", kind="mergesort")
    frames = {}
    for name in ("detections", "non_detections"):
        a, b = getattr(first, name), getattr(second, name)
        frame = pd.concat([f for f in (a, b) if len(f)] or [a], ignore_index=True)
        frames[name] = frame.sort_values(["oid", "mjd", "band"], kind="mergesort").reset_index(drop=True)
    return LightCurves(objects=objects.reset_index(drop=True), **frames)


def _class_counts(lcs: LightCurves) -> dict[str, int]:
    labels = lcs.objects["label"].fillna("(none)")
    return {str(k): int(v) for k, v in labels.value_counts().sort_index().items()}


def run(params: IngestParams, paths: IngestPaths, base: BaseParams | None = None,
        progress: Progress | None = None) -> IngestResult:
    """Ingest from the configured source into ``paths.raw_dir``; see the module docstring."""
    base = base or BaseParams()
    step = progress or (lambda *_args, **_kw: None)
    started = time.perf_counter()
    if params.source == "alerce":
        from deeprubin.stages.ingest_alerce import pull

        result = pull(params, paths, base, step)
        result.seconds = time.perf_counter() - started
        return result

    step(f"reading from {params.source}")
    mapped = _from_source(params, base)
    # Deterministic for deterministic sources, so that `dvc repro` reproduces the same bytes.
    ingested_at = pd.Timestamp(0, tz="UTC") if params.source == "simulator" else pd.Timestamp.now(tz="UTC")
    batch, reports, dropped = prepare_batch(mapped, params, base, ingested_at, step)
    if params.mix_files:
        from deeprubin.sources.files import load

        step(f"reading {params.files.detections}")
        extra, extra_reports, extra_dropped = prepare_batch(load(params.files), params, base, ingested_at, step)
        batch = concat_batches(batch, extra)
        reports, dropped = reports + extra_reports, dropped + extra_dropped

    step(f"writing {paths.raw_dir}")
    store = RawStore(paths.raw_dir)
    counts = None
    if params.upsert:
        batch, counts = upsert(store.read(), batch)
    result = IngestResult(
        source=params.source + ("+files" if params.mix_files else ""),
        raw_dir=paths.raw_dir,
        objects_per_class=_class_counts(batch),
        detections=len(batch.detections),
        non_detections=len(batch.non_detections),
        reports=reports,
        objects_dropped=dropped,
        counts=counts,
    )
    # Replacing the tables voids an ALeRCE pull's watermarks; an upsert keeps them valid.
    store.commit(batch, result.manifest(), rejections=result.rejections_frame(), state=None if params.upsert else {})
    result.seconds = time.perf_counter() - started
    return result


def main() -> None:  # `python -m deeprubin.stages.ingest` (what dvc.yaml calls)
    from deeprubin.cli import app

    app(["ingest"])


if __name__ == "__main__":
    main()
