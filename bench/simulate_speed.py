"""Speed of the simulator, against named baselines run in the same process.

    python bench/simulate_speed.py [--n-per-class 2500] [--seed 42] [--repeat 1] [--strict]

Baselines (the project's rule: a benchmark runs the named baseline in the same process and prints the ratio;
absolute times are noise):

1. ``budget``: the issue's budget, 10,000 objects in under 10 s (ratio < 1 passes). Over budget is printed; the exit
   status says so only with ``--strict``: on a shared machine a busy minute is not a regression, and ``make bench``
   would stop at this first script.
2. ``drw-per-object-loop``: the damped random walk of the simulated quasars' own epochs, computed with the
   straightforward per-object, per-epoch Python loop (``ou_process_reference``) versus the vectorised update that
   ``simulate`` uses (``ou_process``), on identical times and τ.
3. ``one-worker``: the same simulation on one process (``workers=1``) against the default (one worker per core);
   the output is identical, only the time differs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
# Worker processes import this checkout too (a forkserver ignores sys.path; an editable install elsewhere would win)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))

from deeprubin.config import SimulatorParams  # noqa: E402
from deeprubin.sources import simulate as S  # noqa: E402

BUDGET_S = 10.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-per-class", type=int, default=2500)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs")
    ap.add_argument("--strict", action="store_true", help="exit 1 when over the budget")
    args = ap.parse_args()
    params = SimulatorParams(n_per_class=args.n_per_class)
    n_total = 4 * args.n_per_class

    best = np.inf
    for _ in range(args.repeat):
        t = time.perf_counter()
        sim = S.simulate(params, seed=args.seed)
        best = min(best, time.perf_counter() - t)
    print(f"simulate {n_total} objects: {best:.2f} s; budget {BUDGET_S:.0f} s; ratio {best / BUDGET_S:.2f} "
          f"({'within' if best < BUDGET_S else 'OVER'} budget); {len(sim.detections)} detections, "
          f"{len(sim.non_detections)} non-detections")

    t = time.perf_counter()
    S.simulate(params, seed=args.seed, workers=1)
    t_one = time.perf_counter() - t
    print(f"simulate {n_total} objects: default workers {best:.2f} s; baseline one-worker {t_one:.2f} s; "
          f"ratio {best / t_one:.2f}")

    # DRW: the vectorised update against the per-object loop on the same epochs (all g/r epochs of the quasars).
    rng = np.random.default_rng(args.seed)
    weather_ok = S.weather(rng, int(np.ceil(params.survey_days)) + 1)
    n_qso = args.n_per_class
    ep, _ = S.observe(rng, n_qso, params.survey_start_mjd, int(np.ceil(params.survey_days)), params.phase, weather_ok)
    tau = np.exp(rng.normal(np.log(400.0), 0.5, n_qso))
    padded, _ = S._pad(ep.obj, ep.mjd, n_qso)
    per_object = np.split(ep.mjd, np.cumsum(np.bincount(ep.obj, minlength=n_qso))[:-1])
    t = time.perf_counter()
    S.ou_process(padded, tau, np.random.default_rng(1))
    t_vec = time.perf_counter() - t
    t = time.perf_counter()
    S.ou_process_reference(per_object, tau, np.random.default_rng(1))
    t_loop = time.perf_counter() - t
    print(f"DRW {n_qso} quasars, {len(ep)} epochs: vectorised {t_vec:.3f} s; baseline drw-per-object-loop "
          f"{t_loop:.2f} s; ratio {t_vec / t_loop:.3f} (speed-up x{t_loop / t_vec:.0f})")
    return 1 if args.strict and best >= BUDGET_S else 0


if __name__ == "__main__":
    raise SystemExit(main())
