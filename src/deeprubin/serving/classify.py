"""Classification with a registered (or local) model: light curves -> one row of probabilities per object.

The model is loaded once (:func:`deeprubin.models.served.load_model`, default ``models:/<base.model_name>@champion``);
light curves go through :func:`deeprubin.lightcurves.tensorize.tensorize_curves` with the model's own preprocessing
settings, in bounded batches (:mod:`deeprubin.serving.reading` reads files of any size, :mod:`deeprubin.serving.pool`
runs the GP on a process pool), so memory does not grow with the input. Objects the GP cannot interpolate are returned as rejections (oid, reason,
detail) and never stop the run.

Output columns (the output contract): ``oid``, ``predicted_class``, ``p_QSO``, ``p_CEP``, ``p_SNIa``,
``p_SNII``, ``n_det``, ``days_since_first_detection``, ``photometry``, ``photometry_declared``, ``model_name``,
``model_version``, ``classified_at``. ``photometry`` is the path the object took: ``difference`` (classified as
given) or ``apparent`` (apparent magnitudes turned into difference flux first,
:mod:`deeprubin.lightcurves.presentation`); ``photometry_declared`` is true when the input, the request or
``classify.photometry`` said so, false when it was recognised from the curve. ``n_det`` counts the detections
classified (for an apparent curve: those 5 σ from its reference).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from deeprubin import scratch
from deeprubin.config import Params
from deeprubin.lightcurves.presentation import DECLARED_DIFFERENCE, PhotometryPath
from deeprubin.models.served import ServingModel, load_model
from deeprubin.processed import Preprocessing
from deeprubin.progress import Progress, or_silent
from deeprubin.schema import CLASSES
from deeprubin.serving.pool import TCN_BATCH, Tensorizer, prepare_job, resolve_workers, tensorize_job
from deeprubin.serving.reading import READ_ROWS, CurveBatch, NotGroupedError, check_input, count_rows, \
    curve_batches, grouped_objects, partitioned_objects, read_detections, spill_partitions

COLUMNS = ["oid", "predicted_class", *[f"p_{c}" for c in CLASSES], "n_det", "days_since_first_detection",
           "photometry", "photometry_declared", "model_name", "model_version", "classified_at"]
REJECTION_COLUMNS = ["oid", "reason", "detail"]


def serving_settings(model: Any, params: Params) -> Preprocessing:
    """The preprocessing the model was trained with; the configured one only for a model that records none."""
    fallback = Preprocessing(params.preprocess.grid_days, params.preprocess.fit_context_days)
    return model.settings(fallback) if isinstance(model, ServingModel) else fallback


def classify_curves(curves: list, model: ServingModel, grid_days: int = 100, fit_context_days: float = 100.0,
                    batch_size: int = 1024, progress: Progress | None = None,
                    paths: dict[str, PhotometryPath] | None = None,
                    tensorizer: Tensorizer | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(classifications, rejections)`` of ``curves`` (:class:`deeprubin.lightcurves.tensorize.Curve`), batch by batch,
    in this process (the HTTP service and the alert consumer; files go through :func:`run_file`). ``paths``: how
    each curve was read (:func:`deeprubin.lightcurves.presentation.resolve`); a curve not in it is difference flux,
    declared (an alert stream's).

    ``tensorizer``: a running :class:`deeprubin.serving.pool.Tensorizer` (a long-lived consumer keeps one, so its
    workers start once, not per call): the curves are then split into one slice per worker (at least
    :data:`MIN_SLICE` curves each) and classified on the pool, in order."""
    step = or_silent(progress)
    frames, rejected = [], []
    stamp = pd.Timestamp.now(tz="UTC")
    if tensorizer is not None and tensorizer.pool is not None and len(curves) > MIN_SLICE:
        size = max(MIN_SLICE, min(batch_size, -(-len(curves) // (2 * tensorizer.workers))))
    else:
        tensorizer, size = None, batch_size
    slices = [curves[start:start + size] for start in range(0, len(curves), size)]
    if tensorizer is not None:
        results = tensorizer.map((batch, (batch, grid_days, fit_context_days)) for batch in slices)
    else:
        results = ((batch, (tensorize_job((batch, grid_days, fit_context_days)), None)) for batch in slices)
    done = 0
    for batch, (t, proba) in results:
        rejected.extend(t.skipped)
        if len(t.rows):
            if proba is None:
                proba = _predict_here(model, t.x, batch_size, tensorizer is not None)
            frames.append(_rows(t, proba, model, _n_det(batch), stamp, paths))
        done += len(batch)
        step("classifying", completed=done, total=len(curves))
    out = pd.concat(frames, ignore_index=True) if frames else empty_classifications()
    return out[COLUMNS], pd.DataFrame(rejected, columns=REJECTION_COLUMNS)


def _tcn_batch(model: ServingModel, batch_size: int) -> int:
    """Curves per TCN call: at most :data:`deeprubin.serving.pool.TCN_BATCH` on a CPU (cache-sized), the batch on a
    GPU."""
    return min(batch_size, TCN_BATCH) if getattr(model, "device", "cpu") == "cpu" else batch_size


def _predict_here(model: ServingModel, x: np.ndarray, batch_size: int, beside_pool: bool) -> np.ndarray:
    """The network in this process; on one torch thread when worker processes hold the other cores (two threads
    spinning beside them slowed the whole run)."""
    if not beside_pool or getattr(model, "device", "cpu") != "cpu":
        return model.predict_proba(x, _tcn_batch(model, batch_size))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return model.predict_proba(x, _tcn_batch(model, batch_size))
    finally:
        torch.set_num_threads(threads)


MIN_SLICE = 128  # curves per worker's slice in classify_curves: smaller slices cost more in overhead than they save


def empty_classifications() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype="float64") for c in COLUMNS})
    for c in ("oid", "predicted_class", "model_name", "model_version"):
        frame[c] = frame[c].astype(object)
    frame["n_det"] = frame["n_det"].astype("int64")
    frame["photometry"] = frame["photometry"].astype(object)
    frame["photometry_declared"] = frame["photometry_declared"].astype(bool)
    frame["classified_at"] = pd.Series(dtype="datetime64[ns, UTC]")
    return frame


