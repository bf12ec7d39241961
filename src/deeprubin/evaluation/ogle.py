"""Real quasars and Cepheids of OGLE-II presented as a ZTF alert stream: the evaluation set of the two classes the
real labelled set (BTS supernovae) lacks, scored by every ``evaluate`` run (``evaluate.ogle``).

No real labelled ZTF g/r light curves of quasars or Cepheids could be had offline. The OGLE-II curves
(``../shared/data/other_surveys``: LMC quasars and classical Cepheids, I band, apparent magnitudes, 170-530 epochs
over 3-4 years) are the nearest real thing, presented as ZTF's alert stream would have carried them:

1. **Bands.** OGLE observed in I only; ZTF alerts are g and r. The epochs of each object alternate between g and r in
   time order (the first g, the second r, ...): every point is used once, none duplicated, and each band is sampled
   at half the OGLE cadence (every ~9 days; ZTF phase I: every 3 nights). Both bands get the I-band magnitudes as
   they are, so the curves carry **no colour** (g - r ~ 0 and equal amplitudes, where a real Cepheid has g - r of
   0.5-1 mag and a g amplitude ~1.4 times its r amplitude): the set tests variability shape and time scale, not
   colour.
2. **Flux and time.** Magnitude -> µJy with the contract's AB zero point (23.9; OGLE's I is Vega-based, which only
   scales every flux of an object alike), the error propagated; HJD -> MJD (the heliocentric correction, < 0.01 d,
   is ignored). The same mapping as the tests' ``tests/real_curves.py``.
3. **Difference flux.** :func:`deeprubin.lightcurves.presentation.apparent_to_difference` on the *whole* curve:
   per object and band the reference flux is the median of every epoch (a deep reference image built over the
   survey), the difference flux is signed, only points at least 5 σ from the reference are detections, and the
   apparent magnitude stays in ``mag_corr``.
4. **The alert stream's view.** "Now" is the object's last OGLE epoch; the stream carries the detections of the
   last ``alert_days`` days before it (default 200). The TCN's window is the last ``grid_days`` (100) days up to the
   last detection and the GP is fitted to the detections of ``fit_context_days`` (100) more before it, so on a
   multi-year curve it uses nothing older than ~200 days: giving the whole curve or its last 200 days yields the
   same tensor, while the forest's features (duration, periodogram, counts) would see years that a ZTF object of
   the simulator's 2-year survey never has. 200 days is about one LMC observing season of OGLE-II.
   An object with fewer than ``ingest.min_detections`` detections in that view raised too few alerts to be
   classified: it is not scored, and counted (``n_not_alerting``).

``<name>_apparent``: the same curves given as apparent magnitudes (every epoch, all positive, the star's whole
flux), read as ``deeprubin classify`` and serve-api read input that does not say what it is
(:func:`deeprubin.lightcurves.presentation.resolve`, ``auto``): recognised as apparent and turned into difference
flux, or, if not recognised, classified as given. An object left with no point 5 σ from its reference is rejected
there as a steady source: not scored, and counted (``n_rejected_steady``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from deeprubin.config import OgleSetParams, Params
from deeprubin.evaluation.sets import EvalSet
from deeprubin.lightcurves import presentation
from deeprubin.lightcurves.presentation import apparent_to_difference
from deeprubin.lightcurves.tensorize import curves_from_detections, tensorize_curves
from deeprubin.processed import Preprocessing
from deeprubin.schema import CLASS_ALIASES, MJD_FROM_JD, flux_to_mag, mag_to_flux

ALERT_STREAM = "alert_stream"
APPARENT = "apparent"


def read_ogle(path: Path | str) -> pd.DataFrame:
    """The OGLE-II file (oid, label, time in HJD, mag, mag_err) as contract detections of *apparent* flux, epochs
    alternating g, r, g, ... per object in time order; ``label`` kept beside (``Ceph`` aliases to ``CEP``)."""
    raw = pd.read_csv(path)
    missing = {"oid", "label", "time", "mag", "mag_err"} - set(raw.columns)
    if missing:
        raise ValueError(f"{path}: columns {sorted(missing)} missing")
    raw = raw.loc[np.isfinite(raw["time"]) & np.isfinite(raw["mag"]) & np.isfinite(raw["mag_err"])
                  & (raw["mag_err"] > 0)]
    raw = raw.assign(oid=raw["oid"].astype(str)).sort_values(["oid", "time"], kind="mergesort")
    raw = raw.drop_duplicates(["oid", "time"], keep="first")  # float32 times: one epoch per time stamp
    order = raw.groupby("oid", sort=False).cumcount().to_numpy()
    flux, flux_err = mag_to_flux(raw["mag"].to_numpy(float), raw["mag_err"].to_numpy(float))
    return pd.DataFrame({
        "oid": raw["oid"].to_numpy(), "mjd": raw["time"].to_numpy(float) - MJD_FROM_JD,
        "band": np.where(order % 2 == 0, "g", "r"), "mag": raw["mag"].to_numpy(float),
        "mag_err": raw["mag_err"].to_numpy(float), "flux": flux, "flux_err": flux_err,
        "label": raw["label"].map(lambda v: CLASS_ALIASES.get(v, v)).to_numpy(), "source": "ogle2",
    })


def last_days(detections: pd.DataFrame, days: float, now: pd.Series) -> pd.DataFrame:
    """Rows within ``days`` before each object's ``now`` (oid -> mjd)."""
    at = detections["oid"].map(now).to_numpy(float)
    mjd = detections["mjd"].to_numpy(float)
    return detections.loc[(mjd > at - days) & (mjd <= at)].reset_index(drop=True)


