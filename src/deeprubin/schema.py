"""The light-curve contract: Parquet schemas, column mapping and validation.

Every source (ALeRCE, files, the simulator) yields tables in this shape; every later stage reads only this shape.
One alias table maps the column names of known formats onto the contract (the sncosmo ``photdata`` habit), and
validation drops bad rows explicitly, with a reason that names the object: nothing is dropped silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

CLASSES: tuple[str, ...] = ("QSO", "CEP", "SNIa", "SNII")
BANDS: tuple[str, ...] = ("g", "r")
# Band -> row of a (2, ...) per-band array, everywhere (GP, tensors, fingerprints, alert packets).
BAND_INDEX: dict[str, int] = {b: i for i, b in enumerate(BANDS)}
# Older ALeRCE files and taxonomies spell some classes differently.
CLASS_ALIASES: dict[str, str] = {"Ceph": "CEP", "SNII": "SNII", "SNIa": "SNIa", "QSO": "QSO", "CEP": "CEP"}

# Label provenance (objects.label_source). A spectroscopic type outranks a classifier's guess: see
# :func:`deeprubin.store.upsert`; evaluation scores supernovae on spectroscopic labels (evaluation/sets.py).
SPECTROSCOPIC = "bts:spectroscopic"
SIMULATED_LABELS = "simulated"
# Label sources that are ground truth (the simulator's labels are true by construction).
TRUE_LABEL_SOURCES: tuple[str, ...] = (SPECTROSCOPIC, SIMULATED_LABELS)

AB_ZERO_POINT_UJY = 23.9  # m_AB = 23.9 - 2.5 log10(F / µJy)
MJD_FROM_JD = 2400000.5
# Plausibility of ZTF-like photometry (README "The light-curve contract"). A point brighter than magnitude 5 or
# fainter than 30 is no ZTF-like measurement (ZTF saturates near 12.5 and reaches about 21; a 99 or -99 is a
# sentinel); a time outside 1990-2050 is no MJD of such a survey, and one near 2,4xx,xxx is a Julian Date.
PLAUSIBLE_MAG = (5.0, 30.0)            # brightest, faintest AB magnitude
PLAUSIBLE_MJD = (47892.0, 69807.0)     # 1990-01-01, 2050-01-01
JD_LIKE = (2_400_000.0, 2_500_000.0)   # a JD (years 1858-2132) where an MJD belongs
MAG_TOO_BRIGHT = f"magnitude brighter than {PLAUSIBLE_MAG[0]:g} (implausible for ZTF-like photometry)"
MAG_TOO_FAINT = f"magnitude fainter than {PLAUSIBLE_MAG[1]:g} (implausible for ZTF-like photometry: a sentinel " \
                f"such as 99?)"
TIME_LOOKS_LIKE_JD = "time looks like a Julian Date, not an MJD: subtract 2400000.5"
TIME_NOT_PLAUSIBLE_MJD = "time is not a plausible MJD (before 1990 or after 2050)"
# Point reasons (the point is dropped), then object reasons (every row of the object is dropped).
PLAUSIBILITY_REASONS: tuple[str, ...] = (MAG_TOO_BRIGHT, MAG_TOO_FAINT, TIME_LOOKS_LIKE_JD, TIME_NOT_PLAUSIBLE_MJD)
# ZTF filter ids as used by ALeRCE and ANTARES; fid 3 (i) is outside the contract.
ZTF_FID_TO_BAND: dict[int, str] = {1: "g", 2: "r", 3: "i"}

OBJECTS_SCHEMA = pa.schema(
    [
        pa.field("oid", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("label_source", pa.string()),
        pa.field("label_probability", pa.float64()),
        pa.field("first_mjd", pa.float64()),
        pa.field("last_mjd", pa.float64()),
        pa.field("n_det", pa.int64()),
        pa.field("source", pa.string()),
        pa.field("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)

DETECTIONS_SCHEMA = pa.schema(
    [
        pa.field("oid", pa.string(), nullable=False),
        pa.field("mjd", pa.float64(), nullable=False),
        pa.field("band", pa.string(), nullable=False),
        pa.field("mag", pa.float64()),
        pa.field("mag_err", pa.float64()),
        pa.field("flux", pa.float64()),  # µJy, difference flux, negative when isdiffpos says so
        pa.field("flux_err", pa.float64()),
        # Apparent ("corrected") magnitude, ALeRCE's magpsf_corr: only for sources with a reference counterpart.
        pa.field("mag_corr", pa.float64()),
        pa.field("mag_corr_err", pa.float64()),
        pa.field("source", pa.string()),
    ]
)

NON_DETECTIONS_SCHEMA = pa.schema(
    [
        pa.field("oid", pa.string(), nullable=False),
        pa.field("mjd", pa.float64(), nullable=False),
        pa.field("band", pa.string(), nullable=False),
        pa.field("diffmaglim", pa.float64()),
    ]
)

DETECTION_KEY = ("oid", "mjd", "band")
NON_DETECTION_KEY = ("oid", "mjd", "band")

# Contract column -> accepted input names, in order of preference (first present wins).
DETECTION_ALIASES: dict[str, tuple[str, ...]] = {
    "oid": ("oid", "objectId", "object_id", "ant_objectid", "snid"),
    "mjd": ("mjd", "ant_mjd", "time"),
    "jd": ("jd",),
    "band": ("band", "ant_passband", "passband", "filter"),
    "fid": ("fid",),
    "mag": ("mag", "magpsf", "ant_mag"),
    "mag_err": ("mag_err", "sigmapsf", "ant_magerr", "magerr"),
    "flux": ("flux",),
    "flux_err": ("flux_err",),
    "isdiffpos": ("isdiffpos",),
    "mag_corr": ("mag_corr", "magpsf_corr"),
    "mag_corr_err": ("mag_corr_err", "sigmapsf_corr"),
    "photometry": ("photometry",),
}
# What a detection's brightness is (a declaration; deeprubin.lightcurves.presentation): the difference flux of an
# alert stream, or an apparent magnitude (forced photometry, other surveys).
PHOTOMETRIES: tuple[str, ...] = ("difference", "apparent")
NON_DETECTION_ALIASES: dict[str, tuple[str, ...]] = {
    "oid": DETECTION_ALIASES["oid"],
    "mjd": ("mjd", "ant_mjd"),
    "jd": ("jd",),
    "band": DETECTION_ALIASES["band"],
    "fid": ("fid",),
    "diffmaglim": ("diffmaglim", "limiting_mag", "ant_maglim"),
}
LABEL_ALIASES: dict[str, tuple[str, ...]] = {
    "oid": DETECTION_ALIASES["oid"],
    "label": ("label", "classALeRCE", "class", "class_name", "type"),
    "label_probability": ("label_probability", "probability"),
}
# Band spellings seen in ZTF, ANTARES and ALeRCE exports.
BAND_ALIASES: dict[str, str] = {"g": "g", "r": "r", "i": "i", "zg": "g", "zr": "r", "zi": "i", "ztfg": "g", "ztfr": "r",
                                "ztf_g": "g", "ztf_r": "r", "1": "g", "2": "r", "3": "i"}


class SchemaError(ValueError):
    """A table cannot be mapped onto the contract at all (a required column is missing)."""


@dataclass(frozen=True)
class Rejection:
    """Rows of one object dropped for one reason."""

    oid: str
    reason: str
    rows: int

    def __str__(self) -> str:
        return f"{self.oid}: {self.rows} row(s) dropped: {self.reason}"


@dataclass
class ValidationReport:
    """What validation kept and dropped, per reason and per object."""

    table: str
    rows_in: int = 0
    rows_out: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    # Where each validation step's rejections start in ``rejections`` (one entry per step, whatever it found): the
    # reports of consecutive blocks of one table merge into the whole table's report (:meth:`merge_blocks`).
    steps: list[int] = field(default_factory=list, repr=False, compare=False)

    def step(self) -> None:
        """Start the next validation step (the rejections recorded until the next one belong to it)."""
        self.steps.append(len(self.rejections))

    @property
    def rows_dropped(self) -> int:
        return self.rows_in - self.rows_out

    def by_reason(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for r in self.rejections:
            counts[r.reason] += r.rows
        return dict(counts)

    def reject(self, frame: pd.DataFrame, mask: pd.Series | np.ndarray, reason: str) -> pd.DataFrame:
        """Record the rows under ``mask`` as rejected for ``reason``, per object, and return the rest (one step)."""
        self.step()
        return self._reject(frame, mask, reason)

    def _reject(self, frame: pd.DataFrame, mask: pd.Series | np.ndarray, reason: str) -> pd.DataFrame:
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            oids = frame.loc[mask, "oid"]
            oids = oids.astype(object).where(oids.notna(), "").astype(str)  # rows without an oid count too, as ""
            for oid, n in oids.value_counts(sort=False, dropna=False).items():
                self.rejections.append(Rejection(oid=str(oid), reason=reason, rows=int(n)))
        return frame.loc[~mask]

    def merge(self, other: "ValidationReport") -> "ValidationReport":
        return ValidationReport(
            table=self.table,
            rows_in=self.rows_in + other.rows_in,
            rows_out=self.rows_out + other.rows_out,
            rejections=self.rejections + other.rejections,
        )

    @staticmethod
    def merge_blocks(reports: list["ValidationReport"]) -> "ValidationReport":
        """The report of a table validated block by block (consecutive oid ranges of one table, each through the
        same steps): the report that validating the whole table at once gives, with the rejections in the same order
        (step by step, and within a step in table order)."""
        first = reports[0]
        merged = ValidationReport(table=first.table, rows_in=sum(r.rows_in for r in reports),
                                  rows_out=sum(r.rows_out for r in reports))
        n_steps = len(first.steps)
        if any(len(r.steps) != n_steps for r in reports):
            raise ValueError("blocks of one table went through different validation steps")
        groups: list[list[Rejection]] = [[] for _ in range(n_steps + 1)]
        for r in reports:
            bounds = [0, *r.steps, len(r.rejections)]
            for k in range(n_steps + 1):
                groups[k].extend(r.rejections[bounds[k]:bounds[k + 1]])
        for group in groups:
            merged.step()
            merged.rejections.extend(group)
        merged.steps = merged.steps[1:]
        return merged

    def summary(self) -> str:
        head = f"{self.table}: {self.rows_in} in, {self.rows_out} kept, {self.rows_dropped} dropped"
        if not self.rejections:
            return head
        reasons = ", ".join(f"{reason} ({n})" for reason, n in sorted(self.by_reason().items()))
        return f"{head}: {reasons}"


@dataclass
class LightCurves:
    """A batch of light curves in the contract: objects, detections and (possibly empty) non-detections."""

    objects: pd.DataFrame
    detections: pd.DataFrame
    non_detections: pd.DataFrame

    def __post_init__(self) -> None:
        for name, frame, schema in self._tables():
            missing = [c for c in schema.names if c not in frame.columns]
            if missing:
                raise SchemaError(f"{name} table is missing contract column(s) {missing}")

    def _tables(self):
        return (
            ("objects", self.objects, OBJECTS_SCHEMA),
            ("detections", self.detections, DETECTIONS_SCHEMA),
            ("non_detections", self.non_detections, NON_DETECTIONS_SCHEMA),
        )

    def to_arrow(self) -> dict[str, pa.Table]:
        return {name: to_arrow(frame, schema) for name, frame, schema in self._tables()}

    @property
    def n_objects(self) -> int:
        return len(self.objects)


def empty_frame(schema: pa.Schema) -> pd.DataFrame:
    return schema.empty_table().to_pandas()


def to_arrow(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """Cast a contract frame to its Arrow schema (extra columns are dropped, types enforced)."""
    frame = frame.loc[:, list(schema.names)]
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def mag_to_flux(mag: np.ndarray, mag_err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AB magnitude and its error -> flux and flux error in µJy (zero point 23.9)."""
    mag = np.asarray(mag, dtype=float)
    flux = 10.0 ** (-0.4 * (mag - AB_ZERO_POINT_UJY))
    return flux, flux * np.log(10.0) / 2.5 * np.asarray(mag_err, dtype=float)


