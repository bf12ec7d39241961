"""Stage ``ingest``: light curves from a source -> validated contract tables in ``data/raw``.

Sources: the simulator, files, the ALeRCE API (``alerce``, incremental) and the BTS catalogue (``bts``, incremental:
spectroscopic types, light curves from the ALeRCE API). The simulator streams (blocks of consecutive oids, from its
workers to the store's files), so its memory does not grow with the number of objects. Every source goes through
the same checks: rows are mapped onto the contract, bad rows are dropped with a reason naming the object, objects
outside the configured classes or with too few detections are dropped and counted (the BTS source keeps its other
types, labelled outside the four classes), and the result is committed atomically to the raw store (replacing it, or
upserted into it by key).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from deeprubin.config import BaseParams, IngestParams, Params
from deeprubin.progress import Progress, or_silent, silent
from deeprubin.schema import ValidationReport
from deeprubin.sources import bts
from deeprubin.sources.alerce_pull import pull
from deeprubin.sources.batch import (
    IngestResult,
    class_counts,
    concat_batches,
    merge_dropped,
    oid_range,
    prepare_batch,
    shared_oids,
    shared_oids_error,
)
from deeprubin.sources.files import MappedTables, load
from deeprubin.sources.simulate import BLOCK_OBJECTS, simulate_blocks
from deeprubin.store import RawStore, UpsertCounts, upsert


@dataclass(frozen=True)
class IngestPaths:
    raw_dir: Path

    @classmethod
    def from_params(cls, params: Params) -> "IngestPaths":
        return cls(raw_dir=Path(params.ingest.raw_dir))


def _from_source(params: IngestParams, base: BaseParams) -> MappedTables:
    """A source read whole (the simulator streams instead: :func:`_stream_simulator`)."""
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

    if cfg.source == "simulator":
        result = _stream_simulator(cfg, base, paths, step)
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



def _stream_simulator(cfg: IngestParams, base: BaseParams, paths: IngestPaths, step: Progress,
                      block_objects: int | None = None) -> IngestResult:
    """The simulator's objects ingested block by block (consecutive oids; :func:`simulate_blocks`): each block is
    validated, selected, mixed with the files' objects of its oid range, upserted into the stored rows of that range
    when upserting, and appended to the new state's tables, which are swapped in at the end (atomically: a failure
    on the way leaves the stored state whole). Every step works object by object, so the tables, counts, reports
    and rejections are those of the whole set at once, and the memory held is one block's, whatever the number of
    objects."""
    block_objects = block_objects or BLOCK_OBJECTS
    ingested_at = pd.Timestamp(0, tz="UTC")  # deterministic, so that `dvc repro` reproduces the same bytes
    extra, extra_reports, extra_dropped = None, [], []
    if cfg.mixes_files:
        step(f"reading {cfg.files.detections}")
        extra, extra_reports, extra_dropped = prepare_batch(load(cfg.files), cfg, base, ingested_at, step)
    store = RawStore(paths.raw_dir)
    seed = cfg.simulator.seed or base.seed
    n_total = cfg.simulator.n_per_class * len(base.classes)
    det_reports: list[ValidationReport] = []
    nd_reports: list[ValidationReport] = []
    dropped_blocks = []
    per_class: dict[str, int] = {}
    counts: UpsertCounts | None = None
    shared: set[str] = set()
    step(f"simulating {n_total} objects into {paths.raw_dir}, {block_objects} per block")
    with store.writing() as new:
        blocks = simulate_blocks(cfg.simulator, new.scratch, classes=base.classes, seed=seed,
                                 block_objects=block_objects)
        previous_block = next(blocks, None)
        low: str | None = None  # each block covers the oids from its first to the next block's first
        while previous_block is not None:
            sim = previous_block
            following = next(blocks, None)
            high = None if following is None else str(following.objects["oid"].iloc[0])
            mapped = MappedTables(detections=sim.detections, non_detections=sim.non_detections,
                                  labels=sim.objects[["oid", "label", "label_probability"]], source="simulator",
                                  label_source="simulated")
            batch, (det_report, nd_report), dropped = prepare_batch(mapped, cfg, base, ingested_at, silent)
            det_reports.append(det_report)
            nd_reports.append(nd_report)
            dropped_blocks.append(dropped)
            if extra is not None:
                part = oid_range(extra, low, high)
                shared |= shared_oids(batch, part)
                batch = concat_batches(batch, part, check=False)
            if cfg.upsert:
                batch, block_counts = upsert(store.read_range(low, high), batch)
                counts = block_counts if counts is None else counts + block_counts
            for label, n in class_counts(batch).items():
                per_class[label] = per_class.get(label, 0) + n
            new.write(batch)
            previous_block, low = following, high
        if shared:
            raise shared_oids_error(shared)
        result = IngestResult(
            source=cfg.source + ("+files" if cfg.mixes_files else ""),
            raw_dir=paths.raw_dir,
            objects_per_class=dict(sorted(per_class.items())),
            detections=new.rows("detections"),
            non_detections=new.rows("non_detections"),
            reports=[ValidationReport.merge_blocks(det_reports), ValidationReport.merge_blocks(nd_reports),
                     *extra_reports],
            objects_dropped=merge_dropped(dropped_blocks, cfg.min_detections) + extra_dropped,
            counts=counts,
        )
        step(f"writing {paths.raw_dir}")
        new.finish(result.manifest(), rejections=result.rejections_frame(), state=None if cfg.upsert else {})
    return result
