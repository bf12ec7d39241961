"""Pictures of light curves (matplotlib, Agg backend: no display needed).

:func:`plot_object` draws one object's detections (flux in µJy with 1σ errors) and non-detections (5σ upper limits
from ``diffmaglim``, as downward triangles) per band, with the GP mean and ±1σ band over the model's window, computed
by the same code as the preprocess stage (:func:`deeprubin.stages.preprocess.interpolate_one`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from deeprubin.schema import AB_ZERO_POINT_UJY, LightCurves  # noqa: E402

BAND_COLOURS = {"g": "#2ca02c", "r": "#d62728"}


def plot_object(lcs: LightCurves, oid: str, out: Path | str, grid_days: int = 100, fit_context_days: float = 100.0,
                until_mjd: float | None = None) -> Path:
    """Write a PNG of object ``oid`` from contract tables ``lcs`` to ``out``; returns the path.

    Raises KeyError when ``oid`` has no detections. A GP that cannot be fitted still gives a plot of the data,
    with the reason in the title.
    """
    from deeprubin.stages.preprocess import BAND_INDEX, interpolate_one

    det = lcs.detections.loc[lcs.detections["oid"].astype(str) == str(oid)]
    if det.empty:
        raise KeyError(f"object {oid!r} has no detections in the store")
    nondet = lcs.non_detections.loc[lcs.non_detections["oid"].astype(str) == str(oid)]
    obj = lcs.objects.loc[lcs.objects["oid"].astype(str) == str(oid)]
    label = None if obj.empty or pd.isna(obj["label"].iloc[0]) else str(obj["label"].iloc[0])

    status, window, gp = "", None, None
    try:
        prep, gp = interpolate_one(det, grid_days, fit_context_days, until_mjd)
        window, status = prep.window, str(gp.status)
    except Exception as exc:  # noqa: BLE001 -- the data are still worth a picture
        status = f"no GP: {exc}"

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    if window is not None:
        # from the first detection the GP was given (at most fit_context_days before the window) to the window end
        fitted = det["mjd"].loc[det["mjd"] >= window.start_mjd - fit_context_days]
        lo, hi = min(float(fitted.min()), window.start_mjd), window.end_mjd
        ax.axvspan(window.start_mjd, window.end_mjd, color="0.93", zorder=0, label=f"{grid_days}-day window")
        ax.axvline(window.last_mjd, color="0.5", lw=0.8, ls=":", zorder=1)
    else:
        lo, hi = float(det["mjd"].min()), float(det["mjd"].max())
    pad = 0.03 * max(hi - lo, 1.0)
    lo, hi = lo - pad, hi + pad
    for band, colour in BAND_COLOURS.items():
        d = det.loc[(det["band"] == band) & det["mjd"].between(lo, hi)]
        if until_mjd is not None:
            d = d.loc[d["mjd"] <= until_mjd]
        ax.errorbar(d["mjd"], d["flux"], yerr=d["flux_err"], fmt="o", ms=3.5, color=colour, elinewidth=0.8,
                    capsize=0, label=f"{band} detections ({len(d)})", zorder=3)
        n = nondet.loc[(nondet["band"] == band) & nondet["mjd"].between(lo, hi)]
        if len(n):
            limit = 10.0 ** (-0.4 * (n["diffmaglim"].to_numpy(dtype=float) - AB_ZERO_POINT_UJY))
            ax.scatter(n["mjd"], limit, marker="v", s=14, color=colour, alpha=0.35, linewidths=0,
                       label=f"{band} upper limits ({len(n)})", zorder=2)
        if gp is not None and window is not None:
            x = window.grid_mjd()
            m, s = np.asarray(gp.mean)[BAND_INDEX[band]], np.asarray(gp.std)[BAND_INDEX[band]]
            ax.plot(x, m, color=colour, lw=1.4, zorder=4)
            ax.fill_between(x, m - s, m + s, color=colour, alpha=0.18, lw=0, zorder=1)
    ax.axhline(0.0, color="0.6", lw=0.6)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("MJD")
    ax.set_ylabel("difference flux (µJy)")
    title = f"{oid}" + (f"  [{label}]" if label else "")
    if status:
        title += f"  GP: {status}"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best", ncols=2)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out
