"""Single-alert latency through the HTTP classification service (``deeprubin serve-api``).

    python bench/serve_latency.py                                  # 2,000 requests, the champion of sqlite:///mlflow.db
    python bench/serve_latency.py --model models:/deeprubin-tcn/3 --tracking-uri http://127.0.0.1:5000
    python bench/serve_latency.py --requests 500 --json metrics/serve_latency.json

What is measured: the real service (``deeprubin serve-api``: uvicorn + FastAPI, loopback, access log on, as
``deeprubin serve-api`` runs it) started in a subprocess with the model; then ``--requests`` sequential POST
/classify requests, each one light curve of 20 to 60 g/r detections (simulated ZTF alerts: an object's detections in
the 100 days from its first one), over one keep-alive httpx client. The payload is JSON-encoded beforehand; the time
is from sending the request to having read the whole response.

Baseline (the project's rule: measured in the same run, on the same curves): the same single-curve classification
called in process, ``deeprubin.serving.classify.classify_curves([curve], model)`` with the same model and the same torch
threads as the service. Baseline and HTTP calls alternate (one of each per alert), so a shared machine's load falls
on both alike. Reported: p50/p90/p99/max of each, the HTTP overhead ratio (p50 HTTP / p50 in process, and the same
at p99) and the target ratio p99 / 50 ms (target: p99 < 50 ms, i.e. ratio < 1).

No model in the registry: an untrained TCN of the training shape (train.hidden, levels, kernel_size) is registered
in a temporary sqlite registry (latency does not depend on the weights), and a note says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

for _k, _v in {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():
    os.environ.setdefault(_k, _v)

import httpx

TARGET_P99_MS = 50.0
DEFAULT_MODEL = "models:/deeprubin-tcn@champion"


def machine() -> str:
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        name = platform.processor() or name
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"{os.cpu_count()} CPUs ({name}), Python {platform.python_version()}, "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def percentiles(ms: np.ndarray) -> dict[str, float]:
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "max": float(ms.max()), "mean": float(ms.mean()), "n": len(ms)}


# --- model ---------------------------------------------------------------------------------------------------------

def register_untrained(directory: Path) -> tuple[str, str]:
    """An untrained TCN of the training shape, logged and registered like training does; (model_uri, tracking_uri)."""
    from deeprubin.lightcurves.tensorize import CHANNELS
    from deeprubin.models.served import log_and_register, untrained_served_model
    from deeprubin.processed import Preprocessing
    from deeprubin.schema import CLASSES

    uri = f"sqlite:///{directory / 'mlflow.db'}"
    window = Preprocessing(channels=CHANNELS).grid_days  # as training makes it: the network knows its window
    log_and_register(untrained_served_model(grid_days=window), uri, "deeprubin-tcn", CLASSES, alias="champion",
                     experiment="bench-serve", artifact_location=(directory / "artifacts").as_uri())
    return DEFAULT_MODEL, uri


def resolve_model(model_uri: str | None, tracking_uri: str | None, scratch: Path):
    """(model_uri, tracking_uri, ServingModel, note)."""
    from deeprubin.models.served import load_model
    from deeprubin.config import TrainParams

    uri = model_uri or DEFAULT_MODEL
    tracking = tracking_uri or TrainParams().tracking_uri
    try:
        return uri, tracking, load_model(uri, tracking), ""
    except Exception as exc:  # noqa: BLE001
        if model_uri is not None:
            raise SystemExit(f"cannot load {uri} from {tracking}: {exc}") from None
        note = (f"note: no model at {uri} in {tracking} ({type(exc).__name__}); registered an untrained TCN of the "
                f"training shape in a temporary sqlite registry (latency does not depend on the weights)")
        uri, tracking = register_untrained(scratch)
        return uri, tracking, load_model(uri, tracking), note


# --- curves --------------------------------------------------------------------------------------------------------

def alert_curves(n: int, seed: int, lo: int = 20, hi: int = 60) -> list[dict]:
    """``n`` simulated light curves (classes mixed) of ``lo``..``hi`` detections: an object's detections in the 100
    days from its first detection, as the JSON objects the API takes."""
    from deeprubin.config import SimulatorParams
    from deeprubin.sources.simulate import simulate

    det = simulate(SimulatorParams(n_per_class=max(25, n)), seed=seed).detections
    out = []
    for oid, d in det.groupby("oid", sort=True):
        d = d.loc[d["mjd"] < d["mjd"].min() + 100]
        if not lo <= len(d) <= hi:
            continue
        out.append({"oid": str(oid), "detections": [
            {"mjd": float(m), "band": str(b), "flux": float(f), "flux_err": float(e)}
            for m, b, f, e in zip(d["mjd"], d["band"], d["flux"], d["flux_err"])]})
    if not out:
        raise SystemExit("the simulator gave no curve of 20-60 detections")
    rng = np.random.default_rng(seed)
    return [out[i] for i in rng.permutation(len(out))[:n]]


def to_curve(lc: dict):
    from deeprubin.lightcurves.tensorize import Curve
    from deeprubin.schema import BAND_INDEX

    d = lc["detections"]
    return Curve(lc["oid"], np.array([x["mjd"] for x in d]), np.array([BAND_INDEX[x["band"]] for x in d]),
                 np.array([x["flux"] for x in d]), np.array([x["flux_err"] for x in d]))


# --- the service ---------------------------------------------------------------------------------------------------

def service_spec(workdir: Path, model_uri: str, tracking_uri: str):
    """The real service (`deeprubin serve-api`) on a free loopback port, serving ``model_uri``."""
    from deeprubin import servers

    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        # the service runs in workdir: a relative sqlite path must name this checkout's file
        tracking_uri = f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).resolve()}"
    (workdir / "params.yaml").write_text(json.dumps({"classify": {"model_uri": model_uri},
                                                     "train": {"tracking_uri": tracking_uri}}))
    return servers.service_spec(workdir / "params.yaml", workdir, port=servers.free_port())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="single-alert requests (and baseline calls)")
    ap.add_argument("--warmup", type=int, default=50, help="untimed requests first (each path)")
    ap.add_argument("--curves", type=int, default=200, help="distinct simulated alerts, cycled")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--model", default=None, help=f"model URI or local MLflow model dir (default {DEFAULT_MODEL})")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI (default: as train)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here (JSON)")
    args = ap.parse_args()

    import torch

    from deeprubin.serving.classify import classify_curves
    from deeprubin.schema import CLASSES
    from deeprubin import servers
    from deeprubin.serving.service import default_torch_threads

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="deeprubin-bench-serve-") as tmp:
        scratch = Path(tmp)
        model_uri, tracking_uri, model, note = resolve_model(args.model, args.tracking_uri, scratch)
        if note:
            print(note)
        print(f"model: {model.name} version {model.version} ({model.uri}) from {tracking_uri}")
        lcs = alert_curves(args.curves, args.seed)
        n_det = np.array([len(c["detections"]) for c in lcs])
        print(f"alerts: {len(lcs)} simulated light curves, detections per curve median {np.median(n_det):.0f} "
              f"(min {n_det.min()}, max {n_det.max()}), one per request, cycled")
        bodies = [json.dumps({"light_curves": [c]}).encode() for c in lcs]
        curves = [to_curve(c) for c in lcs]
        threads = default_torch_threads()
        torch.set_num_threads(threads)  # as the service does

        with servers.running(service_spec(scratch, model_uri, tracking_uri), scratch) as record:
            url, startup_s = record["url"], record["startup_s"]
            print(f"service: {url} (subprocess uvicorn, started and model loaded in {startup_s:.1f} s); "
                  f"torch threads {threads} in both")
            headers = {"content-type": "application/json"}
            with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
                # Same answer both ways (the service adds transport, not a different computation).
                got = client.post("/classify", content=bodies[0], headers=headers).json()["classifications"][0]
                ref, _ = classify_curves([curves[0]], model)
                diff = max(abs(got["probabilities"][c] - float(ref.iloc[0][f"p_{c}"])) for c in CLASSES)
                assert diff < 1e-5, f"HTTP and in-process probabilities differ by {diff}"
                for i in range(args.warmup):
                    client.post("/classify", content=bodies[i % len(bodies)], headers=headers).raise_for_status()
                    classify_curves([curves[i % len(curves)]], model)
                http_ms, local_ms, server_ms = (np.empty(args.requests) for _ in range(3))
                t_all = time.perf_counter()
                for i in range(args.requests):
                    k = i % len(bodies)
                    t0 = time.perf_counter()
                    classify_curves([curves[k]], model)
                    t1 = time.perf_counter()
                    r = client.post("/classify", content=bodies[k], headers=headers)
                    t2 = time.perf_counter()
                    if r.status_code != 200:
                        raise SystemExit(f"request {i}: {r.status_code} {r.text[:300]}")
                    local_ms[i], http_ms[i] = (t1 - t0) * 1e3, (t2 - t1) * 1e3
                    server_ms[i] = float(r.headers["server-timing"].split("dur=")[1])
                wall = time.perf_counter() - t_all

    h, b, srv, over = (percentiles(x) for x in (http_ms, local_ms, server_ms, http_ms - server_ms))
    print(f"\n{args.requests} single-alert requests, sequential, one keep-alive connection "
          f"({wall:.1f} s for both paths, alternated)")
    print(f"  {'':40s} {'p50':>8s} {'p90':>8s} {'p99':>8s} {'max':>8s} {'mean':>8s}  (ms)")
    for name, s in (("HTTP service (POST /classify)", h), ("  in it: classify (Server-Timing)", srv),
                    ("  in it: HTTP + validation + JSON", over), ("baseline: classify_curves in-process", b)):
        print(f"  {name:40s} {s['p50']:8.2f} {s['p90']:8.2f} {s['p99']:8.2f} {s['max']:8.2f} {s['mean']:8.2f}")
    ratios = {"http_over_inprocess_p50": h["p50"] / b["p50"], "http_over_inprocess_p99": h["p99"] / b["p99"],
              "http_overhead_p50_ms": h["p50"] - b["p50"], "p99_over_target": h["p99"] / TARGET_P99_MS}
    print(f"HTTP overhead ratio: p50 {ratios['http_over_inprocess_p50']:.3f}x, p99 "
          f"{ratios['http_over_inprocess_p99']:.3f}x the in-process baseline "
          f"(+{ratios['http_overhead_p50_ms']:.2f} ms at p50)")
    met = h["p99"] < TARGET_P99_MS
    print(f"target p99 < {TARGET_P99_MS:g} ms: p99 / target = {ratios['p99_over_target']:.3f} "
          f"({'met' if met else 'NOT met'})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": machine(), "model_uri": model_uri, "model_version": model.version, "note": note or None,
            "requests": args.requests, "curves": len(lcs), "median_detections": float(np.median(n_det)),
            "torch_threads": threads, "http_ms": h, "server_classify_ms": srv, "http_minus_server_ms": over,
            "inprocess_ms": b, "ratios": ratios,
            "target_p99_ms": TARGET_P99_MS, "target_met": bool(met)}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
