"""Reading detections for classification: files of any size in bounded memory, as batches of whole objects.

Input grouped by object goes through in one pass (:func:`grouped_objects`); other input is partitioned on disk by a
stable hash of the oid first (:func:`partitioned_objects`). Bad points are dropped and counted by reason; an object
left with no point is rejected with its reason; apparent magnitudes (declared or recognised) become difference flux
(:func:`curve_batches`, :mod:`deeprubin.lightcurves.presentation`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from deeprubin.lightcurves import presentation
from deeprubin.lightcurves.tensorize import curves_from_detections
from deeprubin.processed import partition_of
from deeprubin.schema import DETECTIONS_SCHEMA, MJD_FROM_JD, PLAUSIBILITY_REASONS, TIME_LOOKS_LIKE_JD, \
    TIME_NOT_PLAUSIBLE_MJD, Rejection, SchemaError, map_detections, map_photometry, to_arrow, validate_detections

READ_ROWS = 65_536  # detections parsed per chunk of the input file
SPILL_BYTES = 32 * 2**20  # input bytes per on-disk partition when the input is not grouped by object
_SPILL_SCHEMA = pa.schema([*(f.with_nullable(True) for f in DETECTIONS_SCHEMA), pa.field("photometry", pa.string())])


class NotGroupedError(Exception):
    """The input's rows of one object are not contiguous (it is then partitioned on disk first)."""


class UnreadableInputError(SchemaError):
    """The input file cannot be read (corrupt pages or footer, not text, not the format its name says); the
    message names the file and the problem."""


def unreadable(path: Path, exc: BaseException) -> UnreadableInputError:
    what = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UnreadableInputError(f"input file {path} cannot be read: {what}")


# What a damaged or mislabelled file raises while it is parsed (pyarrow's errors are OSError or ValueError
# subclasses; pandas' parser errors and UnicodeDecodeError are ValueErrors).
_READ_ERRORS = (OSError, ValueError, pa.ArrowException, EOFError)


def _format(path: Path) -> str:
    suffix = "".join(path.suffixes[-2:]).lower()
    if suffix.endswith((".parquet", ".pq")):
        return "parquet"
    if suffix.endswith((".csv", ".csv.gz")):
        return "csv"
    raise SchemaError(f"{path}: unknown format {path.suffix!r}; expected .parquet or .csv")


