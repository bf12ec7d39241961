"""Throughput of the ALeRCE pull (objects/s) against the local ALeRCE server, with and without injected faults.

    python bench/alerce_pull.py [--n-per-class 100] [--concurrency 4]

The server runs in its own process (tests/alerce_server.py, simulated objects); the pull is the real code path:
`deeprubin.stages.ingest.run` with `source: alerce`, the real `alerce` client, no rate limit. Runs, each into an
empty store, each printed as objects/s:

1. ``sequential`` (the named baseline): concurrency 1, no faults.
2. ``concurrent``: ``--concurrency`` light curves in flight, no faults; ratio to the baseline.
3. ``concurrent+faults``: the same against a server that answers 10 % of light-curve requests with a 500, 5 % with
   a 429 (Retry-After 0.2 s), 5 % with a truncated body, 5 % with a reset connection, 2 % past the client timeout,
   and one /objects page with a 503 (each fault fires that many times, on whichever requests come first, so one
   object can meet several in a row and run out of attempts); ratio to the fault-free concurrent run; then a rerun,
   and whether the store then holds exactly the tables of the clean run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from deeprubin.config import AlerceParams, IngestParams, Params  # noqa: E402
from deeprubin.stages.ingest import IngestPaths, run  # noqa: E402
from deeprubin.store import RawStore  # noqa: E402


def start_server(n_per_class: int, faults: list[dict]) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-m", "tests.alerce_server", "--n-per-class", str(n_per_class), "--seed", "5"]
    for fault in faults:
        args += ["--fault", json.dumps(fault)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'src'}"})
    line = proc.stdout.readline().strip()
    if not line.startswith("ALERCE_URL="):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, line.split("=", 1)[1]


def pull_once(url: str, concurrency: int, out: Path) -> tuple[float, int, object]:
    params = Params(ingest=IngestParams(source="alerce", raw_dir=out, alerce=AlerceParams(
        base_url=url, concurrency=concurrency, requests_per_second=1e6, timeout_s=1.0, max_attempts=6,
        backoff_base_s=0.05, backoff_max_s=1.0, page_size=100, max_objects_per_class=100_000, commit_every=500)))
    start = time.perf_counter()
    result = run(params, IngestPaths.from_params(params))
    seconds = time.perf_counter() - start
    fetched = sum(c["fetched"] for c in result.per_class.values())
    return seconds, fetched, result


def fault_mix(n_objects: int) -> list[dict]:
    share = lambda p: max(1, round(p * n_objects))  # noqa: E731
    return [
        {"route": "lightcurve", "kind": "http_500", "times": share(0.10)},
        {"route": "lightcurve", "kind": "http_429", "times": share(0.05), "retry_after": 0.2},
        {"route": "lightcurve", "kind": "truncated_json", "times": share(0.05)},
        {"route": "lightcurve", "kind": "reset", "times": share(0.05)},
        {"route": "lightcurve", "kind": "slow", "times": share(0.02), "delay": 2.0},
        {"route": "objects", "kind": "http_503", "page": 1, "times": 1},
    ]


def frames(path: Path):
    lcs = RawStore(path).read()
    return (lcs.objects.drop(columns="ingested_at").sort_values("oid").reset_index(drop=True),
            lcs.detections.sort_values(["oid", "mjd", "band"]).reset_index(drop=True))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-per-class", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="alerce-bench-"))
    rates = {}
    results = {}
    for name, concurrency, faulty in (("sequential", 1, False), ("concurrent", args.concurrency, False),
                                      ("concurrent+faults", args.concurrency, True)):
        faults = fault_mix(4 * args.n_per_class // 2) if faulty else []  # about half pass the 0.7 threshold
        proc, url = start_server(args.n_per_class, faults)
        try:
            seconds, fetched, result = pull_once(url, concurrency, work / name)
            if faulty:
                # The faults are spent by now: a rerun fetches exactly what failed (held by the watermarks).
                _, refetched, _ = pull_once(url, concurrency, work / name)
                print(f"rerun after the faults fetched {refetched} objects")
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        rates[name] = fetched / seconds
        results[name] = result
        failures = sum(len(c["failures"]) for c in result.per_class.values())
        print(f"{name:18s} {fetched} objects in {seconds:.2f} s: {rates[name]:.1f} objects/s "
              f"({result.extra['requests']} requests, {result.extra['retries']} retries, {failures} failures)")
    print(f"ratio concurrent/sequential (baseline): {rates['concurrent'] / rates['sequential']:.2f}")
    print(f"ratio faults/no faults: {rates['concurrent+faults'] / rates['concurrent']:.2f}")
    same = all(a.equals(b) for a, b in zip(frames(work / "concurrent"), frames(work / "concurrent+faults")))
    print(f"after the rerun, the faulty pull's store equals the clean pull's: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
