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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa
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
    to_arrow,
)

TABLES = {"objects": OBJECTS_SCHEMA, "detections": DETECTIONS_SCHEMA, "non_detections": NON_DETECTIONS_SCHEMA}
MANIFEST = "manifest.json"
REJECTIONS = "rejections.csv"
STATE = "state.json"  # incremental-pull state (watermarks), committed with the data it describes
# In every folder a commit makes beside the store (and in the store while it is being set aside): recovery touches
# only folders that bear it.
MARKER = ".deeprubin-raw-store-commit"
SCRATCH = ".scratch"  # a streaming commit's working files, inside its commit folder, removed before the swap
# pq.write_table's row-group size: a table streamed in blocks is cut into the same row groups, so the same bytes.
ROW_GROUP_ROWS = 1024 * 1024
INGESTED_AT_DTYPE = "datetime64[us, UTC]"  # objects.ingested_at as the store reads it back


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

    # One time unit on both sides (the stored one), else pandas concatenates two units into an object column.
    old_objects = existing.objects.astype({"ingested_at": INGESTED_AT_DTYPE}).set_index("oid")
    new_objects = incoming.objects.astype({"ingested_at": INGESTED_AT_DTYPE}).set_index("oid")
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

    def detections_path(self) -> Path:
        """Where the stored detections are now (what :meth:`read` reads)."""
        return self._current() / "detections.parquet"

    def read(self) -> LightCurves:
        """The stored tables, or empty contract tables when nothing has been stored yet."""
        return LightCurves(**{name: self.read_table(name, list(schema.names)) for name, schema in TABLES.items()})

    def read_table(self, name: str, columns: list[str]) -> pd.DataFrame:
        """Only ``columns`` of one stored table (empty when nothing has been stored yet): a stage that needs a few
        columns does not hold the whole store in memory (at 100,000 objects, every table in full was ~1 GB more)."""
        schema = TABLES[name]
        unknown = [c for c in columns if c not in schema.names]
        if unknown:
            raise KeyError(f"the {name} table has no column(s) {unknown}")
        path = self._current() / f"{name}.parquet"
        if not path.exists():
            return empty_frame(schema)[columns]
        wanted = pa.schema([schema.field(c) for c in columns])
        return pq.read_table(path, columns=columns, schema=wanted).to_pandas()

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
        with self.writing() as new:
            for name, table in lcs.to_arrow().items():
                pq.write_table(table, new.folder / f"{name}.parquet", compression="zstd")
            new.finish(manifest, rejections=rejections, state=state)

    @contextmanager
    def writing(self) -> Iterator["CommitInProgress"]:
        """A commit written piece by piece (:meth:`CommitInProgress.write`, then :meth:`CommitInProgress.finish`):
        the same atomic swap as :meth:`commit`, with the tables streamed in blocks of rows. Leaving the block
        without ``finish`` (an error, or no call) discards everything written and leaves the stored state whole."""
        self.recover()
        new = CommitInProgress(self, self._make_commit_dir())
        try:
            yield new
        finally:
            new._close_writers()
            if not new.done:
                shutil.rmtree(new.folder, ignore_errors=True)
                (self.root / MARKER).unlink(missing_ok=True)

    def read_range(self, low: str | None, high: str | None) -> LightCurves:
        """The stored rows whose oid is in [low, high) (None: unbounded), as :meth:`read` returns them."""
        root = self._current()
        filters = ([("oid", ">=", low)] if low is not None else []) + ([("oid", "<", high)] if high is not None else [])
        frames = {}
        for name, schema in TABLES.items():
            path = root / f"{name}.parquet"
            if not path.exists():
                frames[name] = empty_frame(schema)
                continue
            table = pq.read_table(path, schema=schema, filters=filters or None)
            frames[name] = table.to_pandas()
        return LightCurves(**frames)


