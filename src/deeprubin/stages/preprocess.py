"""Stage ``preprocess``: contract light curves in ``data/raw`` -> model input tensors in ``data/processed``.

Each object goes through :func:`deeprubin.lightcurves.tensorize.tensorize_curves` (window, GP, channels); the output
format is :mod:`deeprubin.processed`. A GP that could not be fitted well but still gave a finite answer is written
with status ``fallback: <reason>``; an object that cannot be interpolated at all is skipped with its reason.

Distribution: objects are split into ``partitions`` by a hash of their oid (so the split never depends on the
number of workers); partitions run in this process (``workers: 1``), on a local process pool, or on a Dask cluster
(``executor: dask``), with identical output. A Dask task carries the raw detections file's path and its partition's
oids, and the worker reads its own rows (:class:`PartitionRef`), when the workers see that file; workers that do not
(no shared data folder) are sent the curves. Incremental: each object's fingerprint is a hash of its detections;
with the same configuration and code, only objects whose fingerprint changed are recomputed, the rest are copied
from the previous output, and the result is the same as a full recompute.

Both "identical"s hold to the byte because an object's tensor is a function of that object alone: the GP runs with
:data:`deeprubin.lightcurves.gp.BATCH_INVARIANT` (never the dense likelihood that a tiny batch would get, never a
prediction padded to a chunk-mate's size) and every partition runs with one BLAS/OpenMP thread (:func:`one_blas_thread`:
OpenBLAS's threaded factorisations round differently from its serial ones, and two threads in each of two workers
on two cores only fought: 1.45-1.84x slower; ``bench/preprocess.py``). Where OpenBLAS ignores the limit, the run
warns and names the partitions. Across CPU types OpenBLAS picks other kernels: the bytes are the same on one machine
(or identical ones), not on a mixed cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from deeprubin import __version__
from deeprubin.config import Params, PreprocessParams
from deeprubin.lightcurves import gp, tensorize, window
from deeprubin.lightcurves.tensorize import CHANNELS, Curve, Tensors, curves_from_detections, \
    interpolate_batch_invariant, reason_key, tensorize_curves
from deeprubin.processed import FORMAT_VERSION, INDEX, INDEX_SCHEMA, MANIFEST, META_COLUMNS, SKIPPED, \
    SKIPPED_SCHEMA, fingerprints, partition_of, read_previous, shard_name
from deeprubin.progress import Progress, or_silent
from deeprubin.store import RawStore

# Code whose change invalidates every stored tensor (the incremental cache is keyed on it).
_CODE_MODULES = (tensorize, window, gp)


@dataclass(frozen=True)
class PartitionTask:
    partition: int
    curves: list[Curve]
    grid_days: int
    fit_context_days: float


@dataclass(frozen=True)
class PartitionRef:
    """A partition as a Dask task carries it: where its detections are and which objects to take, not the data
    (at 100,000 objects the curves made a 190 MB task graph). The worker reads the rows of ``oids`` from
    ``detections_path`` and checks them against ``fingerprints`` (the raw store it read must be the one the stage
    read)."""

    partition: int
    detections_path: str
    oids: tuple[str, ...]  # in the order of the partition's curves
    fingerprints: tuple[str, ...]  # per oid, processed.fingerprints of its detections ("" when it has none)
    grid_days: int
    fit_context_days: float


DETECTION_COLUMNS = ["oid", "mjd", "band", "flux", "flux_err"]


def partition_curves(grouped: dict[str, Curve], oids: list[str] | tuple[str, ...]) -> list[Curve]:
    """The curves of ``oids``, in that order, from ``{oid: curve}`` (an object without detections: an empty
    curve)."""
    return [grouped.get(oid) or Curve(oid, *(np.zeros(0, dtype=t) for t in (np.float64, np.int64, np.float64,
                                                                            np.float64)))
            for oid in oids]


def load_partition(ref: PartitionRef) -> PartitionTask:
    """A worker's side of :class:`PartitionRef`: the partition's detections read from the raw store's file."""
    det = pq.read_table(ref.detections_path, columns=DETECTION_COLUMNS,
                        filters=[("oid", "in", list(ref.oids))]).to_pandas()
    found = fingerprints(det)
    changed = [oid for oid, fp in zip(ref.oids, ref.fingerprints) if found.get(oid, "") != fp]
    if changed:
        raise RuntimeError(f"preprocess: {ref.detections_path} changed while the stage ran ({len(changed)} "
                           f"object(s) of partition {ref.partition}, e.g. {changed[0]}); run it again")
    grouped = {c.oid: c for c in curves_from_detections(det)}
    return PartitionTask(ref.partition, partition_curves(grouped, ref.oids), ref.grid_days, ref.fit_context_days)


def compute_partition_ref(ref: PartitionRef) -> "PartitionOutput":
    """:func:`compute_partition` of the partition a Dask worker reads itself."""
    return compute_partition(load_partition(ref))


