"""Alert-stream consumer: ZTF Avro alerts and LSST alert packets -> per-object light curves -> one classification
per alert.

Packets
-------
* **ZTF** (``ztf.alert`` schema): an Avro object container file (OCF) with its writer schema embedded, as ZTF
  distributes them (one file per alert in the nightly tarballs; one OCF per Kafka message). Fields used:
  ``objectId`` (the object id), ``candid`` (the alert id), ``candidate`` (the triggering detection: ``jd``, ``fid``,
  ``magpsf``, ``sigmapsf``, ``isdiffpos``) and ``prv_candidates`` (up to 30 days of history; rows with a null
  ``magpsf`` are non-detections, upper limits only, and are skipped). Time: MJD = jd - 2400000.5. Flux: the
  difference magnitude ``magpsf`` -> µJy (AB zero point 23.9), negative when ``isdiffpos`` says so, exactly as
  :func:`deeprubin.schema.map_detections` maps ALeRCE detections. ``fid`` 3 (i) is outside the contract and dropped.
* **LSST** (``lsst-alert-packet`` schemas 5.0 and later; the package ships up to its ``latest.txt``): an OCF, or a
  Confluent wire-format message (magic byte 0, a 4-byte big-endian schema id, the schemaless Avro body) whose id is
  the package's ``Schema.get_schema_id()`` of a version it ships (``704`` for 7.4, ``1101`` for 11.1). With
  ``alerts.format: lsst`` a bare schemaless body is read with ``alerts.lsst_schema_version`` (null: the latest).
  Fields used: ``diaSource`` (``midpointMjdTai``, ``band``, ``psfFlux``/``psfFluxErr`` in nJy -> µJy) and
  ``prvDiaSources`` (history); the object id is ``diaObject.diaObjectId`` (else ``diaSource.diaObjectId``); the
  alert id is ``diaSourceId`` (``alertId`` before schema 9). Bands other than g and r are dropped. A source with no
  diaObject (a solar-system source) is rejected with that reason. TAI is used as is (37 s from UTC: irrelevant here).
* The format is told from each record's fields (``candidate`` -> ZTF, ``diaSource`` -> LSST) unless
  ``alerts.format`` forces one. A packet that cannot be read, or whose triggering detection lacks its time or
  brightness or has a time that is not a plausible MJD (a JD or a Unix time in its place), is *malformed*: it is
  reported (packet name: ``file#record`` or ``topic[partition]@offset``, and the reason) and skipped; it never
  stops the stream. History points that break the contract (non-finite, error not positive) are dropped.

Sources
-------
:func:`iter_directory`: every ``*.avro`` file under a directory (recursively, in sorted path order; an OCF may hold
several alerts; a file that is not an OCF is read as one wire-format message). :class:`KafkaSource`: a Kafka topic
read with ``confluent_kafka.Consumer`` (``alerts.kafka``). Offsets are committed only after the batch holding the
messages has been written, and explicitly (never auto-commit): delivery is **at least once**.

Light curves
------------
:class:`LightCurveBook` keeps each object's detections (time, band, flux, error: the contract's units) merged from
every alert seen (history and triggering point), deduplicated on (time, band). It is bounded: at most
``max_objects`` objects (the least recently updated are dropped first), and for each object only the first
detection plus the detections the window policy can still use (the last ``grid_days - 1 + fit_context_days`` days,
with a margin) are kept, so a years-long variable does not grow without bound; the tensors are the same as with the
whole history (:mod:`deeprubin.lightcurves.window`). ``n_det`` still counts every detection the book has seen (history re-sent
for times already trimmed is not counted twice). Each alert is classified with its object's curve **as of that
alert**: only detections at or before the alert's detection time, even when later alerts of the object are in the
same batch. An alert older than the kept part of its object's history (out of order by more than the margin) is
rejected as a ``late alert`` rather than classified with a partial curve. An object evicted from the book and seen
again starts from the history its next packet carries (30 days for ZTF, 12 months for LSST).

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
import io
import logging
import math
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache, lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deeprubin.lightcurves.tensorize import Curve
from deeprubin.models.served import ServingModel, load_model
from deeprubin.schema import BAND_INDEX, CLASSES, MJD_FROM_JD, ZTF_FID_TO_BAND, isdiffpos_sign, mag_to_flux
from deeprubin.serving.classify import COLUMNS, classify_curves, serving_settings, write_atomically

log = logging.getLogger(__name__)

FORMATS = ("auto", "ztf", "lsst")
OUTPUT_COLUMNS = ["alert_id", *COLUMNS, "alert_mjd", "format"]
REJECTION_COLUMNS = ["alert_id", "oid", "packet", "reason", "detail"]
MALFORMED = "malformed packet"
OCF_MAGIC = b"Obj\x01"
WIRE_MAGIC = 0
# fid -> contract band index; fid 3 (i) is outside the contract and dropped
ZTF_BANDS = {fid: BAND_INDEX[band] for fid, band in ZTF_FID_TO_BAND.items() if band in BAND_INDEX}
LSST_BANDS = BAND_INDEX
NJY_PER_UJY = 1000.0
TRIM_MARGIN_DAYS = 30.0
# Plausible detection times (MJD 1953-2132): catches a Unix time or a JD where an MJD belongs.
MJD_RANGE = (35000.0, 100000.0)
# Early-classification bins (days since first detection): [0, 2), [2, 5), ..., [50, 100].
EARLY_BINS: tuple[float, ...] = (0, 2, 5, 10, 20, 30, 50, 100)


class PacketError(ValueError):
    """A packet (or one record of it) cannot be turned into an alert; the message says why."""


class SchemaVersionError(ValueError):
    """``alerts.lsst_schema_version`` names a schema the installed lsst-alert-packet does not ship."""


# ----------------------------------------------------------------------------------------------------------------
# Alerts.

@dataclass(frozen=True, eq=False)
class Alert:
    """One decoded alert: the detections it carries (history + the triggering one; g and r only, in µJy)."""

    alert_id: str
    oid: str
    mjd: float  # time of the triggering detection
    format: str  # ztf | lsst | replay
    t: np.ndarray  # detection times (MJD)
    band: np.ndarray  # 0 = g, 1 = r
    flux: np.ndarray  # µJy, difference flux (negative allowed)
    flux_err: np.ndarray  # µJy, > 0
    packet: str = ""
    position: tuple[str, int, int] | None = None  # Kafka (topic, partition, offset)
    last_in_packet: bool = True

    @property
    def key(self) -> str:
        """The manifest key: unique per alert across surveys."""
        return f"{self.format}:{self.alert_id}"


@dataclass(frozen=True)
class Malformed:
    """A packet (or record) that could not be decoded: reported and skipped."""

    packet: str
    reason: str
    alert_id: str | None = None
    oid: str | None = None
    position: tuple[str, int, int] | None = None
    last_in_packet: bool = True

    @property
    def key(self) -> str:
        return f"packet:{self.packet}"


Item = Alert | Malformed


class _Idle:
    """Yielded by a source when no message arrived within its poll timeout (lets the consumer flush a batch)."""


IDLE = _Idle()


def _points(t: np.ndarray, band: np.ndarray, flux: np.ndarray, flux_err: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Drop points that break the contract (non-finite, error not positive, band not g/r, time not a plausible
    MJD); sort by (time, band)."""
    t, flux, flux_err = (np.asarray(a, dtype=np.float64) for a in (t, flux, flux_err))
    band = np.asarray(band, dtype=np.int64)
    ok = np.isfinite(flux) & np.isfinite(flux_err) & (flux_err > 0) & ((band == 0) | (band == 1)) \
        & (t >= MJD_RANGE[0]) & (t <= MJD_RANGE[1])
    t, band, flux, flux_err = t[ok], band[ok], flux[ok], flux_err[ok]
    order = np.lexsort((band, t))
    return t[order], band[order], flux[order], flux_err[order]


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _check_time(mjd: float, what: str) -> None:
    if not MJD_RANGE[0] <= mjd <= MJD_RANGE[1]:
        raise PacketError(f"{what} = {mjd!r} is not a plausible MJD (expected {MJD_RANGE[0]:g}-{MJD_RANGE[1]:g})")


