"""The consumer: a source of alerts -> batches classified with the light-curve book -> Parquet parts and a manifest.

:class:`AlertClassifier` updates the book (:mod:`deeprubin.serving.alerts.book`) with every alert of a batch and
classifies each new one with its object's curve as of that alert, in one batched
:func:`deeprubin.serving.classify.classify_curves` call. :func:`consume` is the loop; :func:`run` (``deeprubin
consume``) reads a directory of packets (:func:`deeprubin.serving.alerts.packets.iter_directory`) or the configured
Kafka topic (:class:`deeprubin.serving.alerts.kafka.KafkaSource`).

Output
------
``<output_dir>/classifications/part-<digest>.parquet``: one row per classified alert (``alert_id``, the columns of
:data:`deeprubin.serving.classify.COLUMNS`, ``alert_mjd``, ``format``); ``<output_dir>/rejections/part-<digest>.parquet``:
alerts and packets that were not classified (``alert_id``, ``oid``, ``packet``, ``reason``, ``detail``, and
``key``, the manifest key);
``<output_dir>/manifest.sqlite``: every alert id (and malformed packet) already written. Parts are written
atomically, one per batch; an alert already in the manifest is never written again, so a rerun over the same
directory, or Kafka re-delivering messages after a crash, adds no duplicate rows (the light-curve book is still
updated with it). A part written just before a crash, not yet in the manifest, is adopted at the next start.
One consumer per output directory. Ctrl-C writes the batch in hand (and commits it) before stopping.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deeprubin.lightcurves.tensorize import Curve
from deeprubin.models.served import ServingModel, load_model
from deeprubin.serving.alerts.book import LateAlert, LightCurveBook, keep_days_for, window_days
from deeprubin.serving.alerts.kafka import KafkaSource
from deeprubin.serving.alerts.packets import Alert, Item, Malformed, _Idle, iter_directory
from deeprubin.serving.classify import COLUMNS, MIN_SLICE, classify_curves, serving_settings, write_atomically
from deeprubin.serving.pool import Tensorizer, resolve_workers

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ["alert_id", *COLUMNS, "alert_mjd", "format"]
REJECTION_COLUMNS = ["alert_id", "oid", "packet", "reason", "detail"]
MALFORMED = "malformed packet"


# ----------------------------------------------------------------------------------------------------------------
# Classification of batches.

@dataclass
class BatchOutput:
    rows: pd.DataFrame  # OUTPUT_COLUMNS
    rejections: pd.DataFrame  # REJECTION_COLUMNS + key (the manifest key)
    keys: list[str]  # manifest keys of everything written (classified, rejected, malformed)
    n_alerts: int = 0
    n_malformed: int = 0
    n_duplicates: int = 0


class AlertClassifier:
    """The book plus the model: a batch of alerts -> one row per new alert, each from its as-of curve.

    One :func:`deeprubin.serving.classify.classify_curves` call per batch (the GP and TCN batched across objects).
    ``workers`` > 1: the batch is split across that many worker processes (:class:`deeprubin.serving.pool.Tensorizer`),
    started at the first batch and kept until :meth:`close`, so a long-running consumer pays their start once."""

    def __init__(self, model: ServingModel, grid_days: int = 100, fit_context_days: float = 100.0,
                 batch_size: int = 1024, max_objects: int = 1_000_000, trim: bool = True, workers: int = 1):
        self.model, self.grid_days, self.fit_context_days = model, int(grid_days), float(fit_context_days)
        self.batch_size = int(batch_size)
        self.workers = int(workers)
        self._tensorizer: Tensorizer | None = None
        self.needed_days = window_days(grid_days, fit_context_days)
        self.book = LightCurveBook(max_objects, keep_days_for(grid_days, fit_context_days) if trim else None)

    def classify(self, items: Sequence[Item], written: set[str] | frozenset[str] = frozenset()) -> BatchOutput:
        """Update the book with every alert (in order) and classify those whose key is not in ``written``."""
        curves: list[Curve] = []
        meta: list[tuple[Alert, int]] = []
        rejected: list[dict[str, Any]] = []
        keys: list[str] = []
        seen: set[str] = set()
        n_alerts = n_malformed = n_dup = 0
        for item in items:
            if isinstance(item, Malformed):
                n_malformed += 1
                if item.key in written or item.key in seen:
                    continue
                seen.add(item.key)
                keys.append(item.key)
                rejected.append({"alert_id": item.alert_id, "oid": item.oid, "packet": item.packet,
                                 "reason": MALFORMED, "detail": item.reason, "key": item.key})
                continue
            n_alerts += 1
            self.book.update(item)
            if item.key in written or item.key in seen:
                n_dup += 1
                continue
            seen.add(item.key)
            keys.append(item.key)
            try:
                curve, n_det = self.book.as_of(item.oid, item.mjd, key=str(len(meta)), needed_days=self.needed_days)
            except LateAlert as exc:
                rejected.append({"alert_id": item.alert_id, "oid": item.oid, "packet": item.packet,
                                 "reason": "late alert", "detail": str(exc), "key": item.key})
                continue
            curves.append(curve)
            meta.append((item, n_det))
        rows = pd.DataFrame(columns=OUTPUT_COLUMNS)
        if curves:
            out, skipped = classify_curves(curves, self.model, self.grid_days, self.fit_context_days,
                                           self.batch_size, tensorizer=self._pool(len(curves)))
            rows = self._rows(out, meta)
            for r in skipped.itertuples(index=False):
                alert = meta[int(r.oid)][0]
                rejected.append({"alert_id": alert.alert_id, "oid": alert.oid, "packet": alert.packet,
                                 "reason": r.reason, "detail": r.detail, "key": alert.key})
        rejections = pd.DataFrame(rejected, columns=[*REJECTION_COLUMNS, "key"])
        return BatchOutput(rows=rows, rejections=rejections, keys=keys, n_alerts=n_alerts, n_malformed=n_malformed,
                           n_duplicates=n_dup)

    def _pool(self, n_curves: int) -> Tensorizer | None:
        """The worker pool, started at the first batch big enough to be split (kept for the next ones)."""
        if self._tensorizer is None and self.workers > 1 and n_curves > MIN_SLICE:
            self._tensorizer = Tensorizer(self.workers, self.model)
        return self._tensorizer

    def close(self) -> None:
        """Stop the worker pool, if one was started."""
        if self._tensorizer is not None:
            self._tensorizer.close()
            self._tensorizer = None

    def _rows(self, out: pd.DataFrame, meta: list[tuple[Alert, int]]) -> pd.DataFrame:
        if out.empty:
            return pd.DataFrame(columns=OUTPUT_COLUMNS)
        idx = out["oid"].astype(int).to_numpy()
        alerts = [meta[i][0] for i in idx]
        out = out.copy()
        out["oid"] = [a.oid for a in alerts]
        out["n_det"] = np.asarray([meta[i][1] for i in idx], dtype=np.int64)
        out.insert(0, "alert_id", [a.alert_id for a in alerts])
        out["alert_mjd"] = np.asarray([a.mjd for a in alerts], dtype=np.float64)
        out["format"] = [a.format for a in alerts]
        return out[OUTPUT_COLUMNS].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------------
# Output: parts and the manifest.

class Manifest:
    """The alert ids (and malformed packets) already written to an output directory (SQLite, on disk)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path))
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS written (key TEXT PRIMARY KEY, part TEXT NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS parts (name TEXT PRIMARY KEY, rows INTEGER, rejected INTEGER, "
                        "written_at TEXT)")
        self.db.commit()

    def known(self, keys: Iterable[str]) -> set[str]:
        keys = list(dict.fromkeys(keys))
        found: set[str] = set()
        for i in range(0, len(keys), 900):  # SQLite's bound-parameter limit
            chunk = keys[i:i + 900]
            q = f"SELECT key FROM written WHERE key IN ({','.join('?' * len(chunk))})"
            found.update(k for (k,) in self.db.execute(q, chunk))
        return found

    def record(self, part: str, keys: Sequence[str], rows: int, rejected: int) -> None:
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO written (key, part) VALUES (?, ?)", [(k, part) for k in keys])
            self.db.execute("INSERT OR REPLACE INTO parts VALUES (?, ?, ?, ?)",
                            (part, rows, rejected, pd.Timestamp.now(tz="UTC").isoformat()))

    def parts(self) -> set[str]:
        return {name for (name,) in self.db.execute("SELECT name FROM parts")}

    def close(self) -> None:
        self.db.close()


class AlertWriter:
    """Writes each batch as one Parquet part (plus its rejections) and records it in the manifest."""

    def __init__(self, output_dir: Path | str):
        self.output_dir = Path(output_dir)
        self.classified_dir = self.output_dir / "classifications"
        self.rejected_dir = self.output_dir / "rejections"
        self.manifest = Manifest(self.output_dir / "manifest.sqlite")
        self.adopted = self._adopt_orphans()

    def _adopt_orphans(self) -> int:
        """Parts written by a run that stopped before recording them: their alerts count as written."""
        known = self.manifest.parts()
        names = {p.name for d in (self.classified_dir, self.rejected_dir) if d.exists() for p in d.glob("part-*.parquet")}
        adopted = 0
        for name in sorted(names - known):
            keys: list[str] = []
            rows = rejected = 0
            c, r = self.classified_dir / name, self.rejected_dir / name
            if c.exists():
                f = pd.read_parquet(c, columns=["alert_id", "format"])
                keys += [f"{fmt}:{a}" for a, fmt in zip(f["alert_id"], f["format"])]
                rows = len(f)
            if r.exists():
                f = pd.read_parquet(r, columns=["key"])
                keys += list(f["key"])
                rejected = len(f)
            self.manifest.record(name, keys, rows, rejected)
            adopted += 1
        return adopted

    def known(self, items: Sequence[Item]) -> set[str]:
        return self.manifest.known(i.key for i in items)

    def write(self, out: BatchOutput) -> str | None:
        """Write the batch (nothing when it holds nothing new); returns the part name."""
        if not out.keys:
            return None
        digest = hashlib.blake2b("\n".join(out.keys).encode(), digest_size=10).hexdigest()
        name = f"part-{digest}.parquet"
        if len(out.rows):
            write_atomically(out.rows, self.classified_dir / name)
        if len(out.rejections):
            write_atomically(out.rejections, self.rejected_dir / name)
        self.manifest.record(name, out.keys, len(out.rows), len(out.rejections))
        return name

    def close(self) -> None:
        self.manifest.close()


def read_classifications(output_dir: Path | str) -> pd.DataFrame:
    """Every classification row written to ``output_dir`` (empty frame with the columns when none)."""
    d = Path(output_dir) / "classifications"
    parts = sorted(d.glob("part-*.parquet")) if d.exists() else []
    if not parts:
        return pd.DataFrame(columns=OUTPUT_COLUMNS)
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def read_rejections(output_dir: Path | str) -> pd.DataFrame:
    d = Path(output_dir) / "rejections"
    parts = sorted(d.glob("part-*.parquet")) if d.exists() else []
    if not parts:
        return pd.DataFrame(columns=[*REJECTION_COLUMNS, "key"])
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


# ----------------------------------------------------------------------------------------------------------------
# The loop.

@dataclass
class ConsumeResult:
    """What a run read, classified and wrote."""

    output_dir: Path | None
    alerts_read: int = 0
    classified: int = 0
    rejected: int = 0  # alerts not classified (GP could not interpolate, late alerts, ...): see rejections
    malformed: int = 0
    duplicates: int = 0  # alerts already written (rerun, re-delivery): book updated, not written again
    objects_tracked: int = 0
    objects_evicted: int = 0
    batches: int = 0
    parts_written: int = 0
    seconds: float = 0.0
    first_alert_s: float | None = None  # from the start to the first packet read (Kafka: the group join)
    model_uri: str = ""
    model_version: str = ""
    interrupted: bool = False  # stopped by Ctrl-C: the batch in hand was still written (and committed)
    classifications: pd.DataFrame | None = field(default=None, repr=False)  # in-memory runs only (replay)
    rejections: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def alerts_per_s(self) -> float:
        return self.alerts_read / self.seconds if self.seconds > 0 else float("nan")

    def report(self) -> dict[str, Any]:
        return {"output_dir": None if self.output_dir is None else str(self.output_dir),
                "alerts_read": self.alerts_read, "classified": self.classified, "rejected": self.rejected,
                "malformed": self.malformed, "duplicates": self.duplicates,
                "objects_tracked": self.objects_tracked, "objects_evicted": self.objects_evicted,
                "batches": self.batches, "parts_written": self.parts_written, "seconds": round(self.seconds, 3),
                "first_alert_s": None if self.first_alert_s is None else round(self.first_alert_s, 3),
                "alerts_per_s": round(self.alerts_per_s, 2) if self.seconds > 0 else None,
                "model_uri": self.model_uri, "model_version": self.model_version, "interrupted": self.interrupted}


ConsumeProgress = Callable[[ConsumeResult], None]  # called with the running totals


def consume(source: Iterable[Item | _Idle], classifier: AlertClassifier, writer: AlertWriter | None = None,
            batch_alerts: int = 1024, max_alerts: int | None = None,
            commit: Callable[[Sequence[Item]], None] | None = None, progress: ConsumeProgress | None = None
            ) -> ConsumeResult:
    """Read ``source`` in batches of ``batch_alerts``, classify each batch, write it, then ``commit`` it.

    ``writer`` None keeps the rows in memory (``result.classifications``). ``max_alerts`` stops after that many
    items (alerts and malformed packets). An :data:`IDLE` from the source flushes a partial batch. Ctrl-C writes
    the batch in hand and returns (``result.interrupted``); a second one aborts (its batch is then read again)."""
    started = time.perf_counter()
    result = ConsumeResult(output_dir=None if writer is None else writer.output_dir,
                           model_uri=classifier.model.uri, model_version=classifier.model.version)
    frames: list[pd.DataFrame] = []
    rejections: list[pd.DataFrame] = []
    batch: list[Item] = []

    def flush() -> None:
        if not batch:
            return
        written = writer.known(batch) if writer is not None else frozenset()
        out = classifier.classify(batch, written)
        if writer is not None:
            if writer.write(out) is not None:
                result.parts_written += 1
        else:
            frames.append(out.rows)
            rejections.append(out.rejections)
        if commit is not None:
            commit(batch)
        result.batches += 1
        result.alerts_read += out.n_alerts
        result.malformed += out.n_malformed
        result.duplicates += out.n_duplicates
        result.classified += len(out.rows)
        result.rejected += int((out.rejections["reason"] != MALFORMED).sum()) if len(out.rejections) else 0
        result.objects_tracked = len(classifier.book)
        result.objects_evicted = classifier.book.evicted
        result.seconds = time.perf_counter() - started
        batch.clear()
        if progress is not None:
            progress(result)

    n = 0
    try:
        for item in source:
            if isinstance(item, _Idle):
                flush()
                continue
            if n == 0:
                result.first_alert_s = time.perf_counter() - started
            batch.append(item)
            n += 1
            if len(batch) >= batch_alerts:
                flush()
            if max_alerts is not None and n >= max_alerts:
                break
    except KeyboardInterrupt:  # finish the batch in hand (a batch cut short is redone whole: nothing doubles)
        log.warning("interrupted: writing the %d alert(s) in hand, then stopping", len(batch))
        result.interrupted = True
    flush()
    result.objects_tracked = len(classifier.book)
    result.objects_evicted = classifier.book.evicted
    result.seconds = time.perf_counter() - started
    if writer is None:
        result.classifications = (pd.concat(frames, ignore_index=True) if frames
                                  else pd.DataFrame(columns=OUTPUT_COLUMNS))
        result.rejections = (pd.concat(rejections, ignore_index=True) if rejections
                             else pd.DataFrame(columns=[*REJECTION_COLUMNS, "key"]))
    return result


def _classifier(params, model: ServingModel | None) -> AlertClassifier:
    model = model or load_model(params.model_uri(), params.train.tracking_uri, params.base.classes)
    settings = serving_settings(model, params)  # the model's own window and GP context
    return AlertClassifier(model, settings.grid_days, settings.fit_context_days,
                           params.classify.batch_size, params.alerts.max_objects,
                           workers=resolve_workers(params.classify.workers))


class Prefetched:
    """Iterates ``source`` in a thread, at most ``depth`` items ahead, in the same order: a directory's packets are
    read and decoded while the worker processes classify the batch before (the main thread waits on them with the
    GIL released). An exception of the source is raised where the item would have come. :meth:`close` stops the
    thread."""

    _END = object()

    def __init__(self, source: Iterable[Item], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(iter(source),), name="deeprubin-alert-reader",
                                        daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self, source) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as exc:  # noqa: BLE001 - raised in the consuming thread, in order
            self._put(_SourceFailed(exc))

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, _SourceFailed):
                raise item.exc
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class _SourceFailed:
    exc: BaseException


