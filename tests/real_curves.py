"""Real light curves from ../shared/data in the shapes the tests need.

OGLE-II quasars and Cepheids (``other_surveys/``) are apparent I-band magnitudes, single band. As ZTF input they are
mapped: time HJD -> MJD (HJD - 2400000.5; the heliocentric correction, < 0.01 d, is ignored), the I magnitude is
taken as an AB magnitude, and an object's epochs alternate between g and r in time order (g, r, g, r, ...), so both
bands carry half of the real curve at the real level, with no colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from deeprubin.schema import MJD_FROM_JD, map_detections, validate_detections

OGLE = Path("other_surveys") / "ogle2_lmc_qso_cep_iband.csv"
BTS = Path("bts") / "detections.parquet"


def ogle_as_ztf(shared_data: Path) -> pd.DataFrame:
    """OGLE-II curves as ZTF-like input rows: oid, mjd, band (g/r), mag, mag_err (apparent), label (QSO/CEP)."""
    raw = pd.read_csv(Path(shared_data) / OGLE).sort_values(["oid", "time"], kind="stable")
    return pd.DataFrame({"oid": raw["oid"], "mjd": raw["time"] - MJD_FROM_JD,
                         "band": np.where(raw.groupby("oid").cumcount() % 2 == 0, "g", "r"),
                         "mag": raw["mag"], "mag_err": raw["mag_err"], "label": raw["label"]}).reset_index(drop=True)


def contract(rows: pd.DataFrame, source: str) -> pd.DataFrame:
    """Input rows of any mapped format -> validated contract detections."""
    return validate_detections(map_detections(rows, source=source))[0]


def bts_rows(shared_data: Path) -> pd.DataFrame:
    """The BTS supernovae as shipped: difference magnitudes (magpsf, sigmapsf, fid), no isdiffpos."""
    return pd.read_parquet(Path(shared_data) / BTS)