def _file_stamp(path: str) -> tuple[int, int] | None:
    """(size, mtime in ns) of a file, None when this machine does not see it (run on each Dask worker)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


@dataclass
class PartitionOutput:
    partition: int
    tensors: Tensors
    seconds: float
    threads: int = 1  # the most threads any BLAS library of the process had while the partition ran


_LIMIT_LOCK = threading.Lock()
_LIMIT_USERS = 0
_LIMIT: Any = None


@contextlib.contextmanager
def one_blas_thread():
    """Every BLAS and OpenMP library of this process at one thread while inside; the previous settings are restored
    when the last user leaves (reference-counted, so partitions running on threads of one process, as on a threaded
    Dask worker, never restore each other's limit early). Nothing outside the block changes."""
    global _LIMIT_USERS, _LIMIT
    from threadpoolctl import threadpool_limits

    with _LIMIT_LOCK:
        if _LIMIT_USERS == 0:
            _LIMIT = threadpool_limits(limits=1)
        _LIMIT_USERS += 1
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            _LIMIT_USERS -= 1
            if _LIMIT_USERS == 0:
                _LIMIT.restore_original_limits()
                _LIMIT = None


def _threads_now() -> int:
    """The most threads any BLAS library of this process would use now (OpenMP's count is per calling thread, and
    the GP's bits depend on BLAS's)."""
    from threadpoolctl import threadpool_info

    return max((int(lib["num_threads"]) for lib in threadpool_info() if lib["user_api"] == "blas"), default=1)


def compute_partition(task: PartitionTask) -> PartitionOutput:
    """Run one partition (in this process, a pool worker or a Dask worker) with one BLAS thread and the
    batch-invariant GP, so each object's tensor is the same to the byte wherever it runs and whatever objects it
    runs with. Never raises for one object."""
    started = time.perf_counter()
    with one_blas_thread():
        threads = _threads_now()
        tensors = tensorize_curves(task.curves, task.grid_days, task.fit_context_days,
                                   interpolator=interpolate_batch_invariant)
    return PartitionOutput(task.partition, tensors, time.perf_counter() - started, threads)


def _run_serial(tasks, step):
    for i, task in enumerate(tasks):
        yield compute_partition(task)
        step("interpolating", completed=i + 1, total=len(tasks))


def _run_pool(tasks, workers, step, fn=compute_partition):
    """``fn`` (a top-level function) over ``tasks`` on a local process pool; ``bench/preprocess.py`` passes its
    baseline."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                      else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(fn, task) for task in tasks]
        for i, fut in enumerate(as_completed(futures)):
            yield fut.result()
            step("interpolating", completed=i + 1, total=len(tasks))


def _run_dask(tasks, workers, address, step, refs=None):
    """The partitions on a Dask cluster (a LocalCluster when ``address`` is None). ``refs`` (a callable giving the
    :class:`PartitionRef` list, with the detections file they read) is used when every worker sees that file as
    this process does (same size and time: a local cluster, or workers sharing the data folder): tasks then carry
    the path and the partition's oids, and each worker reads its own rows. Otherwise ``tasks`` (a callable giving
    the :class:`PartitionTask` list, or the list: the curves themselves) are sent, as to workers without the data
    folder."""
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if address is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    else:
        client = Client(address)
    try:
        by_path = None
        if refs is not None:
            path, make_refs = refs
            here = _file_stamp(path)
            seen = client.run(_file_stamp, path) if here is not None else {}
            if seen and all(tuple(v) == here if v is not None else False for v in seen.values()):
                by_path = make_refs()
        if by_path is not None:
            futures = client.map(compute_partition_ref, by_path, pure=False)
        else:
            futures = client.map(compute_partition, tasks() if callable(tasks) else tasks, pure=False)
        total = len(futures)
        for i, fut in enumerate(as_completed(futures)):
            yield fut.result()
            step("interpolating", completed=i + 1, total=total)
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
    """What the stored tensors depend on besides the detections: a change recomputes every object. The code is
    hashed through the modules themselves, so moving a file never leaves a stale cache behind."""
    code = hashlib.blake2b(digest_size=16)
    for module in _CODE_MODULES:
        code.update(module.__name__.encode() + b"\0" + Path(module.__file__).read_bytes())
    return {"format_version": FORMAT_VERSION, "grid_days": params.grid_days, "kernel": params.kernel,
            "fit_context_days": params.fit_context_days, "partitions": params.partitions,
            "channels": list(CHANNELS), "code": code.hexdigest()}



def _status_counts(statuses: pd.Series) -> tuple[int, int, dict[str, int]]:
    """(objects ok, objects with a fallback, fallback reasons counted once per object that had them)."""
    ok = int((statuses == "ok").sum())
    reasons: Counter[str] = Counter()
    for status in statuses:
        if status != "ok":
            notes = {reason_key(n) for n in status.removeprefix("fallback:").split(";") if n.strip()}
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


def run(params: Params, paths: PreprocessPaths, progress: Progress | None = None) -> PreprocessResult:
    """Interpolate every object of the raw store onto the grid and write ``paths.processed_dir``; see the module."""
    step = or_silent(progress)
    cfg = params.preprocess  # the stage reads its own section (and paths) only
    started = time.perf_counter()
    step(f"reading {paths.raw_dir}")
    store = RawStore(paths.raw_dir)
    if not store.exists():
        raise FileNotFoundError(f"no light curves in {paths.raw_dir}: run `deeprubin ingest` first")
    objects = store.read_table("objects", ["oid", "label"]).sort_values("oid").reset_index(drop=True)
    det = store.read_table("detections", DETECTION_COLUMNS)
    label_of = {str(o): (None if pd.isna(lbl) else str(lbl)) for o, lbl in zip(objects["oid"], objects["label"])}
    oids = sorted(set(label_of) | set(det["oid"].astype(str)))
    for oid in oids:
        label_of.setdefault(oid, None)
    fps = fingerprints(det)
    fps_all = {oid: fps.get(oid, "") for oid in oids}
    part_of = {oid: partition_of(oid, cfg.partitions) for oid in oids}

    key = config_key(cfg)
    previous = read_previous(paths.processed_dir, key) if cfg.incremental else None
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

    todo_set = set(todo)
    todo_by_partition: dict[int, list[str]] = {}
    for oid in todo:
        todo_by_partition.setdefault(part_of[oid], []).append(oid)

    def make_tasks() -> list[PartitionTask]:
        step("grouping light curves")
        sub = det.loc[det["oid"].astype(str).isin(todo_set)]
        grouped = {c.oid: c for c in curves_from_detections(sub)}
        return [PartitionTask(p, partition_curves(grouped, todo_by_partition[p]), cfg.grid_days,
                              cfg.fit_context_days)
                for p in sorted(todo_by_partition)]

    def make_refs() -> list[PartitionRef]:
        return [PartitionRef(p, detections_path, tuple(todo_by_partition[p]),
                             tuple(fps_all[oid] for oid in todo_by_partition[p]), cfg.grid_days, cfg.fit_context_days)
                for p in sorted(todo_by_partition)]

    workers = cfg.workers or os.cpu_count() or 1
    n_tasks = len(todo_by_partition)
    step("interpolating", completed=0, total=n_tasks)
    # One BLAS thread here too, for the whole phase: partitions that run on threads of this process (a threaded
    # in-process Dask cluster) use this thread's setting, since OpenBLAS ignores a count set from another thread
    # once the main thread has set one. Restored when the phase ends.
    with one_blas_thread():
        if cfg.executor == "dask":
            detections_path = str(store.detections_path().resolve())
            outputs = list(_run_dask(make_tasks, workers, cfg.dask_address, step, refs=(detections_path, make_refs)))
        elif workers == 1 or n_tasks <= 1:
            outputs = list(_run_serial(make_tasks(), step))
        else:
            outputs = list(_run_pool(make_tasks(), min(workers, n_tasks), step))
    threaded = sorted({out.partition for out in outputs if out.threads > 1})
    if threaded:  # the limit did not take (OpenBLAS ignored it): say so, the bytes may differ from other runs'
        warnings.warn(f"preprocess: partitions {threaded} ran with {max(o.threads for o in outputs)} BLAS threads; "
                      "their tensors may differ in the last bit from a one-thread run", RuntimeWarning, stacklevel=2)

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
        for p in range(cfg.partitions):
            members = [oid for oid in oids if part_of[oid] == p]  # oids are sorted
            xs = []
            for oid in members:
                if oid in new_meta:
                    xs.append(new_x[oid])
                    meta = {k: new_meta[oid][k] for k in META_COLUMNS}
                elif oid in reuse_rows:
                    old = reuse_rows[oid]
                    if old["shard"] not in old_shards:
                        old_shards[old["shard"]] = np.load(paths.processed_dir / old["shard"], mmap_mode="r")
                    xs.append(np.asarray(old_shards[old["shard"]][int(old["row"])]))
                    meta = {k: old[k] for k in META_COLUMNS}
                else:
                    s = new_skips.get(oid) or reuse_skips[oid]
                    skip_rows.append({"oid": oid, "label": label_of[oid], "reason": s["reason"],
                                      "detail": s.get("detail", ""), "fingerprint": fps_all[oid]})
                    continue
                shard = shard_name(p)
                index_rows.append({"oid": oid, "label": label_of[oid], "partition": p, "shard": shard,
                                   "row": len(xs) - 1, **meta, "fingerprint": fps_all[oid]})
            if xs:
                np.save(tmp / shard_name(p), np.ascontiguousarray(np.stack(xs), dtype=np.float32))
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
            shards=int(index["shard"].nunique()), shape=(n_written, len(CHANNELS), cfg.grid_days),
            executor=cfg.executor if cfg.executor == "dask" or workers > 1 else "serial",
            workers=workers, per_class=per_class)
        manifest = {
            "deeprubin_version": __version__,
            "channels": list(CHANNELS),
            "shape": list(result.shape),
            "dtype": "float32",
            "normalisation": "gp mean/std divided by index.flux_scale = max |flux| of the window's detections "
                             "(>= their median flux_err); since_* = log1p(days since detection)/log1p(grid_days)",
            "window": "start = max(first_mjd, last_mjd - (grid_days - 1)); see deeprubin.lightcurves.window",
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

