"""A local stand-in for ALeRCE's legacy ZTF API (``/ztf/v1``), for tests and benchmarks of the ALeRCE source.

It speaks the routes, query parameters and JSON shapes that the real ``alerce`` client (2.3.x) uses, as documented
in ``../shared/data/alerce/API.md`` and in the server code of alercebroker/web-services ``alerts-api`` (flask-restx):

* ``GET /ztf/v1/objects``: the paginated object list (object row joined with a probability row);
* ``GET /ztf/v1/objects/{oid}``, ``.../detections``, ``.../non_detections``, ``.../lightcurve``, ``.../probabilities``;
* ``GET /ztf/v1/classifiers`` and ``/ztf/v1/classifiers/{name}/{version}/classes``.

Behaviour copied from the real server, on purpose (a client that works here works there):

* ``total`` is filled only when ``count=true``; without it ``has_next`` is always false and ``next`` null (the real
  ``Pagination.pages`` is 0 when ``total`` is None). A client that pages must send ``count=true`` or page until a
  short/empty page. ``page`` in the response is always null.
* With none of classifier/classifier_version/class/probability/ranking given, each object appears once, joined with
  its ranking-1 lc_classifier row. With any of them, objects are joined with *every* probability row that matches
  (ranking defaults to 1 when classifier, class or classifier_version is given, not when only probability is), so
  ``probability=0.7`` alone can list an object once per classifier. Probabilities carry lc_classifier and
  lc_classifier_top rows.
* A single ``oid`` filter may use ``*`` as a wildcard; several oids without ``order_by`` come back in the order given.
* Detection rows have no oid and drop null/NaN keys (skip_none); object-list items keep all 23 keys, nulls included.

Faults (:class:`FaultRule`) are injected per route / object / page / class and heal after ``times`` matching
requests; ``unsorted`` makes /objects ignore ``order_by`` (pages out of order). :class:`RandomFaults` fails a share of
all requests at random (a high fault rate); :func:`unused_url` is a URL with nothing listening. Every request is
logged in :attr:`AlerceReplayServer.requests` with its status and fault.

Run ``python -m tests.alerce_server --n-per-class 50 --seed 1 --port 0 [--recorded] [--fault-rate 0.7]`` for a
standalone server: it prints ``ALERCE_URL=http://127.0.0.1:PORT`` and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fnmatch
import json
import math
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_ALERCE = REPO.parent / "shared" / "data" / "alerce"
RECORDED_LIGHTCURVE = SHARED_ALERCE / "ZTF20aaelulu_lightcurve.json"
RECORDED_OID = "ZTF20aaelulu"
DEFAULT_CONFIG = SHARED_ALERCE / "alerce_client_2.3.1_default_config.json"

API_PREFIX = "/ztf/v1"
LC_CLASSIFIER = "lc_classifier"
LC_CLASSIFIER_TOP = "lc_classifier_top"
CLASSIFIER_VERSION = "hierarchical_rf_1.1.0"
STEP_ID_CORR = "bulk_1.0.0"
# lc_classifier taxonomy (alerts-api tests), in the order the real server lists probability rows.
TAXONOMY: dict[str, tuple[str, ...]] = {
    "Transient": ("SNIa", "SNIbc", "SNII", "SLSN"),
    "Stochastic": ("QSO", "AGN", "Blazar", "CV/Nova", "YSO"),
    "Periodic": ("LPV", "E", "DSCT", "RRL", "CEP", "Periodic-Other"),
}
LC_CLASSES: tuple[str, ...] = tuple(c for group in TAXONOMY.values() for c in group)
TOP_OF: dict[str, str] = {c: top for top, group in TAXONOMY.items() for c in group}
STELLAR_CLASSES = frozenset(TAXONOMY["Periodic"]) | {"CV/Nova", "YSO"}
FID = {"g": 1, "r": 2, "i": 3}
ITEM_COLUMNS: tuple[str, ...] = (
    "oid", "ndethist", "ncovhist", "mjdstarthist", "mjdendhist", "corrected", "stellar", "ndet", "g_r_max",
    "g_r_max_corr", "g_r_mean", "g_r_mean_corr", "firstmjd", "lastmjd", "deltajd", "meanra", "meandec", "sigmara",
    "sigmadec", "class", "classifier", "probability", "step_id_corr",
)
OBJECT_COLUMNS: tuple[str, ...] = tuple(c for c in ITEM_COLUMNS if c not in ("class", "classifier", "probability"))
# order_by values the server accepts -> item key (the real server looks the name up on Object, then Probability).
ORDER_BY: dict[str, str] = {c: c for c in ITEM_COLUMNS}
ORDER_BY.update({"class_name": "class", "classifier_name": "classifier", "deltamjd": "deltajd", "ranking": "ranking"})
ROUTES = ("objects", "object", "detections", "non_detections", "lightcurve", "probabilities")
FAULT_KINDS = ("http_500", "http_503", "http_429", "slow", "truncated_json", "malformed_json", "reset", "not_found",
               "empty_page", "repeat_page", "unsorted")
PAGE_FAULTS = ("empty_page", "repeat_page", "unsorted")
# What RandomFaults draws from by default: failures a client should retry past.
TRANSIENT_KINDS = ("http_500", "http_503", "http_429", "truncated_json", "malformed_json", "reset")
MAX_COUNT = 50000  # the real server counts at most max_results + 1 rows

# ---------------------------------------------------------------------------------------------------------------
# Faults and request log
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FaultRule:
    """Make matching requests fail in one way, ``times`` times (-1: forever), then heal."""

    route: str  # "objects" | "object" | "detections" | "non_detections" | "lightcurve" | "probabilities" | "*"
    kind: str  # one of FAULT_KINDS
    oid: str | None = None  # only requests for this object (None = any); never matches /objects
    page: int | None = None  # only this page of /objects (None = any); never matches per-object routes
    class_name: str | None = None  # only /objects queries for this class (None = any)
    times: int = 1
    retry_after: float = 1.0  # seconds, sent as Retry-After with http_429
    delay: float = 5.0  # seconds slept before answering, for "slow"

    def __post_init__(self) -> None:
        if self.route != "*" and self.route not in ROUTES:
            raise ValueError(f"unknown route {self.route!r}: expected one of {ROUTES} or '*'")
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}: expected one of {FAULT_KINDS}")

    def matches(self, route: str, oid: str | None, page: int | None, class_name: str | None = None) -> bool:
        if self.times == 0 or (self.route != "*" and self.route != route):
            return False
        if self.kind in PAGE_FAULTS and route != "objects":
            return False
        if self.kind == "not_found" and oid is None:
            return False
        if self.oid is not None and self.oid != oid:
            return False
        if self.page is not None and (route != "objects" or self.page != page):
            return False
        if self.class_name is not None and (route != "objects" or self.class_name != class_name):
            return False
        return True


@dataclass
class RandomFaults:
    """Fail each request to ``routes`` with probability ``rate``, in a kind drawn from ``kinds`` (seeded: with one
    request in flight at a time the same requests fail on every run)."""

    rate: float
    kinds: tuple[str, ...] = TRANSIENT_KINDS
    routes: tuple[str, ...] = ROUTES
    seed: int = 0
    retry_after: float = 0.05
    delay: float = 2.0

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ValueError(f"rate must lie in [0, 1], got {self.rate}")
        unknown = [k for k in self.kinds if k not in TRANSIENT_KINDS + ("slow",)]
        if unknown:
            raise ValueError(f"unknown random fault kind(s) {unknown}: expected some of {TRANSIENT_KINDS + ('slow',)}")
        self._rng = random.Random(self.seed)

    def draw(self, route: str) -> FaultRule | None:
        if route not in self.routes or self._rng.random() >= self.rate:
            return None
        return FaultRule(route=route, kind=self._rng.choice(self.kinds), times=1, retry_after=self.retry_after,
                         delay=self.delay)


def unused_url(host: str = "127.0.0.1") -> str:
    """An http URL on a free local port with nothing listening (connections are refused)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    return f"http://{host}:{port}"