class _TableStream:
    """One contract table written block by block, cut into the row groups ``pq.write_table`` makes of the whole
    table (:data:`ROW_GROUP_ROWS` rows each, the last one shorter), so the file has the same bytes."""

    def __init__(self, path: Path, schema: Any):
        self.path, self.schema = path, schema
        self.writer: pq.ParquetWriter | None = None
        self.pending: list[pa.Table] = []
        self.n_pending = 0
        self.rows = 0
        self.empty: pa.Table | None = None  # the first empty block, written when no block has rows
        self.closed = False

    def write(self, frame: pd.DataFrame) -> None:
        table = to_arrow(frame, self.schema)
        if table.num_rows == 0:
            if self.empty is None and self.writer is None:
                self.empty = table
            return
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        self.pending.append(table)
        self.n_pending += table.num_rows
        self.rows += table.num_rows
        while self.n_pending >= ROW_GROUP_ROWS:
            self._flush(ROW_GROUP_ROWS)

    def _flush(self, rows: int) -> None:
        assert self.writer is not None
        whole = pa.concat_tables(self.pending).combine_chunks()  # contiguous, as a slice of the whole table is
        self.writer.write_table(whole.slice(0, rows), row_group_size=ROW_GROUP_ROWS)
        rest = whole.slice(rows)
        self.pending = [rest] if rest.num_rows else []
        self.n_pending = rest.num_rows

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.writer is None:
            table = self.empty if self.empty is not None else to_arrow(empty_frame(self.schema), self.schema)
            pq.write_table(table, self.path, compression="zstd")
            return
        if self.n_pending:
            self._flush(self.n_pending)
        self.writer.close()

    def abort(self) -> None:
        if self.writer is not None and not self.closed:
            self.closed = True
            self.writer.close()


class CommitInProgress:
    """The new state being written beside the store (:meth:`RawStore.writing`): tables streamed in blocks, a
    scratch folder inside it (removed before the swap; a crashed run's is removed with its commit folder by the
    next writer's :meth:`RawStore.recover`), and :meth:`finish`, which swaps it in."""

    def __init__(self, store: RawStore, folder: Path):
        self.store, self.folder = store, folder
        self.done = False
        self._tables: dict[str, _TableStream] = {}

    @property
    def scratch(self) -> Path:
        path = self.folder / SCRATCH
        path.mkdir(exist_ok=True)
        return path

    def write(self, lcs: LightCurves) -> None:
        """Append a block of rows to each table; blocks come in key order (oid, then mjd and band)."""
        for name, frame, schema in lcs._tables():
            if name not in self._tables:
                self._tables[name] = _TableStream(self.folder / f"{name}.parquet", schema)
            self._tables[name].write(frame)

    def rows(self, name: str) -> int:
        return self._tables[name].rows if name in self._tables else 0

    def _close_writers(self) -> None:
        for table in self._tables.values():
            table.abort()

    def finish(self, manifest: dict[str, Any], rejections: pd.DataFrame | None = None,
               state: dict[str, Any] | None = None) -> None:
        """Write what remains (tables, rejections, state, manifest), fsync, and swap the new state in."""
        store, tmp = self.store, self.folder
        for table in self._tables.values():
            table.close()
        shutil.rmtree(tmp / SCRATCH, ignore_errors=True)
        if rejections is not None:
            rejections.to_csv(tmp / REJECTIONS, index=False)
        if state is not None:
            (tmp / STATE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        elif (store.root / STATE).exists():
            shutil.copyfile(store.root / STATE, tmp / STATE)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        for path in tmp.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        previous: Path | None = None
        try:
            if store.root.exists():
                _mark(store.root)  # set aside, it is this store's previous state: the next writer may remove it
                previous = store._previous_name()
                store.root.rename(previous)
            tmp.rename(store.root)
        except BaseException:
            if previous is not None and not store.root.exists() and previous.exists():
                previous.rename(store.root)  # the swap failed half way: the previous state goes back
            raise
        self.done = True
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        (store.root / MARKER).unlink(missing_ok=True)


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
