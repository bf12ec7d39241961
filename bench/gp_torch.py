"""The GPU path (issue 18): the GP batched in torch (``lightcurves/gp_torch.py``) and the TCN on one device, against
the CPU path, in the same run.

    python bench/gp_torch.py                  # CUDA visible: 100,000 curves (~2-4 minutes on one H100 + 16 cores)
    python bench/gp_torch.py --n 20000 --no-e2e
    python bench/gp_torch.py                  # no CUDA: the torch GP on the CPU against the numpy GP, 400 curves

With a CUDA device (target: >= 100,000 curves/s on one GPU; an LSST visit's ~10,000-alert burst in a tenth of a
second), on ``--n`` simulated ZTF-like curves (``--unique`` distinct ones, repeated under new object ids; the work per
curve is the same):

1. the CPU half of each curve (window, screening, the GP's input preparation, the time-since channels:
   ``tensorize_device.prepare_batch``) on a process pool of all cores: what `classify` does in its workers on this path;
2. the device half: GP fit + prediction + the TCN on the device (``tensorize_device.tensorize_prepared`` and the
   network), in batches of ``--device-batch`` curves, timed with the device synchronised: the GP+TCN rate;
3. the CPU path in the same run: ``classify.run_file`` end to end with the numpy GP on all cores and the TCN on the
   CPU (``classify.gp_device=cpu``, ``classify.device=cpu``) on the same file, and the device path end to end
   (``classify.gp_device=cuda``); the ratios of (2) and of the device path's end-to-end rate to the CPU path's;
4. equality: the device GP against the numpy GP (``gp.BATCH_INVARIANT``) on the first ``--check`` curves, the
   largest difference of GP mean or std in units of the object's flux scale (the model input's units).

Without CUDA it runs the torch GP on the CPU against the numpy GP for ``--n`` (default 400) curves in this process,
one thread each, prints both rates and the ratio (the torch GP is not meant to be fast on a CPU: this shows it runs
and agrees), then the two halves and the TCN once on the CPU.

The model: ``--model`` (default the champion of ``sqlite:///mlflow.db``), else an untrained TCN of the configured
shape (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
# Worker processes import this checkout too (a forkserver ignores sys.path; an editable install elsewhere would win)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
sys.path.insert(0, str(REPO / "bench"))

from deeprubin.config import load_params  # noqa: E402
from deeprubin.lightcurves import gp, gp_torch  # noqa: E402
from deeprubin.lightcurves import tensorize as tz  # noqa: E402
from deeprubin.lightcurves import tensorize_device as td  # noqa: E402

TARGET_PER_S = 100_000.0


def simulated_detections(n: int, unique: int, seed: int):
    """Contract detections of ``n`` objects: ``unique`` simulated ones (n/4 per class), repeated under new ids."""
    import pandas as pd

    from deeprubin.sources import simulate

    params = load_params(None).ingest.simulator.model_copy(update={"n_per_class": max(1, min(n, unique) // 4)})
    det = simulate.simulate(params, seed=seed).detections
    oids = det["oid"].drop_duplicates().to_numpy()
    copies = []
    for k in range(-(-n // len(oids))):
        take = oids[:min(len(oids), n - k * len(oids))]
        part = det[det["oid"].isin(set(take))]
        copies.append(part.assign(oid=part["oid"].astype(str) + f"-{k}"))
    return pd.concat(copies, ignore_index=True).sort_values(["oid", "mjd"], kind="stable").reset_index(drop=True)


def simulated_curves(n: int, unique: int, seed: int) -> list:
    return tz.curves_from_detections(simulated_detections(n, unique, seed))


def _prepare_part(part):
    return td.prepare_batch(part)


def prepare_on_pool(curves: list, workers: int, part: int = 2048) -> tuple[list, float]:
    parts = [curves[i:i + part] for i in range(0, len(curves), part)]
    t = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        out = list(pool.map(_prepare_part, parts))
    return out, time.perf_counter() - t


def device_half(prepared: list, model, device: str, merge: int) -> dict:
    """GP + TCN on the device over merged batches; seconds of each (device synchronised)."""
    import torch

    from deeprubin.serving.classify import _predict_tensor

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    groups, cur, size = [], [], 0
    for p in prepared:
        cur.append(p)
        size += len(p)
        if size >= merge:
            groups.append(td.PreparedBatch.concat(cur))
            cur, size = [], 0
    if cur:
        groups.append(td.PreparedBatch.concat(cur))
    t_gp = t_tcn = 0.0
    n = 0
    probs = []
    sync()
    for batch in groups:
        t0 = time.perf_counter()
        t, x = td.tensorize_prepared(batch, device)
        sync()
        t1 = time.perf_counter()
        probs.append(_predict_tensor(model, x, max(len(x), 1)))
        sync()
        t_gp += t1 - t0
        t_tcn += time.perf_counter() - t1
        n += len(t.rows)
    return {"n": n, "gp_s": t_gp, "tcn_s": t_tcn, "proba": np.concatenate(probs) if probs else None}


def max_difference(args: list, results_a: list, results_b: list) -> float:
    worst = 0.0
    for a, b in zip(results_a, results_b):
        if isinstance(a, Exception) or isinstance(b, Exception):
            assert type(a) is type(b)
            continue
        s = a.params["flux_scale"]
        worst = max(worst, np.abs(a.mean - b.mean).max() / s, np.abs(a.std - b.std).max() / s)
    return worst


def cpu_only(args, model) -> dict:
    """No CUDA: torch GP on the CPU against numpy, one thread each, in this process."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    curves = simulated_curves(args.n, args.n, args.seed)
    gp_args = [p.gp_args() for p in (tz.prepare(c) for c in curves)]
    with threadpool_limits(limits=1):
        gp.interpolate_batch(gp_args[:20], settings=gp.BATCH_INVARIANT)
        gp_torch.interpolate_batch(gp_args[:20])  # warm (first LAPACK call, imports)
        t = time.perf_counter()
        ref = gp.interpolate_batch(gp_args, settings=gp.BATCH_INVARIANT)
        t_np = time.perf_counter() - t
        t = time.perf_counter()
        ours = gp_torch.interpolate_batch(gp_args)
        t_torch = time.perf_counter() - t
    diff = max_difference(gp_args, ref, ours)
    print(f"numpy GP (gp.BATCH_INVARIANT), 1 core:   {len(gp_args) / t_np:8.1f} curves/s ({t_np:.2f} s)")
    print(f"torch GP on the CPU, 1 thread:          {len(gp_args) / t_torch:8.1f} curves/s ({t_torch:.2f} s); "
          f"ratio torch/numpy {t_np / t_torch:.2f}")
    print(f"largest |difference| of GP mean or std, in units of the object's flux scale: {diff:.2e} (tested: 1e-6)")
    t = time.perf_counter()
    prepared = td.prepare_batch(curves)
    t_prep = time.perf_counter() - t
    half = device_half([prepared], model, "cpu", args.device_batch)
    print(f"CPU half (window, input preparation), 1 process: {len(curves) / t_prep:8.1f} curves/s; "
          f"device half on the CPU: GP {half['n'] / half['gp_s']:.1f} curves/s, TCN {half['n'] / half['tcn_s']:.1f} "
          f"curves/s")
    print("GPU: none visible to torch here; run this on a machine with one for the GPU figures")
    return {"device": "cpu", "n": len(gp_args), "numpy_curves_per_s": len(gp_args) / t_np,
            "torch_cpu_curves_per_s": len(gp_args) / t_torch, "ratio_torch_over_numpy": t_np / t_torch,
            "max_abs_difference": diff}