def flux_to_mag(flux: np.ndarray, flux_err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|flux| and flux error in µJy -> AB magnitude and its error (the sign is carried by isdiffpos)."""
    flux = np.abs(np.asarray(flux, dtype=float))
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = AB_ZERO_POINT_UJY - 2.5 * np.log10(flux)
        mag_err = 2.5 / np.log(10.0) * np.asarray(flux_err, dtype=float) / flux
    return mag, mag_err


def _ujy(mag: float) -> float:
    return float(10.0 ** (-0.4 * (mag - AB_ZERO_POINT_UJY)))


def implausible_brightness(flux: np.ndarray, flux_err: np.ndarray) -> list[tuple[np.ndarray, str]]:
    """``[(mask, reason), ...]``: points whose brightness no ZTF-like photometry gives (:data:`PLAUSIBLE_MAG`).

    Judged on the flux (µJy), so a magnitude given and one derived from a flux are judged alike: brighter than
    magnitude 5 is ``|flux|`` above 3.6e7 µJy; fainter than 30 is ``|flux|`` *and* ``flux_err`` below 0.0036 µJy,
    what a given magnitude over 30 (a 99 sentinel) becomes, while a difference flux near 0 with a real error (ZTF's
    are microjanskys) is a plausible measurement of nothing and is kept."""
    flux = np.abs(np.asarray(flux, dtype=float))
    err = np.asarray(flux_err, dtype=float)
    faintest = _ujy(PLAUSIBLE_MAG[1])
    finite = np.isfinite(flux) & np.isfinite(err)  # a NaN or infinity is another rule's ("not finite")
    with np.errstate(invalid="ignore"):
        return [(finite & (flux > _ujy(PLAUSIBLE_MAG[0])), MAG_TOO_BRIGHT),
                (finite & (flux < faintest) & (err < faintest), MAG_TOO_FAINT)]


def implausible_time(mjd: np.ndarray) -> tuple[str, str] | None:
    """``(reason, detail)`` when any finite time of one object is not a plausible MJD (:data:`PLAUSIBLE_MJD`; a JD,
    :data:`JD_LIKE`, says so and how to fix it), else None. The whole object is then rejected: its time column is
    wrong, not one point."""
    mjd = np.asarray(mjd, dtype=float)
    mjd = mjd[np.isfinite(mjd)]
    jd = (mjd >= JD_LIKE[0]) & (mjd <= JD_LIKE[1])
    if jd.any():
        return TIME_LOOKS_LIKE_JD, f"{int(jd.sum())} of {len(mjd)} time(s) from {mjd[jd].min():.5f} to " \
                                   f"{mjd[jd].max():.5f}; as MJD: {mjd[jd].min() - MJD_FROM_JD:.5f}"
    out = (mjd < PLAUSIBLE_MJD[0]) | (mjd > PLAUSIBLE_MJD[1])
    if out.any():
        return TIME_NOT_PLAUSIBLE_MJD, f"{int(out.sum())} of {len(mjd)} time(s) from {mjd[out].min():.5f} to " \
                                       f"{mjd[out].max():.5f}, outside MJD {PLAUSIBLE_MJD[0]:g}-{PLAUSIBLE_MJD[1]:g}"
    return None


def normalise_label(label: object) -> str | None:
    if label is None or (isinstance(label, float) and np.isnan(label)):
        return None
    text = str(label).strip()
    return CLASS_ALIASES.get(text, text)


def _pick(frame: pd.DataFrame, aliases: dict[str, tuple[str, ...]], name: str) -> str | None:
    for candidate in aliases[name]:
        if candidate in frame.columns:
            return candidate
    return None


#: isdiffpos spellings (stripped, lower case) of a negative difference; anything else is positive
ISDIFFPOS_NEGATIVE = frozenset({"f", "false", "-1", "-1.0", "0", "0.0", "n", "no"})


def isdiffpos_sign(values: pd.Series) -> np.ndarray:
    """ALeRCE/ZTF isdiffpos ('t'/'f', 1/-1, True/False, '1'/'0') -> +1 / -1; unknown is +1."""
    text = values.astype(str).str.strip().str.lower()
    negative = text.isin(ISDIFFPOS_NEGATIVE)
    return np.where(negative.to_numpy(), -1.0, 1.0)


def _bands(frame: pd.DataFrame, aliases: dict[str, tuple[str, ...]]) -> pd.Series:
    band_col = _pick(frame, aliases, "band")
    if band_col is not None:
        raw = frame[band_col].astype(str).str.strip()
    else:
        fid_col = _pick(frame, aliases, "fid")
        if fid_col is None:
            raise SchemaError("no band column: expected one of "
                              f"{list(aliases['band']) + list(aliases['fid'])}")
        raw = frame[fid_col].astype(str).str.replace(r"\.0$", "", regex=True)
    codes, names = pd.factorize(raw)  # map each distinct spelling once, not each row
    mapped = np.array([BAND_ALIASES.get(b, BAND_ALIASES.get(b.lower(), b)) for b in names], dtype=object)
    return pd.Series(mapped[codes] if len(mapped) else np.array([], dtype=object), index=raw.index)


def _times(frame: pd.DataFrame, aliases: dict[str, tuple[str, ...]]) -> pd.Series:
    mjd_col = _pick(frame, aliases, "mjd")
    if mjd_col is not None:
        return pd.to_numeric(frame[mjd_col], errors="coerce").astype(float)
    jd_col = _pick(frame, aliases, "jd")
    if jd_col is None:
        raise SchemaError(f"no time column: expected one of {list(aliases['mjd']) + list(aliases['jd'])}")
    return pd.to_numeric(frame[jd_col], errors="coerce").astype(float) - MJD_FROM_JD


def _require(frame: pd.DataFrame, aliases: dict[str, tuple[str, ...]], name: str) -> str:
    col = _pick(frame, aliases, name)
    if col is None:
        raise SchemaError(f"no {name} column: expected one of {list(aliases[name])}; got {list(frame.columns)}")
    return col


def map_detections(frame: pd.DataFrame, source: str, oid: str | None = None) -> pd.DataFrame:
    """Map a detections table of a known format (ALeRCE, ANTARES/BTS, the simulator) onto the contract.

    ``oid`` supplies the object id for per-object tables that carry none (ALeRCE detection rows).
    Values are not validated here; see :func:`validate_detections`.
    """
    out = pd.DataFrame(index=frame.index)
    if oid is not None:
        out["oid"] = oid
    else:
        out["oid"] = frame[_require(frame, DETECTION_ALIASES, "oid")].astype(str)
    out["mjd"] = _times(frame, DETECTION_ALIASES)
    out["band"] = _bands(frame, DETECTION_ALIASES)

    mag_col = _pick(frame, DETECTION_ALIASES, "mag")
    flux_col = _pick(frame, DETECTION_ALIASES, "flux")
    if flux_col is not None and _pick(frame, DETECTION_ALIASES, "flux_err") is not None:
        # A signed flux wins over a magnitude: the contract's `mag` is the magnitude of |flux| and has no sign.
        mag_col = None
    if mag_col is not None:
        mag = pd.to_numeric(frame[mag_col], errors="coerce").astype(float).to_numpy()
        mag_err = pd.to_numeric(frame[_require(frame, DETECTION_ALIASES, "mag_err")], errors="coerce")
        mag_err = mag_err.astype(float).to_numpy()
        flux, flux_err = mag_to_flux(mag, mag_err)
        isdiffpos_col = _pick(frame, DETECTION_ALIASES, "isdiffpos")
        if isdiffpos_col is not None:
            flux = flux * isdiffpos_sign(frame[isdiffpos_col])
    elif flux_col is not None:
        flux = pd.to_numeric(frame[flux_col], errors="coerce").astype(float).to_numpy()
        flux_err = pd.to_numeric(frame[_require(frame, DETECTION_ALIASES, "flux_err")], errors="coerce")
        flux_err = flux_err.astype(float).to_numpy()
        mag, mag_err = flux_to_mag(flux, flux_err)
    else:
        raise SchemaError(f"no brightness column: expected one of {list(DETECTION_ALIASES['mag'])} or 'flux'")
    out["mag"], out["mag_err"], out["flux"], out["flux_err"] = mag, mag_err, flux, flux_err

    for name in ("mag_corr", "mag_corr_err"):
        col = _pick(frame, DETECTION_ALIASES, name)
        out[name] = pd.to_numeric(frame[col], errors="coerce").astype(float) if col else np.nan
    out["source"] = source
    return out.reset_index(drop=True)


def map_photometry(frame: pd.DataFrame) -> pd.Series | None:
    """The photometry each input row declares: its ``photometry`` column (difference|apparent, any case; blank:
    undeclared), else ``difference`` where ``isdiffpos`` is given (a signed difference by construction); None when
    the table declares nothing. Unknown values are kept as given, for :func:`validate_detections` to reject."""
    col = _pick(frame, DETECTION_ALIASES, "photometry")
    if col is not None:
        text = frame[col].astype(str).str.strip().str.lower().to_numpy(dtype=object)
        blank = frame[col].isna().to_numpy() | (text == "")
        return pd.Series(np.where(blank, None, text), dtype=object)
    if _pick(frame, DETECTION_ALIASES, "isdiffpos") is not None:
        return pd.Series(PHOTOMETRIES[0], index=range(len(frame)), dtype=object)
    return None


def map_non_detections(frame: pd.DataFrame, oid: str | None = None) -> pd.DataFrame:
    """Map an upper-limits table (ALeRCE non_detections: mjd or jd, fid, diffmaglim) onto the contract."""
    out = pd.DataFrame(index=frame.index)
    out["oid"] = oid if oid is not None else frame[_require(frame, NON_DETECTION_ALIASES, "oid")].astype(str)
    out["mjd"] = _times(frame, NON_DETECTION_ALIASES)
    out["band"] = _bands(frame, NON_DETECTION_ALIASES)
    out["diffmaglim"] = pd.to_numeric(frame[_require(frame, NON_DETECTION_ALIASES, "diffmaglim")],
                                      errors="coerce").astype(float)
    return out.reset_index(drop=True)


def map_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """Map a labels table (oid + label, optionally a probability) onto oid, label, label_probability."""
    out = pd.DataFrame(index=frame.index)
    out["oid"] = frame[_require(frame, LABEL_ALIASES, "oid")].astype(str)
    out["label"] = frame[_require(frame, LABEL_ALIASES, "label")].map(normalise_label)
    prob = _pick(frame, LABEL_ALIASES, "label_probability")
    out["label_probability"] = pd.to_numeric(frame[prob], errors="coerce") if prob else np.nan
    return out.reset_index(drop=True)


def _drop_bad_points(frame: pd.DataFrame, report: ValidationReport, value_cols: Iterable[str],
                     positive_cols: Iterable[str]) -> pd.DataFrame:
    frame = report.reject(frame, frame["oid"].isna() | (frame["oid"].astype(str).str.strip() == ""),
                          "missing object id")
    frame = report.reject(frame, ~np.isfinite(frame["mjd"].to_numpy(dtype=float)), "time is NaN or infinite")
    frame = report.reject(frame, ~frame["band"].isin(BANDS), f"band not in {list(BANDS)}")
    for col in value_cols:
        values = frame[col].to_numpy(dtype=float)
        frame = report.reject(frame, np.isnan(values), f"{col} is NaN")
        values = frame[col].to_numpy(dtype=float)
        frame = report.reject(frame, np.isinf(values), f"{col} is infinite")
    for col in positive_cols:
        frame = report.reject(frame, ~(frame[col].to_numpy(dtype=float) > 0), f"{col} is not positive")
    return frame


def _drop_implausible(frame: pd.DataFrame, report: ValidationReport) -> pd.DataFrame:
    """Objects whose times are no plausible MJD (all their rows, :func:`implausible_time`), then points whose
    brightness is implausible (:func:`implausible_brightness`)."""
    mjd = frame["mjd"].to_numpy(dtype=float)
    jd = (mjd >= JD_LIKE[0]) & (mjd <= JD_LIKE[1])
    outside = ~jd & ((mjd < PLAUSIBLE_MJD[0]) | (mjd > PLAUSIBLE_MJD[1]))
    oid = frame["oid"].astype(str)
    jd_objects = oid.isin(set(oid[jd])).to_numpy()
    outside_objects = ~jd_objects & oid.isin(set(oid[outside])).to_numpy()
    frame = report.reject(frame, jd_objects, TIME_LOOKS_LIKE_JD)
    frame = report.reject(frame, outside_objects[~jd_objects], TIME_NOT_PLAUSIBLE_MJD)
    flags = np.zeros(len(frame), dtype=np.int64)  # 0: plausible, k: the k-th reason (the masks are disjoint)
    masks = implausible_brightness(frame["flux"].to_numpy(dtype=float), frame["flux_err"].to_numpy(dtype=float))
    for k, (mask, _) in enumerate(masks, start=1):
        flags[mask & (flags == 0)] = k
    for k, (_, reason) in enumerate(masks, start=1):
        hit = flags == k
        frame, flags = report.reject(frame, hit, reason), flags[~hit]
    return frame


def _drop_unsorted_and_duplicates(frame: pd.DataFrame, report: ValidationReport, key: tuple[str, ...],
                                  on_unsorted: str) -> pd.DataFrame:
    # Rows of an object whose times run backwards are reported; then sorted (policy "sort") or dropped ("reject").
    order = frame.groupby("oid", sort=False)["mjd"].diff()
    backwards = (order < 0).to_numpy()
    report.step()  # a step whether or not it finds anything, so that every block goes through the same steps
    if backwards.any():
        oids = frame.loc[backwards, "oid"].unique()
        unsorted_rows = frame["oid"].isin(oids).to_numpy()
        if on_unsorted == "reject":
            frame = report._reject(frame, unsorted_rows, "times not sorted")
        else:
            for oid in oids:
                report.rejections.append(Rejection(oid=str(oid), reason="times not sorted (re-sorted, kept)", rows=0))
    dup = frame.duplicated(subset=list(key), keep="first").to_numpy()
    frame = report.reject(frame, dup, f"duplicate key {tuple(key)}")
    return frame.sort_values(["oid", "mjd", "band"], kind="mergesort").reset_index(drop=True)


def validate_detections(frame: pd.DataFrame, on_unsorted: str = "sort") -> tuple[pd.DataFrame, ValidationReport]:
    """Drop detections that break the contract, naming each object and reason in the report.

    Rules: missing oid; NaN/inf time; band not g or r; NaN/inf mag, mag_err, flux or flux_err; mag_err or flux_err
    not positive; a time that is no plausible MJD (every row of that object: a JD, or outside 1990-2050); a
    brightness no ZTF-like photometry gives (:func:`implausible_brightness`); a ``photometry`` value (when given) not
    in :data:`PHOTOMETRIES`; duplicate (oid, mjd, band) (the first is kept). Objects whose rows are not in time order are re-sorted (``on_unsorted="sort"``, reported with 0
    rows dropped) or dropped whole (``"reject"``).
    """
    if on_unsorted not in ("sort", "reject"):
        raise ValueError(f"on_unsorted must be 'sort' or 'reject', not {on_unsorted!r}")
    report = ValidationReport(table="detections", rows_in=len(frame))
    frame = _drop_bad_points(frame, report, ("mag", "mag_err", "flux", "flux_err"), ("mag_err", "flux_err"))
    frame = _drop_implausible(frame, report)
    if "photometry" in frame.columns:  # optional: rows that declare their photometry
        unknown = frame["photometry"].notna() & ~frame["photometry"].isin(PHOTOMETRIES)
        frame = report.reject(frame, unknown, f"photometry not in {list(PHOTOMETRIES)}")
    frame = _drop_unsorted_and_duplicates(frame, report, DETECTION_KEY, on_unsorted)
    report.rows_out = len(frame)
    return frame, report


def validate_non_detections(frame: pd.DataFrame) -> tuple[pd.DataFrame, ValidationReport]:
    """Drop upper limits that break the contract (same rules as detections, on diffmaglim)."""
    report = ValidationReport(table="non_detections", rows_in=len(frame))
    frame = _drop_bad_points(frame, report, ("diffmaglim",), ())
    frame = _drop_unsorted_and_duplicates(frame, report, NON_DETECTION_KEY, "sort")
    report.rows_out = len(frame)
    return frame, report


def build_objects(detections: pd.DataFrame, labels: pd.DataFrame | None, source: str, label_source: str | None,
                  ingested_at: pd.Timestamp | None = None) -> pd.DataFrame:
    """The objects table for validated detections: one row per object that kept at least one detection."""
    ingested_at = ingested_at if ingested_at is not None else pd.Timestamp.now(tz="UTC")
    if detections.empty:
        return empty_frame(OBJECTS_SCHEMA)
    grouped = detections.groupby("oid", sort=True)["mjd"]
    objects = pd.DataFrame({"first_mjd": grouped.min(), "last_mjd": grouped.max(), "n_det": grouped.size()})
    objects.index.name = "oid"
    objects = objects.reset_index()
    if labels is not None and not labels.empty:
        labels = labels.drop_duplicates("oid", keep="last")
        objects = objects.merge(labels[["oid", "label", "label_probability"]], on="oid", how="left")
        objects["label_source"] = np.where(objects["label"].notna(), label_source, None)
    else:
        objects["label"], objects["label_probability"], objects["label_source"] = None, np.nan, None
    objects["source"] = source
    objects["ingested_at"] = ingested_at
    objects["n_det"] = objects["n_det"].astype("int64")
    return objects.loc[:, list(OBJECTS_SCHEMA.names)]