@dataclass(frozen=True)
class RequestRecord:
    route: str  # a ROUTES name, "classifiers", "classes" or "unknown"
    oid: str | None
    page: int | None  # /objects only (the page asked for, default 1)
    query: dict[str, list[str]]
    status: int  # the status sent; for "reset" the status in the (cut) headers
    fault: str | None
    time: float = 0.0  # time.monotonic() when the request arrived


# ---------------------------------------------------------------------------------------------------------------
# Catalogue
# ---------------------------------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _rows(columns: dict[str, np.ndarray], index: np.ndarray) -> list[dict]:
    """Dicts for the rows ``index`` of a column store, dropping null/NaN keys (flask-restx skip_none)."""
    keys = list(columns)
    values = [columns[k][index].tolist() for k in keys]
    return [{k: v for k, v in zip(keys, row) if v is not None and v == v} for row in zip(*values)]


@dataclass
class _Object:
    oid: str
    class_name: str
    probability: float
    probabilities: list[dict]
    # Arrays of the served detections, in served order, for the object row.
    det_mjd: np.ndarray
    det_fid: np.ndarray
    det_mag: np.ndarray
    det_mag_corr: np.ndarray
    det_ra: np.ndarray
    det_dec: np.ndarray
    det_corrected: np.ndarray
    nondet_mjd: np.ndarray
    # Either indices into the catalogue's column stores (simulated) or the recorded dicts as they are.
    det_index: np.ndarray | None = None
    nondet_index: np.ndarray | None = None
    det_dicts: list[dict] | None = None
    nondet_dicts: list[dict] | None = None

    @property
    def first_mjd(self) -> float:
        return float(self.det_mjd.min()) if len(self.det_mjd) else math.inf


def probability_rows(class_name: str, probability: float, rng: np.random.Generator,
                     version: str = CLASSIFIER_VERSION) -> list[dict]:
    """lc_classifier rows (top class at ranking 1, the rest sharing 1 - p) and lc_classifier_top rows."""
    others = [c for c in LC_CLASSES if c != class_name]
    share = rng.dirichlet(np.ones(len(others))) * (1.0 - probability)
    cap = probability * 0.999
    for _ in range(60):  # mix towards uniform until no other class beats the top one (when that is possible)
        if share.max() < cap or (1.0 - probability) / len(others) >= cap:
            break
        share = 0.5 * share + 0.5 * (1.0 - probability) / len(others)
    probs = {class_name: probability, **{c: float(s) for c, s in zip(others, share)}}
    ranked = [class_name] + sorted(others, key=lambda c: (-probs[c], c))
    rank = {c: i + 1 for i, c in enumerate(ranked)}
    rows = [
        {"classifier_name": LC_CLASSIFIER, "classifier_version": version, "class_name": c,
         "probability": probs[c], "ranking": rank[c]}
        for c in LC_CLASSES
    ]
    top = {t: sum(probs[c] for c in group) for t, group in TAXONOMY.items()}
    top_ranked = sorted(top, key=lambda t: (t != TOP_OF.get(class_name), -top[t]))
    rows += [
        {"classifier_name": LC_CLASSIFIER_TOP, "classifier_version": version, "class_name": t,
         "probability": top[t], "ranking": top_ranked.index(t) + 1}
        for t in TAXONOMY
    ]
    return rows


