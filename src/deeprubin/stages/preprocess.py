"""Stage ``preprocess``: contract light curves in ``data/raw`` -> model input tensors in ``data/processed``.

Per object: the window (:mod:`deeprubin.window`), a Matérn-3/2 GP per band (:mod:`deeprubin.gp`) evaluated on the
daily grid, and a float32 tensor of shape ``(C, grid_days)`` with the channels :data:`CHANNELS`:

==========  =====================================================================================================
gp_mean_g   GP mean of the g difference flux / ``flux_scale``
gp_mean_r   GP mean of the r difference flux / ``flux_scale``
gp_std_g    GP standard deviation in g / ``flux_scale`` (> 0)
gp_std_r    GP standard deviation in r / ``flux_scale`` (> 0)
since_g     time since the latest g detection at or before the grid point: ``log1p(dt) / log1p(grid_days)``, dt
            capped at ``grid_days``; 0 on a day with a detection, 1 before the band's first detection
since_r     the same for r
==========  =====================================================================================================

Per-object normalisation: ``flux_scale`` is the largest |flux| among the object's detections inside the window
(both bands together, at least the median flux error of those detections, so never ~0). One scale for both bands
keeps the colour (g/r ratio) and the sign of a difference flux (0 = the reference image's level) meaningful; it
depends on the given detections only, so it is the same at training and at inference. ``index.parquet`` records
``flux_scale``, so ``gp_mean * flux_scale`` is the GP mean in µJy again.

Output (``data/processed``): ``part-XXXXX.npy`` float32 ``(n, C, grid_days)``, one per oid-hash partition, rows in
oid order; ``index.parquet`` (oid, label, partition, shard, row, window, detections per band, flux_scale, status,
fingerprint); ``skipped.parquet`` (oid, reason, detail, fingerprint); ``manifest.json`` (channels, report, config).
A GP that could not be fitted well but still gave a finite answer is written with status ``fallback: <reason>``;
an object that cannot be interpolated at all is skipped with its reason. No exception from one object escapes the
batch, and nothing non-finite is ever written.

Distribution: objects are split into ``partitions`` by a hash of their oid (so the split never depends on the
number of workers); partitions run in this process (``workers: 1``), on a local process pool, or on a Dask cluster
(``executor: dask``), with identical output. Incremental: each object's fingerprint is a hash of its detections;
with the same configuration and code, only objects whose fingerprint changed are recomputed, the rest are copied
from the previous output, and the result is the same as a full recompute.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from deeprubin import __version__
from deeprubin.config import BaseParams, Params, PreprocessParams
from deeprubin.window import Window, fit_start, truncate, window_for

Progress = Callable[..., None]

CHANNELS: tuple[str, ...] = ("gp_mean_g", "gp_mean_r", "gp_std_g", "gp_std_r", "since_g", "since_r")
BAND_INDEX = {"g": 0, "r": 1}
FORMAT_VERSION = 1
INDEX = "index.parquet"
SKIPPED = "skipped.parquet"
MANIFEST = "manifest.json"
# Code whose change invalidates every stored tensor (the incremental cache is keyed on it).
_CODE_FILES = ("stages/preprocess.py", "window.py", "gp.py")

INDEX_SCHEMA = pa.schema([
    pa.field("oid", pa.string(), nullable=False),
    pa.field("label", pa.string()),
    pa.field("partition", pa.int32()),
    pa.field("shard", pa.string()),
    pa.field("row", pa.int64()),
    pa.field("window_start_mjd", pa.float64()),
    pa.field("window_end_mjd", pa.float64()),
    pa.field("anchored", pa.string()),
    pa.field("first_mjd", pa.float64()),
    pa.field("last_mjd", pa.float64()),
    pa.field("n_det_g", pa.int64()),
    pa.field("n_det_r", pa.int64()),
    pa.field("n_fit", pa.int64()),
    pa.field("flux_scale", pa.float64()),
    pa.field("status", pa.string()),
    pa.field("fingerprint", pa.string()),
])
SKIPPED_SCHEMA = pa.schema([
    pa.field("oid", pa.string(), nullable=False),
    pa.field("label", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
    pa.field("fingerprint", pa.string()),
])
_META_COLUMNS = [f.name for f in INDEX_SCHEMA if f.name not in ("oid", "label", "partition", "shard", "row",
                                                                 "fingerprint")]


# ----------------------------------------------------------------------------------------------------------------
# One object: window, GP inputs, tensor.

class Skip(Exception):
    """This object cannot be made into a tensor; ``reason`` is counted in the report, ``detail`` names the case."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Curve:
    """One object's detections as arrays (band: 0 = g, 1 = r), sorted by time."""

    oid: str
    mjd: np.ndarray
    band: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray

    @classmethod
    def from_frame(cls, oid: str, det: pd.DataFrame) -> "Curve":
        det = det.sort_values(["mjd", "band"], kind="mergesort")
        band = band_index(det["band"])
        return cls(oid=str(oid), mjd=det["mjd"].to_numpy(dtype=np.float64),
                   band=np.where(pd.isna(band), -1, band).astype(np.int64),
                   flux=det["flux"].to_numpy(dtype=np.float64), flux_err=det["flux_err"].to_numpy(dtype=np.float64))