def _n_det(curves) -> dict[str, int]:
    return {c.oid: int(len(c.mjd)) for c in curves}


def _rows(t, proba: np.ndarray, model: ServingModel, n_det: dict[str, int], stamp,
          paths: dict[str, PhotometryPath] | None = None) -> pd.DataFrame:
    frame = pd.DataFrame({"oid": [r["oid"] for r in t.rows]})
    classes = list(model.classes)
    frame["predicted_class"] = np.asarray(classes)[proba.argmax(axis=1)]
    for c in CLASSES:  # every contract column, 0 for a class the model does not know
        frame[f"p_{c}"] = proba[:, classes.index(c)] if c in classes else 0.0
    frame["n_det"] = [n_det[o] for o in frame["oid"]]
    frame["days_since_first_detection"] = [float(r["last_mjd"] - r["first_mjd"]) for r in t.rows]
    taken = [(paths or {}).get(o, DECLARED_DIFFERENCE) for o in frame["oid"]]
    frame["photometry"] = [p.photometry for p in taken]
    frame["photometry_declared"] = np.array([p.declared for p in taken], dtype=bool)
    frame["model_name"] = model.name
    frame["model_version"] = model.version
    frame["classified_at"] = stamp
    return frame


class OutputError(ValueError):
    """The output cannot be written as asked; found before any work, so nothing was read, written or removed."""


OUTPUT_SUFFIXES = (".parquet", ".pq")  # classifications are Parquet, whatever the name; the name must say so


def rejections_path(output: Path | str) -> Path:
    """``<output>.rejected.csv`` (``out.parquet`` -> ``out.rejected.csv``): the rejected objects of a run."""
    return Path(output).with_suffix(".rejected.csv")


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file: the same inode (hard links, symlinks) or the same resolved path."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return False


