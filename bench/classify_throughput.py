"""Throughput of `deeprubin classify` end to end (read -> validate -> window -> GP -> TCN -> write) against the same
pipeline with scikit-learn's GP, and the peak memory of a large input.

    python bench/classify_throughput.py                  # 10,000 simulated curves, all cores; baseline on 400
    python bench/classify_throughput.py --memory 100000  # also: peak memory for 100,000 curves vs 10,000
    python bench/classify_throughput.py --model models:/deeprubin-tcn/3 --tracking-uri http://127.0.0.1:5000

Target (issue 18): >= 3,000 curves/s on a 2-core machine, end to end, the workers' start included (issue 7's
1,000/s, a 3.5x margin on LSST's ~10 million alerts in a 10-hour night, ~280/s, was the first goal). The rate is
what `classify.run_file` does for a Parquet file of simulated ZTF-like
curves sorted by object (QSO, CEP, SN Ia, SN II in equal numbers), with the GP on `classify.workers` processes (0:
one per core) and the TCN in the main process.

Baseline, in the same run: the same `run_file` pipeline with the interpolation replaced by scikit-learn's
``GaussianProcessRegressor(C * Matern(nu=1.5) + White)`` per band (the GP baseline of bench/gp.py), on the same number
of processes, on the first ``--baseline-n`` curves (it is ~100x slower); rates are compared per curve.

Memory (``--memory N``): each size runs in a fresh child process (the input is simulated in another one); the peak
of the summed PSS of that process, the forkserver and the GP workers (sampled every 0.2 s with psutil; PSS counts a
shared page once across processes), imports -- torch, MLflow -- included. Flat means the ratio of
the two peaks stays near 1 while the input grows N/10,000 times.

GPU: when torch sees a CUDA device, the TCN also runs there (``classify.device=cuda``), then the GP too
(``classify.gp_device=cuda``), and both rates are printed; ``bench/gp_torch.py`` measures that path on 100,000
curves.

The model: ``--model`` (default the champion of ``sqlite:///mlflow.db``, what `make run` leaves). Without one, an
untrained TCN of the configured shape (`train.hidden`, `train.levels`, `train.kernel_size`) is used: speed does not
depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
# Worker processes import this checkout too (a forkserver ignores sys.path; an editable install elsewhere would win)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))

from deeprubin.config import load_params  # noqa: E402
from deeprubin.models import served  # noqa: E402
from deeprubin.schema import CLASSES  # noqa: E402
from deeprubin.serving import classify as clf  # noqa: E402
from deeprubin.serving.pool import resolve_workers  # noqa: E402

TARGET_PER_S = 3000.0


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {cpu}, {platform.system()}"


def simulated_file(n: int, seed: int, path: Path) -> int:
    """``n`` simulated objects (n/4 per class) written sorted by object, as a survey export would be."""
    from deeprubin.sources import simulate

    params = load_params(None).ingest.simulator.model_copy(update={"n_per_class": max(1, n // 4)})
    det = simulate.simulate(params, seed=seed).detections
    det.sort_values(["oid", "mjd"], kind="stable").to_parquet(path, index=False, row_group_size=65_536)
    return len(det)


def first_objects(src: Path, n: int, path: Path) -> None:
    import pandas as pd

    det = pd.read_parquet(src)
    keep = set(det["oid"].drop_duplicates().iloc[:n])
    det[det["oid"].isin(keep)].to_parquet(path, index=False)


def serving_model(uri: str | None, tracking_uri: str) -> served.ServingModel:
    if uri:
        return served.load_model(uri, tracking_uri)
    try:
        return served.load_model("models:/deeprubin-tcn@champion", tracking_uri)
    except Exception as exc:  # noqa: BLE001 - no registry yet: an untrained network of the same shape
        from deeprubin.models.served import untrained_served_model

        t = load_params(None).train
        print(f"note: no champion in {tracking_uri} ({type(exc).__name__}); an untrained TCN of the configured shape "
              f"(hidden {t.hidden}, levels {t.levels}, kernel {t.kernel_size}) is used")
        return served.ServingModel(uri="untrained", name="untrained-tcn", version="0", classes=tuple(CLASSES),
                                module=untrained_served_model(t, grid_days=load_params(None).preprocess.grid_days))


def sklearn_interpolator(preps):
    """scikit-learn's GPR per band in place of deeprubin.lightcurves.gp (top level: it runs in the worker processes)."""
    from threadpoolctl import threadpool_limits

    from deeprubin.lightcurves.gp import GPResult

    sys.path.insert(0, str(REPO / "bench"))
    from gp import sklearn_predict  # the baseline of bench/gp.py

    out = []
    with threadpool_limits(limits=1, user_api="blas"):
        for p in preps:
            t, flux, err, band, grid = p.gp_args()
            try:
                (mg, sg), (mr, sr) = sklearn_predict(t, flux, err, band, [grid, grid])
                out.append(GPResult(mean=np.stack([mg, mr]), std=np.stack([sg, sr]), status="ok", params={}))
            except Exception as exc:  # noqa: BLE001 - recorded as the object's skip, as the real path does
                out.append(exc)
    return out