@dataclass(frozen=True)
class PreparedCurve:
    """What the GP is given for one object: times relative to the window start, and the window itself."""

    oid: str
    window: Window
    t: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    band: np.ndarray
    in_window: np.ndarray  # bool per fitted detection
    flux_scale: float

    def gp_args(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.t, self.flux, self.flux_err, self.band, self.window.grid()

    def meta(self) -> dict[str, Any]:
        w = self.window
        return {"window_start_mjd": w.start_mjd, "window_end_mjd": w.end_mjd, "anchored": w.anchored,
                "first_mjd": w.first_mjd, "last_mjd": w.last_mjd,
                "n_det_g": int(((self.band == 0) & self.in_window).sum()),
                "n_det_r": int(((self.band == 1) & self.in_window).sum()),
                "n_fit": int(len(self.t)), "flux_scale": float(self.flux_scale)}


def prepare(curve: Curve, grid_days: int = 100, fit_context_days: float = 100.0,
            until_mjd: float | None = None) -> PreparedCurve:
    """Cut the curve at ``until_mjd``, choose its window, and select the detections the GP sees. Raises Skip."""
    ok = np.isfinite(curve.mjd) & np.isfinite(curve.flux) & np.isfinite(curve.flux_err) & (curve.flux_err > 0) \
        & np.isin(curve.band, (0, 1))
    if until_mjd is not None:
        ok &= curve.mjd <= until_mjd
    if not ok.any():
        raise Skip("no usable detections", "none finite in g or r" + ("" if until_mjd is None else
                                                                      f" up to mjd {until_mjd}"))
    mjd = curve.mjd[ok]
    window = window_for(mjd.min(), mjd.max(), grid_days)
    keep = mjd >= fit_start(window, fit_context_days)
    t = mjd[keep] - window.start_mjd
    flux, flux_err, band = curve.flux[ok][keep], curve.flux_err[ok][keep], curve.band[ok][keep]
    order = np.lexsort((band, t))
    t, flux, flux_err, band = t[order], flux[order], flux_err[order], band[order]
    in_window = t >= 0
    scale = float(np.max(np.abs(flux[in_window])))
    scale = max(scale, float(np.median(flux_err[in_window])))
    return PreparedCurve(oid=curve.oid, window=window, t=t, flux=flux, flux_err=flux_err, band=band,
                         in_window=in_window, flux_scale=scale)


def time_since_detection(t: np.ndarray, band: np.ndarray, grid: np.ndarray, grid_days: int) -> np.ndarray:
    """(2, G): for each band, ``log1p(dt) / log1p(grid_days)`` with dt the days since the latest detection at or
    before the grid point, capped at ``grid_days`` (1.0 before the band's first detection)."""
    out = np.ones((2, len(grid)), dtype=np.float64)
    for b in (0, 1):
        tb = np.sort(t[band == b])
        if not len(tb):
            continue
        idx = np.searchsorted(tb, grid, side="right") - 1
        seen = idx >= 0
        dt = np.full(len(grid), float(grid_days))
        dt[seen] = np.minimum(grid[seen] - tb[idx[seen]], grid_days)
        out[b] = np.log1p(dt) / np.log1p(grid_days)
    return out


def assemble(prep: PreparedCurve, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The (C, G) float32 tensor of one object from its GP mean and std (2, G) in µJy. Raises Skip if not finite."""
    grid = prep.window.grid()
    g = len(grid)
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    if mean.shape != (2, g) or std.shape != (2, g):
        raise Skip("GP output has the wrong shape", f"mean {mean.shape}, std {std.shape}, expected (2, {g})")
    x = np.empty((len(CHANNELS), g), dtype=np.float64)
    x[0:2] = mean / prep.flux_scale
    x[2:4] = std / prep.flux_scale
    x[4:6] = time_since_detection(prep.t, prep.band, grid, prep.window.grid_days)
    x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():
        raise Skip("GP output is not finite", "NaN or infinite (or beyond float32) in the mean or std")
    if not (x32[2:4] > 0).all():
        raise Skip("GP output is not finite", "standard deviation not positive")
    return x32


def interpolate(preps: Sequence[PreparedCurve]) -> list[Any]:
    """GP results for many prepared curves; an exception for one curve is returned in its place, never raised."""
    from deeprubin import gp

    try:
        results = list(gp.interpolate_batch([p.gp_args() for p in preps]))
        if len(results) != len(preps):
            raise RuntimeError(f"interpolate_batch returned {len(results)} results for {len(preps)} curves")
    except Exception:  # a bug in the batch path must not take down the other objects: one at a time
        results = []
        for p in preps:
            try:
                results.append(gp.interpolate(*p.gp_args()))
            except Exception as exc:  # noqa: BLE001 -- recorded as this object's skip reason
                results.append(exc)
    return results


def _skip_from_exception(exc: BaseException) -> Skip:
    from deeprubin import gp

    if isinstance(exc, Skip):
        return exc
    if isinstance(exc, gp.GPInputError):
        return Skip(f"cannot interpolate: {_reason_key(str(exc))}", str(exc))
    return Skip(f"GP failed: {type(exc).__name__}", str(exc))


@dataclass
class Tensors:
    """Tensors of a batch of objects: X (N, C, G) float32, one meta row per X row, and the objects skipped."""

    x: np.ndarray
    rows: list[dict[str, Any]]
    skipped: list[dict[str, str]]


def tensorize_curves(curves: Sequence[Curve], grid_days: int = 100, fit_context_days: float = 100.0,
                     until_mjd: float | None = None,
                     interpolator: Callable[[Sequence[PreparedCurve]], list[Any]] | None = None) -> Tensors:
    """The one path from light curves to model input, shared by the stage, evaluation and classification.

    ``interpolator`` replaces :func:`interpolate` (benchmarks run the same path with a baseline GP)."""
    preps: list[PreparedCurve] = []
    skipped: list[dict[str, str]] = []
    for curve in curves:
        try:
            preps.append(prepare(curve, grid_days, fit_context_days, until_mjd))
        except Exception as exc:  # noqa: BLE001
            skip = exc if isinstance(exc, Skip) else Skip(f"bad light curve: {type(exc).__name__}", str(exc))
            skipped.append({"oid": curve.oid, "reason": skip.reason, "detail": skip.detail})
    results = (interpolator or interpolate)(preps) if preps else []
    xs, rows = [], []
    for prep, res in zip(preps, results):
        try:
            if isinstance(res, BaseException):
                raise res
            x = assemble(prep, res.mean, res.std)
        except Exception as exc:  # noqa: BLE001
            skip = _skip_from_exception(exc)
            skipped.append({"oid": prep.oid, "reason": skip.reason, "detail": skip.detail})
            continue
        xs.append(x)
        rows.append({"oid": prep.oid, **prep.meta(), "status": str(res.status)})
    x = np.stack(xs) if xs else np.zeros((0, len(CHANNELS), grid_days), dtype=np.float32)
    return Tensors(x=x, rows=rows, skipped=skipped)


def band_index(bands: pd.Series) -> np.ndarray:
    """``g``/``r`` -> 0/1, anything else -> -1 (vectorised: each distinct value is looked up once)."""
    codes, names = pd.factorize(bands)
    lookup = np.array([BAND_INDEX.get(b, -1) for b in names] + [-1], dtype=np.int64)  # code -1 (NaN) -> -1
    return lookup[codes]


def curves_from_detections(detections: pd.DataFrame) -> list[Curve]:
    """Contract detections (any number of objects) -> one Curve per oid, in oid order.

    Equal to ``Curve.from_frame`` per group, with one sort of the whole table instead of one per object."""
    if detections.empty:
        return []
    det = detections.assign(oid=detections["oid"].astype(str)).sort_values(["oid", "mjd", "band"], kind="mergesort")
    oid = det["oid"].to_numpy()
    band = band_index(det["band"])
    mjd, flux, err = (det[c].to_numpy(dtype=np.float64) for c in ("mjd", "flux", "flux_err"))
    starts = np.r_[0, np.flatnonzero(oid[1:] != oid[:-1]) + 1]
    ends = np.r_[starts[1:], len(oid)]
    return [Curve(oid=oid[a], mjd=mjd[a:b], band=band[a:b], flux=flux[a:b], flux_err=err[a:b])
            for a, b in zip(starts, ends)]


def tensorize(detections: pd.DataFrame, grid_days: int = 100, fit_context_days: float = 100.0,
              until_mjd: float | None = None) -> Tensors:
    """Contract detections -> model input (what `deeprubin classify` and evaluation call)."""
    return tensorize_curves(curves_from_detections(truncate(detections, until_mjd)), grid_days, fit_context_days)


def interpolate_one(detections: pd.DataFrame, grid_days: int = 100, fit_context_days: float = 100.0,
                    until_mjd: float | None = None):
    """(PreparedCurve, GPResult) of one object's detections, in µJy (for plots). Raises Skip or GPInputError."""
    curves = curves_from_detections(detections)
    if len(curves) != 1:
        raise Skip("expected one object", f"got {len(curves)}")
    prep = prepare(curves[0], grid_days, fit_context_days, until_mjd)
    from deeprubin import gp

    return prep, gp.interpolate(*prep.gp_args())


# ----------------------------------------------------------------------------------------------------------------
# Partitions.

def partition_of(oid: str, partitions: int) -> int:
    """Stable across runs, machines and Python processes (unlike hash())."""
    digest = hashlib.blake2b(str(oid).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % partitions


def fingerprints(detections: pd.DataFrame) -> dict[str, str]:
    """Per object: a hash of its detections (time, band, flux, error), the key of the incremental cache."""
    out: dict[str, str] = {}
    if detections.empty:
        return out
    det = detections.sort_values(["oid", "mjd", "band"], kind="mergesort")
    mjd = det["mjd"].to_numpy(dtype=np.float64)
    band = det["band"].map(BAND_INDEX).fillna(-1).to_numpy(dtype=np.float64)
    flux = det["flux"].to_numpy(dtype=np.float64)
    err = det["flux_err"].to_numpy(dtype=np.float64)
    table = np.ascontiguousarray(np.stack([mjd, band, flux, err], axis=1))
    oids = det["oid"].astype(str).to_numpy()
    bounds = np.flatnonzero(oids[1:] != oids[:-1]) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(oids)]])
    for s, e in zip(starts, ends):
        out[oids[s]] = hashlib.blake2b(table[s:e].tobytes(), digest_size=16).hexdigest()
    return out