def ztf_alert(record: Mapping[str, Any], packet: str = "") -> Alert:
    """A ZTF alert record (``ztf.alert``) -> :class:`Alert`. Raises PacketError naming the problem."""
    cand = record.get("candidate")
    if not isinstance(cand, Mapping):
        raise PacketError("not a ZTF alert: no candidate record")
    oid = record.get("objectId")
    if not oid:
        raise PacketError("ZTF alert without objectId")
    alert_id = record.get("candid", cand.get("candid"))
    if alert_id is None:
        raise PacketError(f"ZTF alert of {oid} without candid")
    for name in ("jd", "fid", "magpsf", "sigmapsf"):
        if cand.get(name) is None:
            raise PacketError(f"ZTF alert {alert_id} of {oid}: candidate.{name} is null")
    rows = [cand] + [p for p in (record.get("prv_candidates") or []) if p.get("magpsf") is not None]
    jd = np.array([_num(r.get("jd")) for r in rows])
    fid = np.array([int(r["fid"]) if r.get("fid") is not None else -1 for r in rows])
    mag = np.array([_num(r.get("magpsf")) for r in rows])
    mag_err = np.array([_num(r.get("sigmapsf")) for r in rows])
    flux, flux_err = mag_to_flux(mag, mag_err)
    flux = flux * isdiffpos_sign(pd.Series([r.get("isdiffpos") for r in rows], dtype=object))
    band = np.array([ZTF_BANDS.get(f, -1) for f in fid])
    t, band, flux, flux_err = _points(jd - MJD_FROM_JD, band, flux, flux_err)
    mjd = float(cand["jd"]) - MJD_FROM_JD
    _check_time(mjd, f"ZTF alert {alert_id} of {oid}: candidate.jd - 2400000.5")
    return Alert(alert_id=str(alert_id), oid=str(oid), mjd=mjd, format="ztf", t=t, band=band, flux=flux,
                 flux_err=flux_err, packet=packet)


