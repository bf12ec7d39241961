"""Classification with a registered (or local) model: light curves -> one row of probabilities per object.

The model is loaded once (:func:`load_model`, default ``models:/deeprubin-tcn@champion``); light curves go through
:func:`deeprubin.lightcurves.tensorize.tensorize_curves` (the window policy and GP of training) in bounded batches, so
memory does not grow with the input. Objects the GP cannot interpolate are returned as rejections (oid, reason,
detail) and never stop the run.

Output columns (the contract in DESIGN.md): ``oid``, ``predicted_class``, ``p_QSO``, ``p_CEP``, ``p_SNIa``,
``p_SNII``, ``n_det``, ``days_since_first_detection``, ``model_name``, ``model_version``, ``classified_at``.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from deeprubin.config import Params
from deeprubin.lightcurves.tensorize import curves_from_detections, tensorize_curves
from deeprubin.models.served import ServingModel, load_exported, load_model, predict
from deeprubin.processed import Preprocessing, partition_of
from deeprubin.progress import Progress, or_silent
from deeprubin.schema import CLASSES, DETECTIONS_SCHEMA, SchemaError, map_detections, to_arrow, validate_detections
COLUMNS = ["oid", "predicted_class", *[f"p_{c}" for c in CLASSES], "n_det", "days_since_first_detection",
           "model_name", "model_version", "classified_at"]
REJECTION_COLUMNS = ["oid", "reason", "detail"]


def serving_settings(model: Any, params: Params) -> Preprocessing:
    """The preprocessing the model was trained with; the configured one only for a model that records none."""
    fallback = Preprocessing(params.preprocess.grid_days, params.preprocess.fit_context_days)
    return model.settings(fallback) if isinstance(model, ServingModel) else fallback


def classify_curves(curves: list, model: ServingModel, grid_days: int = 100, fit_context_days: float = 100.0,
                    batch_size: int = 1024, progress: Progress | None = None
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(classifications, rejections)`` of ``curves`` (:class:`deeprubin.lightcurves.tensorize.Curve`), batch by batch,
    in this process (the HTTP service and the alert consumer; files go through :func:`classify_stream`)."""
    step = or_silent(progress)
    frames, rejected = [], []
    stamp = pd.Timestamp.now(tz="UTC")
    for start in range(0, len(curves), batch_size):
        batch = curves[start:start + batch_size]
        t = _tensorize_job((batch, grid_days, fit_context_days))
        rejected.extend(t.skipped)
        if len(t.rows):
            frames.append(_rows(t, model.predict_proba(t.x, batch_size), model, _n_det(batch), stamp))
        step("classifying", completed=min(start + batch_size, len(curves)), total=len(curves))
    out = pd.concat(frames, ignore_index=True) if frames else empty_classifications()
    return out[COLUMNS], pd.DataFrame(rejected, columns=REJECTION_COLUMNS)


def empty_classifications() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype="float64") for c in COLUMNS})
    for c in ("oid", "predicted_class", "model_name", "model_version"):
        frame[c] = frame[c].astype(object)
    frame["n_det"] = frame["n_det"].astype("int64")
    frame["classified_at"] = pd.Series(dtype="datetime64[ns, UTC]")
    return frame


def _n_det(curves) -> dict[str, int]:
    return {c.oid: int(len(c.mjd)) for c in curves}


@functools.cache
def _blas_controller():
    """One scan of the process's BLAS libraries (threadpool_limits rescans them on every call: ms per request)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _tensorize_job(job):
    """One batch through the GP and the window policy (a top-level function: it runs in worker processes)."""
    curves, grid_days, fit_context_days, *rest = job
    interpolator = rest[0] if rest else None
    # The GP's linear algebra is many small matrices: BLAS threads only add synchronisation, and they starve
    # when torch's own threads spin between TCN batches in the same process (3.4x slower measured on 2 cores).
    with _blas_controller().limit(limits=1, user_api="blas"):
        return tensorize_curves(curves, grid_days, fit_context_days, interpolator=interpolator)


# Streaming: input files of any size in bounded memory.

READ_ROWS = 65_536  # detections parsed per chunk of the input file
SPILL_BYTES = 32 * 2**20  # input bytes per on-disk partition when the input is not grouped by object
_SPILL_SCHEMA = pa.schema([f.with_nullable(True) for f in DETECTIONS_SCHEMA])


class NotGroupedError(Exception):
    """The input's rows of one object are not contiguous (it is then partitioned on disk first)."""


