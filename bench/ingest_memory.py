"""Peak memory of ``ingest`` with the simulator, streamed (this tree) against the code before streaming.

    python bench/ingest_memory.py [--sizes 10000 100000] [--baseline-ref d924adb] [--no-baseline]

Each size runs in a fresh child process per code version (the default params.yaml: the simulator plus the shipped
BTS files, replace mode; ``ingest.simulator.n_per_class`` = size / 4, ``ingest.raw_dir`` a temporary folder). The
parent samples the resident memory of the child and of every process under it (the simulator's workers) every
50 ms with psutil; the child also reports its own peak (``ru_maxrss``) and its workers' (RUSAGE_CHILDREN: the
largest one). Workers are forked, so the sampled sum counts pages they share with the parent more than once: it is
an upper bound; ``main`` is the ingest process alone, where the old code's memory went.

Baseline (the project's rule: a benchmark runs its baseline in the same run and prints the ratio):
``--baseline-ref`` (default ``d924adb``, the last commit before ingest streamed) checked out with ``git worktree``
into a temporary folder and run the same way. It prints, per size, the peak memory of both and their ratio, and,
per code version, the growth of the peak between consecutive sizes against the growth of the input; and whether
the two wrote the same bytes (md5 of every stored file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "d924adb"

CHILD = r"""
import json, resource, sys, time
import deeprubin
from deeprubin.config import load_params
from deeprubin.stages import ingest
n_total, raw, params_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
p = load_params(params_path, [f"ingest.simulator.n_per_class={n_total // 4}", f"ingest.raw_dir={raw}"])
t = time.perf_counter()
r = ingest.run(p, ingest.IngestPaths.from_params(p))
print(json.dumps({"module": deeprubin.__file__, "seconds": time.perf_counter() - t, "detections": r.detections,
                  "main_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "children_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def _tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(RSS of ``proc``, RSS of ``proc`` and all its descendants), bytes."""
    try:
        main = proc.memory_info().rss
        total = main
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return main, total
    except psutil.Error:
        return 0, 0


def run_one(src: Path, n_total: int, workdir: Path) -> dict:
    raw = workdir / "raw"
    shutil.rmtree(raw, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(src), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1")
    out_path = workdir / "child.out"
    with open(out_path, "w") as out:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(n_total), str(raw), str(ROOT / "params.yaml")],
                                 cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        proc = psutil.Process(child.pid)
        peak_main = peak_tree = 0
        while child.poll() is None:
            main, tree = _tree_rss(proc)
            peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
            time.sleep(0.05)
    text = out_path.read_text()
    if child.returncode != 0:
        raise RuntimeError(f"ingest of {n_total} objects with {src} failed:\n{text[-3000:]}")
    report = json.loads(text.strip().splitlines()[-1])
    if not report["module"].startswith(str(src)):
        raise RuntimeError(f"the child imported {report['module']}, not the code under {src}")
    report.update(sampled_main_mb=peak_main / 2**20, sampled_tree_mb=peak_tree / 2**20,
                  stored_mb=sum(f.stat().st_size for f in raw.iterdir()) / 2**20,
                  md5={f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in sorted(raw.iterdir())})
    shutil.rmtree(raw, ignore_errors=True)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000], help="objects (4 classes)")
    ap.add_argument("--baseline-ref", default=DEFAULT_BASELINE, help="git ref of the code before streaming")
    ap.add_argument("--no-baseline", action="store_true", help="only this tree")
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"cores {os.cpu_count()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    versions = {"streamed": ROOT / "src"}
    with tempfile.TemporaryDirectory(prefix="ingest-memory-") as tmp:
        tmp = Path(tmp)
        if not args.no_baseline:
            tree = tmp / "baseline"
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline_ref], cwd=ROOT,
                           check=True, capture_output=True)
            versions["baseline"] = tree / "src"
        try:
            results: dict[str, dict[int, dict]] = {name: {} for name in versions}
            for n in args.sizes:
                for name, src in versions.items():
                    r = run_one(src, n, tmp)
                    results[name][n] = r
                    print(f"{n:>8} objects  {name:<9} {r['seconds']:7.1f} s  peak main {r['sampled_main_mb']:7.0f} MB "
                          f"(ru_maxrss {r['main_maxrss_mb']:.0f})  main+workers {r['sampled_tree_mb']:7.0f} MB  "
                          f"largest worker {r['children_maxrss_mb']:.0f} MB  stored {r['stored_mb']:.0f} MB  "
                          f"{r['detections']} detections", flush=True)
                if "baseline" in results:
                    new, old = results["streamed"][n], results["baseline"][n]
                    same = new["md5"] == old["md5"]
                    ratio = new["sampled_main_mb"] / old["sampled_main_mb"]
                    print(f"{n:>8} objects  streamed/baseline: peak main {ratio:.3f}, "
                          f"main+workers {new['sampled_tree_mb'] / old['sampled_tree_mb']:.3f}, "
                          f"time {new['seconds'] / old['seconds']:.2f}; stored files identical: {same}"
                          + ("" if same else f" ({new['md5']} vs {old['md5']})"), flush=True)
            for name, by_size in results.items():
                sizes = sorted(by_size)
                for a, b in zip(sizes, sizes[1:]):
                    print(f"{name:<9} {a} -> {b} objects (x{b / a:.1f}): peak main x"
                          f"{by_size[b]['sampled_main_mb'] / by_size[a]['sampled_main_mb']:.2f}, main+workers x"
                          f"{by_size[b]['sampled_tree_mb'] / by_size[a]['sampled_tree_mb']:.2f}")
        finally:
            if not args.no_baseline:
                subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "baseline")], cwd=ROOT,
                               capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
