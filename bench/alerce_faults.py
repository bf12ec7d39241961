"""What an ALeRCE pull stores when the server fails: objects and rows stored against the server's truth at a high fault rate (a pull and two
reruns), and the time a pull takes to fail on a wrong URL. Run from the repository root:

    .venv/bin/python bench/alerce_faults.py --n-per-class 100 --rate 0.7 --seed 1
"""
from __future__ import annotations

import argparse
import json
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
from tests.alerce_server import AlerceReplayServer, RandomFaults, build_catalogue, unused_url  # noqa: E402

FAST = dict(page_size=20, concurrency=4, requests_per_second=200.0, timeout_s=2.0, backoff_base_s=0.05,
            backoff_max_s=1.0)


def pull(url: str, raw: Path, **alerce):
    params = Params(ingest=IngestParams(source="alerce", raw_dir=raw, alerce=AlerceParams(base_url=url, **alerce)))
    return run(params, IngestPaths.from_params(params))


def stored(raw: Path) -> tuple[set[str], set[tuple]]:
    if not (raw / "objects.parquet").exists():
        return set(), set()
    lcs = RawStore(raw).read()
    det = lcs.detections
    assert not det.duplicated(["oid", "mjd", "band"]).any(), "duplicated rows"
    rows = set(zip(det["oid"], det["mjd"].round(6), det["band"], det["mag"].round(4)))
    return set(lcs.objects["oid"]), rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-per-class", type=int, default=100)
    ap.add_argument("--rate", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3, help="a pull and (runs - 1) reruns under faults")
    ap.add_argument("--skip-url", action="store_true", help="skip the wrong-URL timings (minutes on old code)")
    args = ap.parse_args()
    out: dict = {"settings": {**FAST, "max_attempts": AlerceParams().max_attempts,
                              "overlap_days": AlerceParams().overlap_days, **vars(args)}}
    tmp = Path(tempfile.mkdtemp(prefix="h15b-measure-"))
    cat = build_catalogue(args.n_per_class, seed=args.seed)
    with AlerceReplayServer(cat) as server:
        pull(server.url, tmp / "truth", **FAST)
        truth_objects, truth_rows = stored(tmp / "truth")
        out["truth"] = {"objects": len(truth_objects), "rows": len(truth_rows)}
        server.set_random_faults(RandomFaults(rate=args.rate, seed=args.seed))
        runs = []
        for i in range(args.runs):
            n_before = len(server.requests)
            started = time.monotonic()
            result = pull(server.url, tmp / "raw", **FAST)
            objects, rows = stored(tmp / "raw")
            log = server.requests[n_before:]
            runs.append({"run": i + 1, "seconds": round(time.monotonic() - started, 1), "requests": len(log),
                         "failed_requests": sum(r.fault is not None for r in log),
                         "objects": len(objects & truth_objects), "rows": len(rows & truth_rows),
                         "wrong_objects": len(objects - truth_objects), "wrong_rows": len(rows - truth_rows),
                         "complete": result.complete, "missing": len(getattr(result, "missing", None) or [])})
        server.clear_faults()
        result = pull(server.url, tmp / "raw", **FAST)
        objects, rows = stored(tmp / "raw")
        out["runs"] = runs
        out["healed_rerun"] = {"objects": len(objects & truth_objects), "rows": len(rows & truth_rows),
                               "equal_to_truth": objects == truth_objects and rows == truth_rows,
                               "complete": result.complete}
        if args.skip_url:
            print(json.dumps(out, indent=1))
            return
        # A 404 server (wrong path): in process.
        started = time.monotonic()
        try:
            pull(f"{server.url}/no-such-api", tmp / "wrong404", **FAST)
            out["wrong_path_404"] = {"seconds": round(time.monotonic() - started, 2), "failed": False}
        except Exception as exc:  # noqa: BLE001
            out["wrong_path_404"] = {"seconds": round(time.monotonic() - started, 2), "failed": True,
                                     "error": f"{type(exc).__name__}: {exc}"}
    # Nothing listening, default retry settings: in process, and the CLI end to end.
    url = unused_url()
    started = time.monotonic()
    try:
        pull(url, tmp / "nothing")
        out["nothing_listening"] = {"seconds": round(time.monotonic() - started, 2), "failed": False}
    except Exception as exc:  # noqa: BLE001
        out["nothing_listening"] = {"seconds": round(time.monotonic() - started, 3), "failed": True,
                                    "error": f"{type(exc).__name__}: {exc}"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "deeprubin.cli", "ingest", "--source", "alerce", "--alerce-url", url,
                           "--out", str(tmp / "nothing-cli")], cwd=tmp, capture_output=True, text=True, timeout=900)
    out["nothing_listening_cli"] = {"seconds": round(time.monotonic() - started, 2), "exit": proc.returncode,
                                    "stderr": proc.stderr.strip()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
