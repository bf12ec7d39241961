"""A local stand-in for the ZTF Bright Transient Survey sample explorer's CSV export, and the light curves of its
objects for the local ALeRCE server, for tests of the BTS source.

The catalogue is built from the shared real labelled set (``../shared/data/bts/labels.csv``, or the copy shipped in
``data/bts``): per object a row in the explorer's CSV columns (``ZTFID, IAUID, RA, Dec, peakt, peakfilt, peakmag,
peakabs, duration, rise, fade, type, redshift, b, A_V``; ``type`` is the real BTS type, ``-`` when untyped); the
columns the labels file lacks are filled deterministically. The light curves are the real ones
(``bts/detections.parquet``), served by :class:`tests.alerce_server.AlerceReplayServer` under the same ZTF ids.

Faults (:class:`BtsFault`) heal after ``times`` requests: ``http_500``, ``http_503``, ``http_429``, ``not_found``,
``slow`` (answers after ``delay`` s), ``truncated`` (Content-Length of the whole body, half of it sent, connection
closed), ``cut`` (no Content-Length, the body stops inside a row, connection closed), ``html`` (200 with an HTML
error page). Every request is logged in :attr:`BtsServer.requests` as (path, query, status, fault).
"""

from __future__ import annotations

import csv
import io
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
EXPLORER_PATH = "/ztf/bts/explorer.php"
COLUMNS = ("ZTFID", "IAUID", "RA", "Dec", "peakt", "peakfilt", "peakmag", "peakabs", "duration", "rise", "fade",
           "type", "redshift", "b", "A_V")
FAULT_KINDS = ("http_500", "http_503", "http_429", "not_found", "slow", "truncated", "cut", "html")


def bts_dir() -> Path:
    from tests.conftest import shared_data_dir

    shared = shared_data_dir() / "bts"
    return shared if (shared / "labels.csv").exists() else REPO / "data" / "bts"


def shared_labels() -> pd.DataFrame:
    return pd.read_csv(bts_dir() / "labels.csv")


def pick(labels: pd.DataFrame, per_type: dict[str, int]) -> pd.DataFrame:
    """The first ``n`` objects (by oid) of each BTS type."""
    parts = [labels.loc[labels["bts_type"] == t].sort_values("oid").head(n) for t, n in per_type.items()]
    return pd.concat(parts, ignore_index=True)


def catalogue_rows(labels: pd.DataFrame, untyped: list[str] = ()) -> list[dict[str, str]]:
    """BTS explorer rows for ``labels`` (oid, bts_type, redshift, peakmag), plus untyped rows for ``untyped``."""
    rows = []
    for rec in labels.itertuples(index=False):
        rows.append(_row(str(rec.oid), str(rec.bts_type), rec.redshift, rec.peakmag))
    rows += [_row(oid, "-", float("nan"), 18.9) for oid in untyped]
    return rows


def _row(oid: str, bts_type: str, redshift: float, peakmag: float) -> dict[str, str]:
    rng = np.random.default_rng(zlib.crc32(oid.encode()))
    redshift = pd.to_numeric(pd.Series([redshift]), errors="coerce").iloc[0]  # the labels file has some "-"
    z = "" if not np.isfinite(redshift) else f"{redshift:.5g}"
    peakabs = "" if not z else f"{peakmag - 5 * np.log10(max(redshift, 1e-4) * 4.3e8 / 10):.2f}"
    return {"ZTFID": oid, "IAUID": f"SN 20{oid[3:5]}{oid[-3:]}", "RA": f"{rng.uniform(0, 360):.6f}",
            "Dec": f"{rng.uniform(-30, 90):.6f}", "peakt": f"{rng.uniform(1200, 2600):.2f}",
            "peakfilt": str(rng.choice(["g", "r"])), "peakmag": f"{peakmag:.4f}", "peakabs": peakabs,
            "duration": f"{rng.uniform(10, 120):.1f}", "rise": f"{rng.uniform(5, 30):.1f}",
            "fade": f"{rng.uniform(10, 90):.1f}", "type": bts_type, "redshift": z,
            "b": f"{rng.uniform(-90, 90):.2f}", "A_V": f"{rng.uniform(0, 1):.3f}"}


