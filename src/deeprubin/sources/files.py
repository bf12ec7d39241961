"""The ``files`` source: light curves from Parquet or CSV tables in any contract-mapped format.

Works for ALeRCE exports (oid or objectId, mjd, fid, magpsf, sigmapsf, isdiffpos, magpsf_corr), ANTARES/BTS
exports (ant_mjd, ant_passband, ant_mag, ant_magerr, or the BTS file's fid/magpsf) and the project's own tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from deeprubin.config import FilesParams
from deeprubin.schema import (
    NON_DETECTIONS_SCHEMA,
    SchemaError,
    empty_frame,
    map_detections,
    map_labels,
    map_non_detections,
)


def read_table(path: Path | str) -> pd.DataFrame:
    """Read one Parquet or CSV file; the format is taken from the suffix."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file {path} does not exist")
    suffix = "".join(path.suffixes[-2:]).lower()
    if suffix.endswith((".parquet", ".pq")):
        return pd.read_parquet(path)
    if suffix.endswith((".csv", ".csv.gz")):
        return pd.read_csv(path)
    raise SchemaError(f"{path}: unknown format {path.suffix!r}; expected .parquet or .csv")


@dataclass
class MappedTables:
    """Tables mapped onto the contract's columns but not yet validated, with the labels that came along."""

    detections: pd.DataFrame
    non_detections: pd.DataFrame
    labels: pd.DataFrame | None
    source: str
    label_source: str | None


def load(params: FilesParams) -> MappedTables:
    """Read and map the configured files (detections required; labels and non-detections optional)."""
    if params.detections is None:
        raise SchemaError("the files source needs files.detections (a Parquet or CSV table)")
    detections = map_detections(read_table(params.detections), source="files")
    non_detections = (map_non_detections(read_table(params.non_detections)) if params.non_detections
                      else empty_frame(NON_DETECTIONS_SCHEMA))
    labels = map_labels(read_table(params.labels)) if params.labels else None
    return MappedTables(detections=detections, non_detections=non_detections, labels=labels, source="files",
                        label_source=params.label_source if labels is not None else None)