def lsst_alert(record: Mapping[str, Any], packet: str = "") -> Alert:
    """An LSST alert record (lsst-alert-packet schema >= 5.0) -> :class:`Alert`. Raises PacketError."""
    src = record.get("diaSource")
    if not isinstance(src, Mapping):
        raise PacketError("not an LSST alert: no diaSource record")
    alert_id = record.get("alertId", record.get("diaSourceId", src.get("diaSourceId")))
    if alert_id is None:
        raise PacketError("LSST alert without diaSourceId")
    obj = record.get("diaObject")
    oid = obj.get("diaObjectId") if isinstance(obj, Mapping) else None
    oid = src.get("diaObjectId") if oid is None else oid
    if oid is None:
        raise PacketError(f"LSST alert {alert_id}: no diaObjectId (a solar-system source has none); "
                          "not a light curve to classify")
    if "midpointMjdTai" not in src:
        raise PacketError(f"LSST alert {alert_id} of {oid}: diaSource has no midpointMjdTai "
                          "(schemas before 5.0 are not supported)")
    mjd = _num(src.get("midpointMjdTai"))
    _check_time(mjd, f"LSST alert {alert_id} of {oid}: diaSource.midpointMjdTai")
    rows = [src] + list(record.get("prvDiaSources") or [])
    t = np.array([_num(r.get("midpointMjdTai")) for r in rows])
    band = np.array([LSST_BANDS.get(r.get("band"), -1) for r in rows])
    flux = np.array([_num(r.get("psfFlux")) for r in rows]) / NJY_PER_UJY
    flux_err = np.array([_num(r.get("psfFluxErr")) for r in rows]) / NJY_PER_UJY
    t, band, flux, flux_err = _points(t, band, flux, flux_err)
    return Alert(alert_id=str(alert_id), oid=str(oid), mjd=mjd, format="lsst", t=t, band=band, flux=flux,
                 flux_err=flux_err, packet=packet)


def record_format(record: Mapping[str, Any]) -> str | None:
    """``ztf``, ``lsst`` or None, from the record's fields."""
    if "candidate" in record and "objectId" in record:
        return "ztf"
    if "diaSource" in record:
        return "lsst"
    return None


def alert_from_record(record: Any, packet: str = "", format: str = "auto") -> Alert:
    """A decoded Avro record -> :class:`Alert` (``format``: auto, ztf or lsst). Raises PacketError."""
    if not isinstance(record, Mapping):
        raise PacketError(f"record is a {type(record).__name__}, not an alert record")
    found = record_format(record)
    if found is None:
        raise PacketError(f"neither a ZTF nor an LSST alert: fields {sorted(record)[:12]}")
    if format != "auto" and found != format:
        raise PacketError(f"expected a {format} alert, got a {found} alert")
    return ztf_alert(record, packet) if found == "ztf" else lsst_alert(record, packet)


@lru_cache(maxsize=1)
def _lsst_registry():
    from lsst.alert.packet import SchemaRegistry

    return SchemaRegistry.all_schemas_from_filesystem()