def _oid_rng(seed: int, oid: str, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(oid.encode()), salt])


class Catalogue:
    """What the server knows: per object its ALeRCE object row, lc_classifier class + probability, detections and
    non-detections as ALeRCE dicts."""

    def __init__(self) -> None:
        self._objects: dict[str, _Object] = {}
        self._det_cols: dict[str, np.ndarray] = {}
        self._nondet_cols: dict[str, np.ndarray] = {}
        self.version = 0  # bumped on every change (invalidates the server's caches)

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_lightcurves(cls, lcs, seed: int = 0, probability: Callable[[str, str], float] | None = None
                         ) -> "Catalogue":
        """Contract tables (:class:`deeprubin.schema.LightCurves`) -> ALeRCE shapes.

        The class is ``objects.label``; its probability is ``probability(oid, label)`` or drawn uniform in
        [0.4, 1.0) per object from ``seed`` and the oid (so the same object gets the same number in any catalogue).
        """
        cat = cls()
        labels = dict(zip(lcs.objects["oid"].astype(str), lcs.objects["label"]))
        det = lcs.detections.sort_values(["oid", "mjd"], kind="mergesort").reset_index(drop=True)
        nondet = lcs.non_detections.sort_values(["oid", "mjd"], kind="mergesort").reset_index(drop=True)
        det = det[det["oid"].astype(str).isin(labels)].reset_index(drop=True)
        nondet = nondet[nondet["oid"].astype(str).isin(labels)].reset_index(drop=True)
        n = len(det)
        oid = det["oid"].astype(str).to_numpy()
        mjd = det["mjd"].to_numpy(dtype=float)
        fid = det["band"].map(FID).fillna(0).to_numpy(dtype=np.int64)
        mag = det["mag"].to_numpy(dtype=float)
        mag_err = det["mag_err"].to_numpy(dtype=float)
        flux = det["flux"].to_numpy(dtype=float)
        flux_err = det["flux_err"].to_numpy(dtype=float)
        mag_corr = det["mag_corr"].to_numpy(dtype=float)
        mag_corr_err = (det["mag_corr_err"].to_numpy(dtype=float) if "mag_corr_err" in det
                        else np.full(n, np.nan))
        corrected = np.isfinite(mag_corr)
        mag_corr_err = np.where(corrected, mag_corr_err, np.nan)

        # Per-object constants, from the oid and seed.
        uniq, start = np.unique(oid, return_index=True)
        stop = np.append(start[1:], n)
        crc = np.array([zlib.crc32(o.encode()) for o in uniq], dtype=np.int64)
        obj_ra = np.empty(len(uniq))
        obj_dec = np.empty(len(uniq))
        for i, o in enumerate(uniq):
            r = _oid_rng(seed, o, 1)
            obj_ra[i] = r.uniform(0.0, 360.0)
            obj_dec[i] = np.degrees(np.arcsin(r.uniform(np.sin(np.radians(-30.0)), 1.0)))
        obj_of_row = np.repeat(np.arange(len(uniq)), stop - start)
        k_in_obj = np.arange(n) - np.repeat(start, stop - start)

        rng = np.random.default_rng([seed, 7])
        nid = np.floor(mjd).astype(np.int64) - 57754
        frac5 = np.floor((mjd - np.floor(mjd)) * 1e5).astype(np.int64)
        pid = nid * 10**9 + frac5 * 10**4 + crc[obj_of_row] % 10**4
        candid = pid * 10**6 + (crc[obj_of_row] // 10**4 % 10**3) * 10**3 + k_in_obj % 10**3
        order = np.argsort(candid, kind="mergesort")
        dup = np.zeros(n, dtype=bool)
        dup[order[1:]] = np.diff(candid[order]) == 0
        taken = set(candid.tolist())
        for i in np.flatnonzero(dup):  # deterministic repair of (practically impossible) collisions
            c = int(candid[i])
            while c in taken:
                c += 1
            candid[i] = c
            taken.add(c)

        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.abs(flux) / flux_err
            diffmaglim = mag + 2.5 * np.log10(np.maximum(snr, 1e-3) / 5.0)
        has_stamp = rng.random(n) < 0.7
        last_of_obj = stop - 1
        has_stamp[last_of_obj] = True
        parent = np.full(n, np.nan, dtype=object)
        next_alert = None
        for i in range(n - 1, -1, -1):
            if i == last_of_obj[obj_of_row[i]]:
                next_alert = None
            if has_stamp[i]:
                next_alert = int(candid[i])
            elif next_alert is not None:
                parent[i] = next_alert
        parent = np.where(has_stamp, None, parent)
        parent = np.array([None if (p is None or (isinstance(p, float) and p != p)) else int(p) for p in parent],
                          dtype=object)
        sig_ext = np.sqrt(mag_corr_err**2 + 0.01**2)
        rfid = (crc[obj_of_row] % 1000) * 10**6 + 120000 + fid * 10

        cols: dict[str, np.ndarray] = {
            "tid": np.full(n, "ztf", dtype=object),
            "mjd": mjd,
            "candid": candid.astype(str).astype(object),
            "fid": fid,
            "pid": pid,
            "diffmaglim": diffmaglim,
            "isdiffpos": np.where(flux < 0, -1, 1).astype(np.int64),
            "nid": nid,
            "distnr": np.where(corrected, rng.uniform(0.05, 1.0, n), rng.uniform(1.5, 8.0, n)),
            "magpsf": mag,
            "magpsf_corr": np.where(corrected, mag_corr, np.nan),
            "magpsf_corr_ext": np.where(corrected, mag_corr, np.nan),
            "magap": mag + rng.normal(0.0, 1.0, n) * np.nan_to_num(mag_err) * 0.5,
            "sigmapsf": mag_err,
            "sigmapsf_corr": mag_corr_err,
            "sigmapsf_corr_ext": np.where(corrected, sig_ext, np.nan),
            "sigmagap": mag_err * 1.05,
            "ra": obj_ra[obj_of_row] + rng.normal(0.0, 0.1 / 3600, n) / np.cos(np.radians(obj_dec[obj_of_row])),
            "dec": obj_dec[obj_of_row] + rng.normal(0.0, 0.1 / 3600, n),
            "rb": rng.uniform(0.55, 1.0, n),
            "rbversion": np.full(n, "t17_f5_c3", dtype=object),
            "drb": rng.uniform(0.8, 1.0, n),
            "magapbig": mag + rng.normal(0.0, 1.0, n) * np.nan_to_num(mag_err) * 0.6,
            "sigmagapbig": mag_err * 1.2,
            "rfid": rfid,
            "has_stamp": has_stamp,
            "corrected": corrected,
            "dubious": np.zeros(n, dtype=bool),
            "step_id_corr": np.full(n, STEP_ID_CORR, dtype=object),
            "phase": np.zeros(n),
            "parent_candid": parent,
        }
        cat._det_cols = cols
        nd_oid = nondet["oid"].astype(str).to_numpy()
        cat._nondet_cols = {
            "tid": np.full(len(nondet), "ztf", dtype=object),
            "mjd": nondet["mjd"].to_numpy(dtype=float),
            "fid": nondet["band"].map(FID).fillna(0).to_numpy(dtype=np.int64),
            "diffmaglim": nondet["diffmaglim"].to_numpy(dtype=float),
        }
        nd_uniq, nd_start = np.unique(nd_oid, return_index=True)
        nd_stop = np.append(nd_start[1:], len(nd_oid))
        nd_ranges = {o: (a, b) for o, a, b in zip(nd_uniq.tolist(), nd_start.tolist(), nd_stop.tolist())}

        for i, o in enumerate(uniq.tolist()):
            label = str(labels[o])
            if probability is not None:
                p = float(probability(o, label))
            else:
                p = float(_oid_rng(seed, o, 2).uniform(0.4, 1.0))
            a, b = int(start[i]), int(stop[i])
            na, nb = nd_ranges.get(o, (0, 0))
            cat._objects[o] = _Object(
                oid=o, class_name=label, probability=p,
                probabilities=probability_rows(label, p, _oid_rng(seed, o, 3)),
                det_mjd=mjd[a:b], det_fid=fid[a:b], det_mag=mag[a:b],
                det_mag_corr=np.where(corrected[a:b], mag_corr[a:b], np.nan),
                det_ra=cols["ra"][a:b], det_dec=cols["dec"][a:b], det_corrected=corrected[a:b],
                nondet_mjd=cat._nondet_cols["mjd"][na:nb],
                det_index=np.arange(a, b), nondet_index=np.arange(na, nb),
            )
        cat.version += 1
        return cat

    def add_recorded(self, oid: str, lightcurve_json: Path, class_name: str, probability: float) -> None:
        """Serve a real recorded /lightcurve response as it is (its detection and non-detection dicts, nulls kept;
        an extra ``features`` list is ignored); the object row is derived from its detections."""
        data = json.loads(Path(lightcurve_json).read_text())
        dets = list(data["detections"])
        nondets = list(data.get("non_detections") or [])

        def arr(key: str, default=np.nan) -> np.ndarray:
            return np.array([default if d.get(key) is None else d[key] for d in dets], dtype=float)

        self._objects[oid] = _Object(
            oid=oid, class_name=class_name, probability=float(probability),
            probabilities=probability_rows(class_name, float(probability), _oid_rng(0, oid, 3)),
            det_mjd=arr("mjd"), det_fid=arr("fid", 0).astype(np.int64), det_mag=arr("magpsf"),
            det_mag_corr=arr("magpsf_corr"), det_ra=arr("ra"), det_dec=arr("dec"),
            det_corrected=np.array([bool(d.get("corrected")) for d in dets], dtype=bool),
            nondet_mjd=np.array([d["mjd"] for d in nondets], dtype=float),
            det_dicts=dets, nondet_dicts=nondets,
        )
        self.version += 1

    # -- access -----------------------------------------------------------------------------------------------
    @property
    def oids(self) -> list[str]:
        return sorted(self._objects)

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, oid: object) -> bool:
        return oid in self._objects

    def label(self, oid: str) -> str:
        return self._objects[oid].class_name

    def probability(self, oid: str) -> float:
        return self._objects[oid].probability

    def _get(self, oid: str) -> _Object | None:
        return self._objects.get(oid)

    def visible(self, oid: str, now: float | None) -> bool:
        obj = self._objects.get(oid)
        return obj is not None and len(obj.det_mjd) > 0 and (now is None or obj.first_mjd <= now)

    def detections(self, oid: str, now: float | None = None) -> list[dict]:
        obj = self._objects[oid]
        if obj.det_dicts is not None:
            return [copy.copy(d) for d in obj.det_dicts if now is None or d["mjd"] <= now]
        index = obj.det_index if now is None else obj.det_index[obj.det_mjd <= now]
        return _rows(self._det_cols, index)

    def non_detections(self, oid: str, now: float | None = None) -> list[dict]:
        obj = self._objects[oid]
        if obj.nondet_dicts is not None:
            return [copy.copy(d) for d in obj.nondet_dicts if now is None or d["mjd"] <= now]
        index = obj.nondet_index if now is None else obj.nondet_index[obj.nondet_mjd <= now]
        return _rows(self._nondet_cols, index)

    def probabilities(self, oid: str) -> list[dict]:
        return [dict(r) for r in self._objects[oid].probabilities]

    def object_row(self, oid: str, now: float | None = None) -> dict:
        """The /objects/{oid} row (OBJECT_COLUMNS) from the detections visible at ``now``."""
        obj = self._objects[oid]
        mask = np.ones(len(obj.det_mjd), dtype=bool) if now is None else obj.det_mjd <= now
        n_nondet = int(len(obj.nondet_mjd) if now is None else np.count_nonzero(obj.nondet_mjd <= now))
        mjd, fid = obj.det_mjd[mask], obj.det_fid[mask]
        mag, mag_corr = obj.det_mag[mask], obj.det_mag_corr[mask]
        ra, dec = obj.det_ra[mask], obj.det_dec[mask]
        ndet = int(mask.sum())
        corrected = bool(obj.det_corrected[mask].any()) if ndet else False

        def colour(values: np.ndarray, fn) -> float | None:
            g, r = values[(fid == 1) & np.isfinite(values)], values[(fid == 2) & np.isfinite(values)]
            return _clean(float(fn(g) - fn(r))) if len(g) and len(r) else None

        first, last = (float(mjd.min()), float(mjd.max())) if ndet else (None, None)
        row = {
            "oid": oid,
            "ndethist": str(ndet),
            "ncovhist": ndet + n_nondet,
            "mjdstarthist": first,
            "mjdendhist": last,
            "corrected": corrected,
            "stellar": corrected and obj.class_name in STELLAR_CLASSES,
            "ndet": ndet,
            "g_r_max": colour(mag, np.min),
            "g_r_max_corr": colour(mag_corr, np.min),
            "g_r_mean": colour(mag, np.mean),
            "g_r_mean_corr": colour(mag_corr, np.mean),
            "firstmjd": first,
            "lastmjd": last,
            "deltajd": (last - first) if ndet else None,
            "meanra": _clean(float(np.nanmean(ra))) if ndet else None,
            "meandec": _clean(float(np.nanmean(dec))) if ndet else None,
            "sigmara": _clean(float(np.nanstd(ra))) if ndet else None,
            "sigmadec": _clean(float(np.nanstd(dec))) if ndet else None,
            "step_id_corr": STEP_ID_CORR,
        }
        return {k: row[k] for k in OBJECT_COLUMNS}