def _raw_chunks(path: Path, rows: int) -> Iterator[pd.DataFrame]:
    suffix = "".join(path.suffixes[-2:]).lower()
    if suffix.endswith((".parquet", ".pq")):
        reader = pq.ParquetFile(path)
        for batch in reader.iter_batches(batch_size=rows):
            yield batch.to_pandas()
    elif suffix.endswith((".csv", ".csv.gz")):
        yield from pd.read_csv(path, chunksize=rows)
    else:
        raise SchemaError(f"{path}: unknown format {path.suffix!r}; expected .parquet or .csv")


def count_rows(path: Path) -> int | None:
    """Rows of a Parquet file from its footer (None for CSV: counting would read it all)."""
    path = Path(path)
    return pq.ParquetFile(path).metadata.num_rows if path.suffix.lower() in (".parquet", ".pq") else None


def read_detections(path: Path | str, rows: int = READ_ROWS) -> Iterator[pd.DataFrame]:
    """Contract detections of ``path`` (Parquet or CSV; contract, ALeRCE or ANTARES/BTS columns), chunk by chunk."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file {path} does not exist")
    for raw in _raw_chunks(path, rows):
        yield map_detections(raw, source="files")


def grouped_objects(chunks: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Frames of whole objects from chunks whose rows are grouped by oid (each object's rows contiguous, the usual
    layout of exports). The trailing object of a chunk waits for the next one; an object seen again after its rows
    ended raises :class:`NotGroupedError`."""
    done: set[str] = set()
    carry: pd.DataFrame | None = None
    for chunk in chunks:
        if carry is not None and len(carry):
            chunk = pd.concat([carry, chunk], ignore_index=True)
        if chunk.empty:
            continue
        oid = chunk["oid"].astype(str).to_numpy()
        starts = np.r_[0, np.flatnonzero(oid[1:] != oid[:-1]) + 1]
        runs = oid[starts]
        if len(set(runs)) != len(runs) or not done.isdisjoint(runs):
            again = next(o for o in runs if o in done or (runs == o).sum() > 1)
            raise NotGroupedError(f"the rows of object {again} are not contiguous")
        tail = int(starts[-1])
        done.update(runs[:-1])
        carry = chunk.iloc[tail:]
        if tail:
            yield chunk.iloc[:tail]
    if carry is not None and len(carry):
        yield carry


def partitioned_objects(chunks: Iterable[pd.DataFrame], spill_dir: Path, partitions: int) -> Iterator[pd.DataFrame]:
    """Frames of whole objects from chunks in any order: rows are first written to ``partitions`` Parquet files by
    a stable hash of the oid (on disk, so memory holds one partition at a time), then read back one by one."""
    spill_dir.mkdir(parents=True, exist_ok=True)
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for chunk in chunks:
            part = chunk["oid"].astype(str).map(lambda o: partition_of(o, partitions))
            for k, rows in chunk.groupby(part.to_numpy(), sort=False):
                if k not in writers:
                    writers[k] = pq.ParquetWriter(spill_dir / f"part-{k:05d}.parquet", _SPILL_SCHEMA)
                writers[k].write_table(to_arrow(rows, _SPILL_SCHEMA))
    finally:
        for w in writers.values():
            w.close()
    for k in sorted(writers):
        path = spill_dir / f"part-{k:05d}.parquet"
        frame = pd.read_parquet(path)
        path.unlink()
        yield frame