def on_gpu(args, model, det, device: str = "cuda") -> dict:
    import torch

    from deeprubin.serving.pool import resolve_workers

    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run of the GPU branch)"
    workers = resolve_workers(args.workers)
    print(f"device: {name}; {workers} CPU workers")
    t = time.perf_counter()
    curves = tz.curves_from_detections(det)
    print(f"input: {len(curves)} curves ({time.perf_counter() - t:.1f} s to split the table into curves)")
    model.to(device)

    # warm: CUDA context, cuSOLVER/cuBLAS handles, the network's first call
    device_half([td.prepare_batch(curves[:512])], model, device, args.device_batch)

    prepared, t_prep = prepare_on_pool(curves, workers)
    print(f"CPU half (window, screening, GP input, time-since channels) on {workers} processes: "
          f"{len(curves) / t_prep:9.0f} curves/s ({t_prep:.1f} s)")
    half = device_half(prepared, model, device, args.device_batch)
    dev_s = half["gp_s"] + half["tcn_s"]
    rate_dev = half["n"] / dev_s
    print(f"GP + TCN on {name}: {rate_dev:9.0f} curves/s ({half['n']} curves in {dev_s:.2f} s: GP {half['gp_s']:.2f} s,"
          f" TCN {half['tcn_s']:.2f} s); target {TARGET_PER_S:.0f}/s, ratio {rate_dev / TARGET_PER_S:.2f}")
    report = {"device": name, "n": len(curves), "workers": workers, "prepare_curves_per_s": len(curves) / t_prep,
              "gpu_gp_tcn_curves_per_s": rate_dev, "gpu_gp_s": half["gp_s"], "gpu_tcn_s": half["tcn_s"]}

    check = [p.gp_args() for p in (tz.prepare(c) for c in curves[:args.check])]
    diff = max_difference(check, gp.interpolate_batch(check, settings=gp.BATCH_INVARIANT),
                          gp_torch.interpolate_batch(check, device=device))
    print(f"equality on {len(check)} curves: largest |difference| of GP mean or std against the numpy GP, in units "
          f"of the flux scale: {diff:.2e} (tested on the CPU: 1e-6)")
    report["max_abs_difference_gpu_vs_numpy"] = diff
    return report