# ---------------------------------------------------------------------------------------------------------------
# Query parsing (what flask-restx reqparse would accept)
# ---------------------------------------------------------------------------------------------------------------


class BadRequest(ValueError):
    def __init__(self, errors: dict[str, str]):
        super().__init__(str(errors))
        self.errors = errors


_TRUE = {"true", "1", "yes", "y", "t", "on"}
_FALSE = {"false", "0", "no", "n", "f", "off"}


def _one(q: dict[str, list[str]], name: str, kind: Callable, default=None):
    values = q.get(name)
    if not values or values[-1] == "":
        return default
    raw = values[-1]
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(f"Invalid literal for boolean(): {raw}")
        return kind(raw)
    except (TypeError, ValueError) as exc:
        raise BadRequest({name: f"{exc}"}) from None


def _many(q: dict[str, list[str]], name: str, kind: Callable) -> list | None:
    values = [v for v in q.get(name, []) if v != ""]
    if not values:
        return None
    try:
        return [kind(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise BadRequest({name: f"{exc}"}) from None


def _angular_sep_deg(ra1, dec1, ra2, dec2) -> float:
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    s = (math.sin((d2 - d1) / 2) ** 2 + math.cos(d1) * math.cos(d2) * math.sin((r2 - r1) / 2) ** 2)
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(s))))