def consume_directory(params, directory: Path | str, output_dir: Path | str | None = None,
                      model: ServingModel | None = None, max_alerts: int | None = None,
                      progress: ConsumeProgress | None = None) -> ConsumeResult:
    """Classify every alert packet under ``directory`` into ``output_dir`` (default ``params.alerts.output_dir``)."""
    a = params.alerts
    packets = iter_directory(directory, a.format, a.lsst_schema_version)
    classifier = _classifier(params, model)
    writer = AlertWriter(output_dir or a.output_dir)
    source = Prefetched(packets, 2 * a.batch_alerts)
    try:
        return consume(source, classifier, writer, a.batch_alerts, max_alerts, progress=progress)
    finally:
        source.close()
        writer.close()
        classifier.close()


def consume_kafka(params, output_dir: Path | str | None = None, model: ServingModel | None = None,
                  max_alerts: int | None = None, idle_timeout_s: float | None = None,
                  progress: ConsumeProgress | None = None) -> ConsumeResult:
    """Classify the alerts of ``params.alerts.kafka.topic`` until interrupted (or idle for ``idle_timeout_s``, or
    ``max_alerts`` read), committing offsets after each written batch. A broker that cannot be reached fails here
    (:class:`~deeprubin.serving.alerts.kafka.BrokerUnreachable`, after ``alerts.kafka.connect_timeout_s``), before
    the model is loaded."""
    a = params.alerts
    with KafkaSource(a.kafka, a.format, a.lsst_schema_version, idle_timeout_s=idle_timeout_s) as source:
        classifier = _classifier(params, model)
        writer = AlertWriter(output_dir or a.output_dir)
        try:
            return consume(source, classifier, writer, a.batch_alerts, max_alerts, commit=source.commit,
                           progress=progress)
        finally:
            writer.close()
            classifier.close()


def run(params, directory: Path | str | None = None, output_dir: Path | str | None = None,
        model: ServingModel | None = None, max_alerts: int | None = None, idle_timeout_s: float | None = None,
        progress: ConsumeProgress | None = None) -> ConsumeResult:
    """``deeprubin consume``: a directory of packets when given, else the configured Kafka topic."""
    if directory is not None:
        return consume_directory(params, directory, output_dir, model, max_alerts, progress)
    if params.alerts.kafka.bootstrap_servers:
        return consume_kafka(params, output_dir, model, max_alerts, idle_timeout_s, progress)
    raise ValueError("no alert source: give a directory of packets, or set alerts.kafka.bootstrap_servers and "
                     "alerts.kafka.topic")