def _validated(frame: pd.DataFrame, dropped: Counter) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Contract validation of a frame of whole objects: bad points dropped (counted by reason); an object left with
    no detection is rejected with the reasons its points were dropped for."""
    clean, report = validate_detections(frame)
    reasons: dict[str, list[str]] = {}
    for r in report.rejections:
        if r.rows:
            dropped[r.reason] += r.rows
            reasons.setdefault(r.oid, []).append(f"{r.rows} x {r.reason}")
    gone = set(frame["oid"].astype(str)) - set(clean["oid"].astype(str))
    rejected = [{"oid": o, "reason": "no valid detection", "detail": "; ".join(reasons.get(o, []))}
                for o in sorted(gone)]
    return clean, rejected


@dataclass
class CurveBatch:
    curves: list
    rejected: list[dict[str, str]]
    rows_read: int


def curve_batches(frames: Iterable[pd.DataFrame], batch_size: int, dropped: Counter) -> Iterator[CurveBatch]:
    """Light curves of frames of whole objects, validated, in batches of ``batch_size`` objects (the last may be
    smaller); points dropped by validation are counted in ``dropped``."""
    pending: list = []
    rejected: list[dict[str, str]] = []
    rows_read = 0
    for frame in frames:
        rows_read += len(frame)
        clean, bad = _validated(frame, dropped)
        rejected.extend(bad)
        pending.extend(curves_from_detections(clean))
        while len(pending) >= batch_size:
            yield CurveBatch(pending[:batch_size], rejected, rows_read)
            pending, rejected, rows_read = pending[batch_size:], [], 0
    if pending or rejected or rows_read:
        yield CurveBatch(pending, rejected, rows_read)


def _spill_partitions(path: Path) -> int:
    return max(1, math.ceil(Path(path).stat().st_size / SPILL_BYTES))


_WORKER_MODEL: Any = None  # the network in a worker process (see _Tensorizer)
WORKER_PRELOAD = ["deeprubin.serving.classify", "deeprubin.lightcurves.tensorize", "threadpoolctl", "torch",
                  "torch.export.pt2_archive._package", "torch._export.serde.serialize"]


def _init_worker(model_path: str | None) -> None:
    global _WORKER_MODEL
    import torch

    torch.set_num_threads(1)  # one process per core: more threads would only fight the other workers
    if model_path:
        _WORKER_MODEL = load_exported(model_path)


def _classify_job(job):
    """GP, window and (when this worker holds the network) TCN of one batch: ``(Tensors, probabilities or None)``.
    The tensors are dropped once classified: only probabilities travel back."""
    t = _tensorize_job(job[:4])
    if _WORKER_MODEL is None or not len(t.rows):
        return t, None
    proba = predict(_WORKER_MODEL, t.x, len(t.x), "cpu", 0)
    t.x = t.x[:0]
    return t, proba


class _Tensorizer:
    """Runs the GP (:func:`_tensorize_job`) in this process or on a process pool, keeping at most ``2 × workers``
    batches in flight (memory stays bounded) and returning results in input order.

    With a pool and a CPU model that has a local copy, each worker also loads the network and runs the TCN on its
    own batch (single-threaded), so the main process only reads, validates and writes: the TCN in the main process
    fought the GP workers for the two cores. Results are ``(Tensors, probabilities or None)``."""

    def __init__(self, workers: int, model: ServingModel | None = None):
        self.workers = workers
        self.pool = None
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            if ctx.get_start_method() == "forkserver":
                # Workers fork from a server that imported the GP path, torch and torch.export's loader once
                # (~5 s of imports per worker otherwise; a module missing from this torch is skipped).
                ctx.set_forkserver_preload(WORKER_PRELOAD)
            shipped = model is not None and model.device == "cpu" and model.local_path is not None
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                            initargs=(model.local_path if shipped else None,))

    def map(self, jobs: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """``(key, job)`` pairs -> ``(key, (Tensors, probabilities or None))`` in order."""
        if self.pool is None:
            for key, job in jobs:
                yield key, (_tensorize_job(job), None)
            return
        inflight: deque = deque()
        for key, job in jobs:
            inflight.append((key, self.pool.submit(_classify_job, job)))
            if len(inflight) >= 2 * self.workers:
                k, fut = inflight.popleft()
                yield k, fut.result()
        while inflight:
            k, fut = inflight.popleft()
            yield k, fut.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def resolve_workers(workers: int) -> int:
    """``classify.workers``: 0 means one GP process per core."""
    return workers or os.cpu_count() or 1


def _rows(t, proba: np.ndarray, model: ServingModel, n_det: dict[str, int], stamp) -> pd.DataFrame:
    frame = pd.DataFrame({"oid": [r["oid"] for r in t.rows]})
    classes = list(model.classes)
    frame["predicted_class"] = np.asarray(classes)[proba.argmax(axis=1)]
    for c in CLASSES:  # every contract column, 0 for a class the model does not know
        frame[f"p_{c}"] = proba[:, classes.index(c)] if c in classes else 0.0
    frame["n_det"] = [n_det[o] for o in frame["oid"]]
    frame["days_since_first_detection"] = [float(r["last_mjd"] - r["first_mjd"]) for r in t.rows]
    frame["model_name"] = model.name
    frame["model_version"] = model.version
    frame["classified_at"] = stamp
    return frame


def write_atomically(frame: pd.DataFrame, path: Path) -> Path:
    """Write Parquet to a temporary file beside ``path`` and rename it in: a failed run leaves the old file whole,
    and a rerun replaces rather than duplicates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


