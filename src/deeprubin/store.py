"""The raw light-curve store: the three contract tables in one directory, committed atomically.

Layout of ``data/raw``: ``objects.parquet``, ``detections.parquet``, ``non_detections.parquet`` and
``manifest.json`` (what the last ingest did). A commit writes the whole new state into a sibling temporary
directory and swaps it in with two renames; a crash at any point leaves either the old or the new state, and
:meth:`RawStore.recover` (run by the next commit, never by a read) finishes or rolls back an interrupted swap,
touching only the folders the store made itself (they bear :data:`MARKER`). Rows are upserted by key, so a rerun
never duplicates them.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import socket
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
# In every folder a commit makes beside the store (and in the store while it is being set aside): recovery touches
# only folders that bear it.
MARKER = ".deeprubin-raw-store-commit"


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
    """The contract tables under one directory (``data/raw``), read whole and committed atomically.

    A commit works in folders of its own beside the store, named ``.<root>.deeprubin-commit-*`` (the new state) and
    ``.<root>.deeprubin-previous-*`` (the state it replaces, until the swap is done), each with a :data:`MARKER`
    file written when the folder is made. Only a writer (:meth:`commit`) recovers an interrupted commit
    (:meth:`recover`), and only folders bearing the marker are ever removed or restored: a user's own ``raw.old``
    or ``.raw.tmp-x`` is never touched, and reading changes nothing."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    # --- the folders a commit makes -------------------------------------------------------------------------------

    @property
    def _commit_prefix(self) -> str:
        return f".{self.root.name}.deeprubin-commit-"

    @property
    def _previous_prefix(self) -> str:
        return f".{self.root.name}.deeprubin-previous-"

    def _ours(self, prefix: str) -> list[Path]:
        """This store's own folders named ``prefix*`` (bearing the marker), oldest first."""
        parent = self.root.parent
        if not parent.is_dir():
            return []
        found = [p for p in parent.glob(f"{glob.escape(prefix)}*")
                 if p.is_dir() and not p.is_symlink() and _marked(p)]
        return sorted(found, key=lambda p: p.stat().st_mtime)

    def _make_commit_dir(self) -> Path:
        """A new folder for the next state, marked as this store's from the start."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=self._commit_prefix, dir=self.root.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the store is a normal data directory
        _mark(tmp)
        return tmp

    def _previous_name(self) -> Path:
        while True:
            candidate = self.root.with_name(f"{self._previous_prefix}{secrets.token_hex(4)}")
            if not candidate.exists() and not candidate.is_symlink():
                return candidate

    def _current(self) -> Path:
        """Where the stored state is: the store itself, or, while a commit is between its two renames (or was
        interrupted there), the previous state it set aside. Read only: nothing is moved."""
        if self.root.exists():
            return self.root
        previous = self._ours(self._previous_prefix)
        return previous[-1] if previous else self.root

    # --- recovery (writers only) ----------------------------------------------------------------------------------

    def recover(self) -> None:
        """Finish an interrupted commit: keep whichever complete state exists, drop this store's temporaries.

        Run by :meth:`commit` before it writes, never by a read. Only folders bearing this store's marker are
        restored or removed; a commit still in progress in another live process on this machine is left alone."""
        previous = [p for p in self._ours(self._previous_prefix) if not _writer_alive(p)]
        if not self.root.exists() and previous:
            previous.pop().rename(self.root)  # crashed between the two renames: roll back
        for stale in previous:
            shutil.rmtree(stale, ignore_errors=True)  # crashed after the swap, before cleanup
        for stale in self._ours(self._commit_prefix):
            if not _writer_alive(stale):
                shutil.rmtree(stale, ignore_errors=True)
        (self.root / MARKER).unlink(missing_ok=True)  # the new state's marker, left by a crash before cleanup

    # --- reading (changes nothing) --------------------------------------------------------------------------------

    def exists(self) -> bool:
        return (self._current() / "detections.parquet").exists()

    def read(self) -> LightCurves:
        """The stored tables, or empty contract tables when nothing has been stored yet."""
        root = self._current()
        frames = {}
        for name, schema in TABLES.items():
            path = root / f"{name}.parquet"
            frames[name] = pq.read_table(path, schema=schema).to_pandas() if path.exists() else empty_frame(schema)
        return LightCurves(**frames)

    def read_manifest(self) -> dict[str, Any] | None:
        path = self._current() / MANIFEST
        return json.loads(path.read_text()) if path.exists() else None

    def read_state(self) -> dict[str, Any]:
        path = self._current() / STATE
        return json.loads(path.read_text()) if path.exists() else {}

    # --- writing --------------------------------------------------------------------------------------------------

    def commit(self, lcs: LightCurves, manifest: dict[str, Any], rejections: pd.DataFrame | None = None,
               state: dict[str, Any] | None = None) -> None:
        """Replace the stored state with ``lcs`` atomically (write aside, fsync, swap by rename).

        ``rejections`` (oid, table, reason, rows), when given, is stored beside the tables as the full record of
        what validation dropped in this ingest. ``state`` (watermarks) is stored with the tables; None keeps the
        state already stored.
        """
        self.recover()
        tmp = self._make_commit_dir()
        previous: Path | None = None
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
                _mark(self.root)  # set aside, it is this store's previous state: the next writer may remove it
                previous = self._previous_name()
                self.root.rename(previous)
            tmp.rename(self.root)
        except BaseException:
            if previous is not None and not self.root.exists() and previous.exists():
                previous.rename(self.root)  # the swap failed half way: the previous state goes back
                previous = None
            shutil.rmtree(tmp, ignore_errors=True)
            (self.root / MARKER).unlink(missing_ok=True)
            raise
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        (self.root / MARKER).unlink(missing_ok=True)


def _mark(folder: Path) -> None:
    (folder / MARKER).write_text(json.dumps({"written_by": "deeprubin raw store commit", "pid": os.getpid(),
                                             "host": socket.gethostname()}) + "\n")


def _marked(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _writer_alive(folder: Path) -> bool:
    """Whether the process that made this commit folder is still running on this machine (its commit is then in
    progress, not interrupted)."""
    try:
        made = json.loads((folder / MARKER).read_text())
        pid, host = int(made["pid"]), str(made["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
