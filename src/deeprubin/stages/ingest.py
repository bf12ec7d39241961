"""Stage ``ingest``: light curves from a source -> validated contract tables in ``data/raw``.

Sources: the simulator, files, the ALeRCE API (``alerce``, incremental) and the BTS catalogue (``bts``,
incremental: spectroscopic types, light curves from the ALeRCE API). Every source goes through the same checks: rows
are mapped onto the contract, bad rows are dropped with a reason naming the object, objects outside the configured
classes or with too few detections are dropped and counted (the BTS source keeps its other types, labelled outside
the four classes), and the result is committed atomically to the raw store (replacing it, or upserted into it by
key).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from deeprubin.config import BaseParams, IngestParams, Params
from deeprubin.progress import Progress, or_silent
from deeprubin.sources import bts
from deeprubin.sources.alerce_pull import pull
from deeprubin.sources.batch import IngestResult, class_counts, concat_batches, prepare_batch
from deeprubin.sources.files import MappedTables, load
from deeprubin.sources.simulate import simulate
from deeprubin.store import RawStore, upsert


@dataclass(frozen=True)
class IngestPaths:
    raw_dir: Path

    @classmethod
    def from_params(cls, params: Params) -> "IngestPaths":
        return cls(raw_dir=Path(params.ingest.raw_dir))


def _from_source(params: IngestParams, base: BaseParams) -> MappedTables:
    if params.source == "simulator":
        sim = simulate(params.simulator, classes=base.classes, seed=params.simulator.seed or base.seed)
        return MappedTables(detections=sim.detections, non_detections=sim.non_detections,
                            labels=sim.objects[["oid", "label", "label_probability"]], source="simulator",
                            label_source="simulated")
    if params.source == "files":
        return load(params.files)
    raise ValueError(f"unknown ingest source {params.source!r}")


def run(params: Params, paths: IngestPaths, progress: Progress | None = None) -> IngestResult:
    """Ingest from the configured source into ``paths.raw_dir``; see the module docstring."""
    base, cfg = params.base, params.ingest  # the stage reads its own section (and base) from here on
    step = or_silent(progress)
    started = time.perf_counter()
    if cfg.source in ("alerce", "bts"):
        result = (pull if cfg.source == "alerce" else bts.pull)(cfg, paths.raw_dir, base, step)
        result.seconds = time.perf_counter() - started
        return result

    step(f"reading from {cfg.source}")
    mapped = _from_source(cfg, base)
    # Deterministic for deterministic sources, so that `dvc repro` reproduces the same bytes.
    ingested_at = pd.Timestamp(0, tz="UTC") if cfg.source == "simulator" else pd.Timestamp.now(tz="UTC")
    batch, reports, dropped = prepare_batch(mapped, cfg, base, ingested_at, step)
    if cfg.mixes_files:
        step(f"reading {cfg.files.detections}")
        extra, extra_reports, extra_dropped = prepare_batch(load(cfg.files), cfg, base, ingested_at, step)
        batch = concat_batches(batch, extra)
        reports, dropped = reports + extra_reports, dropped + extra_dropped

    step(f"writing {paths.raw_dir}")
    store = RawStore(paths.raw_dir)
    counts = None
    if cfg.upsert:
        batch, counts = upsert(store.read(), batch)
    result = IngestResult(
        source=cfg.source + ("+files" if cfg.mixes_files else ""),
        raw_dir=paths.raw_dir,
        objects_per_class=class_counts(batch),
        detections=len(batch.detections),
        non_detections=len(batch.non_detections),
        reports=reports,
        objects_dropped=dropped,
        counts=counts,
    )
    # Replacing the tables voids an ALeRCE pull's watermarks; an upsert keeps them valid.
    store.commit(batch, result.manifest(), rejections=result.rejections_frame(), state=None if cfg.upsert else {})
    result.seconds = time.perf_counter() - started
    return result