OUTPUT_SCHEMA = pa.schema(
    [pa.field("oid", pa.string()), pa.field("predicted_class", pa.string()),
     *[pa.field(f"p_{c}", pa.float64()) for c in CLASSES], pa.field("n_det", pa.int64()),
     pa.field("days_since_first_detection", pa.float64()), pa.field("model_name", pa.string()),
     pa.field("model_version", pa.string()), pa.field("classified_at", pa.timestamp("ns", tz="UTC"))])


@dataclass
class ClassifyResult:
    output: Path
    rejections: Path | None
    n_classified: int
    n_rejected: int
    model_uri: str
    model_version: str
    per_class: dict[str, int]
    seconds: float
    n_points_dropped: dict[str, int] | None = None
    input_grouped: bool = True

    def report(self) -> dict[str, Any]:
        return {"output": str(self.output), "rejections": None if self.rejections is None else str(self.rejections),
                "n_classified": self.n_classified, "n_rejected": self.n_rejected, "model_uri": self.model_uri,
                "model_version": self.model_version, "per_class": self.per_class, "seconds": round(self.seconds, 3),
                "points_dropped": dict(self.n_points_dropped or {}), "input_grouped": self.input_grouped}


@dataclass
class _Written:
    n_classified: int = 0
    n_rejected: int = 0
    per_class: Counter | None = None


def _classify_batches(batches: Iterable[CurveBatch], model: ServingModel, params, tmp: Path, workers: int,
                      step: Progress, total_rows: int | None, interpolator=None) -> _Written:
    """GP (``workers`` processes) -> TCN -> one Parquet file and one rejections CSV in ``tmp``, batch by batch."""
    settings = serving_settings(model, params)
    grid, context, batch_size = settings.grid_days, settings.fit_context_days, params.classify.batch_size
    written = _Written(per_class=Counter())
    rows_done = 0
    tensorizer = _Tensorizer(workers, model)
    writer = pq.ParquetWriter(tmp / "out.parquet", OUTPUT_SCHEMA)
    try:
        with open(tmp / "rejected.csv", "w", newline="") as side:
            pd.DataFrame(columns=REJECTION_COLUMNS).to_csv(side, index=False)
            jobs = ((b, (b.curves, grid, context, interpolator)) for b in batches)
            for batch, (t, proba) in tensorizer.map(jobs):
                stamp = pd.Timestamp.now(tz="UTC")
                rejected = [*batch.rejected, *t.skipped]
                if rejected:
                    pd.DataFrame(rejected, columns=REJECTION_COLUMNS).to_csv(side, header=False, index=False)
                if len(t.rows):
                    proba = model.predict_proba(t.x, batch_size) if proba is None else proba
                    frame = _rows(t, proba, model, _n_det(batch.curves), stamp)
                    writer.write_table(pa.Table.from_pandas(frame[COLUMNS], schema=OUTPUT_SCHEMA,
                                                            preserve_index=False))
                    written.n_classified += len(frame)
                    written.per_class.update(frame["predicted_class"])
                written.n_rejected += len(rejected)
                rows_done += batch.rows_read
                step("classifying", completed=rows_done if total_rows else written.n_classified,
                     total=total_rows)
    finally:
        writer.close()
        tensorizer.close()
    return written