def check_paths(output: Path | str, input_path: Path | str | None = None) -> None:
    """Refuse, before any work, an output the run could not write or should not: one that is (or whose
    ``.rejected.csv`` is) the input file, however named (symlinks, hard links, ``..``), a directory, a name whose
    suffix says another format than the Parquet written, or a place that is no writable directory. Raises
    :class:`OutputError` naming the path and the problem."""
    output = Path(output)
    side = rejections_path(output)
    if input_path is not None:
        for what, path in (("output", output), ("rejections file", side)):
            if _same_file(path, Path(input_path)):
                raise OutputError(f"{what} {path} is the input file {input_path}: classify never writes over or "
                                  f"removes its input; choose another --output")
    for what, path in (("output", output), ("rejections file", side)):
        if path.is_dir():
            raise OutputError(f"{what} {path} is a directory; name a Parquet file (e.g. {path / 'classes.parquet'})")
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise OutputError(f"output {output}: classifications are written as Parquet, so its name must end in "
                          f".parquet (not {output.suffix!r}); e.g. {output.with_suffix('.parquet')}")
    for folder in (output.parent, *output.parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise OutputError(f"output {output}: {folder} is not a directory")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise OutputError(f"output {output}: cannot write in {folder} (permission denied)")
            break
        if folder.is_symlink():
            raise OutputError(f"output {output}: {folder} is a broken symbolic link")


def _missing_folders(output: Path) -> list[Path]:
    """The folders above ``output`` that do not exist yet (made by the run; removed again if it fails)."""
    missing = []
    for folder in (Path(output).parent, *Path(output).parent.parents):
        if folder.exists() or folder.is_symlink():
            break
        missing.append(folder)
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


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
     pa.field("days_since_first_detection", pa.float64()), pa.field("photometry", pa.string()),
     pa.field("photometry_declared", pa.bool_()), pa.field("model_name", pa.string()),
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
    per_photometry: dict[str, int] | None = None  # "apparent (recognised)" -> objects classified this run

    def report(self) -> dict[str, Any]:
        return {"output": str(self.output), "rejections": None if self.rejections is None else str(self.rejections),
                "n_classified": self.n_classified, "n_rejected": self.n_rejected, "model_uri": self.model_uri,
                "model_version": self.model_version, "per_class": self.per_class, "seconds": round(self.seconds, 3),
                "points_dropped": dict(self.n_points_dropped or {}), "input_grouped": self.input_grouped,
                "per_photometry": dict(self.per_photometry or {})}


@dataclass
class _Written:
    n_classified: int = 0
    n_rejected: int = 0
    per_class: Counter | None = None
    per_photometry: Counter = field(default_factory=Counter)

    def write(self, writer: pq.ParquetWriter, frame: pd.DataFrame) -> None:
        """Append classified rows to the output and count them (by class, by photometry path)."""
        writer.write_table(pa.Table.from_pandas(frame[COLUMNS], schema=OUTPUT_SCHEMA, preserve_index=False))
        self.n_classified += len(frame)
        self.per_class.update(frame["predicted_class"])
        self.per_photometry.update(f"{p} ({'declared' if d else 'recognised'})"
                                   for p, d in zip(frame["photometry"], frame["photometry_declared"]))


def resolve_gp_device(setting: str) -> str | None:
    """``classify.gp_device`` -> the torch device of the GP, or None for the numpy GP on the CPU workers."""
    if setting == "cpu":
        return None
    if setting == "torch-cpu":
        return "cpu"
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else None
    if not torch.cuda.is_available():
        raise ValueError("classify.gp_device is 'cuda' but torch sees no CUDA device")
    return "cuda"


def _predict_tensor(model: ServingModel, x, batch: int) -> np.ndarray:
    """:meth:`ServingModel.predict_proba` of a float32 tensor already on a device (no trip through the host)."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            out.append(np.asarray(model.module(x[i:i + batch].to(model.device)).detach().cpu().numpy(),
                                  dtype=np.float64))
    return np.concatenate(out) if out else np.zeros((0, len(model.classes)), dtype=np.float64)


def _classify_batches(batches: Iterable[CurveBatch], model: ServingModel, params, tmp: Path, workers: int,
                      step: Progress, total_rows: int | None, interpolator=None) -> _Written:
    """GP (``workers`` processes) -> TCN -> one Parquet file and one rejections CSV in ``tmp``, batch by batch."""
    gp_device = resolve_gp_device(params.classify.gp_device)
    if gp_device is not None:
        return _classify_batches_on_device(batches, model, params, tmp, workers, step, total_rows, gp_device)
    settings = serving_settings(model, params)
    grid, context, batch_size = settings.grid_days, settings.fit_context_days, params.classify.batch_size
    written = _Written(per_class=Counter())
    rows_done = 0
    tensorizer = Tensorizer(workers, model)
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
                    if proba is None:  # a network the workers could not load: here, on one thread beside them
                        proba = _predict_here(model, t.x, batch_size, tensorizer.pool is not None)
                    written.write(writer, _rows(t, proba, model, _n_det(batch.curves), stamp, batch.paths))
                written.n_rejected += len(rejected)
                rows_done += batch.rows_read
                step("classifying", completed=rows_done if total_rows else written.n_classified,
                     total=total_rows)
    finally:
        writer.close()
        tensorizer.close()
    return written


def _classify_batches_on_device(batches: Iterable[CurveBatch], model: ServingModel, params, tmp: Path, workers: int,
                                step: Progress, total_rows: int | None, device: str) -> _Written:
    """:func:`_classify_batches` with the GP in torch on ``device`` (``classify.gp_device``): the ``workers``
    processes prepare each batch (window, screening, the GP's input: :func:`pool.prepare_job`), this process merges
    them up to ``classify.device_batch_size`` objects and runs the GP and the TCN on the device in one go."""
    from deeprubin.lightcurves.tensorize_device import PreparedBatch, tensorize_prepared

    settings = serving_settings(model, params)
    grid, context = settings.grid_days, settings.fit_context_days
    batch_size, merge_size = params.classify.batch_size, params.classify.device_batch_size
    written = _Written(per_class=Counter())
    done = {"rows": 0}
    tensorizer = Tensorizer(workers, model, job=prepare_job)
    writer = pq.ParquetWriter(tmp / "out.parquet", OUTPUT_SCHEMA)
    try:
        with open(tmp / "rejected.csv", "w", newline="") as side:
            pd.DataFrame(columns=REJECTION_COLUMNS).to_csv(side, index=False)

            def flush(group: list) -> None:
                if not group:
                    return
                merged = PreparedBatch.concat([prepared for _, prepared in group])
                merged.skipped = []  # written per input batch below
                t, x = tensorize_prepared(merged, device)
                rejected = [r for batch, prepared in group for r in (*batch.rejected, *prepared.skipped)]
                rejected += t.skipped
                if rejected:
                    pd.DataFrame(rejected, columns=REJECTION_COLUMNS).to_csv(side, header=False, index=False)
                if len(t.rows):
                    proba = _predict_tensor(model, x, max(batch_size, len(x)) if model.device != "cpu"
                                            else batch_size)
                    n_det, paths = {}, {}
                    for batch, _ in group:
                        n_det.update(_n_det(batch.curves))
                        paths.update(batch.paths or {})
                    written.write(writer, _rows(t, proba, model, n_det, pd.Timestamp.now(tz="UTC"), paths))
                written.n_rejected += len(rejected)
                done["rows"] += sum(batch.rows_read for batch, _ in group)
                step("classifying", completed=done["rows"] if total_rows else written.n_classified,
                     total=total_rows)

            group: list = []
            pending = 0
            for batch, (prepared, _) in tensorizer.map((b, (b.curves, grid, context)) for b in batches):
                group.append((batch, prepared))
                pending += len(prepared)
                if pending >= merge_size:
                    flush(group)
                    group, pending = [], 0
            flush(group)
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
    side = rejections_path(output)
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
        progress: Progress | None = None, upsert: bool = False, workers: int | None = None,
        photometry: str | None = None) -> ClassifyResult:
    """Classify every object of ``detections`` (contract columns, in memory) with ``params.model_uri()`` (or
    ``model``); write ``output`` (Parquet) and ``<output stem>.rejected.csv`` when objects were rejected.
    ``photometry``: what the detections are where a ``photometry`` column does not say (default
    ``params.classify.photometry``).

    ``upsert``: keep the rows of an existing ``output`` for objects not classified now (a night's file rerun replaces
    its rows and never duplicates them); the result then counts the whole file."""
    started = time.perf_counter()
    step = or_silent(progress)
    check_paths(output)
    model, workers = _prepare_run(params, model, output, workers)
    frames = [detections.sort_values(["oid", "mjd"], kind="stable")] if len(detections) else []
    dropped: Counter = Counter()
    with scratch.folder(CLASSIFY_SCRATCH, Path(output).parent) as tmp:
        batches = curve_batches(frames, params.classify.batch_size, dropped, photometry or params.classify.photometry)
        written = _classify_batches(batches, model, params, Path(tmp), _useful_workers(workers, len(detections)),
                                    step, len(detections))
        n, per_class, side = _finish(Path(tmp), Path(output), upsert, written)
    return ClassifyResult(output=Path(output), rejections=side, n_classified=n, n_rejected=written.n_rejected,
                          model_uri=model.uri, model_version=model.version, per_class=per_class,
                          seconds=time.perf_counter() - started, n_points_dropped=dict(dropped),
                          per_photometry=dict(written.per_photometry))


CLASSIFY_SCRATCH = ".classify-"  # the run's scratch folder beside the output: .classify-<pid>-*; a killed
# run's (its process dead) is removed by the next run in that folder
MIN_ROWS_FOR_POOL = 20_000  # a process pool costs a second or two to start: not worth it for a small input


def _useful_workers(workers: int, n_rows: int, min_rows: int = MIN_ROWS_FOR_POOL) -> int:
    return 1 if n_rows < min_rows else workers


def run_file(params, input_path: Path | str, output: Path, model: ServingModel | None = None,
             progress: Progress | None = None, upsert: bool = False, workers: int | None = None,
             read_rows: int = READ_ROWS, min_rows_for_pool: int = MIN_ROWS_FOR_POOL,
             interpolator=None) -> ClassifyResult:
    """Classify a detections file of any size (:func:`_run_file`), after checking, before any work, that the input
    is a readable file and the output may be written (:func:`check_paths`: never over, or in place of, the input).
    A failed run leaves nothing behind: no temporary file, no folder it made, ``output`` as it was."""
    input_path = Path(input_path)
    check_input(input_path)
    check_paths(output, input_path)
    made = _missing_folders(Path(output))
    try:
        return _run_file(params, input_path, output, model, progress, upsert, workers, read_rows, min_rows_for_pool,
                         interpolator)
    except BaseException:
        _remove_if_empty(made)
        raise


def _run_file(params, input_path: Path | str, output: Path, model: ServingModel | None = None,
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
    with scratch.folder(CLASSIFY_SCRATCH, Path(output).parent) as tmp:
        tmp = Path(tmp)
        dropped: Counter = Counter()
        grouped = True
        try:
            frames = grouped_objects(read_detections(input_path, read_rows))
            written = _classify_batches(curve_batches(frames, params.classify.batch_size, dropped,
                                                      params.classify.photometry), model, params,
                                        tmp, workers, step, total_rows, interpolator)
        except NotGroupedError as exc:
            grouped = False
            step(f"input not grouped by object ({exc}): partitioning it on disk")
            dropped.clear()
            frames = partitioned_objects(read_detections(input_path, read_rows), tmp / "spill",
                                         spill_partitions(input_path))
            written = _classify_batches(curve_batches(frames, params.classify.batch_size, dropped,
                                                      params.classify.photometry), model, params,
                                        tmp, workers, step, total_rows, interpolator)
        n, per_class, side = _finish(tmp, Path(output), upsert, written)
    return ClassifyResult(output=Path(output), rejections=side, n_classified=n, n_rejected=written.n_rejected,
                          model_uri=model.uri, model_version=model.version, per_class=per_class,
                          seconds=time.perf_counter() - started, n_points_dropped=dict(dropped),
                          per_photometry=dict(written.per_photometry),
                          input_grouped=grouped)
