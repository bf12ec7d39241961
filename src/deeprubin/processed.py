"""The processed store (``data/processed``): the model-input tensors the ``preprocess`` stage writes, and how to
read them back.

Layout: ``part-XXXXX.npy`` float32 ``(n, C, grid_days)``, one per oid-hash partition (:func:`partition_of`), rows in
oid order; ``index.parquet`` (:data:`INDEX_SCHEMA`: oid, label, partition, shard, row, window, detections per band,
flux_scale, status, fingerprint); ``skipped.parquet`` (:data:`SKIPPED_SCHEMA`); ``manifest.json`` (channels, report,
and ``config``: the preprocessing settings the tensors were made with, which a trained model carries on).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from deeprubin.schema import BAND_INDEX

FORMAT_VERSION = 1
INDEX = "index.parquet"
SKIPPED = "skipped.parquet"
MANIFEST = "manifest.json"

INDEX_SCHEMA = pa.schema([
    pa.field("oid", pa.string(), nullable=False),
    pa.field("label", pa.string()),
    pa.field("partition", pa.int32()),
    pa.field("shard", pa.string()),
    pa.field("row", pa.int64()),
    pa.field("window_start_mjd", pa.float64()),
    pa.field("window_end_mjd", pa.float64()),
    pa.field("anchored", pa.string()),
    pa.field("first_mjd", pa.float64()),
    pa.field("last_mjd", pa.float64()),
    pa.field("n_det_g", pa.int64()),
    pa.field("n_det_r", pa.int64()),
    pa.field("n_fit", pa.int64()),
    pa.field("flux_scale", pa.float64()),
    pa.field("status", pa.string()),
    pa.field("fingerprint", pa.string()),
])
SKIPPED_SCHEMA = pa.schema([
    pa.field("oid", pa.string(), nullable=False),
    pa.field("label", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
    pa.field("fingerprint", pa.string()),
])
META_COLUMNS = [f.name for f in INDEX_SCHEMA if f.name not in ("oid", "label", "partition", "shard", "row",
                                                                 "fingerprint")]


def shard_name(partition: int) -> str:
    return f"part-{partition:05d}.npy"


def partition_of(oid: str, partitions: int) -> int:
    """Stable across runs, machines and Python processes (unlike hash())."""
    digest = hashlib.blake2b(str(oid).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % partitions


def fingerprints(detections: pd.DataFrame) -> dict[str, str]:
    """Per object: a hash of its detections (time, band, flux, error), the key of the incremental cache."""
    out: dict[str, str] = {}
    if detections.empty:
        return out
    det = detections.sort_values(["oid", "mjd", "band"], kind="mergesort")
    mjd = det["mjd"].to_numpy(dtype=np.float64)
    band = det["band"].map(BAND_INDEX).fillna(-1).to_numpy(dtype=np.float64)
    flux = det["flux"].to_numpy(dtype=np.float64)
    err = det["flux_err"].to_numpy(dtype=np.float64)
    table = np.ascontiguousarray(np.stack([mjd, band, flux, err], axis=1))
    oids = det["oid"].astype(str).to_numpy()
    bounds = np.flatnonzero(oids[1:] != oids[:-1]) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(oids)]])
    for s, e in zip(starts, ends):
        out[oids[s]] = hashlib.blake2b(table[s:e].tobytes(), digest_size=16).hexdigest()
    return out



def read_manifest(processed_dir: Path | str) -> dict[str, Any]:
    path = Path(processed_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no processed tensors in {processed_dir}: run `deeprubin preprocess` first")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Preprocessing:
    """The settings that turn light curves into the tensors a model was trained on. A trained model carries them
    (MLmodel metadata and version tags) and every serving path uses the model's, never today's params.yaml."""

    grid_days: int = 100
    fit_context_days: float = 100.0
    channels: tuple[str, ...] = ()

    TAG_PREFIX: ClassVar[str] = "preprocessing/"

    def as_dict(self) -> dict[str, Any]:
        return {"grid_days": int(self.grid_days), "fit_context_days": float(self.fit_context_days),
                "channels": list(self.channels)}

    def as_tags(self) -> dict[str, str]:
        return {self.TAG_PREFIX + "grid_days": str(int(self.grid_days)),
                self.TAG_PREFIX + "fit_context_days": repr(float(self.fit_context_days)),
                self.TAG_PREFIX + "channels": ",".join(self.channels)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Preprocessing":
        return cls(grid_days=int(values["grid_days"]), fit_context_days=float(values["fit_context_days"]),
                   channels=tuple(values.get("channels") or ()))

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> "Preprocessing | None":
        p = cls.TAG_PREFIX
        if p + "grid_days" not in tags or p + "fit_context_days" not in tags:
            return None
        channels = tags.get(p + "channels", "")
        return cls(grid_days=int(tags[p + "grid_days"]), fit_context_days=float(tags[p + "fit_context_days"]),
                   channels=tuple(channels.split(",")) if channels else ())


def preprocessing_of(processed_dir: Path | str) -> Preprocessing:
    """The settings the tensors in ``processed_dir`` were made with (from its manifest)."""
    config = read_manifest(processed_dir)["config"]
    return Preprocessing(grid_days=int(config["grid_days"]), fit_context_days=float(config["fit_context_days"]),
                         channels=tuple(config["channels"]))


def read_previous(processed_dir: Path, key: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(index, skipped) of an earlier output made with the same ``key`` (configuration and code), else None."""
    try:
        manifest = json.loads((processed_dir / MANIFEST).read_text())
        if manifest.get("config") != key:
            return None
        index = pq.read_table(processed_dir / INDEX).to_pandas()
        skipped = pq.read_table(processed_dir / SKIPPED).to_pandas()
        for shard in index["shard"].unique():
            if not (processed_dir / shard).exists():
                return None
        return index, skipped
    except (OSError, ValueError, KeyError, pa.ArrowException):
        return None



def load_processed(processed_dir: Path | str) -> tuple[np.ndarray, pd.DataFrame]:
    """All tensors (N, C, G) in index order, and the index."""
    processed_dir = Path(processed_dir)
    index = pq.read_table(processed_dir / INDEX).to_pandas()
    manifest = json.loads((processed_dir / MANIFEST).read_text())
    if index.empty:
        return np.zeros((0, *manifest["shape"][1:]), dtype=np.float32), index
    shards = {s: np.load(processed_dir / s, mmap_mode="r") for s in index["shard"].unique()}
    x = np.stack([np.asarray(shards[s][r]) for s, r in zip(index["shard"], index["row"])])
    return x, index