def _finish(tmp: Path, output: Path, upsert: bool, written: _Written) -> tuple[int, dict[str, int], Path | None]:
    """Move the results in: Parquet (merged into ``output`` when ``upsert``) and ``<output>.rejected.csv``."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    n, per_class = written.n_classified, dict(written.per_class or {})
    if upsert and output.exists():
        new = pd.read_parquet(tmp / "out.parquet")
        previous = pd.read_parquet(output)
        kept = previous.loc[~previous["oid"].isin(set(new["oid"]))]
        merged = pd.concat([kept, new], ignore_index=True).sort_values("oid", kind="stable").reset_index(drop=True)
        write_atomically(merged, output)
        n, per_class = len(merged), {str(k): int(v) for k, v in merged["predicted_class"].value_counts().items()}
    else:
        os.replace(tmp / "out.parquet", output)
    side = output.with_suffix(".rejected.csv")
    if written.n_rejected:
        os.replace(tmp / "rejected.csv", side)
        return n, per_class, side
    side.unlink(missing_ok=True)
    return n, per_class, None


def _prepare_run(params, model: ServingModel | None, output: Path, workers: int | None):
    model = model or load_model(params.model_uri(), params.train.tracking_uri, params.base.classes)
    model.to(params.classify.device)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    return model, resolve_workers(params.classify.workers if workers is None else workers)


def run(params, detections: pd.DataFrame, output: Path, model: ServingModel | None = None,
        progress: Progress | None = None, upsert: bool = False, workers: int | None = None) -> ClassifyResult:
    """Classify every object of ``detections`` (contract columns, in memory) with ``params.model_uri()`` (or
    ``model``); write ``output`` (Parquet) and ``<output stem>.rejected.csv`` when objects were rejected.

    ``upsert``: keep the rows of an existing ``output`` for objects not classified now (a night's file rerun replaces
    its rows and never duplicates them); the result then counts the whole file."""
    started = time.perf_counter()
    step = or_silent(progress)
    model, workers = _prepare_run(params, model, output, workers)
    frames = [detections.sort_values(["oid", "mjd"], kind="stable")] if len(detections) else []
    dropped: Counter = Counter()
    with tempfile.TemporaryDirectory(prefix=".classify-", dir=Path(output).parent) as tmp:
        batches = curve_batches(frames, params.classify.batch_size, dropped)
        written = _classify_batches(batches, model, params, Path(tmp), _useful_workers(workers, len(detections)),
                                    step, len(detections))
        n, per_class, side = _finish(Path(tmp), Path(output), upsert, written)
    return ClassifyResult(output=Path(output), rejections=side, n_classified=n, n_rejected=written.n_rejected,
                          model_uri=model.uri, model_version=model.version, per_class=per_class,
                          seconds=time.perf_counter() - started, n_points_dropped=dict(dropped))


MIN_ROWS_FOR_POOL = 20_000  # a process pool costs a second or two to start: not worth it for a small input


def _useful_workers(workers: int, n_rows: int, min_rows: int = MIN_ROWS_FOR_POOL) -> int:
    return 1 if n_rows < min_rows else workers


def run_file(params, input_path: Path | str, output: Path, model: ServingModel | None = None,
             progress: Progress | None = None, upsert: bool = False, workers: int | None = None,
             read_rows: int = READ_ROWS, min_rows_for_pool: int = MIN_ROWS_FOR_POOL,
             interpolator=None) -> ClassifyResult:
    """Classify a detections file of any size (Parquet or CSV, any contract-mapped columns) in bounded memory.

    Input grouped by object streams in one pass. When an object's rows turn out not to be contiguous, the partial
    results are discarded and the input is partitioned on disk by object first (memory then holds one partition).
    Results are written to a temporary file and moved in at the end: a failed run leaves ``output`` as it was.
    ``interpolator`` (a top-level function, it may run in worker processes) replaces the GP: benchmarks only."""
    started = time.perf_counter()
    step = or_silent(progress)
    input_path = Path(input_path)
    model, workers = _prepare_run(params, model, output, workers)
    total_rows = count_rows(input_path) if input_path.exists() else None
    estimate = total_rows if total_rows is not None else (input_path.stat().st_size // 40 if input_path.exists()
                                                          else 0)  # ~40 bytes per CSV row
    workers = _useful_workers(workers, estimate, min_rows_for_pool)
    with tempfile.TemporaryDirectory(prefix=".classify-", dir=Path(output).parent) as tmp:
        tmp = Path(tmp)
        dropped: Counter = Counter()
        grouped = True
        try:
            frames = grouped_objects(read_detections(input_path, read_rows))
            written = _classify_batches(curve_batches(frames, params.classify.batch_size, dropped), model, params,
                                        tmp, workers, step, total_rows, interpolator)
        except NotGroupedError as exc:
            grouped = False
            step(f"input not grouped by object ({exc}): partitioning it on disk")
            dropped.clear()
            frames = partitioned_objects(read_detections(input_path, read_rows), tmp / "spill",
                                         _spill_partitions(input_path))
            written = _classify_batches(curve_batches(frames, params.classify.batch_size, dropped), model, params,
                                        tmp, workers, step, total_rows, interpolator)
        n, per_class, side = _finish(tmp, Path(output), upsert, written)
    return ClassifyResult(output=Path(output), rejections=side, n_classified=n, n_rejected=written.n_rejected,
                          model_uri=model.uri, model_version=model.version, per_class=per_class,
                          seconds=time.perf_counter() - started, n_points_dropped=dict(dropped),
                          input_grouped=grouped)