def check_input(path: Path | str) -> None:
    """Refuse, before any work, an input that is missing, not a file, or of an unknown format (by its name)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file {path} does not exist")
    if not path.is_file():
        raise UnreadableInputError(f"input file {path} is not a file" + (" but a directory" if path.is_dir() else ""))
    _format(path)


def _raw_chunks(path: Path, rows: int) -> Iterator[pd.DataFrame]:
    suffix = "".join(path.suffixes[-2:]).lower()
    if suffix.endswith((".parquet", ".pq")):
        try:
            reader = pq.ParquetFile(path)
            batches = reader.iter_batches(batch_size=rows)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                yield batch.to_pandas()
        except _READ_ERRORS as exc:
            raise unreadable(path, exc) from exc
    elif suffix.endswith((".csv", ".csv.gz")):
        try:
            reader = pd.read_csv(path, chunksize=rows)
            while True:
                try:
                    chunk = next(reader)
                except StopIteration:
                    return
                yield chunk
        except pd.errors.EmptyDataError:
            raise UnreadableInputError(f"input file {path} is empty (no header row)") from None
        except _READ_ERRORS as exc:
            raise unreadable(path, exc) from exc
    else:
        raise SchemaError(f"{path}: unknown format {path.suffix!r}; expected .parquet or .csv")


def count_rows(path: Path) -> int | None:
    """Rows of a Parquet file from its footer (None for CSV: counting would read it all)."""
    path = Path(path)
    if path.suffix.lower() not in (".parquet", ".pq"):
        return None
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except _READ_ERRORS as exc:
        raise unreadable(path, exc) from exc


def read_detections(path: Path | str, rows: int = READ_ROWS) -> Iterator[pd.DataFrame]:
    """Contract detections of ``path`` (Parquet or CSV; contract, ALeRCE or ANTARES/BTS columns), chunk by chunk,
    with a ``photometry`` column where the input declares it (:func:`deeprubin.schema.map_photometry`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file {path} does not exist")
    for raw in _raw_chunks(path, rows):
        detections = map_detections(raw, source="files")
        declared = map_photometry(raw)
        if declared is not None:
            detections["photometry"] = declared.to_numpy()
        yield detections


def missing_oid(oid: pd.Series) -> np.ndarray:
    """Rows with no object id (null, or blank): validation drops them ("missing object id"); they belong to no
    object, so they never count as one for grouping."""
    return (oid.isna() | (oid.astype(str).str.strip() == "")).to_numpy(dtype=bool)


def grouped_objects(chunks: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Frames of whole objects from chunks whose rows are grouped by oid (each object's rows contiguous, the usual
    layout of exports). The trailing object of a chunk waits for the next one; an object seen again after its rows
    ended raises :class:`NotGroupedError`. Rows without an oid, wherever they are, come as a frame of their own (for
    validation to drop and count)."""
    done: set[str] = set()
    carry: pd.DataFrame | None = None
    for chunk in chunks:
        orphans = missing_oid(chunk["oid"]) if len(chunk) else np.zeros(0, dtype=bool)
        if orphans.any():
            yield chunk.loc[orphans]
            chunk = chunk.loc[~orphans]
        if carry is not None and len(carry):
            chunk = pd.concat([carry, chunk], ignore_index=True)
        if chunk.empty:
            continue
        oid = chunk["oid"].astype(str).to_numpy()
        starts = np.r_[0, np.flatnonzero(oid[1:] != oid[:-1]) + 1]
        runs = oid[starts]
        if len(set(runs)) != len(runs) or not done.isdisjoint(runs):
            seen: set[str] = set()
            again = next((o for o in runs if o in done or o in seen or seen.add(o)), runs[0])
            raise NotGroupedError(f"the rows of object {again} are not contiguous")
        tail = int(starts[-1])
        done.update(runs[:-1])
        carry = chunk.iloc[tail:]
        if tail:
            yield chunk.iloc[:tail]
    if carry is not None and len(carry):
        yield carry


def partitioned_objects(chunks: Iterable[pd.DataFrame], spill_dir: Path, partitions: int) -> Iterator[pd.DataFrame]:
    """Frames of whole objects from chunks in any order: rows are first written to ``partitions`` Parquet files by
    a stable hash of the oid (on disk, so memory holds one partition at a time), then read back one by one."""
    spill_dir.mkdir(parents=True, exist_ok=True)
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for chunk in chunks:
            part = chunk["oid"].astype(str).map(lambda o: partition_of(o, partitions))
            if "photometry" not in chunk.columns:
                chunk = chunk.assign(photometry=None)
            for k, rows in chunk.groupby(part.to_numpy(), sort=False):
                if k not in writers:
                    writers[k] = pq.ParquetWriter(spill_dir / f"part-{k:05d}.parquet", _SPILL_SCHEMA)
                writers[k].write_table(to_arrow(rows, _SPILL_SCHEMA))
    finally:
        for w in writers.values():
            w.close()
    for k in sorted(writers):
        path = spill_dir / f"part-{k:05d}.parquet"
        frame = pd.read_parquet(path)
        path.unlink()
        yield frame


def _validated(frame: pd.DataFrame, dropped: Counter) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Contract validation of a frame of whole objects: bad points dropped (counted by reason); an object left with
    no detection is rejected with the reasons its points were dropped for."""
    clean, report = validate_detections(frame)
    reasons: dict[str, list[Rejection]] = {}
    for r in report.rejections:
        if r.rows:
            dropped[r.reason] += r.rows
            reasons.setdefault(r.oid, []).append(r)
    named = frame.loc[~missing_oid(frame["oid"]), "oid"].astype(str)  # rows without an oid are no object
    # distinct values first: iterating an Arrow-backed string column row by row was a tenth of classify's main process
    kept = pd.unique(clean["oid"].astype(str).to_numpy(dtype=object))
    gone = set(pd.unique(named.to_numpy(dtype=object))) - set(kept)
    rejected = [_rejection(o, reasons.get(o, []), frame) for o in sorted(gone)]
    return clean, rejected


def _rejection(oid: str, mine: list[Rejection], frame: pd.DataFrame) -> dict[str, str]:
    """An object none of whose points survived validation: named by its implausibility (a JD where an MJD belongs,
    a sentinel magnitude) when that is why every point went, else "no valid detection"; the detail counts each
    reason."""
    why = {r.reason for r in mine}
    detail = "; ".join(f"{r.rows} x {r.reason}" for r in mine)
    if len(why) == 1 and why <= set(PLAUSIBILITY_REASONS):
        reason = why.pop()
        if reason in (TIME_LOOKS_LIKE_JD, TIME_NOT_PLAUSIBLE_MJD):
            mjd = frame.loc[frame["oid"].astype(str) == oid, "mjd"].to_numpy(dtype=float)
            mjd = mjd[np.isfinite(mjd)]
            if len(mjd):
                detail += f"; times {mjd.min():.5f} to {mjd.max():.5f}" + (
                    f" (as MJD: {mjd.min() - MJD_FROM_JD:.5f} to {mjd.max() - MJD_FROM_JD:.5f})"
                    if reason == TIME_LOOKS_LIKE_JD else "")
        return {"oid": oid, "reason": reason, "detail": detail}
    return {"oid": oid, "reason": "no valid detection", "detail": detail}


@dataclass
class CurveBatch:
    curves: list
    rejected: list[dict[str, str]]
    rows_read: int
    paths: dict[str, presentation.PhotometryPath] = field(default_factory=dict)  # oid -> how it was read


def curve_batches(frames: Iterable[pd.DataFrame], batch_size: int, dropped: Counter,
                  photometry: str = presentation.AUTO) -> Iterator[CurveBatch]:
    """Light curves of frames of whole objects, validated, in batches of ``batch_size`` objects (the last may be
    smaller); points dropped by validation are counted in ``dropped``. Each object is difference flux as given, or
    apparent photometry turned into difference flux: as its rows declare, else as ``photometry`` says (``auto``:
    recognised, :func:`deeprubin.lightcurves.presentation.resolve`)."""
    pending: list = []
    paths: dict[str, presentation.PhotometryPath] = {}
    rejected: list[dict[str, str]] = []
    rows_read = 0
    for frame in frames:
        rows_read += len(frame)
        clean, bad = _validated(frame, dropped)
        rejected.extend(bad)
        declared, mixed = presentation.declared_per_object(clean)
        rejected.extend(mixed)
        if mixed:
            clean = clean.loc[~clean["oid"].astype(str).isin({r["oid"] for r in mixed})]
        resolved = presentation.resolve(curves_from_detections(clean), photometry, declared)
        rejected.extend(resolved.rejected)
        pending.extend(resolved.curves)
        paths.update(resolved.paths)
        while len(pending) >= batch_size:
            batch = pending[:batch_size]
            yield CurveBatch(batch, rejected, rows_read, {c.oid: paths.pop(c.oid) for c in batch})
            pending, rejected, rows_read = pending[batch_size:], [], 0
    if pending or rejected or rows_read:
        yield CurveBatch(pending, rejected, rows_read, {c.oid: paths.pop(c.oid) for c in pending})


def spill_partitions(path: Path) -> int:
    return max(1, math.ceil(Path(path).stat().st_size / SPILL_BYTES))
