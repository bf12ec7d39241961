"""Photometry presentations: the difference flux the model learned, from light curves given as apparent magnitudes.

The model learned ZTF's alert stream: the *difference* flux of a science image minus a reference image (0 = the
reference level; signed), detected at 5 σ. Forced photometry and other surveys give *apparent* magnitudes instead:
all positive, with a large steady flux under the variability, which a model of difference flux takes for a
supernova plateau. :func:`apparent_to_difference` does what a reference image does: per object and band, the
reference flux is the median of the given fluxes, the difference flux is what is left, and only points at least
``threshold_sigma`` from the reference are kept, as detections of the alert stream are. The apparent magnitude is
kept in ``mag_corr`` (ALeRCE's ``magpsf_corr``: the apparent magnitude of a source with a reference counterpart).

Frames here are contract detections (:data:`deeprubin.schema.DETECTIONS_SCHEMA`) whose ``flux`` is the total flux in
µJy (positive) when they are apparent.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from deeprubin.schema import flux_to_mag

DIFFERENCE = "difference"  # difference-image photometry (alerts, ALeRCE detections, BTS): used as given
APPARENT = "apparent"      # apparent magnitudes: turned into difference flux first
ALERT_THRESHOLD_SIGMA = 5.0  # ZTF's alert threshold


def reference_flux(detections: pd.DataFrame) -> pd.Series:
    """The reference flux of each point's object and band: the median of that object's fluxes in that band."""
    keys = [detections["oid"].astype(str), detections["band"].astype(str)]
    return detections["flux"].groupby(keys, sort=False).transform("median")


def apparent_to_difference(detections: pd.DataFrame, threshold_sigma: float = ALERT_THRESHOLD_SIGMA) -> pd.DataFrame:
    """Contract detections with apparent (total) flux -> contract detections of difference flux, as an alert
    stream would report them: flux minus the object's median flux per band, only points with
    ``|difference| >= threshold_sigma * flux_err``; ``mag``/``mag_err`` are the magnitude of |difference|, and the
    apparent magnitude goes to ``mag_corr``/``mag_corr_err``. An object none of whose points clears the threshold
    has no rows left (a steady source produces no alert)."""
    if detections.empty:
        return detections.copy()
    out = detections.copy()
    apparent_mag, apparent_err = flux_to_mag(out["flux"].to_numpy(float), out["flux_err"].to_numpy(float))
    diff = out["flux"].to_numpy(float) - reference_flux(out).to_numpy(float)
    err = out["flux_err"].to_numpy(float)
    keep = np.abs(diff) >= threshold_sigma * err
    out["flux"] = diff
    out["mag"], out["mag_err"] = flux_to_mag(diff, err)
    out["mag_corr"], out["mag_corr_err"] = apparent_mag, apparent_err
    return out.loc[keep].reset_index(drop=True)