def e2e(args, model, det, report: dict, device: str = "cuda") -> None:
    """`classify.run_file` end to end on the same file: the CPU path and the device path."""
    from deeprubin.serving import classify as clf
    from deeprubin.serving.pool import resolve_workers

    workers = resolve_workers(args.workers)
    with tempfile.TemporaryDirectory(prefix="bench-gp-torch-") as tmp:
        src = Path(tmp) / "curves.parquet"
        det.to_parquet(src, index=False, row_group_size=65_536)
        rates = {}
        for label, overrides in (("CPU path (numpy GP on the workers, TCN on the CPU)",
                                  ["classify.gp_device=cpu", "classify.device=cpu"]),
                                 ("device path (GP and TCN on the GPU, CPU half on the workers)",
                                  [f"classify.gp_device={'cuda' if device == 'cuda' else 'torch-cpu'}",
                                   f"classify.device={device}",
                                   f"classify.device_batch_size={args.device_batch}"])):
            params = load_params(None, overrides)
            model.to(params.classify.device)
            t = time.perf_counter()
            res = clf.run_file(params, src, Path(tmp) / "out.parquet", model=model, workers=workers,
                               min_rows_for_pool=0)
            seconds = time.perf_counter() - t
            rates[label] = res.n_classified / seconds
            print(f"classify end to end, {label}: {rates[label]:9.0f} curves/s ({res.n_classified} in {seconds:.1f} s,"
                  f" pool start included)")
        cpu_rate, dev_rate = rates.values()
        print(f"ratio: device path / CPU path end to end {dev_rate / cpu_rate:.2f}; GP + TCN on the device / CPU path "
              f"end to end {report['gpu_gp_tcn_curves_per_s'] / cpu_rate:.1f}")
        report.update(e2e_cpu_curves_per_s=cpu_rate, e2e_device_curves_per_s=dev_rate,
                      ratio_gpu_gp_tcn_over_cpu_path=report["gpu_gp_tcn_curves_per_s"] / cpu_rate,
                      ratio_e2e_device_over_cpu=dev_rate / cpu_rate)


def main() -> int:
    import torch

    from classify_throughput import machine, serving_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--n", type=int, default=100_000 if cuda else 400, help="curves")
    ap.add_argument("--unique", type=int, default=20_000, help="distinct simulated curves (repeated up to --n)")
    ap.add_argument("--device-batch", type=int, default=32_768, help="curves per GP + TCN call on the device")
    ap.add_argument("--check", type=int, default=2_000, help="curves compared with the numpy GP on the device")
    ap.add_argument("--workers", type=int, default=0, help="CPU processes (0: one per core)")
    ap.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the end-to-end classify runs")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    ap.add_argument("--output", type=Path, default=REPO / "metrics" / "bench_gp_torch.json")
    ap.add_argument("--dry-run-on-cpu", action="store_true",
                    help="run the GPU branch with the CPU as its device (use a small --n): checks it without a GPU")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(f"machine: {machine()}; torch {torch.__version__}")
    model = serving_model(args.model, args.tracking_uri)
    if cuda or args.dry_run_on_cpu:
        device = "cuda" if cuda else "cpu"
        t = time.perf_counter()
        det = simulated_detections(args.n, args.unique, args.seed)
        print(f"simulated {min(args.n, args.unique)} distinct curves, repeated to {args.n} "
              f"({time.perf_counter() - t:.1f} s)")
        report = on_gpu(args, model, det, device)
        if args.e2e:
            e2e(args, model, det, report, device)
    else:
        report = cpu_only(args, model)
    report["machine"] = machine()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