def alert_stream(apparent: pd.DataFrame, alert_days: float) -> pd.DataFrame:
    """Difference-flux detections of the last ``alert_days`` days of each curve (see the module docstring)."""
    now = apparent.groupby("oid")["mjd"].max()
    return last_days(apparent_to_difference(apparent), alert_days, now)  # the reference over the whole curve


def as_classify_reads_it(apparent: pd.DataFrame) -> tuple[list, dict[str, int]]:
    """The apparent curves as classify reads undeclared input (``auto``): difference-flux curves ready for the GP,
    and counts (recognised as apparent, rejected as steady)."""
    resolved = presentation.resolve(curves_from_detections(apparent.drop(columns=["label"])), presentation.AUTO)
    recognised = sum(p.photometry == presentation.APPARENT for p in resolved.paths.values())
    return resolved.curves, {"n_recognised_apparent": recognised + len(resolved.rejected),
                             "n_rejected_steady": len(resolved.rejected)}


def ogle_sets(params: Params, preprocessing: Preprocessing) -> tuple[list[EvalSet], dict[str, str]]:
    """(the alert-stream set and the apparent diagnostic, interpolated with ``preprocessing``; set -> why it was
    skipped)."""
    cfg: OgleSetParams = params.evaluate.ogle
    names = {ALERT_STREAM: f"{cfg.name}_{ALERT_STREAM}", APPARENT: f"{cfg.name}_{APPARENT}"}
    kinds = [ALERT_STREAM] + ([APPARENT] if cfg.apparent else [])
    if not cfg.available:
        return [], {names[k]: f"file not found ({cfg.path})" for k in kinds}
    apparent = read_ogle(cfg.path)
    apparent = apparent.loc[apparent["label"].isin(cfg.classes)]
    label_of = apparent.groupby("oid")["label"].first()
    sets, skipped = [], {}
    for kind in kinds:
        if kind == ALERT_STREAM:
            frame = alert_stream(apparent, cfg.alert_days)
            counts = frame.groupby("oid").size()
            alerting = counts.index[counts >= params.ingest.min_detections]
            det = frame.loc[frame["oid"].isin(alerting)].drop(columns=["label"]).reset_index(drop=True)
            curves = curves_from_detections(det)
            not_alerting = label_of[~label_of.index.isin(alerting)]
            extra = {"n_not_alerting": len(not_alerting)}
            note = (f"{len(label_of)} objects, last {cfg.alert_days:g} days; not alerting (< "
                    f"{params.ingest.min_detections} detections): "
                    + (", ".join(f"{c} {n}" for c, n in not_alerting.value_counts().sort_index().items()) or "none"))
        else:
            curves, extra = as_classify_reads_it(apparent)
            note = (f"{len(label_of)} objects given as apparent magnitudes; recognised as apparent "
                    f"{extra['n_recognised_apparent']}, rejected as steady {extra['n_rejected_steady']}")
        t = tensorize_curves(curves, preprocessing.grid_days, preprocessing.fit_context_days)
        oids = np.asarray([r["oid"] for r in t.rows], dtype=str)
        note += f"; {len(t.skipped)} not interpolable" if t.skipped else ""
        if not len(oids):
            skipped[names[kind]] = f"no object to score: {note}"
            continue
        scored = set(oids)
        det = detections_with_magnitudes(pd.concat(
            [pd.DataFrame({"oid": c.oid, "mjd": c.mjd, "band": np.where(c.band == 0, "g", "r"), "flux": c.flux,
                           "flux_err": c.flux_err}) for c in curves if c.oid in scored], ignore_index=True))
        sets.append(EvalSet(name=names[kind], oids=oids, labels=label_of.reindex(oids).to_numpy().astype(str),
                            x=t.x, detections=det, scored_classes=list(cfg.classes), restrict=False, note=note,
                            counts={"n_in_file": len(label_of), **extra}))
    return sets, skipped


def detections_with_magnitudes(det: pd.DataFrame) -> pd.DataFrame:
    """Contract columns of difference-flux detections (the forest's features read them)."""
    mag, mag_err = flux_to_mag(det["flux"].to_numpy(float), det["flux_err"].to_numpy(float))
    return det.assign(mag=mag, mag_err=mag_err, mag_corr=np.nan, mag_corr_err=np.nan, source="ogle2")
