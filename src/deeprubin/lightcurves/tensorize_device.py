"""The model-input path of :mod:`deeprubin.lightcurves.tensorize` split at the GP, for a GP on a device
(:mod:`deeprubin.lightcurves.gp_torch`, ``classify.gp_device``).

:func:`prepare_batch` does the per-curve work on a CPU (in `classify`'s worker processes): the window and screening
(:func:`tensorize.prepare`), the GP's input preparation (:func:`gp._prepare`, packed into flat arrays) and the
time-since-detection channels. :func:`tensorize_prepared` does the rest where the device is, batched: the GP fit and
prediction in torch and :func:`tensorize.assemble`'s channels and skips. Together they give what
:func:`tensorize.tensorize_curves` gives with :data:`gp.BATCH_INVARIANT` (tested to 1e-6 in the model input; the
same rows and skips). A module of its own so that the DVC stages, which import ``tensorize``, do not depend on torch's
GP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from deeprubin.lightcurves import gp, gp_torch
from deeprubin.lightcurves.tensorize import CHANNELS, Curve, Skip, Tensors, prepare, skip_from_exception, \
    time_since_detection


@dataclass
class PreparedBatch:
    """One batch of curves after :func:`prepare_batch` (the CPU half), ready for :func:`tensorize_prepared`."""

    rows: list[dict[str, Any]]  # one meta row per curve kept (status added after the GP)
    skipped: list[dict[str, str]]
    packed: Any  # gp_torch.Packed: the GP's prepared input
    since: np.ndarray  # (n, 2, G) float64: the time-since-detection channels
    flux_scale: np.ndarray  # (n,)
    grid_days: int

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def concat(parts: Sequence["PreparedBatch"]) -> "PreparedBatch":
        return PreparedBatch(rows=[r for p in parts for r in p.rows], skipped=[s for p in parts for s in p.skipped],
                             packed=gp_torch.Packed.concat([p.packed for p in parts]),
                             since=np.concatenate([p.since for p in parts]),
                             flux_scale=np.concatenate([p.flux_scale for p in parts]), grid_days=parts[0].grid_days)


def prepare_batch(curves: Sequence[Curve], grid_days: int = 100, fit_context_days: float = 100.0,
                  until_mjd: float | None = None) -> PreparedBatch:
    """The CPU half of :func:`tensorize.tensorize_curves` (same windows, same skips with the same reasons)."""
    skipped: list[dict[str, str]] = []
    kept, gp_curves, since = [], [], []
    for curve in curves:
        try:
            prep = prepare(curve, grid_days, fit_context_days, until_mjd)
        except Exception as exc:  # noqa: BLE001
            skip = exc if isinstance(exc, Skip) else Skip(f"bad light curve: {type(exc).__name__}", str(exc))
            skipped.append({"oid": curve.oid, "reason": skip.reason, "detail": skip.detail})
            continue
        try:
            gp_curves.append(gp._prepare(*prep.gp_args()))
        except Exception as exc:  # noqa: BLE001 - as interpolate_batch reports it
            if not isinstance(exc, gp.GPInputError):
                exc = gp.GPInputError(f"malformed curve: {type(exc).__name__}: {exc}")
            skip = skip_from_exception(exc)
            skipped.append({"oid": prep.oid, "reason": skip.reason, "detail": skip.detail})
            continue
        kept.append(prep)
        since.append(time_since_detection(prep.t, prep.band, prep.window.grid(), prep.window.grid_days))
    return PreparedBatch(rows=[{"oid": p.oid, **p.meta()} for p in kept], skipped=skipped,
                         packed=gp_torch.pack(gp_curves),
                         since=np.stack(since) if since else np.zeros((0, 2, grid_days)),
                         flux_scale=np.array([p.flux_scale for p in kept], dtype=np.float64), grid_days=grid_days)


def tensorize_prepared(batch: PreparedBatch, device: Any = "cpu", settings: gp.GPSettings = gp.BATCH_INVARIANT):
    """The device half: ``(Tensors with an empty x, x)``, x the ``(N, C, G)`` float32 model input as a torch tensor
    on ``device``; the GP is :func:`deeprubin.lightcurves.gp_torch.finish` (equal to the numpy GP with
    :data:`gp.BATCH_INVARIANT`) and the channels are :func:`assemble`'s, batched, with its skips."""
    dev = gp_torch.resolve_device(device)
    n, G = len(batch.rows), batch.grid_days
    if n == 0:
        return Tensors(x=np.zeros((0, len(CHANNELS), G), dtype=np.float32), rows=[], skipped=list(batch.skipped)), \
            torch.zeros((0, len(CHANNELS), G), dtype=torch.float32, device=dev)
    out = gp_torch.finish(batch.packed, settings, dev)
    scale = torch.from_numpy(batch.flux_scale).to(dev)[:, None, None]
    x = torch.empty((n, len(CHANNELS), G), dtype=torch.float64, device=dev)
    x[:, 0:2] = out.mean / scale
    x[:, 2:4] = out.std / scale
    x[:, 4:6] = torch.from_numpy(batch.since).to(dev)
    x32 = x.to(torch.float32)
    finite = torch.isfinite(x32).flatten(1).all(1).cpu().numpy()
    positive = (x32[:, 2:4] > 0).flatten(1).all(1).cpu().numpy()
    rows, skipped = [], list(batch.skipped)
    for i, row in enumerate(batch.rows):
        if not finite[i]:
            skipped.append({"oid": row["oid"], "reason": "GP output is not finite",
                            "detail": "NaN or infinite (or beyond float32) in the mean or std"})
        elif not positive[i]:
            skipped.append({"oid": row["oid"], "reason": "GP output is not finite",
                            "detail": "standard deviation not positive"})
        else:
            rows.append({**row, "status": str(out.status[i])})
    good = finite & positive
    if not good.all():
        x32 = x32[torch.from_numpy(np.flatnonzero(good)).to(dev)]
    return Tensors(x=np.zeros((0, len(CHANNELS), G), dtype=np.float32), rows=rows, skipped=skipped), x32
