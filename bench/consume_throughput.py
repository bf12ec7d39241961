"""Throughput of `deeprubin consume` from a directory of ZTF Avro alerts (decode -> book -> as-of curve -> GP ->
TCN -> Parquet part + manifest), in alerts/s, against a baseline in the same run.

    python bench/consume_throughput.py                          # 8,000 alerts; baseline: 1 alert per batch
    python bench/consume_throughput.py --compare-src /tmp/head/src   # baseline: the same run with other code
    python bench/consume_throughput.py --source kafka           # the same alerts from a Kafka topic

Target (issue 18): >= 2,000 alerts/s on a 2-core machine, each alert classified with its object's curve as of that
alert, per-object order kept, no duplicate rows on a rerun.

Input: simulated ZTF-like objects (QSO, CEP, SN Ia, SN II in equal numbers), one alert per detection (g and r), in
time order across objects; each alert is one Avro object container file with the triggering ``candidate`` and the
object's detections of the previous 30 days as ``prv_candidates``, as ZTF distributes them (the test schema of
``tests/alert_packets.py``: ZTF's field names and Avro types). The first ``--n`` alerts in time order are kept.

Measured: ``consume.consume_directory`` into a fresh output directory with the configured ``alerts.batch_alerts``
and ``classify.workers`` (the pool started once for the run, its start included), then a rerun over the same
directory (every alert already written: no row may be added). Baseline, in the same run:

* default: the same code with one alert per batch (``alerts.batch_alerts=1``: what a consumer that classifies each
  alert as it comes does), on the first ``--baseline-n`` alerts;
* ``--compare-src DIR``: the same measurement with the code under ``DIR`` (e.g. a ``git worktree`` of HEAD's
  ``src``) in a child process, on the same directory; the two outputs' probabilities are compared alert by alert.

``--source kafka``: the same packets, one Kafka message each (keyed by object, so each object's alerts stay in
order; lz4-compressed, as the mock broker keeps only ~5 MB a partition), produced before the clock starts into a
topic of librdkafka's built-in mock cluster (``test.mock.num.brokers``: the Kafka protocol, consumer groups and
committed offsets) run by this parent process; the child consumes it with ``consume.consume_kafka`` (offsets
committed after each written batch) until it has read them all. The rate counts from before the consumer joins its
group (about 3 s before the first message: the group's initial rebalance delay, idle time); the rate from the
first message on, the start of a long-running consumer's stream, is printed beside it. The rerun is a new consumer
group: every message delivered again, which must add no row. The mock broker serves from this process on the same
two cores (its CPU time is printed): a real broker would be elsewhere.

The model: ``--model`` (default the champion of ``sqlite:///mlflow.db``); without one an untrained TCN of the
configured shape, logged to a temporary local MLflow model directory (so the worker processes load it as they
load a registered model): speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

TARGET_PER_S = 2000.0
JD_MJD = 2400000.5
ZTF_HISTORY_DAYS = 30.0


def write_alerts(n_alerts: int, seed: int, directory: Path) -> int:
    """Simulated objects -> one ZTF Avro file per alert (the first ``n_alerts`` in time order); returns the count."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "src"))
    import fastavro

    from deeprubin.config import load_params
    from deeprubin.lightcurves.tensorize import curves_from_detections
    from deeprubin.sources import simulate
    from tests.alert_packets import _ZTF_PARSED, ztf_alert_record, ztf_point

    n_objects = max(4, n_alerts // 10)
    params = load_params(None).ingest.simulator.model_copy(update={"n_per_class": max(1, n_objects // 4)})
    det = simulate.simulate(params, seed=seed).detections
    events = []
    for ci, c in enumerate(curves_from_detections(det)):
        ok = np.isin(c.band, (0, 1)) & (c.flux != 0) & np.isfinite(c.flux) & (c.flux_err > 0)
        t, band, flux, err = c.mjd[ok], c.band[ok], c.flux[ok], c.flux_err[ok]
        mag = (23.9 - 2.5 * np.log10(np.abs(flux))).astype(np.float32)
        sig = (2.5 / np.log(10) * err / np.abs(flux)).astype(np.float32)
        for j in range(len(t)):
            events.append((float(t[j]), ci, j, c.oid, t, band, flux, mag, sig))
    events.sort(key=lambda e: (e[0], e[1], e[2]))
    events = events[:n_alerts]
    directory.mkdir(parents=True, exist_ok=True)
    for k, (mjd, ci, j, oid, t, band, flux, mag, sig) in enumerate(events):
        prv = [ztf_point(float(t[i]), int(band[i]) + 1, float(mag[i]), float(sig[i]),
                         "t" if flux[i] > 0 else "f", candid=ci * 10_000 + i)
               for i in range(j) if t[i] >= mjd - ZTF_HISTORY_DAYS]
        record = ztf_alert_record(f"ZTF{oid}", ci * 10_000 + j, mjd, int(band[j]) + 1, float(mag[j]),
                                  float(sig[j]), "t" if flux[j] > 0 else "f", prv)
        with open(directory / f"{k:08d}.avro", "wb") as fh:
            fastavro.writer(fh, _ZTF_PARSED, [record])
    return len(events)


def local_model(workdir: Path) -> tuple[str, str]:
    """An untrained TCN of the configured shape registered in a temporary sqlite registry: (model URI, tracking
    URI)."""
    sys.path.insert(0, str(REPO / "src"))
    from deeprubin.config import load_params
    from deeprubin.lightcurves.tensorize import CHANNELS
    from deeprubin.models.served import log_and_register, untrained_served_model
    from deeprubin.processed import Preprocessing
    from deeprubin.schema import CLASSES

    p = load_params(None)
    prep = Preprocessing(p.preprocess.grid_days, p.preprocess.fit_context_days, channels=CHANNELS)
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    version = log_and_register(untrained_served_model(p.train, grid_days=prep.grid_days), tracking, "bench-tcn", CLASSES,
                               artifact_location=str(workdir / "artifacts"), preprocessing=prep)
    return f"models:/bench-tcn/{version}", tracking


def child(args) -> int:
    """One measured run (in a child process, so the code under test is the one on ``sys.path``)."""
    warnings.filterwarnings("ignore")
    from deeprubin.config import load_params
    from deeprubin.models.served import load_model
    import importlib

    cons = importlib.import_module("deeprubin.serving.alerts.consume")

    params = load_params(None, [f"alerts.batch_alerts={args.batch_alerts}"])
    model = load_model(args.model, args.tracking_uri)
    out = Path(args.out)

    def run(group: str):
        if args.kafka is None:
            return cons.consume_directory(params, args.alerts, out, model=model, max_alerts=args.max_alerts)
        bootstrap, topic, n = args.kafka.split(",")
        p = load_params(None, [f"alerts.batch_alerts={args.batch_alerts}", f"alerts.kafka.bootstrap_servers={bootstrap}",
                               f"alerts.kafka.topic={topic}", f"alerts.kafka.group_id={group}"])
        return cons.consume_kafka(p, out, model=model, max_alerts=min(int(n), args.max_alerts or int(n)),
                                  idle_timeout_s=30)

    t = time.perf_counter()
    first = run("bench-first")
    seconds = time.perf_counter() - t
    t = time.perf_counter()
    again = run("bench-redelivery")  # directory: the same files again; Kafka: a new group, every message again
    rerun = time.perf_counter() - t
    rows = cons.read_classifications(out)
    print(json.dumps({"alerts": first.alerts_read, "classified": first.classified, "rejected": first.rejected,
                      "seconds": seconds, "first_alert_s": getattr(first, "first_alert_s", None), "rerun_seconds": rerun, "rerun_classified": again.classified,
                      "rerun_duplicates": again.duplicates, "rows_after_rerun": len(rows),
                      "unique_alert_ids": int(rows["alert_id"].nunique())}))
    return 0


def produce_to_kafka(directory: Path, topic: str):
    """The packets of ``directory`` (in file order), one message each keyed by object id, into ``topic`` of a new
    one-broker mock cluster; returns (the producer, which owns the cluster: keep it alive, bootstrap servers).
    Compressed (lz4): the mock broker keeps only the last ~5 MB of each partition, about 4,000 of these packets
    uncompressed, and drops older messages unread; compressed, 40,000 fit."""
    import confluent_kafka

    sys.path.insert(0, str(REPO / "src"))
    from deeprubin.serving.alerts.packets import decode_packet

    producer = confluent_kafka.Producer({"test.mock.num.brokers": 1, "linger.ms": 50, "compression.type": "lz4",
                                         "batch.size": 1_000_000})
    metadata = producer.list_topics(timeout=10)
    bootstrap = ",".join(f"{b.host}:{b.port}" for b in metadata.brokers.values())
    for k, path in enumerate(sorted(directory.glob("*.avro"))):
        data = path.read_bytes()
        producer.produce(topic, key=decode_packet(data, path.name)[0].oid.encode(), value=data)
        if k % 5000 == 4999:
            producer.flush(60)
    if producer.flush(60):
        raise RuntimeError("the mock cluster did not take every message")
    return producer, bootstrap


def measure(src: Path, alerts: Path, out: Path, model: str, tracking_uri: str, batch_alerts: int,
            max_alerts: int | None = None, kafka: bool = False) -> dict:
    """One child run over ``alerts``: its directory, or with ``kafka`` a topic of a new mock cluster holding them
    (``parent_cpu_s``: this process's CPU meanwhile, the mock broker serving the child on the same cores)."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, __file__, "--child", "--alerts", str(alerts), "--out", str(out), "--model", model,
           "--tracking-uri", tracking_uri, "--batch-alerts", str(batch_alerts)]
    if max_alerts:
        cmd += ["--max-alerts", str(max_alerts)]
    producer = None
    if kafka:
        producer, bootstrap = produce_to_kafka(alerts, "bench-alerts")
        cmd += ["--kafka", f"{bootstrap},bench-alerts,{max_alerts or len(list(alerts.glob('*.avro')))}"]
    before = resource.getrusage(resource.RUSAGE_SELF)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    after = resource.getrusage(resource.RUSAGE_SELF)
    del producer  # the mock cluster with it
    if done.returncode:
        raise RuntimeError(f"child failed ({src}):\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["parent_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8000, help="alerts")
    ap.add_argument("--baseline-n", type=int, default=500, help="alerts of the one-alert-per-batch baseline")
    ap.add_argument("--compare-src", type=Path, default=None, help="baseline: this code (a src directory)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    ap.add_argument("--output", type=Path, default=REPO / "metrics" / "bench_consume.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--alerts", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch-alerts", type=int, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--max-alerts", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--source", choices=("directory", "kafka"), default="directory",
                    help="read the alerts from their directory, or from a Kafka topic (librdkafka's mock cluster)")
    ap.add_argument("--kafka", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(REPO / "src"))
    from deeprubin.config import load_params

    batch_alerts = load_params(None).alerts.batch_alerts
    with tempfile.TemporaryDirectory(prefix="bench-consume-") as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            try:
                from deeprubin.models.served import load_model

                model = load_model("models:/deeprubin-tcn@champion", args.tracking_uri).uri
            except Exception as exc:  # noqa: BLE001 - no registry yet: an untrained network of the same shape
                print(f"note: no champion in {args.tracking_uri} ({type(exc).__name__}); an untrained TCN of the "
                      f"configured shape is used")
                model, args.tracking_uri = local_model(tmp)
        t = time.perf_counter()
        n = write_alerts(args.n, args.seed, tmp / "alerts")
        print(f"input: {n} ZTF Avro alerts (one file each) in {time.perf_counter() - t:.0f} s; model {model}")
        print(f"load: {os.getloadavg()[0]:.2f} (1-min average), {os.cpu_count()} cores")
        ours = measure(REPO / "src", tmp / "alerts", tmp / "ours", model, args.tracking_uri, batch_alerts,
                       kafka=args.source == "kafka")
        rate = ours["alerts"] / ours["seconds"]
        report = {"n": n, "source": args.source, "ours": ours, "alerts_per_s": rate}
        if ours["alerts"] != n:
            print(f"WARNING: the child read {ours['alerts']} of {n} alerts (the mock broker dropped messages?)")
        ok = ours["rerun_classified"] == 0 and ours["rows_after_rerun"] == ours["classified"] == \
            ours["unique_alert_ids"]
        print(f"consume ({args.source}), this code:  {rate:8.1f} alerts/s ({ours['alerts']} in {ours['seconds']:.1f} s, "
              f"{ours['classified']} classified, {ours['rejected']} rejected); target {TARGET_PER_S:.0f}/s, "
              f"ratio {rate / TARGET_PER_S:.2f}")
        if args.source == "kafka" and ours.get("first_alert_s") is not None:
            steady = ours["alerts"] / (ours["seconds"] - ours["first_alert_s"])
            report["alerts_per_s_after_first"] = steady
            print(f"  the first message came {ours['first_alert_s']:.1f} s into the run (the consumer group's join; a "
                  f"long-running consumer waits once); from then: {steady:.1f} alerts/s, ratio "
                  f"{steady / TARGET_PER_S:.2f}")
        if args.source == "kafka":
            print(f"  the mock broker used {ours['parent_cpu_s']:.1f} s of CPU in this process "
                  f"during the child's run (first run and rerun, {ours['seconds'] + ours['rerun_seconds']:.1f} s)")
        print(f"  rerun: {ours['rerun_seconds']:.1f} s, {ours['rerun_classified']} new rows, "
              f"{ours['rerun_duplicates']} duplicates skipped; rows {ours['rows_after_rerun']} "
              f"({ours['unique_alert_ids']} alert ids): {'no duplicates' if ok else 'DUPLICATES OR LOSS'}")
        if args.compare_src is not None:
            base = measure(args.compare_src, tmp / "alerts", tmp / "base", model, args.tracking_uri, batch_alerts,
                           kafka=args.source == "kafka")
            label = f"code under {args.compare_src}"
        else:
            base = measure(REPO / "src", tmp / "alerts", tmp / "base", model, args.tracking_uri, 1, args.baseline_n,
                           kafka=args.source == "kafka")
            label = f"this code, 1 alert per batch, first {args.baseline_n} alerts"
        rate_base = base["alerts"] / base["seconds"]
        print(f"baseline ({label}): {rate_base:8.1f} alerts/s ({base['alerts']} in {base['seconds']:.1f} s); "
              f"ratio {rate / rate_base:.2f}x")
        report.update(baseline=base, baseline_alerts_per_s=rate_base, ratio=rate / rate_base, baseline_label=label)
        import pandas as pd

        from deeprubin.serving.alerts.consume import read_classifications

        a = read_classifications(tmp / "ours").set_index("alert_id").sort_index()
        b = read_classifications(tmp / "base").set_index("alert_id").sort_index()
        common = a.index.intersection(b.index)
        cols = [c for c in a.columns if c.startswith("p_")]
        diff = float(np.abs(a.loc[common, cols].to_numpy(float) - b.loc[common, cols].to_numpy(float)).max()) \
            if len(common) else float("nan")
        print(f"same alerts in both: {len(common)}; largest |difference| of a probability: {diff:.2e}")
        report.update(common_alerts=len(common), max_abs_diff=diff)
        del pd
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
