"""Realism check of the simulator: simulated light curves measured exactly like real ones, side by side.

    python bench/realism.py [--n-per-class 500] [--seed 42] [--out docs/]

Simulated SNIa/SNII are compared with the ZTF Bright Transient Survey (real ZTF alert photometry, spectroscopic
labels); simulated QSO/CEP with OGLE-II LMC quasars and Cepheids (I band, compared with the simulated r band) and,
for Cepheids, with the 5 ALeRCE example Cepheids (ZTF g/r, magpsf_corr). Every quantity comes from
``deeprubin.lightcurves.stats`` (definitions of PRIORS §6). Writes ``<out>/realism.md``, ``<out>/realism.json`` and
``<out>/realism.png``. Real data are read from ``../shared/data`` next to the repository (or $DEEPRUBIN_SHARED_DATA);
a missing real data set is skipped with a message, and its rows say so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from deeprubin.lightcurves import stats as L  # noqa: E402
from deeprubin.schema import map_detections, validate_detections  # noqa: E402

SN_CLASSES = ("SNIa", "SNII")
JD_TO_MJD = 2400000.5
# Lag windows (days) of the per-object structure function quoted in the QSO table.
SF_WINDOWS = ((5.0, 20.0), (20.0, 60.0), (200.0, 500.0))
SF_CURVE_BINS = np.geomspace(1.0, 1500.0, 17)
# BTS selection: the faintest peak magnitude in bts/labels.csv is 19.0 (BTS classifies down to ~19 mag). Simulated
# SNe whose brightest detection (any band) is at most this form the "BTS-like" sample.
BTS_PEAK_LIMIT = 19.0
# Quasar variability is measured only on objects with at least this many detections in the band.
QSO_MIN_DET = 10


def shared_data_dir() -> Path:
    env = os.environ.get("DEEPRUBIN_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def note(msg: str) -> None:
    print(f"[realism] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

def load_simulated(n_per_class: int, seed: int):
    from deeprubin.config import SimulatorParams
    from deeprubin.sources.simulate import simulate

    t0 = time.time()
    lc = simulate(SimulatorParams(n_per_class=n_per_class), seed=seed)
    det = lc.detections.merge(lc.objects[["oid", "label"]], on="oid", how="left")
    note(f"simulated {lc.n_objects} objects, {len(det)} detections in {time.time() - t0:.1f} s")
    return det, lc.truth


def load_bts(root: Path) -> pd.DataFrame | None:
    path, labels_path = root / "bts" / "detections.parquet", root / "bts" / "labels.csv"
    if not path.exists() or not labels_path.exists():
        note(f"BTS data not found under {root / 'bts'}: SN comparison skipped")
        return None
    det, report = validate_detections(map_detections(pd.read_parquet(path), source="bts"))
    note(report.summary())
    labels = pd.read_csv(labels_path)[["oid", "label"]]
    return det.merge(labels, on="oid", how="inner")


def load_ogle(root: Path) -> pd.DataFrame | None:
    path = root / "other_surveys" / "ogle2_lmc_qso_cep_iband.csv"
    if not path.exists():
        note(f"OGLE-II data not found at {path}: QSO/CEP comparison with OGLE skipped")
        return None
    raw = pd.read_csv(path)
    # I band is outside the contract's g/r, so the frame is built directly (lcstats is band-agnostic).
    return pd.DataFrame({"oid": raw["oid"].astype(str), "mjd": raw["time"] - JD_TO_MJD, "band": "I",
                         "mag": raw["mag"], "mag_err": raw["mag_err"], "label": raw["label"]})


def load_alerce_cepheids(root: Path) -> pd.DataFrame | None:
    base = root / "alerce" / "lc_classifier_examples"
    det_path, lab_path = base / "25_periodic_detections.csv", base / "25_periodic_labels.csv"
    if not det_path.exists() or not lab_path.exists():
        note(f"ALeRCE periodic examples not found under {base}: skipped")
        return None
    labels = pd.read_csv(lab_path)
    ceph = labels.loc[labels["classALeRCE"] == "Ceph", ["oid", "period", "class_source"]]
    det, _ = validate_detections(map_detections(pd.read_csv(det_path), source="alerce"))
    det = det[det["oid"].isin(ceph["oid"])].merge(ceph, on="oid")
    return L.apparent_magnitudes(det)


# ----------------------------------------------------------------------------------------------------------------
# Comparison table
# ----------------------------------------------------------------------------------------------------------------

def verdict(sim: dict, real: dict) -> str:
    """Compare two {median, p10, p90, n} summaries.

    "matches": the medians differ by at most a quarter of the real half-range (p90 − p10)/2; "within range (sim
    higher/lower)": the simulated median lies inside the real [p10, p90]; otherwise "sim too high/low". A spread
    (p90 − p10) more than twice or less than half the real one adds "; sim too broad/narrow".
    """
    if sim["n"] == 0 or real["n"] == 0:
        return "no data"
    half = (real["p90"] - real["p10"]) / 2
    diff = sim["median"] - real["median"]
    if half <= 0:
        text = "matches" if abs(diff) < 1e-9 else ("sim too high" if diff > 0 else "sim too low")
    elif abs(diff) <= 0.25 * half:
        text = "matches"
    elif real["p10"] <= sim["median"] <= real["p90"]:
        text = "within range (sim higher)" if diff > 0 else "within range (sim lower)"
    else:
        text = "sim too high" if diff > 0 else "sim too low"
    s_spread, r_spread = sim["p90"] - sim["p10"], real["p90"] - real["p10"]
    if r_spread > 0 and s_spread > 2 * r_spread:
        text += "; sim too broad"
    elif r_spread > 0 and s_spread < 0.5 * r_spread:
        text += "; sim too narrow"
    return text


def _digits(*qs: dict) -> int | None:
    scale = max((max(abs(q["median"]), abs(q["p10"]), abs(q["p90"])) for q in qs if q["n"]), default=1.0)
    return 3 if scale < 0.5 else 2 if scale < 10 else 1 if scale < 1000 else 0


def row(quantity: str, sim_values, real_values, real_label: str = "", unit: str = "") -> dict:
    qs, qr = L.quantiles(sim_values), L.quantiles(real_values)
    digits = _digits(qs, qr)
    return {"quantity": quantity, "unit": unit, "real_source": real_label,
            "sim": qs, "real": qr, "verdict": verdict(qs, qr),
            "sim_text": L.summarise(sim_values, digits), "real_text": L.summarise(real_values, digits)}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| quantity | simulated median [10–90%] (N) | real median [10–90%] (N) | verdict |", "|---|---|---|---|"]
    for r in rows:
        q = r["quantity"] + (f" ({r['unit']})" if r["unit"] else "")
        src = f" {r['real_source']}" if r["real_source"] else ""
        lines.append(f"| {q} | {r['sim_text']} ({r['sim']['n']}) | {r['real_text']} ({r['real']['n']}){src} "
                     f"| {r['verdict']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Per class pair
# ----------------------------------------------------------------------------------------------------------------

def sn_measure(det: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    return L.transient_stats(det), L.night_gaps(det)


def sn_rows(sim_st, sim_gaps, real_st, real_gaps) -> list[dict]:
    rows = [row("detections", sim_st["n_det"], real_st["n_det"]),
            row("span", sim_st["span"], real_st["span"], unit="d")]
    for b in ("g", "r"):
        rows.append(row(f"gap {b} (pooled, distinct nights)", sim_gaps.loc[sim_gaps["band"] == b, "gap"],
                        real_gaps.loc[real_gaps["band"] == b, "gap"], unit="d"))
    for b in ("g", "r"):
        rows.append(row(f"peak mag {b}", sim_st[f"peak_mag_{b}"], real_st[f"peak_mag_{b}"]))
    for b in ("g", "r"):
        rows.append(row(f"rise {b}", sim_st[f"rise_{b}"], real_st[f"rise_{b}"], unit="d"))
    for b in ("g", "r"):
        rows.append(row(f"decline {b}", sim_st[f"decline_{b}"], real_st[f"decline_{b}"], unit="mag/d"))
    rows.append(row("g−r at r peak", sim_st["gr_peak"], real_st["gr_peak"], unit="mag"))
    return rows


def qso_measure(det: pd.DataFrame, band: str) -> dict:
    """Per-object quantities of quasars in one band (apparent magnitudes)."""
    d = det[det["band"] == band]
    out = pd.DataFrame({"n_det": L.n_detections(d), "span": L.time_span(d)})
    out["mean_mag"] = d.groupby("oid")["mag"].median()
    out["rms"] = L.rms(d, bands=(band,))[f"rms_{band}"]
    out["mag_err"] = d.groupby("oid")["mag_err"].median()
    fits = L.drw_fits(d, band=band)
    out["sf_inf"], out["tau"] = fits["sf_inf"], fits["tau"]
    edges = np.unique(np.array(SF_WINDOWS).ravel())
    per = L.structure_function(d, band=band, bins=edges, per_object=True, min_pairs=5)
    for lo, hi in SF_WINDOWS:
        sel = per[(per["lag_lo"] == lo) & (per["lag_hi"] == hi)].set_index("oid")["sf_corr"]
        out[f"sf_{lo:g}_{hi:g}"] = sel
    ens = L.structure_function(d, band=band, bins=SF_CURVE_BINS)
    return {"per_object": out, "ensemble": ens, "ensemble_fit": L.fit_drw(ens, column="sf")}


def qso_rows(sim: dict, real: dict, real_label: str, real730: dict, truth: pd.DataFrame) -> list[dict]:
    s_all, r, r7 = sim["per_object"], real["per_object"], real730["per_object"]
    s = s_all[s_all["n_det"] >= QSO_MIN_DET]
    sub = f"sim ≥ {QSO_MIN_DET} det"
    rows = [row("detections per band", s_all["n_det"], r["n_det"], real_label),
            row("span", s_all["span"], r["span"], real_label, "d"),
            row("median apparent mag", s_all["mean_mag"], r["mean_mag"], real_label),
            row("median mag error", s_all["mag_err"], r["mag_err"], real_label),
            row(f"rms ({sub})", s["rms"], r["rms"], real_label, "mag"),
            row(f"DRW SF∞, likelihood fit ({sub})", s["sf_inf"], r["sf_inf"], real_label, "mag"),
            row(f"DRW SF∞, likelihood fit ({sub})", s["sf_inf"], r7["sf_inf"], real_label + ", first 730 d", "mag"),
            row(f"DRW τ, likelihood fit, observed ({sub})", s["tau"], r["tau"], real_label, "d"),
            row(f"DRW τ, likelihood fit, observed ({sub})", s["tau"], r7["tau"], real_label + ", first 730 d", "d")]
    for lo, hi in SF_WINDOWS:
        rows.append(row(f"SF, noise removed, Δt {lo:g}–{hi:g} d ({sub})", s[f"sf_{lo:g}_{hi:g}"],
                        r[f"sf_{lo:g}_{hi:g}"], real_label, "mag"))
    t = truth[truth["label"] == "QSO"] if "label" in truth.columns else truth.iloc[0:0]
    if "sf_inf_r" in t.columns:
        rows.append(row("DRW SF∞ r, simulator truth (all)", t["sf_inf_r"], r["sf_inf"], real_label + " (fit)", "mag"))
    if "tau" in t.columns:
        rows.append(row("DRW τ observed, simulator truth (all)", t["tau"], r["tau"], real_label + " (fit)", "d"))
    return rows


def cep_measure(det: pd.DataFrame, bands, period_band: str) -> pd.DataFrame:
    st = L.periodic_stats(det, bands=bands, period_band=period_band, min_period=0.2, max_period=200.0)
    for b in bands:
        st[f"mean_mag_{b}"] = det[det["band"] == b].groupby("oid")["mag"].median()
        st[f"n_{b}"] = det[det["band"] == b].groupby("oid").size()
    return st


def cep_rows(sim: pd.DataFrame, ogle: pd.DataFrame | None, alerce: pd.DataFrame | None) -> list[dict]:
    rows = []
    empty = pd.Series(dtype=float)
    o = ogle if ogle is not None else pd.DataFrame({c: empty for c in ("period", "amp_I", "R21_I", "phi21_I",
                                                                       "mean_mag_I", "n_I")})
    a = alerce if alerce is not None else pd.DataFrame({c: empty for c in ("period", "amp_g", "amp_r", "R21_r",
                                                                           "amp_ratio", "mean_mag_r", "n_r")})
    fund = sim["period"] > 2.5
    o_fund = o["period"] > 2.5
    rows += [row("detections r", sim["n_r"], o["n_I"], "OGLE I"),
             row("detections r", sim["n_r"], a["n_r"], "ALeRCE r"),
             row("period", sim["period"], o["period"], "OGLE I", "d"),
             row("period", sim["period"], a["period"], "ALeRCE (catalogue)", "d"),
             row("median apparent mag r", sim["mean_mag_r"], o["mean_mag_I"], "OGLE I (LMC)"),
             row("median apparent mag r", sim["mean_mag_r"], a["mean_mag_r"], "ALeRCE r"),
             row("amplitude r (peak-to-peak)", sim["amp_r"], o["amp_I"], "OGLE I", "mag"),
             row("amplitude r, P > 2.5 d", sim.loc[fund, "amp_r"], o.loc[o_fund, "amp_I"], "OGLE I", "mag"),
             row("amplitude g", sim["amp_g"], a["amp_g"], "ALeRCE g", "mag"),
             row("R21 r", sim["R21_r"], o["R21_I"], "OGLE I"),
             row("R21 r, P > 2.5 d", sim.loc[fund, "R21_r"], o.loc[o_fund, "R21_I"], "OGLE I"),
             row("φ21 r (sine), P > 2.5 d", sim.loc[fund, "phi21_r"], o.loc[o_fund, "phi21_I"], "OGLE I", "rad"),
             row("A_r/A_g", sim["amp_ratio"], a["amp_ratio"], "ALeRCE")]
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------------------------

def _hist(ax, sim, real, title, bins=None, log=False, real_label="real", clip=None, sim_label="sim", extra=None,
          extra_label="sim, all"):
    sim = pd.Series(sim, dtype=float).dropna().to_numpy()
    real = pd.Series(real, dtype=float).dropna().to_numpy()
    both = np.concatenate([sim, real]) if len(sim) + len(real) else np.array([0.0, 1.0])
    if clip is not None:
        lo, hi = clip
    else:
        lo, hi = np.quantile(both, [0.01, 0.99]) if len(both) else (0, 1)
    if log:
        lo, hi = max(lo, 1e-3), max(hi, 1e-3 * 10)
        edges = np.geomspace(lo, hi, 30) if bins is None else bins
        ax.set_xscale("log")
    else:
        edges = np.linspace(lo, hi, 30) if bins is None else bins
    if len(sim):
        ax.hist(np.clip(sim, edges[0], edges[-1]), bins=edges, density=True, histtype="step", lw=1.6, color="C0",
                label=f"{sim_label} (N={len(sim)})")
    if extra is not None:
        ex = pd.Series(extra, dtype=float).dropna().to_numpy()
        if len(ex):
            ax.hist(np.clip(ex, edges[0], edges[-1]), bins=edges, density=True, histtype="step", lw=1.0,
                    ls=":", color="0.35", label=f"{extra_label} (N={len(ex)})")
    if len(real):
        ax.hist(np.clip(real, edges[0], edges[-1]), bins=edges, density=True, histtype="stepfilled", alpha=0.35,
                color="C1", label=f"{real_label} (N={len(real)})")
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="best")


def make_figure(path: Path, sn: dict, qso: dict, cep: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(5, 5, figsize=(17, 15.5))
    panels = [("n_det", "detections", True), ("span", "span (d)", False), ("peak_mag_r", "peak mag r", False),
              ("rise_r", "rise r (d)", False), ("decline_g", "decline g (mag/d)", False),
              ("decline_r", "decline r (mag/d)", False), ("gr_peak", "g−r at r peak", False)]
    # Rows 0-1: SNIa (cols 0-3 of row 0 + row 1) ... laid out as two rows per class, 7 panels + gap panel.
    for k, cls in enumerate(SN_CLASSES):
        if cls not in sn:
            continue
        sim_st, sim_gaps, real_st, real_gaps, sim_all, gaps_all = sn[cls]
        cells = [axes[2 * k, 0], axes[2 * k, 1], axes[2 * k, 2], axes[2 * k, 3],
                 axes[2 * k + 1, 0], axes[2 * k + 1, 1], axes[2 * k + 1, 2]]
        for ax, (col, title, log) in zip(cells, panels):
            clip = {"decline_g": (-0.02, 0.15), "decline_r": (-0.02, 0.1), "gr_peak": (-0.6, 1.2),
                    "rise_r": (0, 60), "peak_mag_r": (15.0, 21.0), "n_det": (1, 300)}.get(col)
            _hist(ax, sim_st[col], real_st[col], f"{cls}: {title}", log=log, real_label="BTS", clip=clip,
                  sim_label="sim BTS-like", extra=sim_all[col])
        _hist(axes[2 * k + 1, 3], sim_gaps.loc[sim_gaps["band"] == "r", "gap"],
              real_gaps.loc[real_gaps["band"] == "r", "gap"], f"{cls}: gap r between nights (d)",
              bins=np.arange(0.5, 20.5, 1.0), real_label="BTS", sim_label="sim BTS-like",
              extra=gaps_all.loc[gaps_all["band"] == "r", "gap"])
    # Column 4, rows 0-3: QSO.
    ax = axes[0, 4]
    if qso:
        for key, (res, color, label) in qso["curves"].items():
            ens = res["ensemble"]
            ok = ens["sf_corr"] > 0
            ax.plot(ens.loc[ok, "lag"], ens.loc[ok, "sf_corr"], "o-", ms=3, color=color,
                    label=label + " (noise removed)")
            ok2 = ens["sf"] > 0
            ax.plot(ens.loc[ok2, "lag"], ens.loc[ok2, "sf"], ":", color=color, lw=1.2, label=label + " (raw)")
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("Δt (d)", fontsize=8)
        ax.set_title("QSO: ensemble SF (all pairs of detections)", fontsize=9)
        ax.legend(fontsize=6)
        ax.tick_params(labelsize=7)
        s_all = qso["sim_r"]["per_object"]
        s = s_all[s_all["n_det"] >= QSO_MIN_DET]
        lab = f"sim r ≥{QSO_MIN_DET} det"
        r = qso["ogle"]["per_object"] if qso.get("ogle") else None
        rr = r if r is not None else pd.DataFrame({"tau": [], "sf_inf": [], "rms": [], "mean_mag": []})
        r7 = qso["ogle730"]["per_object"] if qso.get("ogle730") else None
        _hist(axes[1, 4], s["tau"], rr["tau"], "QSO: DRW τ, likelihood fit (d)", log=True, real_label="OGLE I",
              clip=(1.0, 1e4), sim_label=lab, extra=r7["tau"] if r7 is not None else None,
              extra_label="OGLE I, first 730 d")
        _hist(axes[2, 4], s["sf_inf"], rr["sf_inf"], "QSO: DRW SF∞, likelihood fit (mag)", log=True,
              real_label="OGLE I", clip=(0.01, 2.0), sim_label=lab,
              extra=r7["sf_inf"] if r7 is not None else None, extra_label="OGLE I, first 730 d")
        _hist(axes[3, 4], s_all["mean_mag"], rr["mean_mag"], "QSO: median apparent mag (sim r, OGLE I)",
              real_label="OGLE I", sim_label="sim r, all")
    # Row 4: CEP.
    if cep:
        s, o, a = cep["sim"], cep.get("ogle"), cep.get("alerce")
        oo = o if o is not None else pd.DataFrame({"period": [], "amp_I": [], "R21_I": [], "phi21_I": []})
        _hist(axes[4, 0], s["period"], oo["period"], "CEP: period (d)", log=True, real_label="OGLE I",
              clip=(0.2, 200))
        if a is not None:
            axes[4, 0].plot(a["period"], np.full(len(a), 0.05), "k^", ms=6, label="ALeRCE Ceph")
            axes[4, 0].legend(fontsize=6)
        _hist(axes[4, 1], s["amp_r"], oo["amp_I"], "CEP: peak-to-peak amplitude (sim r, OGLE I)",
              real_label="OGLE I", clip=(0, 1.6))
        _hist(axes[4, 2], s["R21_r"], oo["R21_I"], "CEP: R21 (sim r, OGLE I)", real_label="OGLE I", clip=(0, 0.8))
        ax = axes[4, 3]
        ax.scatter(np.log10(s["period"]), s["R21_r"], s=5, alpha=0.4, color="C0", label="sim r")
        ax.scatter(np.log10(oo["period"]), oo["R21_I"], s=25, color="C1", label="OGLE I")
        if a is not None:
            ax.scatter(np.log10(a["period"]), a["R21_r"], s=30, marker="^", color="k", label="ALeRCE r")
        ax.set_ylim(0, 0.8)
        ax.set_xlabel("log10 P (d)", fontsize=8)
        ax.set_title("CEP: R21 vs period", fontsize=9)
        ax.legend(fontsize=6)
        ax.tick_params(labelsize=7)
        _hist(axes[4, 4], s["amp_ratio"], a["amp_ratio"] if a is not None else [], "CEP: A_r/A_g",
              real_label="ALeRCE", clip=(0.3, 1.2))
    fig.suptitle("Simulator vs real light curves (deeprubin.lightcurves.stats; blue: simulated, orange: real)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

def fmt_q(q: dict, digits: int = 2) -> str:
    return L.summarise([q["median"]], digits) if q["n"] else "n/a"


def differences(tables: dict[str, list[dict]]) -> tuple[list[str], list[str]]:
    """Rows whose verdict is not "matches" (the secondary "all simulated" SN tables left out), worst first.

    Returns (clear, smaller): sim median outside the real [p10, p90], and inside it (or only the spread differs).
    Ordered by the offset of the medians in units of the real half-range (p90 − p10)/2.
    """
    clear, smaller = [], []
    for name, rows in tables.items():
        if "all simulated" in name:
            continue
        for r in rows:
            if r["verdict"] in ("matches", "no data"):
                continue
            s, q = r["sim"], r["real"]
            half = max((q["p90"] - q["p10"]) / 2, 1e-12)
            score = abs(s["median"] - q["median"]) / half
            src = f" vs {r['real_source']}" if r["real_source"] else ""
            text = (f"**{name.split(':')[0]}, {r['quantity']}**{src}: sim {r['sim_text']}, real {r['real_text']} "
                    f"({score:.1f} half-ranges) → {r['verdict']}.")
            (clear if r["verdict"].startswith("sim too") else smaller).append((score, text))
    return [t for _, t in sorted(clear, key=lambda x: -x[0])], [t for _, t in sorted(smaller, key=lambda x: -x[0])]


def _find(tables: dict[str, list[dict]], table_prefix: str, quantity: str, source: str = "") -> dict | None:
    for name, rows in tables.items():
        if not name.startswith(table_prefix):
            continue
        for r in rows:
            if r["quantity"] == quantity and source in r["real_source"] and r["sim"]["n"] and r["real"]["n"]:
                return r
    return None


def _cmp(r: dict | None, what: str) -> str:
    """"<what> sim X vs real Y (+Z%)" for a row, or "" when it is missing."""
    if r is None:
        return ""
    s, q = r["sim"]["median"], r["real"]["median"]
    if r["real"]["p10"] < 0 < r["real"]["p90"] or abs(q) < 1e-9:  # straddles zero (a colour): absolute offset
        rel = f" ({s - q:+.3f})"
    else:
        rel = f" ({(s / q - 1):+.0%})"
    return f"{what} {r['sim_text'].split(' [')[0]} vs {r['real_text'].split(' [')[0]}{rel}"


def interpretation(tables: dict[str, list[dict]]) -> list[str]:
    """Plain-language reading of the largest differences, with the measured numbers (regenerated each run)."""
    out = []
    for cls in SN_CLASSES:
        pre = f"{cls}: simulated (BTS-like)"
        parts = [_cmp(_find(tables, pre, q), w) for q, w in (
            ("decline g", "g decline (mag/d)"), ("decline r", "r decline"), ("rise r", "r rise (d)"),
            ("span", "span (d)"), ("g−r at r peak", "g−r at peak"), ("detections", "detections"))]
        parts = [p for p in parts if p]
        if parts:
            out.append(f"{cls}, BTS-like simulated vs BTS (medians): " + "; ".join(parts) + ".")
        r_all = _find(tables, f"{cls}: all simulated", "peak mag r")
        if r_all:
            out.append(f"{cls} without the BTS magnitude cut: peak r {r_all['sim_text']} vs BTS {r_all['real_text']}"
                       f" — the simulated population reaches the alert limit, BTS stops near 19 mag; the "
                       f"classifier trains on the full population, the realism test uses the cut.")
    q = "QSO: simulated r vs OGLE-II I"
    parts = [_cmp(_find(tables, q, "detections per band"), "detections per band"),
             _cmp(_find(tables, q, f"DRW SF∞, likelihood fit (sim ≥ {QSO_MIN_DET} det)", "first 730"),
                  "fitted SF∞ (OGLE cut to 730 d)"),
             _cmp(_find(tables, q, "DRW SF∞ r, simulator truth (all)"), "simulator-truth SF∞ r vs OGLE fit"),
             _cmp(_find(tables, q, "DRW τ observed, simulator truth (all)"), "truth τ vs OGLE fit (d)")]
    parts = [p for p in parts if p]
    if parts:
        out.append("QSO: " + "; ".join(parts) + ". Most simulated quasars raise only a few alerts (the difference "
                   "flux must reach 5σ), so their detection-only light curves are short and selected at the "
                   "extremes; the OGLE curves are full photometry. The per-object fits therefore say more about "
                   "alert selection than about the DRW; the truth rows are the fairer check of the drawn "
                   "variability (OGLE's own τ is baseline-limited too).")
    c = "CEP:"
    parts = [_cmp(_find(tables, c, "period", "OGLE"), "period (d) vs OGLE"),
             _cmp(_find(tables, c, "amplitude r, P > 2.5 d", "OGLE"), "amplitude r (P > 2.5 d) vs OGLE I"),
             _cmp(_find(tables, c, "R21 r, P > 2.5 d", "OGLE"), "R21 (P > 2.5 d)"),
             _cmp(_find(tables, c, "φ21 r (sine), P > 2.5 d", "OGLE"), "φ21"),
             _cmp(_find(tables, c, "A_r/A_g", "ALeRCE"), "A_r/A_g vs ALeRCE")]
    parts = [p for p in parts if p]
    if parts:
        out.append("CEP: " + "; ".join(parts) + ". The OGLE sample is 12 LMC Cepheids of 1.3–7.7 d (I band, "
                   "where amplitudes are ~0.6× V and smaller than in r), so a broader simulated period range and "
                   "a somewhat larger r amplitude are expected; R21 and φ21 are measured on sparse, "
                   "detection-only alert curves in the simulation (phase gaps where the star is near its "
                   "reference flux), against dense OGLE curves.")
    return out


def write_report(out: Path, tables: dict[str, list[dict]], meta: dict, extra: dict[str, str]) -> None:
    lines = ["# Realism of the simulator: simulated vs real light curves", "",
             f"Generated by `bench/realism.py --n-per-class {meta['n_per_class']} --seed {meta['seed']}` "
             f"in {meta['runtime_s']:.0f} s. Figure: `realism.png`; numbers: `realism.json`.", "",
             "## Definitions", "",
             "All quantities are measured by `deeprubin.lightcurves.stats` with the same code on simulated and real data, on "
             "detections only (values: median [10th, 90th percentile] over objects; N = objects, or gaps for the gap "
             "rows).",
             "",
             "- **Supernovae (PRIORS §6).** Night = floor(MJD). Gaps: between consecutive distinct nights with a "
             "detection in the band, pooled over all objects. Peak: brightest detection in the band. Rise: peak "
             "time − first detection in any band (bands with ≥ 5 detections). Decline: least-squares slope (mag/d) "
             "of the band's detections in [t_peak, t_peak + 30 d] (≥ 5 detections in the band, ≥ 3 in the window). "
             "g−r: mean g − mean r of the night with both bands whose mean r time is nearest the r peak (±4 d). "
             "Simulated alert magnitudes (difference flux) are used as they are: for SNe the reference image has "
             "no SN.",
             "- **Quasars.** Apparent magnitudes: the simulator's `mag_corr` where finite (alert `mag` is a "
             "difference magnitude), OGLE-II I-band magnitudes. Simulated r band is compared with OGLE I band. "
             "rms: standard deviation of the magnitudes. DRW: per-object maximum-likelihood damped random walk "
             "(celerite2 exponential kernel plus the quoted errors), SF∞ = √2 σ, τ in the observed frame. SF: "
             "per-object structure function in a lag window, sqrt(<Δm²> − <σ_i² + σ_j²>) (noise removed with the "
             "quoted errors).",
             "- **Cepheids.** Apparent magnitudes as for quasars (ALeRCE: magpsf_corr). Period: Lomb–Scargle "
             "(astropy) on the r band (OGLE: I), 0.2–200 d, at most half the span. Fourier fit with up to 4 "
             "harmonics at that period: amplitude = peak-to-peak of the fit, R21 = A2/A1, φ21 = φ2 − 2φ1 (sine "
             "convention, as PRIORS §3). A_r/A_g = ratio of the peak-to-peak amplitudes at the r period.",
             "- **Verdict.** *matches*: medians differ by ≤ ¼ of the real half-range (p90 − p10)/2; *within range*: "
             "the simulated median lies inside the real [p10, p90]; *too high/low*: outside. *too broad/narrow*: the "
             "simulated 10–90% spread is > 2× or < ½ the real one.", "",
             "## Data", ""]
    lines += [f"- {d}" for d in meta["sources"]]
    for name, rows in tables.items():
        lines += ["", f"## {name}", "", markdown_table(rows)]
        if name in extra:
            lines += ["", extra[name]]
    lines += ["", "## Where the simulator still differs from the real sky", ""]
    lines += meta["differences_intro"]
    clear, smaller = differences(tables)
    lines += ["### Clear differences (simulated median outside the real 10–90% range)", ""]
    lines += [f"- {d}" for d in clear] if clear else ["- None."]
    lines += ["", "### Smaller offsets (inside the real range, or only the spread differs)", ""]
    lines += [f"- {d}" for d in smaller] if smaller else ["- None."]
    lines += ["", "### What these numbers mean", ""] + [f"- {t}" for t in meta.get("interpretation", [])] + [""]
    (out / "realism.md").write_text("\n".join(lines), encoding="utf-8")


def _json_safe(obj):
    """NaN/inf -> null and numpy scalars -> Python, so the file is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-per-class", type=int, default=500, help="simulated objects per class (default 500)")
    parser.add_argument("--seed", type=int, default=42, help="simulator seed (default 42)")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="output folder (default docs/)")
    args = parser.parse_args(argv)
    t_start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    root = shared_data_dir()
    if not root.exists():
        note(f"real data folder {root} not found (set DEEPRUBIN_SHARED_DATA): real columns will be empty")

    sim, truth = load_simulated(args.n_per_class, args.seed)
    bts, ogle, alerce = load_bts(root), load_ogle(root), load_alerce_cepheids(root)
    sources = [f"Simulated: `deeprubin.sources.simulate.simulate(SimulatorParams(n_per_class={args.n_per_class}), "
               f"seed={args.seed})`, {sim['oid'].nunique()} objects, {len(sim)} detections "
               f"(all observed in ZTF-like g/r)."]
    tables: dict[str, list[dict]] = {}
    extra: dict[str, str] = {}

    # --- Supernovae -----------------------------------------------------------------------------------------
    sn_results = {}
    for cls in SN_CLASSES:
        t0 = time.time()
        s_det = sim[sim["label"] == cls]
        sim_all, gaps_all = sn_measure(s_det)
        brightest = s_det.groupby("oid")["mag"].min()
        bts_like = brightest.index[brightest <= BTS_PEAK_LIMIT]
        sim_st, sim_gaps = sim_all.loc[sim_all.index.isin(bts_like)], gaps_all[gaps_all["oid"].isin(bts_like)]
        if bts is not None:
            real_st, real_gaps = sn_measure(bts[bts["label"] == cls])
        else:
            real_st = pd.DataFrame(columns=sim_st.columns, dtype=float)
            real_gaps = pd.DataFrame({"oid": [], "band": [], "gap": []})
        sn_results[cls] = (sim_st, sim_gaps, real_st, real_gaps, sim_all, gaps_all)
        tables[f"{cls}: simulated (BTS-like) vs ZTF BTS"] = sn_rows(sim_st, sim_gaps, real_st, real_gaps)
        tables[f"{cls}: all simulated (no magnitude cut) vs ZTF BTS"] = sn_rows(sim_all, gaps_all, real_st,
                                                                                real_gaps)
        extra[f"{cls}: simulated (BTS-like) vs ZTF BTS"] = (
            f"BTS-like: the {len(sim_st)} of {len(sim_all)} simulated {cls} whose brightest detection (any band) "
            f"is ≤ {BTS_PEAK_LIMIT} mag (the faintest BTS peak magnitude in labels.csv); BTS itself is "
            f"spectroscopically complete to 18.5 mag.")
        note(f"{cls}: {len(sim_all)} simulated ({len(sim_st)} BTS-like), {len(real_st)} real, "
             f"{time.time() - t0:.1f} s")
    if bts is not None:
        n = bts.groupby("label")["oid"].nunique()
        sources.append(f"ZTF BTS (`bts/detections.parquet`, `labels.csv`): SNIa {n.get('SNIa', 0)}, SNII "
                       f"{n.get('SNII', 0)} objects; ANTARES alert PSF photometry, detections only, spectroscopic "
                       f"labels; BTS is magnitude-limited (peak ≲ 18.5–19 mag).")

    # --- Quasars ---------------------------------------------------------------------------------------------
    t0 = time.time()
    s_qso = L.apparent_magnitudes(sim[sim["label"] == "QSO"])
    frac_app = float(s_qso["mag_is_apparent"].mean()) if len(s_qso) else math.nan
    qso: dict = {"sim_r": qso_measure(s_qso, "r"), "sim_g": qso_measure(s_qso, "g")}
    real_q = real_q730 = None
    if ogle is not None:
        o_qso = ogle[ogle["label"] == "QSO"]
        real_q = qso_measure(o_qso, "I")
        first = o_qso.groupby("oid")["mjd"].transform("min")
        window = float(getattr(truth, "attrs", {}).get("survey_days", 730.0))
        real_q730 = qso_measure(o_qso[o_qso["mjd"] - first <= window], "I")
    qso["ogle"] = real_q
    empty_q = {"per_object": pd.DataFrame(columns=qso["sim_r"]["per_object"].columns, dtype=float)}
    name = "QSO: simulated r vs OGLE-II I"
    tables[name] = qso_rows(qso["sim_r"], real_q or empty_q, "OGLE I", real_q730 or empty_q, truth)
    s_po = qso["sim_r"]["per_object"]
    well = s_po[s_po["n_det"] >= QSO_MIN_DET]
    true_sf = truth.set_index("oid")["sf_inf_r"].reindex(well.index) if "sf_inf_r" in truth else None
    true_tau = truth.set_index("oid")["tau"].reindex(well.index) if "tau" in truth else None
    ratio = (qso["sim_g"]["per_object"]["sf_inf"] / s_po["sf_inf"])
    fit_s, fit_r = qso["sim_r"]["ensemble_fit"], (real_q or {}).get("ensemble_fit")
    neg = float((s_qso["flux"] < 0).mean()) if len(s_qso) else math.nan
    extra[name] = (
        f"Variability rows (rms, DRW, SF) use the {len(well)} of {len(s_po)} simulated QSOs with ≥ {QSO_MIN_DET} "
        f"r detections ({(s_po['n_det'] >= 1).sum()} have any r detection; a QSO is detected only where its "
        f"difference flux reaches 5σ, {neg:.0%} of simulated QSO detections are negative). "
        + (f"For those, the simulator's truth is SF∞(r) {L.summarise(true_sf)} mag and τ(obs) "
           f"{L.summarise(true_tau)} d, while the same fit gives {L.summarise(well['sf_inf'])} and "
           f"{L.summarise(well['tau'])} d from their detections: the short baseline "
           f"({L.summarise(well['span'])} d) and detection-only sampling bias both low. Detection-only data are "
           f"truncated twice: an epoch is kept only where the difference from the reference reaches 5σ, so the "
           f"detections cluster at one extreme of the light curve (small Δm between them) and their noise is "
           f"truncated too (so subtracting the quoted errors over-corrects: noise-removed SF = 0 at short lags). "
           f"The OGLE curves are full photometry, not alerts: the variability rows therefore test the simulator "
           f"only loosely; the 'simulator truth' rows compare the drawn DRW parameters with the OGLE fits "
           f"(SF∞ ∝ λ^−0.48, so I-band SF∞ ≈ 0.9 × r). "
           if true_sf is not None else "")
        + f"Ensemble SF fit SF(Δt)² = SF∞²(1 − e^(−Δt/τ)) + noise² over {SF_CURVE_BINS[0]:g}–"
          f"{SF_CURVE_BINS[-1]:g} d (all pairs): simulated r SF∞ {fit_s['sf_inf']:.3f} mag, τ {fit_s['tau']:.0f} d, "
          f"noise {fit_s['noise']:.3f}"
        + (f"; OGLE I SF∞ {fit_r['sf_inf']:.3f} mag, τ {fit_r['tau']:.0f} d, noise {fit_r['noise']:.3f}."
           if fit_r else ".")
        + f" Simulated g/r SF∞ ratio (per object, both fitted): {L.summarise(ratio[ratio.index.isin(well.index)])}"
          f" (bluer when brighter; PRIORS §2 expects Δg/Δr ≈ 1.1–1.25). {frac_app:.0%} of simulated QSO "
          f"detections carry an apparent `mag_corr`. Rows marked 'OGLE I, first 730 d' cut each OGLE curve to the "
          f"simulated survey length, so that τ and SF∞ face the same baseline bias.")
    curves = {"sim_r": (qso["sim_r"], "C0", "sim r"), "sim_g": (qso["sim_g"], "C2", "sim g")}
    if real_q:
        curves["ogle"] = (real_q, "C1", "OGLE I")
    qso["curves"] = curves
    qso["ogle730"] = real_q730
    note(f"QSO: {time.time() - t0:.1f} s")
    if ogle is not None:
        nq = ogle.groupby("label")["oid"].nunique()
        sources.append(f"OGLE-II LMC (`other_surveys/ogle2_lmc_qso_cep_iband.csv`): QSO {nq.get('QSO', 0)}, CEP "
                       f"{nq.get('CEP', 0)} objects, I band only (compared with the simulated r band), apparent "
                       f"magnitudes; Magellanic Cloud quasars behind the LMC/SMC, LMC classical Cepheids "
                       f"(P ≈ 1.3–7.7 d).")

    # --- Cepheids ----------------------------------------------------------------------------------------------
    t0 = time.time()
    s_cep = L.apparent_magnitudes(sim[sim["label"] == "CEP"])
    cep = {"sim": cep_measure(s_cep, ("g", "r"), "r")}
    cep["ogle"] = cep_measure(ogle[ogle["label"] == "CEP"], ("I",), "I") if ogle is not None else None
    if alerce is not None:
        a = cep_measure(alerce, ("g", "r"), "r")
        cat = alerce.groupby("oid")[["period", "class_source"]].first()
        a["ls_period"] = a["period"]
        a["period"] = cat["period"]
        a["class_source"] = cat["class_source"]
        cep["alerce"] = a
        sources.append(f"ALeRCE lc_classifier examples (`alerce/lc_classifier_examples/25_periodic_*`): the "
                       f"{len(a)} 'Ceph' objects (types {', '.join(cat['class_source'])}; ZTF g/r magpsf_corr; "
                       f"period: the catalogue's).")
    else:
        cep["alerce"] = None
    tables["CEP: simulated vs OGLE-II I and ALeRCE"] = cep_rows(cep["sim"], cep["ogle"], cep["alerce"])
    # How well the period is recovered on simulated curves (a check of the measurement, not of realism).
    p_true = truth.set_index("oid")["period"] if "period" in truth.columns else None
    if p_true is not None:
        pt = p_true.reindex(cep["sim"].index)
        good = (np.abs(cep["sim"]["period"] / pt - 1) < 0.01).mean()
        extra["CEP: simulated vs OGLE-II I and ALeRCE"] = (
            f"Lomb–Scargle recovers the simulated true period within 1% for {good:.0%} of simulated Cepheids "
            f"(true periods {L.summarise(pt)} d). ALeRCE rows: 5 objects, 3 of them type II Cepheids (CWA, "
            f"Cep-II), so only indicative.")
        if cep["alerce"] is not None:
            a = cep["alerce"]
            extra["CEP: simulated vs OGLE-II I and ALeRCE"] += " ALeRCE per object: " + "; ".join(
                f"{oid} ({r.class_source}) P {r.period:.2f} d (LS r {r.ls_period:.2f}), A_g {r.amp_g:.2f}, "
                f"A_r {r.amp_r:.2f}, R21_r {r.R21_r:.2f}" for oid, r in a.iterrows()) + "."
    note(f"CEP: {time.time() - t0:.1f} s")

    make_figure(args.out / "realism.png", sn_results, qso, cep)
    runtime = time.time() - t_start
    meta = {"n_per_class": args.n_per_class, "seed": args.seed, "runtime_s": runtime, "sources": sources,
            "differences_intro": [
                "Rows whose verdict is not *matches*, ordered by the offset of the medians in units of the real "
                "half-range (largest first). Caveats: BTS is a magnitude-limited spectroscopic sample (the SN "
                "tables therefore use the BTS-like simulated subset; the 'all simulated' tables are left out "
                "here); OGLE is "
                "another survey, band (I) and cadence; the ALeRCE Cepheids are 5 objects.", ""],
            "interpretation": interpretation(tables)}
    write_report(args.out, tables, meta, extra)
    payload = {"meta": {k: v for k, v in meta.items() if k != "differences_intro"}, "tables": tables,
               "notes": extra}
    (args.out / "realism.json").write_text(json.dumps(_json_safe(payload), indent=1, ensure_ascii=False),
                                           encoding="utf-8")
    note(f"wrote {args.out / 'realism.md'}, realism.json, realism.png in {time.time() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