def timed_run(params, src: Path, out: Path, model, workers: int, **kw) -> tuple[float, clf.ClassifyResult]:
    t = time.perf_counter()
    result = clf.run_file(params, src, out, model=model, workers=workers, min_rows_for_pool=0, **kw)
    return time.perf_counter() - t, result


def steady_rate(params, src: Path, out: Path, model, workers: int) -> tuple[float, float, clf.ClassifyResult]:
    """(seconds, curves/s after the first batch came back, result): the rate once the workers are up."""
    marks: list[tuple[float, int]] = []
    t0 = time.perf_counter()

    def step(message, completed=None, total=None):
        if completed is not None:
            marks.append((time.perf_counter() - t0, completed))

    result = clf.run_file(params, src, out, model=model, workers=workers, min_rows_for_pool=0, progress=step)
    seconds = time.perf_counter() - t0
    (t_first, rows_first), (t_last, rows_last) = marks[0], marks[-1]
    per_row = result.n_classified / max(rows_last, 1)  # progress counts input rows
    return seconds, (rows_last - rows_first) * per_row / max(t_last - t_first, 1e-9), result


def child_peak(n: int, seed: int, workdir: Path, model_uri: str | None, tracking_uri: str) -> dict:
    """Simulate the input in one child (its memory must not count), classify it in another and measure that."""
    src = Path(workdir) / f"mem-{n}.parquet"
    subprocess.run([sys.executable, __file__, "--make-file", str(n), "--seed", str(seed), "--workdir", str(workdir)],
                   capture_output=True, text=True, check=True)
    cmd = [sys.executable, __file__, "--child-memory", str(n), "--workdir", str(workdir),
           "--tracking-uri", tracking_uri] + (["--model", model_uri] if model_uri else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    src.unlink(missing_ok=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


class TreePeak:
    """Peak of the summed PSS (proportional set size: a page shared by k processes counts 1/k in each, so torch's
    libraries mapped in every worker count once) of this process and all its descendants, sampled every 0.2 s."""

    def __init__(self):
        import threading

        import psutil

        self.me, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self.stop.is_set():
            total = 0
            for p in [self.me, *self.me.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.stop.wait(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def memory_child(args) -> int:
    src = Path(args.workdir) / f"mem-{args.child_memory}.parquet"
    model = serving_model(args.model, args.tracking_uri)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with TreePeak() as tree:
        seconds, result = timed_run(load_params(None), src, Path(args.workdir) / "mem-out.parquet", model, 0)
    print(json.dumps({"n": args.child_memory, "classified": result.n_classified, "seconds": seconds,
                      "peak_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_before_run_mb": before, "peak_tree_mb": tree.peak / 2**20}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="light curves classified")
    ap.add_argument("--baseline-n", type=int, default=400, help="curves for the scikit-learn baseline")
    ap.add_argument("--workers", type=int, default=0, help="GP processes (0: one per core)")
    ap.add_argument("--memory", type=int, default=0, help="also measure peak memory for this many curves")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    ap.add_argument("--output", type=Path, default=REPO / "metrics" / "bench_classify.json")
    ap.add_argument("--child-memory", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--make-file", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.child_memory:
        return memory_child(args)
    if args.make_file:
        simulated_file(args.make_file, args.seed, Path(args.workdir) / f"mem-{args.make_file}.parquet")
        return 0

    print(f"machine: {machine()}")
    params = load_params(None)
    workers = resolve_workers(args.workers)
    model = serving_model(args.model, args.tracking_uri)
    report: dict = {"machine": machine(), "model": model.uri, "n": args.n, "workers": workers}
    with tempfile.TemporaryDirectory(prefix="bench-classify-") as tmp:
        tmp = Path(tmp)
        src, base_src = tmp / "curves.parquet", tmp / "baseline.parquet"
        rows = simulated_file(args.n, args.seed, src)
        first_objects(src, args.baseline_n, base_src)
        print(f"input: {args.n} simulated objects, {rows} detections ({rows / args.n:.0f} per object), "
              f"{src.stat().st_size / 2**20:.0f} MiB Parquet; model {model.uri}")

        # Cold: the first run with a pool in this process pays the forkserver's start (imports) and each worker's
        # model load: what a one-off `deeprubin classify` pays once. The rate is measured warm, as a service runs.
        t_cold, _ = timed_run(params, base_src, tmp / "warm.parquet", model, workers)
        t_ours, rate_steady, r_ours = steady_rate(params, src, tmp / "ours.parquet", model, workers)
        rate = r_ours.n_classified / t_ours
        t_one, r_one = timed_run(params, src, tmp / "one.parquet", model, 1)
        rate_one = r_one.n_classified / t_one
        base_params = load_params(None, [f"classify.batch_size={max(1, args.baseline_n // (2 * workers))}"])
        t_base, r_base = timed_run(base_params, base_src, tmp / "base.parquet", model, workers,
                                   interpolator=sklearn_interpolator)
        rate_base = (r_base.n_classified + r_base.n_rejected) / t_base
        print(f"classify, {workers} GP processes:  {rate:8.1f} curves/s ({r_ours.n_classified} in {t_ours:.1f} s, "
              f"{r_ours.n_rejected} rejected); target {TARGET_PER_S:.0f}/s, ratio {rate / TARGET_PER_S:.2f}")
        print(f"  of which, once the first batch is back (workers up): {rate_steady:8.1f} curves/s; "
              f"target ratio {rate_steady / TARGET_PER_S:.2f}")
        print(f"start of the first pool in a process (forkserver imports, model load in the workers) with "
              f"{args.baseline_n} curves: {t_cold:.1f} s")
        print(f"classify, 1 process:        {rate_one:8.1f} curves/s ({t_one:.1f} s); "
              f"scaling {rate / rate_one:.2f}x on {workers} processes")
        print(f"baseline sklearn GPR, same pipeline, {workers} processes: {rate_base:8.1f} curves/s "
              f"({args.baseline_n} curves in {t_base:.1f} s); ratio ours/baseline {rate / rate_base:.1f}x")
        lsst = 10e6 / (10 * 3600)
        print(f"LSST: ~{lsst:.0f} alerts/s averaged over a 10-hour night; margin {rate / lsst:.1f}x")
        report.update(curves_per_s=rate, curves_per_s_steady=rate_steady, seconds=t_ours, first_pool_seconds=t_cold, curves_per_s_one_process=rate_one,
                      baseline_sklearn_curves_per_s=rate_base, baseline_n=args.baseline_n,
                      ratio_vs_baseline=rate / rate_base, ratio_vs_target=rate / TARGET_PER_S)

        import torch

        if torch.cuda.is_available():
            gpu_params = load_params(None, ["classify.device=cuda"])
            t_gpu, r_gpu = timed_run(gpu_params, src, tmp / "gpu.parquet", model, workers)
            rate_gpu = r_gpu.n_classified / t_gpu
            print(f"classify, TCN on {torch.cuda.get_device_name(0)}: {rate_gpu:8.1f} curves/s; "
                  f"ratio vs CPU TCN {rate_gpu / rate:.2f}")
            report.update(gpu=torch.cuda.get_device_name(0), curves_per_s_gpu=rate_gpu)
            # the GP on the GPU too (lightcurves/gp_torch.py); bench/gp_torch.py measures this path on 100,000 curves
            gp_params = load_params(None, ["classify.device=cuda", "classify.gp_device=cuda"])
            t_gp, r_gp = timed_run(gp_params, src, tmp / "gpu-gp.parquet", model, workers)
            rate_gp = r_gp.n_classified / t_gp
            print(f"classify, GP and TCN on {torch.cuda.get_device_name(0)} (classify.gp_device=cuda): "
                  f"{rate_gp:8.1f} curves/s; ratio vs the CPU GP {rate_gp / rate:.2f}")
            report.update(curves_per_s_gpu_gp=rate_gp)
        else:
            print("GPU: none visible to torch here; the GPU figure needs a machine with one")

        if args.memory:
            small = child_peak(10_000, args.seed, tmp, args.model, args.tracking_uri)
            large = child_peak(args.memory, args.seed, tmp, args.model, args.tracking_uri)
            for m in (small, large):
                print(f"memory, {m['n']:>7} curves: peak {m['peak_tree_mb']:.0f} MiB PSS summed over the main process "
                      f"and its GP workers; main process peak RSS {m['peak_self_mb']:.0f} MiB "
                      f"({m['peak_before_run_mb']:.0f} MiB before classifying: imports, model); "
                      f"{m['classified'] / m['seconds']:.0f} curves/s")
            ratio = large["peak_tree_mb"] / small["peak_tree_mb"]
            print(f"memory: {args.memory} vs 10000 curves: ratio of summed peaks {ratio:.2f} (input "
                  f"{args.memory / 10_000:.0f}x larger); budget 2048 MiB: "
                  f"{'within' if large['peak_tree_mb'] < 2048 else 'OVER'}")
            report.update(memory_small=small, memory_large=large, memory_ratio=ratio)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
