"""Peak memory and time of the ``preprocess`` stage at scale, on Dask against the local process pool (issue 18).

    python bench/preprocess_memory.py                    # 100,000 simulated objects
    python bench/preprocess_memory.py --n 10000

What runs: the simulator's objects (``ingest.simulator.n_per_class`` = n / 4, without the shipped BTS files) are
ingested once into a temporary raw store; then the whole ``preprocess`` stage (read, group, interpolate the
default 16 partitions, write the shards) runs in a fresh child process per executor, each into its own output folder:

* ``dask``: ``preprocess.executor=dask``, a ``LocalCluster`` of one single-threaded worker process per core, each
  task a :class:`deeprubin.stages.preprocess.PartitionRef` (the raw file's path and the partition's oids: the worker
  reads its own rows). Before issue 18 the tasks carried the curves: a 190 MB task graph at 100,000 objects and a
  4.3 GB peak.
* baseline, ``processes``: the stage's default process pool on the same raw store, in the same run.

The parent samples, every 0.2 s, the proportional set size (PSS: shared pages divided among the processes that
share them, so the sum is not inflated by forked copies) of the child and every process under it (the pool's or
the cluster's workers and nanny processes), and reports each run's peak sum and the child's own peak. It also
reports the pickled size of the Dask tasks (what the scheduler ships) against the curves they replace, and whether
the two executors wrote the same bytes (md5 of every shard and index file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
           MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1")

INGEST = r"""
import sys
from deeprubin.config import load_params
from deeprubin.stages import ingest
n, raw = int(sys.argv[1]), sys.argv[2]
p = load_params(None, [f"ingest.simulator.n_per_class={n // 4}", f"ingest.raw_dir={raw}", "ingest.mix_files=false"])
ingest.run(p, ingest.IngestPaths.from_params(p))
"""

PREPROCESS = r"""
import json, resource, sys, time
import deeprubin
from deeprubin.config import load_params
from deeprubin.stages import preprocess
raw, out, executor = sys.argv[1], sys.argv[2], sys.argv[3]
p = load_params(None, [f"ingest.raw_dir={raw}", f"preprocess.processed_dir={out}", f"preprocess.executor={executor}"])
t = time.perf_counter()
r = preprocess.run(p, preprocess.PreprocessPaths.from_params(p))
print(json.dumps({"module": deeprubin.__file__, "seconds": time.perf_counter() - t,
                  "main_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

TASK_SIZES = r"""
import json, pickle, sys
import pandas as pd
from deeprubin.config import load_params
from deeprubin.lightcurves.tensorize import curves_from_detections
from deeprubin.processed import fingerprints, partition_of
from deeprubin.stages.preprocess import PartitionRef, PartitionTask, partition_curves
raw = sys.argv[1]
p = load_params(None).preprocess
det = pd.read_parquet(f"{raw}/detections.parquet", columns=["oid", "mjd", "band", "flux", "flux_err"])
grouped = {c.oid: c for c in curves_from_detections(det)}
fps = fingerprints(det)
parts = {}
for oid in sorted(grouped):
    parts.setdefault(partition_of(oid, p.partitions), []).append(oid)
refs = [PartitionRef(k, f"{raw}/detections.parquet", tuple(o), tuple(fps.get(x, "") for x in o), p.grid_days,
                     p.fit_context_days) for k, o in sorted(parts.items())]
tasks = [PartitionTask(k, partition_curves(grouped, o), p.grid_days, p.fit_context_days) for k, o in sorted(parts.items())]
print(json.dumps({"refs_mb": sum(len(pickle.dumps(r)) for r in refs) / 2**20,
                  "curves_mb": sum(len(pickle.dumps(t)) for t in tasks) / 2**20}))
"""


def _tree_pss(proc: psutil.Process) -> tuple[int, int]:
    """(PSS of ``proc``, PSS summed over ``proc`` and its descendants), bytes."""
    def pss(p: psutil.Process) -> int:
        try:
            return p.memory_full_info().pss
        except psutil.Error:
            return 0

    try:
        kids = proc.children(recursive=True)
    except psutil.Error:
        return 0, 0
    main = pss(proc)
    return main, main + sum(pss(k) for k in kids)


def _digest(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.md5(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and f.suffix in (".parquet", ".npy", ".npz")}


def run_stage(raw: Path, out: Path, executor: str) -> dict:
    log = out.with_suffix(".log")
    with open(log, "w") as fh:
        child = subprocess.Popen([sys.executable, "-c", PREPROCESS, str(raw), str(out), executor], cwd=ROOT, env=ENV,
                                 stdout=fh, stderr=subprocess.STDOUT)
        proc = psutil.Process(child.pid)
        peak_main = peak_tree = 0
        while child.poll() is None:
            main, tree = _tree_pss(proc)
            peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
            time.sleep(0.2)
    text = log.read_text()
    if child.returncode:
        raise RuntimeError(f"preprocess ({executor}) failed:\n{text[-3000:]}")
    report = json.loads(text.strip().splitlines()[-1])
    if not report["module"].startswith(str(ROOT / "src")):
        raise RuntimeError(f"the child imported {report['module']}, not this checkout")
    report.update(peak_main_pss_mb=peak_main / 2**20, peak_tree_pss_mb=peak_tree / 2**20, digest=_digest(out))
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="simulated objects (4 classes)")
    ap.add_argument("--output", type=Path, default=ROOT / "metrics" / "bench_preprocess_memory.json")
    args = ap.parse_args()
    print(f"cores {os.cpu_count()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="preprocess-memory-") as tmp:
        tmp = Path(tmp)
        raw = tmp / "raw"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", INGEST, str(args.n), str(raw)], cwd=ROOT, env=ENV, check=True,
                       capture_output=True)
        print(f"ingested {args.n} simulated objects in {time.perf_counter() - t:.0f} s "
              f"({(raw / 'detections.parquet').stat().st_size / 2**20:.0f} MB of detections)")
        sizes = json.loads(subprocess.run([sys.executable, "-c", TASK_SIZES, str(raw)], cwd=ROOT, env=ENV, check=True,
                                          capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"Dask tasks, pickled: {sizes['refs_mb']:.2f} MB as paths and oids, against {sizes['curves_mb']:.0f} MB "
              f"as curves (ratio {sizes['curves_mb'] / sizes['refs_mb']:.0f}x)")
        runs = {}
        for executor in ("processes", "dask"):
            r = run_stage(raw, tmp / f"processed-{executor}", executor)
            runs[executor] = r
            print(f"  {executor:9s} {r['seconds']:7.1f} s  peak PSS: all processes {r['peak_tree_pss_mb']:7.0f} MB, "
                  f"the stage's process {r['peak_main_pss_mb']:6.0f} MB (ru_maxrss {r['main_maxrss_mb']:.0f} MB)")
        d, p = runs["dask"], runs["processes"]
        same = d["digest"] == p["digest"]
        print(f"dask / processes: peak {d['peak_tree_pss_mb'] / p['peak_tree_pss_mb']:.2f}x, time "
              f"{d['seconds'] / p['seconds']:.2f}x; the same bytes ({len(p['digest'])} files): {same}")
        report = {"n": args.n, "task_sizes": sizes, "same_bytes": same, "load": os.getloadavg(),
                  **{k: {kk: vv for kk, vv in v.items() if kk != "digest"} for k, v in runs.items()}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
