"""The raw light-curve store: the three contract tables in one directory, committed atomically.

Layout of ``data/raw``: ``objects.parquet``, ``detections.parquet``, ``non_detections.parquet`` and
``manifest.json`` (what the last ingest did). A commit writes the whole new state into a sibling temporary
directory and swaps it in with two renames; a crash at any point leaves either the old or the new state, and
:meth:`RawStore.recover` (run on every open) finishes or rolls back an interrupted swap. Rows are upserted by key,
so a rerun never duplicates them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from deeprubin.schema import (
    DETECTION_KEY,
    DETECTIONS_SCHEMA,
    NON_DETECTION_KEY,
    NON_DETECTIONS_SCHEMA,
    OBJECTS_SCHEMA,
    SPECTROSCOPIC,
    LightCurves,
    empty_frame,
)

TABLES = {"objects": OBJECTS_SCHEMA, "detections": DETECTIONS_SCHEMA, "non_detections": NON_DETECTIONS_SCHEMA}
MANIFEST = "manifest.json"
REJECTIONS = "rejections.csv"
STATE = "state.json"  # incremental-pull state (watermarks), committed with the data it describes


@dataclass(frozen=True)
class UpsertCounts:
    objects_new: int
    objects_updated: int
    detections_added: int
    detections_replaced: int
    non_detections_added: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def __add__(self, other: "UpsertCounts") -> "UpsertCounts":
        """The counts of two upserts in a row (a pull's chunks)."""
        return UpsertCounts(**{k: getattr(self, k) + getattr(other, k) for k in self.as_dict()})


def _upsert_rows(old: pd.DataFrame, new: pd.DataFrame, key: tuple[str, ...]) -> tuple[pd.DataFrame, int, int]:
    """Rows of ``new`` replace rows of ``old`` with the same key. Returns (merged, added, replaced)."""
    if old.empty:
        return new.reset_index(drop=True), len(new), 0
    old_keys = pd.MultiIndex.from_frame(old[list(key)])
    new_keys = pd.MultiIndex.from_frame(new[list(key)])
    replaced = int(new_keys.isin(old_keys).sum())
    kept_old = old.loc[~old_keys.isin(new_keys)]
    parts = [f for f in (kept_old, new) if not f.empty]
    merged = pd.concat(parts, ignore_index=True) if parts else old.iloc[0:0]
    return merged.sort_values(list(key), kind="mergesort").reset_index(drop=True), len(new) - replaced, replaced


def upsert(existing: LightCurves, incoming: LightCurves) -> tuple[LightCurves, UpsertCounts]:
    """Merge ``incoming`` into ``existing`` by key; object summaries are recomputed from the merged detections."""
    detections, det_added, det_replaced = _upsert_rows(existing.detections, incoming.detections, DETECTION_KEY)
    non_det, nd_added, _ = _upsert_rows(existing.non_detections, incoming.non_detections, NON_DETECTION_KEY)

    old_objects = existing.objects.set_index("oid")
    new_objects = incoming.objects.set_index("oid")
    is_new = ~new_objects.index.isin(old_objects.index)
    # A newer row without a label keeps the label it had, and so does an object labelled spectroscopically that
    # another source (a classifier) labels again: a spectroscopic label is replaced only by a spectroscopic one.
    known = new_objects.index[~is_new]
    if len(known):
        spectroscopic = (old_objects.loc[known, "label_source"].to_numpy() == SPECTROSCOPIC) \
            & (new_objects.loc[known, "label_source"].to_numpy() != SPECTROSCOPIC)
        carry = new_objects.loc[known, "label"].isna() | spectroscopic
        for col in ("label", "label_source", "label_probability"):
            new_objects.loc[known[carry], col] = old_objects.loc[known[carry], col]
    parts = [f for f in (old_objects.loc[~old_objects.index.isin(new_objects.index)], new_objects) if not f.empty]
    objects = pd.concat(parts) if parts else new_objects
    if not detections.empty:
        stats = detections.groupby("oid")["mjd"].agg(["min", "max", "size"])
        objects = objects.loc[objects.index.isin(stats.index)]
        objects["first_mjd"] = stats.loc[objects.index, "min"].to_numpy()
        objects["last_mjd"] = stats.loc[objects.index, "max"].to_numpy()
        objects["n_det"] = stats.loc[objects.index, "size"].to_numpy().astype("int64")
    objects = objects.sort_index().reset_index()
    counts = UpsertCounts(
        objects_new=int(is_new.sum()),
        objects_updated=int((~is_new).sum()),
        detections_added=det_added,
        detections_replaced=det_replaced,
        non_detections_added=nd_added,
    )
    return LightCurves(objects=objects, detections=detections, non_detections=non_det), counts


class RawStore:
    """The contract tables under one directory (``data/raw``), read whole and committed atomically."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._old = self.root.with_name(self.root.name + ".old")

    def recover(self) -> None:
        """Finish an interrupted commit: keep whichever complete state exists, drop temporaries."""
        if not self.root.exists() and self._old.exists():
            self._old.rename(self.root)  # crashed between the two renames: roll back
        elif self._old.exists():
            shutil.rmtree(self._old)  # crashed after the swap, before cleanup
        parent = self.root.parent
        if parent.exists():
            for stale in parent.glob(f".{self.root.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)

    def exists(self) -> bool:
        self.recover()
        return (self.root / "detections.parquet").exists()

    def read(self) -> LightCurves:
        """The stored tables, or empty contract tables when nothing has been stored yet."""
        self.recover()
        frames = {}
        for name, schema in TABLES.items():
            path = self.root / f"{name}.parquet"
            frames[name] = pq.read_table(path, schema=schema).to_pandas() if path.exists() else empty_frame(schema)
        return LightCurves(**frames)

    def read_manifest(self) -> dict[str, Any] | None:
        self.recover()
        path = self.root / MANIFEST
        return json.loads(path.read_text()) if path.exists() else None

    def read_state(self) -> dict[str, Any]:
        self.recover()
        path = self.root / STATE
        return json.loads(path.read_text()) if path.exists() else {}

    def commit(self, lcs: LightCurves, manifest: dict[str, Any], rejections: pd.DataFrame | None = None,
               state: dict[str, Any] | None = None) -> None:
        """Replace the stored state with ``lcs`` atomically (write aside, fsync, swap by rename).

        ``rejections`` (oid, table, reason, rows), when given, is stored beside the tables as the full record of
        what validation dropped in this ingest. ``state`` (watermarks) is stored with the tables; None keeps the
        state already stored.
        """
        self.recover()
        self.root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.root.name}.tmp-", dir=self.root.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the store is a normal data directory
        try:
            for name, table in lcs.to_arrow().items():
                pq.write_table(table, tmp / f"{name}.parquet", compression="zstd")
            if rejections is not None:
                rejections.to_csv(tmp / REJECTIONS, index=False)
            if state is not None:
                (tmp / STATE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
            elif (self.root / STATE).exists():
                shutil.copyfile(self.root / STATE, tmp / STATE)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
            for path in tmp.iterdir():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
            if self.root.exists():
                self.root.rename(self._old)
            tmp.rename(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self._old, ignore_errors=True)