@dataclass(frozen=True)
class PartitionTask:
    partition: int
    curves: list[Curve]
    grid_days: int
    fit_context_days: float


@dataclass
class PartitionOutput:
    partition: int
    tensors: Tensors
    seconds: float


def compute_partition(task: PartitionTask) -> PartitionOutput:
    """Run one partition (in this process, a pool worker or a Dask worker). Never raises for one object."""
    started = time.perf_counter()
    tensors = tensorize_curves(task.curves, task.grid_days, task.fit_context_days)
    return PartitionOutput(task.partition, tensors, time.perf_counter() - started)


def _run_serial(tasks, step):
    for i, task in enumerate(tasks):
        yield compute_partition(task)
        step("interpolating", completed=i + 1, total=len(tasks))


def _run_pool(tasks, workers, step):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                      else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(compute_partition, task) for task in tasks]
        for i, fut in enumerate(as_completed(futures)):
            yield fut.result()
            step("interpolating", completed=i + 1, total=len(tasks))


def _run_dask(tasks, workers, address, step):
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if address is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    else:
        client = Client(address)
    try:
        futures = client.map(compute_partition, tasks, pure=False)
        for i, fut in enumerate(as_completed(futures)):
            yield fut.result()
            step("interpolating", completed=i + 1, total=len(tasks))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# ----------------------------------------------------------------------------------------------------------------