@cache
def _lsst_parsed(version: str | None) -> tuple[str, Any]:
    """(version, fastavro-parsed schema) of an lsst-alert-packet schema version (None: the package's latest)."""
    import fastavro
    from lsst.alert.packet import get_latest_schema_version

    if version is None:
        version = "{}.{}".format(*get_latest_schema_version())
    registry = _lsst_registry()
    if version not in registry.known_versions:
        raise SchemaVersionError(f"lsst-alert-packet has no alert schema {version!r}; known: "
                         f"{sorted(registry.known_versions, key=lambda v: tuple(map(int, v.split('.'))))}")
    return version, fastavro.parse_schema(registry.get_by_version(version).definition)


@cache
def _lsst_parsed_by_id(schema_id: int) -> tuple[str, Any] | None:
    registry = _lsst_registry()
    if schema_id not in registry.known_ids:
        return None
    version = next(v for v in registry.known_versions if registry.get_by_version(v).get_schema_id() == schema_id)
    return _lsst_parsed(version)


def lsst_schema_versions() -> list[str]:
    """The LSST alert schema versions the installed lsst-alert-packet ships, oldest first."""
    return sorted(_lsst_registry().known_versions, key=lambda v: tuple(map(int, v.split("."))))


def decode_packet(data: bytes, packet: str, format: str = "auto", lsst_schema_version: str | None = None
                  ) -> list[Item]:
    """One packet (a file's or a Kafka message's bytes) -> its alerts, or Malformed entries naming the problem.

    Never raises for bad data: a packet that cannot be read gives one Malformed; a record of an OCF that is not a
    valid alert gives a Malformed for that record only (``packet#index``)."""
    import fastavro

    if format not in FORMATS:
        raise ValueError(f"alerts format must be one of {FORMATS}, not {format!r}")
    if not data:
        return [Malformed(packet, "empty packet")]
    records: list[tuple[str, Any]] = []
    try:
        if data[:4] == OCF_MAGIC:
            decoded = list(fastavro.reader(io.BytesIO(data)))
            if not decoded:
                return [Malformed(packet, "Avro container holds no record")]
            records = [(packet if len(decoded) == 1 else f"{packet}#{i}", r) for i, r in enumerate(decoded)]
        elif data[0] == WIRE_MAGIC and len(data) >= 5:
            schema_id = int.from_bytes(data[1:5], "big")
            found = _lsst_parsed_by_id(schema_id)
            if found is None and lsst_schema_version is None:
                return [Malformed(packet, f"wire-format schema id {schema_id} is not an lsst-alert-packet schema "
                                          f"(known ids: {sorted(_lsst_registry().known_ids)}); set "
                                          "alerts.lsst_schema_version to read it anyway")]
            _, parsed = found if found is not None else _lsst_parsed(lsst_schema_version)
            records = [(packet, fastavro.schemaless_reader(io.BytesIO(data[5:]), parsed, None))]
        elif format == "lsst":
            _, parsed = _lsst_parsed(lsst_schema_version)
            records = [(packet, fastavro.schemaless_reader(io.BytesIO(data), parsed, None))]
        else:
            return [Malformed(packet, "neither an Avro container file nor a Confluent wire-format message (magic "
                                      "byte 0 + schema id); set alerts.format=lsst to read bare LSST Avro bodies")]
    except SchemaVersionError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any decoding failure is this packet's problem, not the stream's
        return [Malformed(packet, f"cannot decode Avro: {type(exc).__name__}: {exc}")]
    out: list[Item] = []
    for name, record in records:
        try:
            out.append(alert_from_record(record, name, format))
        except Exception as exc:  # noqa: BLE001
            alert_id = oid = None
            if isinstance(record, Mapping):
                alert_id = record.get("candid", record.get("alertId", record.get("diaSourceId")))
                oid = record.get("objectId")
            out.append(Malformed(name, str(exc) if isinstance(exc, PacketError) else f"{type(exc).__name__}: {exc}",
                                 None if alert_id is None else str(alert_id), None if oid is None else str(oid)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sources.

def iter_directory(path: Path | str, format: str = "auto", lsst_schema_version: str | None = None
                   ) -> Iterator[Item]:
    """Alerts of every ``*.avro`` file under ``path`` (or of the one file ``path``), in sorted path order.

    Raises FileNotFoundError at once (not when iterated) when ``path`` does not exist."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"alert directory {path} does not exist")
    if format not in FORMATS:
        raise ValueError(f"alerts format must be one of {FORMATS}, not {format!r}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.avro") if p.is_file())
    return _iter_files(files, format, lsst_schema_version)


def _iter_files(files: list[Path], format: str, lsst_schema_version: str | None) -> Iterator[Item]:
    for file in files:
        name = str(file)
        try:
            data = file.read_bytes()
        except OSError as exc:
            yield Malformed(name, f"cannot read: {exc}")
            continue
        yield from decode_packet(data, name, format, lsst_schema_version)


class KafkaSource:
    """Alerts from a Kafka topic (``alerts.kafka``), committed explicitly after each written batch (at least once).

    Iterating yields alerts (and Malformed entries) and :data:`IDLE` after an empty poll. With ``idle_timeout_s``
    iteration ends once partitions were assigned and no message came for that long (tests, catch-up runs); without
    it, it runs until :meth:`close` or an interrupt."""

    def __init__(self, kafka, format: str = "auto", lsst_schema_version: str | None = None,
                 idle_timeout_s: float | None = None, assignment_timeout_s: float = 60.0):
        if not kafka.bootstrap_servers or not kafka.topic:
            raise ValueError("alerts.kafka.bootstrap_servers and alerts.kafka.topic must both be set to read Kafka "
                             f"(got {kafka.bootstrap_servers!r}, {kafka.topic!r})")
        from confluent_kafka import Consumer

        conf = {"bootstrap.servers": kafka.bootstrap_servers, "group.id": kafka.group_id,
                "auto.offset.reset": kafka.auto_offset_reset, **dict(kafka.config)}
        if str(conf.get("enable.auto.commit", "false")).lower() == "true":
            log.warning("alerts.kafka.config enable.auto.commit=true ignored: offsets are committed after each "
                        "written batch")
        conf["enable.auto.commit"] = False
        self.kafka, self.format, self.lsst_schema_version = kafka, format, lsst_schema_version
        self.idle_timeout_s, self.assignment_timeout_s = idle_timeout_s, assignment_timeout_s
        self.assigned = False
        self.consumer = Consumer(conf)
        self.consumer.subscribe([kafka.topic], on_assign=self._on_assign)
        self.committed_batches = 0

    def _on_assign(self, consumer, partitions) -> None:
        self.assigned = True

    def __iter__(self) -> Iterator[Item | _Idle]:
        started = last = time.monotonic()
        while True:
            messages = self.consumer.consume(num_messages=500, timeout=self.kafka.poll_timeout_s)
            now = time.monotonic()
            got = False
            for m in messages:
                if m.error():
                    if m.error().fatal():
                        from confluent_kafka import KafkaException

                        raise KafkaException(m.error())
                    log.warning("Kafka: %s", m.error())
                    continue
                got = True
                yield from self._decode(m)
            if got:
                last = now
                continue
            yield IDLE
            if self.idle_timeout_s is not None:
                if self.assigned and now - last >= self.idle_timeout_s:
                    return
                if not self.assigned and now - started >= max(self.assignment_timeout_s, self.idle_timeout_s):
                    log.warning("Kafka: no partition of %s assigned after %.0f s", self.kafka.topic, now - started)
                    return
            if not self.assigned:
                last = now

    def _decode(self, m) -> Iterator[Item]:
        position = (m.topic(), m.partition(), m.offset())
        name = f"{m.topic()}[{m.partition()}]@{m.offset()}"
        items = decode_packet(m.value() or b"", name, self.format, self.lsst_schema_version)
        for i, item in enumerate(items):
            yield _with_position(item, position, i == len(items) - 1)

    def commit(self, items: Sequence[Item]) -> None:
        """Commit the offsets of ``items`` (all written): a message is committed once its last alert was written."""
        from confluent_kafka import KafkaException, TopicPartition

        upto: dict[tuple[str, int], int] = {}
        for item in items:
            if item.position is None:
                continue
            topic, partition, offset = item.position
            upto[(topic, partition)] = offset + 1 if item.last_in_packet else offset
        if not upto:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in upto.items()],
                                 asynchronous=False)
            self.committed_batches += 1
        except KafkaException as exc:  # e.g. partitions revoked by a rebalance: they will be re-delivered
            log.warning("Kafka: commit failed (%s); the messages will be delivered again and skipped as written",
                        exc)

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> KafkaSource:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _with_position(item: Item, position: tuple[str, int, int], last: bool) -> Item:
    return replace(item, position=position, last_in_packet=last)


# ----------------------------------------------------------------------------------------------------------------
# Light curves.

class LateAlert(Exception):
    """The alert is older than the part of its object's history the book still keeps."""


@dataclass
class _Track:
    t: np.ndarray
    band: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    n_trimmed: int = 0  # detections dropped by trimming (still counted in n_det)
    trimmed_before: float = -math.inf  # detections before this time (except the first) are not kept


def _time_key(t: np.ndarray) -> np.ndarray:
    """Times as integer micro-days (0.09 s): equal detections compare equal after float round trips."""
    return np.round(np.asarray(t) * 1e6).astype(np.int64)


class LightCurveBook:
    """Per-object detections merged from alerts, deduplicated on (time, band), LRU-bounded to ``max_objects``.

    ``keep_days``: detections older than this before an object's latest one are dropped, except its first (which
    fixes the window); None keeps everything. :func:`keep_days_for` gives the value at which the tensors cannot
    change."""

    def __init__(self, max_objects: int = 1_000_000, keep_days: float | None = None):
        if max_objects < 1:
            raise ValueError(f"max_objects must be at least 1, got {max_objects}")
        self.max_objects, self.keep_days = int(max_objects), keep_days
        self._tracks: OrderedDict[str, _Track] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._tracks)

    def __contains__(self, oid: object) -> bool:
        return oid in self._tracks

    def n_points(self, oid: str) -> int:
        """Detections kept for ``oid`` (0 when unknown)."""
        track = self._tracks.get(oid)
        return 0 if track is None else len(track.t)

    def update(self, alert: Alert) -> _Track | None:
        """Merge the alert's detections into its object; the object becomes the most recently used."""
        track = self._tracks.get(alert.oid)
        t, band, flux, err = alert.t, alert.band, alert.flux, alert.flux_err
        if track is not None:
            if len(t) and track.trimmed_before > -math.inf:
                # History re-sent by later alerts: what lies before the trim horizon was counted already.
                keep = (t >= track.trimmed_before) | (t <= track.t[0])
                t, band, flux, err = t[keep], band[keep], flux[keep], err[keep]
            t = np.concatenate([track.t, t])
            band = np.concatenate([track.band, band])
            flux = np.concatenate([track.flux, flux])
            err = np.concatenate([track.flux_err, err])
        if len(t) == 0:
            return track
        key = _time_key(t)
        order = np.lexsort((np.arange(len(t)), band, key))  # stable: a point already kept wins over a re-sent one
        key_s, band_s = key[order], band[order]
        first = np.r_[True, (key_s[1:] != key_s[:-1]) | (band_s[1:] != band_s[:-1])]
        order = order[first]
        t, band, flux, err = t[order], band[order], flux[order], err[order]
        if track is None:
            track = _Track(t, band, flux, err)
            self._tracks[alert.oid] = track
            while len(self._tracks) > self.max_objects:
                self._tracks.popitem(last=False)
                self.evicted += 1
        else:
            track.t, track.band, track.flux, track.flux_err = t, band, flux, err
            self._tracks.move_to_end(alert.oid)
        if self.keep_days is not None and len(t) > 1:
            horizon = float(t[-1]) - float(self.keep_days)
            drop = t < horizon
            drop[0] = False
            if drop.any():
                keep = ~drop
                track.n_trimmed += int(drop.sum())
                track.t, track.band, track.flux, track.flux_err = t[keep], band[keep], flux[keep], err[keep]
            track.trimmed_before = max(track.trimmed_before, horizon)
        return track

    def as_of(self, oid: str, mjd: float, key: str | None = None, needed_days: float | None = None
              ) -> tuple[Curve, int]:
        """(curve, n_det) of ``oid`` with only the detections at or before ``mjd``; the curve is named ``key``.

        Raises LateAlert when detections the window needs (``needed_days`` before ``mjd``) were trimmed."""
        track = self._tracks.get(oid)
        name = key if key is not None else oid
        if track is None:
            empty = np.zeros(0)
            return Curve(name, empty, empty.astype(np.int64), empty, empty), 0
        if needed_days is not None and track.n_trimmed and mjd - needed_days < track.trimmed_before:
            raise LateAlert(f"alert at mjd {mjd:.5f} is older than the kept history of {oid} (detections before "
                            f"mjd {track.trimmed_before:.5f} were trimmed)")
        n = int(np.searchsorted(track.t, mjd + 0.5e-6, side="right"))  # same rounding as the dedupe key
        curve = Curve(name, track.t[:n].copy(), track.band[:n].copy(), track.flux[:n].copy(),
                      track.flux_err[:n].copy())
        return curve, n + (track.n_trimmed if n else 0)

    def detections(self, oid: str) -> pd.DataFrame:
        """The kept detections of ``oid`` as contract columns (mag from |flux|)."""
        from deeprubin.schema import flux_to_mag

        track = self._tracks[oid]
        mag, mag_err = flux_to_mag(track.flux, track.flux_err)
        return pd.DataFrame({"oid": oid, "mjd": track.t, "band": np.where(track.band == 0, "g", "r"), "mag": mag,
                             "mag_err": mag_err, "flux": track.flux, "flux_err": track.flux_err,
                             "mag_corr": np.nan, "mag_corr_err": np.nan, "source": "alerts"})


def window_days(grid_days: int, fit_context_days: float) -> float:
    """Days before a curve's last detection that its tensor can depend on (besides its first detection)."""
    return float(grid_days - 1) + float(fit_context_days)


def keep_days_for(grid_days: int, fit_context_days: float, margin_days: float = TRIM_MARGIN_DAYS) -> float:
    """The book's trim horizon: the window policy's reach plus a margin for alerts that arrive out of order."""
    return window_days(grid_days, fit_context_days) + float(margin_days)


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

    One :func:`deeprubin.serving.classify.classify_curves` call per batch (the GP and TCN batched across objects)."""

    def __init__(self, model: ServingModel, grid_days: int = 100, fit_context_days: float = 100.0,
                 batch_size: int = 1024, max_objects: int = 1_000_000, trim: bool = True):
        self.model, self.grid_days, self.fit_context_days = model, int(grid_days), float(fit_context_days)
        self.batch_size = int(batch_size)
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
                                           self.batch_size)
            rows = self._rows(out, meta)
            for r in skipped.itertuples(index=False):
                alert = meta[int(r.oid)][0]
                rejected.append({"alert_id": alert.alert_id, "oid": alert.oid, "packet": alert.packet,
                                 "reason": r.reason, "detail": r.detail, "key": alert.key})
        rejections = pd.DataFrame(rejected, columns=[*REJECTION_COLUMNS, "key"])
        return BatchOutput(rows=rows, rejections=rejections, keys=keys, n_alerts=n_alerts, n_malformed=n_malformed,
                           n_duplicates=n_dup)

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
                           params.classify.batch_size, params.alerts.max_objects)


def consume_directory(params, directory: Path | str, output_dir: Path | str | None = None,
                      model: ServingModel | None = None, max_alerts: int | None = None,
                      progress: ConsumeProgress | None = None) -> ConsumeResult:
    """Classify every alert packet under ``directory`` into ``output_dir`` (default ``params.alerts.output_dir``)."""
    a = params.alerts
    source = iter_directory(directory, a.format, a.lsst_schema_version)
    classifier = _classifier(params, model)
    writer = AlertWriter(output_dir or a.output_dir)
    try:
        return consume(source, classifier, writer, a.batch_alerts, max_alerts, progress=progress)
    finally:
        writer.close()


def consume_kafka(params, output_dir: Path | str | None = None, model: ServingModel | None = None,
                  max_alerts: int | None = None, idle_timeout_s: float | None = None,
                  progress: ConsumeProgress | None = None) -> ConsumeResult:
    """Classify the alerts of ``params.alerts.kafka.topic`` until interrupted (or idle for ``idle_timeout_s``, or
    ``max_alerts`` read), committing offsets after each written batch."""
    a = params.alerts
    classifier = _classifier(params, model)
    with KafkaSource(a.kafka, a.format, a.lsst_schema_version, idle_timeout_s=idle_timeout_s) as source:
        writer = AlertWriter(output_dir or a.output_dir)
        try:
            return consume(source, classifier, writer, a.batch_alerts, max_alerts, commit=source.commit,
                           progress=progress)
        finally:
            writer.close()


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


# ----------------------------------------------------------------------------------------------------------------
# Replay of labelled light curves, alert by alert (early classification).

def alerts_from_detections(detections: pd.DataFrame, max_days: float | None = None) -> Iterator[Alert]:
    """Contract detections -> one alert per detection (g/r only), in time order across objects; each alert carries
    the object's detections up to and including it (the history a broker would send). ``max_days``: no alerts
    later than this many days after the object's first detection."""
    if detections.empty:
        return
    from deeprubin.lightcurves.tensorize import curves_from_detections

    curves = [c for c in curves_from_detections(detections)]
    events: list[tuple[float, int, int]] = []
    cleaned = []
    for ci, c in enumerate(curves):
        t, band, flux, err = _points(c.mjd, c.band, c.flux, c.flux_err)
        cleaned.append((c.oid, t, band, flux, err))
        for j in range(len(t)):
            if max_days is not None and t[j] - t[0] > max_days:
                break
            events.append((float(t[j]), ci, j))
    events.sort()
    for mjd, ci, j in events:
        oid, t, band, flux, err = cleaned[ci]
        yield Alert(alert_id=f"{oid}:{j}", oid=oid, mjd=mjd, format="replay", t=t[:j + 1], band=band[:j + 1],
                    flux=flux[:j + 1], flux_err=err[:j + 1], packet=f"replay:{oid}:{j}")


def replay_detections(detections: pd.DataFrame, model: ServingModel, grid_days: int = 100,
                      fit_context_days: float = 100.0, batch_alerts: int = 1024, batch_size: int = 1024,
                      max_days: float | None = None, progress: ConsumeProgress | None = None) -> ConsumeResult:
    """Replay labelled detections through the consumer (book, as-of curves, batched classification), in memory.

    Each detection becomes an alert classified with only the detections before it and itself; rows are in
    ``result.classifications`` (``oid``, ``days_since_first_detection``, ``p_*``...), rejections in
    ``result.rejections``."""
    classifier = AlertClassifier(model, grid_days, fit_context_days, batch_size,
                                 max_objects=max(1, int(detections["oid"].nunique()) if len(detections) else 1))
    return consume(alerts_from_detections(detections, max_days), classifier, None, batch_alerts, progress=progress)


def early_metrics(rows: pd.DataFrame, labels: Mapping[str, str] | pd.Series, classes: Sequence[str] = ("SNIa", "SNII"),
                  bins: Sequence[float] = EARLY_BINS, restrict: bool = True) -> pd.DataFrame:
    """Accuracy and macro-F1 against days since first detection, from per-alert classification rows.

    In each bin ``[lo, hi)`` (the last one closed) every labelled object counts once, with its latest alert in the
    bin (so densely observed objects do not outweigh the others). ``restrict``: the prediction is the argmax over
    ``classes`` only (probabilities renormalised), as :mod:`deeprubin.stages.evaluate` scores BTS. Objects whose
    label is not in ``classes`` are left out. Columns: ``bin, lo, hi, n_objects, n_alerts, n_<class>..., accuracy,
    macro_f1``."""
    from deeprubin.evaluation.metrics import macro_f1

    label_of = pd.Series(labels).astype(str) if not isinstance(labels, pd.Series) else labels.astype(str)
    label_of.index = label_of.index.astype(str)
    frame = rows.assign(oid=rows["oid"].astype(str))
    frame = frame.assign(label=frame["oid"].map(label_of))
    frame = frame.loc[frame["label"].isin(list(classes))]
    days = frame["days_since_first_detection"].to_numpy(dtype=float)
    records = []
    edges = list(bins)
    for k, (lo, hi) in enumerate(pairwise(edges)):
        last = k == len(edges) - 2
        inside = (days >= lo) & ((days <= hi) if last else (days < hi))
        sub = frame.loc[inside]
        sub = sub.sort_values(["oid", "days_since_first_detection", "alert_mjd"], kind="mergesort")
        latest = sub.drop_duplicates("oid", keep="last")
        rec: dict[str, Any] = {"bin": f"{lo:g}-{hi:g}", "lo": float(lo), "hi": float(hi),
                               "n_objects": len(latest), "n_alerts": len(sub)}
        for c in classes:
            rec[f"n_{c}"] = int((latest["label"] == c).sum())
        if len(latest):
            proba = latest[[f"p_{c}" for c in CLASSES]].to_numpy(dtype=float)
            y = latest["label"].to_numpy()
            idx = [CLASSES.index(c) for c in classes]
            scored = proba[:, idx] if restrict else proba
            names = np.asarray(classes if restrict else CLASSES)
            pred = names[scored.argmax(axis=1)]
            rec["accuracy"] = float(np.mean(pred == y))
            rec["macro_f1"] = macro_f1(y, proba, classes=CLASSES, labels=list(classes),
                                       restrict_predictions=restrict)
        else:
            rec["accuracy"] = rec["macro_f1"] = float("nan")
        records.append(rec)
    return pd.DataFrame.from_records(records)