# ---------------------------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    replay: "AlerceReplayServer"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "AlerceReplay/1.0"
    timeout = 60  # an idle keep-alive connection is closed after this

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms a request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.replay._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.replay._track(self.connection, add=False)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet; RequestRecord is the log
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.server.replay._handle(self)

    def _method_not_allowed(self) -> None:
        self.server.replay._handle(self, method_allowed=False)

    do_POST = do_PUT = do_DELETE = do_PATCH = _method_not_allowed


class AlerceReplayServer:
    """ALeRCE's legacy ZTF API over a :class:`Catalogue`, on 127.0.0.1, with fault injection."""

    def __init__(self, catalogue: Catalogue, now_mjd: float | None = None, host: str = "127.0.0.1", port: int = 0,
                 default_classifier_version: str = CLASSIFIER_VERSION):
        self.catalogue = catalogue
        self.host = host
        self._port = port
        self.default_classifier_version = default_classifier_version
        self._now = now_mjd
        self._faults: list[FaultRule] = []
        self._random: RandomFaults | None = None
        self._lock = threading.RLock()
        self.requests: list[RequestRecord] = []
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._local = threading.local()
        self._rows_cache: tuple[tuple, list[tuple[dict, list[dict]]]] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "AlerceReplayServer":
        if self._httpd is not None:
            raise RuntimeError("server already started")
        self._stopping.clear()
        self._httpd = _HTTPServer((self.host, self._port), _Handler)
        self._httpd.replay = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"alerce-replay-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: wake sleeping handlers, shut the listening socket and open connections, join the thread."""
        httpd = self._httpd
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> "AlerceReplayServer":
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    # -- control ---------------------------------------------------------------------------------------------
    @property
    def now(self) -> float | None:
        return self._now

    def set_now(self, mjd: float | None) -> None:
        """Only data with mjd <= ``mjd`` is visible (objects first detected later are invisible). None: all."""
        with self._lock:
            self._now = None if mjd is None else float(mjd)

    def add_fault(self, rule: FaultRule) -> None:
        """Arm a copy of ``rule`` (the caller's object is never changed; its ``times`` counts down in the copy)."""
        with self._lock:
            self._faults.append(dataclasses.replace(rule))

    @property
    def faults(self) -> list[FaultRule]:
        """Copies of the armed rules, with the ``times`` each has left (0: healed)."""
        with self._lock:
            return [dataclasses.replace(r) for r in self._faults]

    def clear_faults(self) -> None:
        """Disarm every rule and the random faults."""
        with self._lock:
            self._faults.clear()
            self._random = None

    def set_random_faults(self, faults: RandomFaults | None) -> None:
        """Fail a share of requests at random (None: stop); checked after the armed rules."""
        with self._lock:
            self._random = faults

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def requests_for(self, route: str | None = None, oid: str | None = None) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self.requests if (route is None or r.route == route) and (oid is None or r.oid == oid)]

    def write_client_config(self, path: Path) -> Path:
        """A full copy of the client's default config with ztf.ZTF_API_URL = self.url (for ALERCE_CONFIG_PATH)."""
        if DEFAULT_CONFIG.exists():
            config = json.loads(DEFAULT_CONFIG.read_text())
        else:  # the client ships the same file
            import alerce

            config = json.loads((Path(alerce.__file__).parent / "default_config.json").read_text())
        config["ztf"]["ZTF_API_URL"] = self.url
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=4))
        return path

    # -- request handling ------------------------------------------------------------------------------------
    _OBJECT_ROUTE = re.compile(r"^/ztf/v1/objects/([^/]+)(?:/(detections|non_detections|lightcurve|probabilities))?/?$")
    _CLASSES_ROUTE = re.compile(r"^/ztf/v1/classifiers/([^/]+)/([^/]+)/classes/?$")

    def _take_fault(self, route: str, oid: str | None, page: int | None,
                    class_name: str | None = None) -> FaultRule | None:
        with self._lock:
            for rule in self._faults:
                if rule.matches(route, oid, page, class_name):
                    if rule.times > 0:
                        rule.times -= 1
                    return rule
            if self._random is not None:
                return self._random.draw(route)
        return None

    def _log(self, route, oid, page, query, status, fault) -> None:
        arrived = getattr(self._local, "arrived", time.monotonic())
        with self._lock:
            self.requests.append(RequestRecord(route, oid, page, query, status, fault, arrived))

    def _handle(self, h: _Handler, method_allowed: bool = True) -> None:
        self._local.arrived = time.monotonic()
        parts = urlsplit(h.path)
        path = parts.path
        query = parse_qs(parts.query, keep_blank_values=True)
        route, oid, page = "unknown", None, None
        m = self._OBJECT_ROUTE.match(path)
        if path.rstrip("/") == API_PREFIX + "/objects":
            route = "objects"
            try:
                page = _one(query, "page", int, 1)
            except BadRequest:
                page = None
        elif m:
            oid = unquote(m.group(1))
            route = m.group(2) or "object"
        elif path.rstrip("/") == API_PREFIX + "/classifiers":
            route = "classifiers"
        elif self._CLASSES_ROUTE.match(path):
            route = "classes"

        if not method_allowed:
            body = {"message": "The method is not allowed for the requested URL."}
            self._log(route, oid, page, query, 405, None)
            return self._send(h, 405, body)

        class_name = (query.get("class") or [None])[-1] if route == "objects" else None
        fault = self._take_fault(route, oid, page, class_name) if route in ROUTES else None
        kind = fault.kind if fault else None
        if kind in ("http_500", "http_503"):
            status = 500 if kind == "http_500" else 503
            text = "Internal Server Error" if status == 500 else "Service Unavailable"
            body = {"message": text, "errors": {"server": f"injected {kind}"}, "detail": f"{text} (injected fault)"}
            self._log(route, oid, page, query, status, kind)
            return self._send(h, status, body)
        if kind == "http_429":
            body = {"message": "Too Many Requests", "errors": {"rate": "rate limit exceeded"},
                    "detail": "Too many requests (injected fault)"}
            self._log(route, oid, page, query, 429, kind)
            return self._send(h, 429, body, headers={"Retry-After": f"{fault.retry_after:g}"})
        if kind == "not_found":
            self._log(route, oid, page, query, 404, kind)
            return self._send(h, 404, self._not_found_body(oid))
        if kind == "malformed_json":
            html = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
                    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
                    b"</body>\r\n</html>\r\n")
            self._log(route, oid, page, query, 200, kind)
            return self._send_raw(h, 200, html, "text/html")

        try:
            status, body = self._answer(route, oid, query, kind, path)
        except BadRequest as exc:
            status, body = 400, {"message": "Input payload validation failed", "errors": exc.errors,
                                 "detail": "Input payload validation failed"}
        except Exception as exc:  # a bug here must show as a 500, not a hung client
            status, body = 500, {"message": "Internal Server Error", "errors": {"server": repr(exc)},
                                 "detail": repr(exc)}
        payload = json.dumps(body).encode()
        if kind == "truncated_json" and status == 200:
            self._log(route, oid, page, query, status, kind)
            return self._send_raw(h, status, payload[: max(1, len(payload) // 2)], "application/json")
        if kind == "reset" and status == 200:
            self._log(route, oid, page, query, status, kind)
            return self._send_reset(h, status, payload)
        if kind == "slow":
            # Logged on arrival, so a client that timed out and moved on already sees it in the log.
            self._log(route, oid, page, query, status, kind)
            if self._stopping.wait(fault.delay):
                h.close_connection = True
                return None
            return self._send_raw(h, status, payload, "application/json")
        applied = kind if kind in PAGE_FAULTS and status == 200 else None
        self._log(route, oid, page, query, status, applied)
        return self._send_raw(h, status, payload, "application/json")

    @staticmethod
    def _not_found_body(oid: str | None) -> dict:
        return {"message": f"{oid} not found", "errors": {"oid": f"Object {oid} not found"},
                "detail": f"Object {oid} not found"}

    def _answer(self, route: str, oid: str | None, query: dict[str, list[str]], kind: str | None,
                path: str = "") -> tuple[int, Any]:
        cat, now = self.catalogue, self._now
        if route == "objects":
            return 200, self._objects_page(query, kind)
        if route in ("object", "detections", "non_detections", "lightcurve", "probabilities"):
            if not cat.visible(oid, now):
                return 404, self._not_found_body(oid)
            if route == "object":
                return 200, cat.object_row(oid, now)
            if route == "detections":
                return 200, cat.detections(oid, now)
            if route == "non_detections":
                return 200, cat.non_detections(oid, now)
            if route == "lightcurve":
                return 200, {"detections": cat.detections(oid, now), "non_detections": cat.non_detections(oid, now)}
            rows = cat.probabilities(oid)
            classifier = _one(query, "classifier", str)
            version = _one(query, "classifier_version", str)
            return 200, [r for r in rows if (classifier is None or r["classifier_name"] == classifier)
                         and (version is None or r["classifier_version"] == version)]
        if route == "classifiers":
            return 200, [
                {"classifier_name": LC_CLASSIFIER, "classifier_version": self.default_classifier_version,
                 "classes": list(LC_CLASSES)},
                {"classifier_name": LC_CLASSIFIER_TOP, "classifier_version": self.default_classifier_version,
                 "classes": list(TAXONOMY)},
            ]
        if route == "classes":
            name = unquote(self._CLASSES_ROUTE.match(path).group(1))
            if name == LC_CLASSIFIER:
                return 200, [{"name": c} for c in LC_CLASSES]
            if name == LC_CLASSIFIER_TOP:
                return 200, [{"name": c} for c in TAXONOMY]
            return 200, []
        return 404, {"message": "The requested URL was not found on the server. If you entered the URL manually "
                                "please check your spelling and try again."}

    # -- /objects ----------------------------------------------------------------------------------------------
    def _joined_rows(self) -> list[tuple[dict, list[dict]]]:
        """(object row, probability rows) for every object visible now; cached per (catalogue version, now)."""
        key = (id(self.catalogue), self.catalogue.version, self._now)
        with self._lock:
            if self._rows_cache is not None and self._rows_cache[0] == key:
                return self._rows_cache[1]
        cat, now = self.catalogue, self._now
        rows = [(cat.object_row(o, now), cat._objects[o].probabilities) for o in cat.oids if cat.visible(o, now)]
        with self._lock:
            self._rows_cache = (key, rows)
        return rows

    def _objects_page(self, query: dict[str, list[str]], kind: str | None) -> dict:
        classifier = _one(query, "classifier", str)
        version = _one(query, "classifier_version", str)
        class_ = _one(query, "class", str)
        ranking = _one(query, "ranking", int)
        probability = _one(query, "probability", float)
        ndet = _many(query, "ndet", int)
        firstmjd = _many(query, "firstmjd", float)
        lastmjd = _many(query, "lastmjd", float)
        oids = _many(query, "oid", str)
        ra, dec, radius = _one(query, "ra", float), _one(query, "dec", float), _one(query, "radius", float)
        page = _one(query, "page", int, 1)
        page_size = _one(query, "page_size", int, 10)
        count = _one(query, "count", bool, False)
        order_by = _one(query, "order_by", str)
        order_mode = _one(query, "order_mode", str)
        if order_by is not None and order_by not in ORDER_BY:
            raise BadRequest({"order_by": f"The value '{order_by}' is not a valid choice for 'order_by'."})
        if order_mode is not None and order_mode not in ("ASC", "DESC"):
            raise BadRequest({"order_mode": f"The value '{order_mode}' is not a valid choice for 'order_mode'."})
        page = max(page, 1)
        if page_size < 0:
            page_size = 10

        use_default = all(v is None for v in (classifier, version, ranking, probability, class_))
        if ranking is None and (classifier or class_ or version):
            ranking = 1
        if ra is not None and dec is not None and radius is None:
            radius = 30.0
        oid_like = None
        if oids and len(oids) == 1:
            oid_like = oids[0]
        oid_set = set(oids) if oids and len(oids) > 1 else None

        items: list[dict] = []
        for row, probs in self._joined_rows():
            if ndet and not (row["ndet"] >= ndet[0] and (len(ndet) < 2 or row["ndet"] <= ndet[1])):
                continue
            if firstmjd and not (row["firstmjd"] >= firstmjd[0]
                                 and (len(firstmjd) < 2 or row["firstmjd"] <= firstmjd[1])):
                continue
            if lastmjd and not (row["lastmjd"] >= lastmjd[0] and (len(lastmjd) < 2 or row["lastmjd"] <= lastmjd[1])):
                continue
            if oid_like is not None and not fnmatch.fnmatchcase(row["oid"], oid_like):
                continue
            if oid_set is not None and row["oid"] not in oid_set:
                continue
            if ra and dec and radius and (row["meanra"] is None or _angular_sep_deg(
                    ra, dec, row["meanra"], row["meandec"]) > radius / 3600.0):
                continue
            if use_default:
                joined = [p for p in probs if p["classifier_name"] == LC_CLASSIFIER
                          and p["classifier_version"] == self.default_classifier_version and p["ranking"] == 1]
                joined = joined[:1] or [None]  # outer join: an object without probabilities still appears
            else:
                joined = [p for p in probs
                          if (classifier is None or p["classifier_name"] == classifier)
                          and (version is None or p["classifier_version"] == version)
                          and (class_ is None or p["class_name"] == class_)
                          and (probability is None or p["probability"] >= probability)
                          and (ranking is None or p["ranking"] == ranking)]
            for p in joined:
                item = dict(row)
                item["class"] = p["class_name"] if p else None
                item["classifier"] = p["classifier_name"] if p else None
                item["probability"] = p["probability"] if p else None
                item["_ranking"] = p["ranking"] if p else None
                items.append(item)

        if order_by is not None and kind != "unsorted":  # unsorted: order_by ignored, the catalogue order
            key = ORDER_BY[order_by]
            key = "_ranking" if key == "ranking" else key
            items.sort(key=lambda it: (it["oid"], it["classifier"] or "", it["_ranking"] or 0))
            desc = order_mode == "DESC"
            # Postgres: NULLS LAST ascending, NULLS FIRST descending; ties keep the oid order (sort is stable).
            items.sort(key=lambda it: (it[key] is None, it[key] if it[key] is not None else 0), reverse=desc)
        elif oids and len(oids) > 1:
            position = {o: i for i, o in enumerate(oids)}
            items.sort(key=lambda it: (position.get(it["oid"], len(position)), it["classifier"] or ""))
        # else: the catalogue order (oid ascending)

        n = len(items)
        total = min(n, MAX_COUNT + 1) if count else None
        pages = 0 if (total is None or page_size == 0) else math.ceil(total / page_size)
        has_next = page < pages
        lo = (page - 1) * page_size
        page_items = items[lo: lo + page_size]
        if kind == "empty_page":
            page_items, has_next = [], True
        elif kind == "repeat_page" and page > 1:
            page_items = items[lo - page_size: lo]
        for it in page_items:
            it.pop("_ranking", None)
        page_items = [{k: it[k] for k in ITEM_COLUMNS} for it in page_items]
        return {
            "total": total,
            "page": None,
            "next": page + 1 if has_next else None,
            "has_next": has_next,
            "prev": page - 1 if page > 1 else None,
            "has_prev": page > 1,
            "items": page_items,
        }

    # -- sending -----------------------------------------------------------------------------------------------
    def _send(self, h: _Handler, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self._send_raw(h, status, json.dumps(body).encode(), "application/json", headers)

    @staticmethod
    def _send_raw(h: _Handler, status: int, payload: bytes, content_type: str,
                  headers: dict[str, str] | None = None) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", content_type)
            h.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                h.send_header(name, value)
            h.end_headers()
            h.wfile.write(payload)
            h.wfile.flush()
        except OSError:
            h.close_connection = True

    @staticmethod
    def _send_reset(h: _Handler, status: int, payload: bytes) -> None:
        """Headers with the full Content-Length, half the body, then an abortive close (RST)."""
        h.close_connection = True
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload[: len(payload) // 2])
            h.wfile.flush()
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def build_catalogue(n_per_class: int, seed: int, recorded: bool = False) -> Catalogue:
    from deeprubin.config import SimulatorParams
    from deeprubin.sources.simulate import simulate

    cat = Catalogue.from_lightcurves(simulate(SimulatorParams(n_per_class=n_per_class), seed=seed), seed=seed)
    if recorded and RECORDED_LIGHTCURVE.exists():
        cat.add_recorded(RECORDED_OID, RECORDED_LIGHTCURVE, class_name="SNIa", probability=0.9)
    return cat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.alerce_server", description=__doc__.splitlines()[0])
    ap.add_argument("--n-per-class", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--now", type=float, default=None, help="serve only data with mjd <= NOW")
    ap.add_argument("--recorded", action="store_true", help=f"also serve {RECORDED_OID} (recorded response)")
    ap.add_argument("--fault-rate", type=float, default=0.0,
                    help="fail this share of requests at random with transient faults (e.g. 0.7)")
    ap.add_argument("--fault-seed", type=int, default=0)
    ap.add_argument("--fault", action="append", default=[], metavar="JSON",
                    help='a FaultRule as JSON, e.g. \'{"route": "lightcurve", "kind": "http_500", "times": 20}\' '
                         "(repeatable)")
    args = ap.parse_args(argv)

    cat = build_catalogue(args.n_per_class, args.seed, args.recorded)
    server = AlerceReplayServer(cat, now_mjd=args.now, host=args.host, port=args.port).start()
    for text in args.fault:
        server.add_fault(FaultRule(**json.loads(text)))
    if args.fault_rate > 0:
        server.set_random_faults(RandomFaults(rate=args.fault_rate, seed=args.fault_seed))
    done = threading.Event()

    def _stop(signum, frame):
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"ALERCE_URL={server.url}", flush=True)
    print(f"objects={len(cat)}", file=sys.stderr, flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