# The stage.

@dataclass(frozen=True)
class PreprocessPaths:
    raw_dir: Path
    processed_dir: Path

    @classmethod
    def from_params(cls, params: Params) -> "PreprocessPaths":
        return cls(raw_dir=Path(params.ingest.raw_dir), processed_dir=Path(params.preprocess.processed_dir))


@dataclass
class PreprocessResult:
    processed_dir: Path
    objects_in: int
    ok: int
    fallback_objects: int
    fallback: dict[str, int]  # per reason; an object with two reasons counts under both
    skipped: dict[str, int]
    recomputed: int
    reused: int
    shards: int
    shape: tuple[int, int, int]
    executor: str
    workers: int
    per_class: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def written(self) -> int:
        return self.shape[0]

    def report(self) -> dict[str, Any]:
        return {"objects_in": self.objects_in, "written": self.written, "ok": self.ok,
                "fallback_objects": self.fallback_objects, "fallback": dict(sorted(self.fallback.items())), "skipped": dict(sorted(self.skipped.items())),
                "recomputed": self.recomputed, "reused": self.reused, "per_class": self.per_class}


def config_key(params: PreprocessParams) -> dict[str, Any]:
    """What the stored tensors depend on besides the detections: a change recomputes every object."""
    root = Path(__file__).resolve().parents[1]
    code = hashlib.blake2b(digest_size=16)
    for name in _CODE_FILES:
        path = root / name
        code.update(path.read_bytes() if path.exists() else b"")
    return {"format_version": FORMAT_VERSION, "grid_days": params.grid_days, "kernel": params.kernel,
            "fit_context_days": params.fit_context_days, "partitions": params.partitions,
            "channels": list(CHANNELS), "code": code.hexdigest()}


