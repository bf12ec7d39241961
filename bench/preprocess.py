"""The preprocess stage's interpolation on a process pool: one BLAS thread per worker against BLAS threads as
inherited (issue 18).

    python bench/preprocess.py                 # 10,000 simulated objects, 16 partitions, one worker per core
    python bench/preprocess.py --n 2000 --repeat 1

What runs: the stage's own partitions (objects split by a hash of their oid, as ``preprocess.partitions``) through
the stage's own pool (``stages.preprocess._run_pool``), workers started as the stage starts them (forkserver), so
each run pays the workers' start as the stage does. Reading the raw store and writing shards are left out: they do
not depend on threads.

* ``one thread``: the stage's ``compute_partition``: each partition runs inside ``one_blas_thread()`` (every BLAS and
  OpenMP library of the worker at one thread).
* baseline, ``inherited``: the same partitions and GP (``interpolate_batch_invariant``) without the limit: OpenBLAS
  keeps the thread count it starts with (one per core unless OPENBLAS_NUM_THREADS says otherwise), so on two cores
  two workers run two BLAS threads each: what the stage did before issue 18.

The two alternate (baseline first, after an untimed warm-up pool that starts the forkserver), ``--repeat`` times
each; the ratio is of the best times. The tensors are compared
byte for byte: the baseline's differ from one run to the next where OpenBLAS's threaded factorisations round
differently; the one-thread runs are identical to each other.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
# Worker processes import this checkout too (a forkserver ignores sys.path; an editable install elsewhere would win)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))

from deeprubin.config import SimulatorParams  # noqa: E402
from deeprubin.lightcurves import tensorize  # noqa: E402
from deeprubin.processed import partition_of  # noqa: E402
from deeprubin.sources.simulate import simulate  # noqa: E402
from deeprubin.stages import preprocess as stage  # noqa: E402


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ""
    try:
        load = f", load average {os.getloadavg()[0]:.1f} at start"
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, {platform.system()}{load}"


def inherited_threads(task: stage.PartitionTask) -> stage.PartitionOutput:
    """The baseline: ``compute_partition`` without ``one_blas_thread()`` (BLAS threads as the worker has them)."""
    started = time.perf_counter()
    threads = stage._threads_now()
    tensors = tensorize.tensorize_curves(task.curves, task.grid_days, task.fit_context_days,
                                         interpolator=tensorize.interpolate_batch_invariant)
    return stage.PartitionOutput(task.partition, tensors, time.perf_counter() - started, threads)


def tasks_for(n: int, seed: int, partitions: int) -> list[stage.PartitionTask]:
    det = simulate(SimulatorParams(n_per_class=max(1, n // 4)), seed=seed).detections
    by_partition: dict[int, list] = {}
    for curve in tensorize.curves_from_detections(det):
        by_partition.setdefault(partition_of(curve.oid, partitions), []).append(curve)
    return [stage.PartitionTask(p, by_partition[p], 100, 100.0) for p in sorted(by_partition)]


def timed(tasks, workers: int, fn) -> tuple[float, dict[str, np.ndarray], set[int]]:
    started = time.perf_counter()
    outputs = list(stage._run_pool(tasks, workers, lambda *a, **k: None, fn=fn))
    seconds = time.perf_counter() - started
    x = {row["oid"]: out.tensors.x[i] for out in outputs for i, row in enumerate(out.tensors.rows)}
    return seconds, x, {out.threads for out in outputs}


def differing(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> int:
    return sum(not np.array_equal(a[k], b[k]) for k in a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="simulated objects (equal numbers of the 4 classes)")
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0, help="pool processes (0: one per core)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each (alternating); the best is compared")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    workers = args.workers or os.cpu_count() or 1

    print(f"machine: {machine()}")
    started = time.perf_counter()
    tasks = tasks_for(args.n, args.seed, args.partitions)
    n = sum(len(t.curves) for t in tasks)
    print(f"{n:,} simulated objects in {len(tasks)} partitions (simulated in {time.perf_counter() - started:.1f} s); "
          f"{workers} worker processes")

    # The first pool of a process also starts the forkserver: paid here, untimed, so neither variant carries it.
    stage._run_pool([stage.PartitionTask(0, tasks[0].curves[:8], 100, 100.0)], workers, lambda *a, **k: None)
    runs: dict[str, list[tuple[float, dict, set]]] = {"inherited": [], "one thread": []}
    for _ in range(args.repeat):
        runs["inherited"].append(timed(tasks, workers, inherited_threads))
        runs["one thread"].append(timed(tasks, workers, stage.compute_partition))
    for name, rs in runs.items():
        times = ", ".join(f"{r[0]:.1f}" for r in rs)
        threads = sorted(set().union(*(r[2] for r in rs)))
        print(f"{name:>10}: best {min(r[0] for r in rs):.1f} s ({n / min(r[0] for r in rs):,.0f} objects/s; runs: "
              f"{times} s); BLAS threads seen in the workers: {threads}")
    base = min(r[0] for r in runs["inherited"])
    ours = min(r[0] for r in runs["one thread"])
    print(f"ratio (inherited / one thread, best times): {base / ours:.2f}x")
    one, inh = runs["one thread"], runs["inherited"]
    print(f"tensors differing from the first one-thread run: inherited runs "
          f"{[differing(one[0][1], r[1]) for r in inh]}, other one-thread runs "
          f"{[differing(one[0][1], r[1]) for r in one[1:]]} (of {len(one[0][1]):,})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