def to_csv(rows: list[dict[str, str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def lightcurves(oids: list[str], alerce_class: dict[str, str] | None = None) -> SimpleNamespace:
    """The real detections of ``oids`` in contract shape (what AlerceReplayServer's Catalogue.from_lightcurves
    takes); ``objects.label`` is the class ALeRCE gives each object (default: its BTS label)."""
    from deeprubin.schema import map_detections, validate_detections

    raw = pd.read_parquet(bts_dir() / "detections.parquet")
    raw = raw.loc[raw["oid"].isin(set(oids))]
    det, _ = validate_detections(map_detections(raw, source="bts"))
    labels = shared_labels().set_index("oid")["label"]
    alerce_class = alerce_class or {}
    objects = pd.DataFrame({"oid": oids, "label": [alerce_class.get(o, labels.get(o, "SNIa")) for o in oids]})
    non_det = pd.DataFrame({"oid": pd.Series(dtype=str), "mjd": pd.Series(dtype=float),
                            "band": pd.Series(dtype=str), "diffmaglim": pd.Series(dtype=float)})
    return SimpleNamespace(objects=objects, detections=det, non_detections=non_det)


@dataclass
class BtsFault:
    kind: str
    times: int = 1  # -1: forever
    delay: float = 3.0  # for "slow"

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}: expected one of {FAULT_KINDS}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_HTTPServer"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet; BtsServer.requests is the log
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.server.owner._handle(self)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "BtsServer"


class BtsServer:
    """Serves ``rows`` as the explorer's CSV export at ``EXPLORER_PATH`` on a free loopback port."""

    def __init__(self, rows: list[dict[str, str]], host: str = "127.0.0.1", port: int = 0):
        self.rows = list(rows)
        self._faults: list[BtsFault] = []
        self._lock = threading.Lock()
        self.requests: list[tuple[str, dict, int, str | None]] = []
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.owner = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{EXPLORER_PATH}"

    def start(self) -> "BtsServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="bts-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "BtsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_fault(self, fault: BtsFault) -> None:
        with self._lock:
            self._faults.append(fault)

    def set_type(self, oid: str, bts_type: str) -> None:
        """Re-type an object (as the BTS does when a new spectrum changes a classification)."""
        with self._lock:
            for row in self.rows:
                if row["ZTFID"] == oid:
                    row["type"] = bts_type
                    return
        raise KeyError(oid)

    def _take_fault(self) -> BtsFault | None:
        with self._lock:
            for fault in self._faults:
                if fault.times != 0:
                    fault.times -= 1 if fault.times > 0 else 0
                    return fault
        return None

    def _handle(self, h: _Handler) -> None:
        parts = urlsplit(h.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        if parts.path != EXPLORER_PATH:
            self._log(parts.path, query, 404, None)
            return self._send(h, 404, b"<html><body>404 Not Found</body></html>", "text/html")
        fault = self._take_fault()
        kind = fault.kind if fault else None
        with self._lock:
            body = to_csv(self.rows)
        if query.get("format", ["html"])[0] != "csv" and kind is None:
            kind_body = b"<html><body><table>the explorer's HTML view</table></body></html>"
            self._log(parts.path, query, 200, None)
            return self._send(h, 200, kind_body, "text/html")
        if kind in ("http_500", "http_503", "http_429", "not_found"):
            status = {"http_500": 500, "http_503": 503, "http_429": 429, "not_found": 404}[kind]
            self._log(parts.path, query, status, kind)
            return self._send(h, status, f"<html><body>error {status}</body></html>".encode(), "text/html",
                              {"Retry-After": "0.05"} if status == 429 else None)
        if kind == "slow":  # logged when it arrives: the client gives up (and retries) before the answer
            self._log(parts.path, query, 200, kind)
            time.sleep(fault.delay)
            return self._send(h, 200, body, "text/csv")
        if kind == "html":
            self._log(parts.path, query, 200, kind)
            return self._send(h, 200, b"<html><body>Warning: mysqli_connect(): too many connections</body></html>",
                              "text/html")
        self._log(parts.path, query, 200, kind)
        if kind == "truncated":
            return self._send_cut(h, body, len(body) // 2, with_length=True)
        if kind == "cut":
            line = body.index(b"\n", len(body) // 2)
            return self._send_cut(h, body, line + 5, with_length=False)
        return self._send(h, 200, body, "text/csv")

    def _log(self, path, query, status, fault) -> None:
        with self._lock:
            self.requests.append((path, query, status, fault))

    @staticmethod
    def _send(h: _Handler, status: int, payload: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", content_type)
            h.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass

    @staticmethod
    def _send_cut(h: _Handler, payload: bytes, upto: int, with_length: bool) -> None:
        try:
            h.send_response(200)
            h.send_header("Content-Type", "text/csv")
            if with_length:
                h.send_header("Content-Length", str(len(payload)))
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(payload[:upto])
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        h.close_connection = True