def _read_previous(processed_dir: Path, key: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    try:
        manifest = json.loads((processed_dir / MANIFEST).read_text())
        if manifest.get("config") != key:
            return None
        index = pq.read_table(processed_dir / INDEX).to_pandas()
        skipped = pq.read_table(processed_dir / SKIPPED).to_pandas()
        for shard in index["shard"].unique():
            if not (processed_dir / shard).exists():
                return None
        return index, skipped
    except (OSError, ValueError, KeyError, pa.ArrowException):
        return None


def _reason_key(message: str) -> str:
    """A countable reason from a message that may carry object-specific numbers: 'no usable points: 3 given' ->
    'no usable points'; 'dropped 2 bad point(s)' -> 'dropped N bad point(s)'."""
    head = re.split(r": |\(\d", message, maxsplit=1)[0].strip()
    return re.sub(r"\d+(\.\d+)?", "N", head) or message


def _status_counts(statuses: pd.Series) -> tuple[int, int, dict[str, int]]:
    """(objects ok, objects with a fallback, fallback reasons counted once per object that had them)."""
    ok = int((statuses == "ok").sum())
    reasons: Counter[str] = Counter()
    for status in statuses:
        if status != "ok":
            notes = {_reason_key(n) for n in status.removeprefix("fallback:").split(";") if n.strip()}
            reasons.update(notes or {"unspecified"})
    return ok, int(len(statuses) - ok), dict(reasons)


def _swap_in(tmp: Path, root: Path) -> None:
    old = root.with_name(f".{root.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if root.exists():
        root.rename(old)
    tmp.rename(root)
    shutil.rmtree(old, ignore_errors=True)


def run(params: PreprocessParams, paths: PreprocessPaths, base: BaseParams | None = None,
        progress: Progress | None = None) -> PreprocessResult:
    """Interpolate every object of the raw store onto the grid and write ``paths.processed_dir``; see the module."""
    from deeprubin.store import RawStore

    base = base or BaseParams()
    step = progress or (lambda *_a, **_k: None)
    started = time.perf_counter()
    step(f"reading {paths.raw_dir}")
    store = RawStore(paths.raw_dir)
    if not store.exists():
        raise FileNotFoundError(f"no light curves in {paths.raw_dir}: run `deeprubin ingest` first")
    lcs = store.read()
    objects = lcs.objects.sort_values("oid").reset_index(drop=True)
    det = lcs.detections[["oid", "mjd", "band", "flux", "flux_err"]]
    label_of = {str(o): (None if pd.isna(lbl) else str(lbl)) for o, lbl in zip(objects["oid"], objects["label"])}
    oids = sorted(set(label_of) | set(det["oid"].astype(str)))
    for oid in oids:
        label_of.setdefault(oid, None)
    fps = fingerprints(det)
    fps_all = {oid: fps.get(oid, "") for oid in oids}
    part_of = {oid: partition_of(oid, params.partitions) for oid in oids}

    key = config_key(params)
    previous = _read_previous(paths.processed_dir, key) if params.incremental else None
    reuse_rows: dict[str, dict[str, Any]] = {}
    reuse_skips: dict[str, dict[str, Any]] = {}
    if previous is not None:
        old_index, old_skipped = previous
        for row in old_index.to_dict("records"):
            if fps_all.get(row["oid"]) == row["fingerprint"]:
                reuse_rows[row["oid"]] = row
        for row in old_skipped.to_dict("records"):
            if fps_all.get(row["oid"]) == row["fingerprint"]:
                reuse_skips[row["oid"]] = row
    todo = [oid for oid in oids if oid not in reuse_rows and oid not in reuse_skips]

    step("grouping light curves")
    todo_set = set(todo)
    by_partition: dict[int, list[Curve]] = {}
    sub = det.loc[det["oid"].astype(str).isin(todo_set)]
    grouped = {c.oid: c for c in curves_from_detections(sub)}
    for oid in todo:
        curve = grouped.get(oid) or Curve(
            oid, *(np.zeros(0, dtype=t) for t in (np.float64, np.int64, np.float64, np.float64)))
        by_partition.setdefault(part_of[oid], []).append(curve)
    tasks = [PartitionTask(p, by_partition[p], params.grid_days, params.fit_context_days)
             for p in sorted(by_partition)]

    workers = params.workers or os.cpu_count() or 1
    step("interpolating", completed=0, total=len(tasks))
    if params.executor == "dask":
        outputs = list(_run_dask(tasks, workers, params.dask_address, step))
    elif workers == 1 or len(tasks) <= 1:
        outputs = list(_run_serial(tasks, step))
    else:
        outputs = list(_run_pool(tasks, min(workers, len(tasks)), step))

    new_x: dict[str, np.ndarray] = {}
    new_meta: dict[str, dict[str, Any]] = {}
    new_skips: dict[str, dict[str, Any]] = {}
    for out in outputs:
        for i, row in enumerate(out.tensors.rows):
            new_x[row["oid"]] = out.tensors.x[i]
            new_meta[row["oid"]] = row
        for s in out.tensors.skipped:
            new_skips[s["oid"]] = s
    missing = todo_set - set(new_meta) - set(new_skips)
    for oid in sorted(missing):  # cannot happen unless a worker lost objects; never silently
        new_skips[oid] = {"oid": oid, "reason": "lost by the executor", "detail": ""}

    step(f"writing {paths.processed_dir}")
    paths.processed_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{paths.processed_dir.name}.tmp-", dir=paths.processed_dir.parent))
    tmp.chmod(0o755)
    old_shards: dict[str, np.ndarray] = {}
    try:
        index_rows: list[dict[str, Any]] = []
        skip_rows: list[dict[str, Any]] = []
        n_written = 0
        for p in range(params.partitions):
            members = [oid for oid in oids if part_of[oid] == p]  # oids are sorted
            xs = []
            for oid in members:
                if oid in new_meta:
                    xs.append(new_x[oid])
                    meta = {k: new_meta[oid][k] for k in _META_COLUMNS}
                elif oid in reuse_rows:
                    old = reuse_rows[oid]
                    if old["shard"] not in old_shards:
                        old_shards[old["shard"]] = np.load(paths.processed_dir / old["shard"], mmap_mode="r")
                    xs.append(np.asarray(old_shards[old["shard"]][int(old["row"])]))
                    meta = {k: old[k] for k in _META_COLUMNS}
                else:
                    s = new_skips.get(oid) or reuse_skips[oid]
                    skip_rows.append({"oid": oid, "label": label_of[oid], "reason": s["reason"],
                                      "detail": s.get("detail", ""), "fingerprint": fps_all[oid]})
                    continue
                shard = f"part-{p:05d}.npy"
                index_rows.append({"oid": oid, "label": label_of[oid], "partition": p, "shard": shard,
                                   "row": len(xs) - 1, **meta, "fingerprint": fps_all[oid]})
            if xs:
                np.save(tmp / f"part-{p:05d}.npy", np.ascontiguousarray(np.stack(xs), dtype=np.float32))
                n_written += len(xs)
        old_shards.clear()
        index = pd.DataFrame(index_rows, columns=INDEX_SCHEMA.names)
        skipped = pd.DataFrame(skip_rows, columns=SKIPPED_SCHEMA.names)
        pq.write_table(pa.Table.from_pandas(index, schema=INDEX_SCHEMA, preserve_index=False), tmp / INDEX)
        pq.write_table(pa.Table.from_pandas(skipped, schema=SKIPPED_SCHEMA, preserve_index=False), tmp / SKIPPED)

        ok, n_fallback, fallback = _status_counts(index["status"])
        per_class = {str(k): int(v) for k, v in index["label"].fillna("(none)").value_counts().sort_index().items()}
        result = PreprocessResult(
            processed_dir=paths.processed_dir, objects_in=len(oids), ok=ok, fallback_objects=n_fallback,
            fallback=fallback,
            skipped=dict(Counter(skipped["reason"])), recomputed=len(todo), reused=len(oids) - len(todo),
            shards=int(index["shard"].nunique()), shape=(n_written, len(CHANNELS), params.grid_days),
            executor=params.executor if params.executor == "dask" or workers > 1 else "serial",
            workers=workers, per_class=per_class)
        manifest = {
            "deeprubin_version": __version__,
            "channels": list(CHANNELS),
            "shape": list(result.shape),
            "dtype": "float32",
            "normalisation": "gp mean/std divided by index.flux_scale = max |flux| of the window's detections "
                             "(>= their median flux_err); since_* = log1p(days since detection)/log1p(grid_days)",
            "window": "start = max(first_mjd, last_mjd - (grid_days - 1)); see deeprubin.window",
            "config": key,
            # Deterministic content only (no timings, no recomputed/reused counts): an incremental run and a full
            # one write the same bytes, so DVC sees the same data version.
            "report": {k: v for k, v in result.report().items() if k not in ("recomputed", "reused")},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_in(tmp, paths.processed_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.seconds = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------------------------------------------
# Reading the output back.

def load_processed(processed_dir: Path | str) -> tuple[np.ndarray, pd.DataFrame]:
    """All tensors (N, C, G) in index order, and the index."""
    processed_dir = Path(processed_dir)
    index = pq.read_table(processed_dir / INDEX).to_pandas()
    manifest = json.loads((processed_dir / MANIFEST).read_text())
    if index.empty:
        return np.zeros((0, *manifest["shape"][1:]), dtype=np.float32), index
    shards = {s: np.load(processed_dir / s, mmap_mode="r") for s in index["shard"].unique()}
    x = np.stack([np.asarray(shards[s][r]) for s, r in zip(index["shard"], index["row"])])
    return x, index


def main() -> None:  # `python -m deeprubin.stages.preprocess`
    from deeprubin.cli import app

    app(["preprocess"])


if __name__ == "__main__":
    main()
