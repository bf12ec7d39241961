"""The HTTP classification service (``deeprubin serve-api``): FastAPI on uvicorn.

Endpoints
---------
* ``POST /classify``: a batch of light curves (JSON) -> class probabilities per object, from the serving model.
  Each detection is ``mjd``, ``band`` (``g``/``r``) and either ``flux`` + ``flux_err`` (µJy) or ``mag`` + ``mag_err``
  (AB, zero point 23.9), as difference photometry or apparent magnitudes: a curve's or the request's ``photometry``
  (default ``classify.photometry``; ``auto`` recognises it per curve), and each classification says which path it
  took (``photometry``, ``photometry_declared``). Invalid payloads get a 422 whose ``message`` names the field path
  (``light_curves.3.detections.7.flux_err``) and the object's oid; an object the GP cannot interpolate is a
  per-object rejection in a 200 reply, never a 500. A repeated (mjd, band) point of one object is dropped (the
  first given is kept), as ``deeprubin classify`` drops it from a file: ``n_det`` does not count it, the
  classification's ``n_dropped`` and the reply's ``points_dropped`` (by reason, ``duplicate key ('oid', 'mjd',
  'band')``) do.
* ``GET /healthz``: 200 while a model is loaded, else 503.
* ``GET /model``: the serving version (name, version, pinned URI, run id, classes, when loaded and last checked).
* ``/openapi.json``, ``/docs`` (Swagger UI) and ``/redoc``: the published schema. The two pages load their scripts
  and styles from the app itself (``/static/docs/``, the files the ``fastapi-offline`` package ships), never from a
  CDN or Google Fonts, so they work without internet.

Every error answers JSON with a ``message`` (:class:`~deeprubin.serving.api_schemas.Problem`; a 422 adds ``errors``
and ``n_errors``): 404, 405 and the other errors Starlette raises too, not its default ``{"detail": ...}``.

The model (``classify.model_uri``, default ``models:/deeprubin-tcn@champion`` in ``train.tracking_uri``) is loaded
before the server accepts connections; when the URI is an alias, a background thread looks the alias up every
``serve.reload_interval_s`` and swaps in the version it points at, without a restart. Requests in flight finish on
the model they started with; a failed reload keeps the old model and is logged (and shown in ``/model``).

Limits (``serve``): bodies over ``max_request_bytes`` get 413 before any parsing (Content-Length, or the bytes
counted as they stream in); more than ``max_curves_per_request`` light curves or ``max_detections_per_curve``
detections in one curve get 422. Stalled clients are bounded: a request head not whole ``header_timeout_s`` after
the connection opened is closed (408 when half of one came), a body not whole ``body_timeout_s`` after its head gets
408 and the connection is closed, an idle kept-alive connection goes after ``keep_alive_timeout_s``, and past
``max_concurrency`` open connections a new request gets 503 at once. The server binds 127.0.0.1 unless told
otherwise.

Run it with :func:`serve` (or ``deeprubin serve-api --set serve.port=8001``). The request and response schemas, and
the 422 reply, are in :mod:`deeprubin.serving.api_schemas`.
"""

import asyncio
import copy
import ipaddress
import json
import logging
import logging.config
import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from deeprubin import __version__
from deeprubin.config import Params
from deeprubin.lightcurves import presentation
from deeprubin.lightcurves.tensorize import DUPLICATE_POINT, Curve, drop_duplicate_points, screen_curves
from deeprubin.models.served import load_model, parse_registry_uri
from deeprubin.models.trusted import ModelRejected
from deeprubin.schema import BAND_INDEX, CLASSES, mag_to_flux
from deeprubin.serving.api_schemas import (
    ClassifyResponse,
    Health,
    ModelInfo,
    Problem,
    ValidationErrorResponse,
    http_error_response,
    request_models,
    shown,
    validation_error_response,
)
from deeprubin.serving.classify import classify_curves, serving_settings

log = logging.getLogger("deeprubin.serving.service")

TITLE = "DeepRubin-Explorer classification service"
DOCS_ASSETS = "/static/docs"  # where the app serves Swagger UI's and ReDoc's scripts, styles and favicon
ENDPOINTS = "POST /classify, GET /healthz, GET /model, GET /openapi.json, GET /docs, GET /redoc"
ModelLoader = Callable[..., Any]  # (uri, tracking_uri, default_classes) -> classify.ServingModel


class ServiceError(RuntimeError):
    """The service cannot start (e.g. the model URI points nowhere); the message says why."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# --- the serving model, hot-swappable ------------------------------------------------------------------------------

class ModelHolder:
    """Holds the serving model; :meth:`check` follows a registry alias and swaps in the version it points at.

    ``model`` is read once per request (a plain attribute read), so a swap never changes the model under a request
    in flight; it only decides which model the next request gets."""

    def __init__(self, uri: str, tracking_uri: str, default_classes: tuple[str, ...] | list[str] = CLASSES,
                 loader: ModelLoader | None = None, reload_interval_s: float = 30.0, device: str | None = None):
        self.uri, self.tracking_uri, self.device = uri, tracking_uri, device
        self.default_classes = tuple(default_classes)
        self.reload_interval_s = float(reload_interval_s)
        self._loader = loader
        parsed = parse_registry_uri(uri)
        self.alias = (parsed[0], parsed[2]) if parsed is not None and parsed[2] else None  # (name, alias)
        self.model: Any = None
        self.loaded_at: str | None = None
        self.last_checked_at: str | None = None
        self.last_reload_error: str | None = None
        self._check_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None
        self._refused: tuple[str, str] | None = None  # (version, error) of a version refused as untrusted

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def _load(self, uri: str):
        if self._loader is not None:
            model = self._loader(uri, self.tracking_uri, self.default_classes)
        else:
            model = load_model(uri, self.tracking_uri, self.default_classes)
        if self.device and hasattr(model, "to"):  # classify.device: auto = cuda when available
            model = model.to(self.device) or model
        return model

    def load(self) -> Any:
        """Load the model at start; raises :class:`ServiceError` with the reason when it cannot."""
        try:
            model = self._load(self.uri)
        except Exception as exc:
            # A refused model, a missing directory, an unknown version: their messages say it all, on one line.
            reason = str(exc) if isinstance(exc, (LookupError, ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
            reason = reason.removeprefix(f"{self.uri}: ")  # named once is enough
            raise ServiceError(" ".join(f"cannot load the model {self.uri} from {self.tracking_uri}: {reason}"
                                        .split())) from exc
        self._swap(model)
        self.last_checked_at = _now()
        return model

    def _swap(self, model: Any) -> None:
        self.model, self.loaded_at = model, _now()  # one reference assignment: atomic for readers

    def _alias_version(self) -> str:
        import mlflow

        if self._client is None:
            self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        name, alias = self.alias
        return str(self._client.get_model_version_by_alias(name, alias).version)

    def check(self) -> bool:
        """Look the alias up now; load and swap in the version it points at when that changed. True if swapped.

        A failure (registry unreachable, alias deleted, model unloadable) is logged and recorded in
        ``last_reload_error``; the current model keeps serving. A version refused as untrusted (not a pt2 export:
        :class:`~deeprubin.models.trusted.ModelRejected`) is logged once and not tried again while the alias points
        at it; a transient failure is retried at the next check."""
        if self.alias is None:  # a pinned version or a local directory: nothing to follow
            self.last_checked_at = _now()
            return False
        with self._check_lock:
            version = None
            try:
                version = self._alias_version()
                current = getattr(self.model, "version", None)
                if version == current:
                    self.last_reload_error = None
                    return False
                if self._refused is not None and version == self._refused[0]:  # refused (and logged) already:
                    self.last_reload_error = self._refused[1]  # keep serving, do not load it again
                    return False
                model = self._load(f"models:/{self.alias[0]}/{version}")  # pinned: the version looked up
                self._swap(model)
                self.last_reload_error = None
                log.info("now serving %s version %s (was %s), followed %s", model.name, model.version, current,
                         self.uri)
                return True
            except ModelRejected as exc:
                self.last_reload_error = f"{_now()}: {type(exc).__name__}: {exc}"
                self._refused = (version, self.last_reload_error)
                log.error("refused version %s of %s, still serving version %s (not retried while %s points at it): "
                          "%s", version, self.alias[0], getattr(self.model, "version", None), self.uri, exc)
                return False
            except Exception as exc:  # noqa: BLE001 -- keep serving the old model
                self.last_reload_error = f"{_now()}: {type(exc).__name__}: {exc}"
                log.error("reload of %s failed, still serving version %s: %s", self.uri,
                          getattr(self.model, "version", None), exc)
                return False
            finally:
                self.last_checked_at = _now()

    def start_watching(self) -> None:
        if self.alias is None or self._thread is not None:
            return
        self._stop.clear()

        def watch() -> None:
            while not self._stop.wait(self.reload_interval_s):
                self.check()

        self._thread = threading.Thread(target=watch, name="deeprubin-model-reload", daemon=True)
        self._thread.start()

    def stop_watching(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def holder_for(params: Params, model_loader: ModelLoader | None = None) -> ModelHolder:
    """The holder of ``classify.model_uri`` (from ``train.tracking_uri``, on ``classify.device``)."""
    return ModelHolder(params.model_uri(), params.train.tracking_uri, params.base.classes, loader=model_loader,
                       reload_interval_s=params.serve.reload_interval_s, device=params.classify.device)


# --- request bounds: size, time, connections --------------------------------------------------------------------------

class BodySizeLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413 before the app sees (or parses) any of it, and a body that
    has not wholly arrived ``timeout_s`` seconds after the request head (``serve.body_timeout_s``; a body shorter than
    its Content-Length, a stalled upload) gets 408. Both replies close the connection.

    A declared Content-Length over the limit is refused at once; otherwise the body is read as it streams in
    (chunked bodies too), counting bytes, and refused as soon as the count passes the limit. A body within the limit
    is handed to the app whole (FastAPI reads it whole anyway)."""

    def __init__(self, app, max_bytes: int, timeout_s: float | None = None):
        self.app, self.max_bytes = app, int(max_bytes)
        self.timeout_s = None if timeout_s is None else float(timeout_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = None
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return await _send_json(send, 400, {"message": "Content-Length is not a number"})
        if length is not None and length > self.max_bytes:
            return await self._too_large(send, f"Content-Length {length}")
        chunks, size, too_large = [], 0, False
        try:
            async with asyncio.timeout(self.timeout_s):  # None: no deadline
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body = message.get("body", b"")
                    size += len(body)
                    if size > self.max_bytes:
                        too_large = True
                        break
                    chunks.append(body)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            expected = "" if length is None else f" of {length}"
            log.info("408 to %s: %d%s body bytes in %g s", _client(scope), size, expected, self.timeout_s)
            return await _send_json(send, 408, {
                "message": f"request body not received within {self.timeout_s:g} s ({size}{expected} bytes "
                           f"arrived); the limit is serve.body_timeout_s"})
        if too_large:
            return await self._too_large(send, f"more than {self.max_bytes} bytes sent")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the server's own receive does

        await self.app(scope, replay, send)

    async def _too_large(self, send, what: str) -> None:
        await _send_json(send, 413, {"message": f"request body too large ({what}); the limit is {self.max_bytes} "
                                                f"bytes (serve.max_request_bytes)"})


def _client(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "a client"


async def _send_json(send, status: int, content: dict) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def bounded_http_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline on the request head (``serve.header_timeout_s``).

    uvicorn bounds an idle kept-alive connection (``timeout_keep_alive``) but nothing else before a request head is
    whole: a connection that never sends one, or sends half of one (or dribbles it a byte at a time), would be held
    forever, and each counts against ``limit_concurrency``. Here the head must be whole ``header_timeout_s`` seconds
    after the connection opened, or after the first byte of the next request on a kept-alive connection; otherwise
    the connection is closed, with a 408 when part of a head had come (silently when nothing had: that is an idle
    connection). The body has its own deadline (:class:`BodySizeLimit`)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps({"message": f"request head not received within {header_timeout_s:g} s; the limit is "
                                  f"serve.header_timeout_s"}).encode()
    timed_out = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)) + body

    class BoundedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm_head_timer()  # part of a head: it must be whole in time (one deadline per request)
            else:
                self._cancel_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            partial = len(self.conn.trailing_data[0])
            if partial:
                peer = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
                log.info("408 to %s: %d bytes of a request head in %g s", peer, partial, header_timeout_s)
                self.transport.write(timed_out)
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:
                pass
            self.transport.close()  # the 408 is flushed first

    return BoundedH11Protocol


# --- the documentation pages, offline ---------------------------------------------------------------------------

def docs_assets_dir() -> Path | None:
    """The folder of Swagger UI's and ReDoc's files (``swagger-ui-bundle.js``, ``swagger-ui.css``,
    ``redoc.standalone.js``, ``favicon.png``): those the ``fastapi-offline`` package ships (Swagger UI 5, Apache-2.0;
    ReDoc 2, MIT). None when it is not installed."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    needed = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
    return folder if all((folder / name).is_file() for name in needed) else None


def _add_offline_docs(app: FastAPI, assets: Path) -> None:
    """``/docs`` and ``/redoc`` whose every script, style and icon is served by the app (under :data:`DOCS_ASSETS`):
    FastAPI's own pages load them from a CDN (and ReDoc's fonts from Google), so without internet they are blank."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")

    def here(request: Request, path: str) -> str:  # behind a proxy that mounts the app under a prefix: the prefix
        return f"{request.scope.get('root_path', '')}{path}"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=here(request, app.openapi_url or "/openapi.json"), title=f"{app.title} - Swagger UI",
            swagger_js_url=here(request, f"{DOCS_ASSETS}/swagger-ui-bundle.js"),
            swagger_css_url=here(request, f"{DOCS_ASSETS}/swagger-ui.css"),
            swagger_favicon_url=here(request, f"{DOCS_ASSETS}/favicon.png"),
            swagger_ui_parameters={"validatorUrl": None})  # no badge from validator.swagger.io

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=here(request, app.openapi_url or "/openapi.json"), title=f"{app.title} - ReDoc",
            redoc_js_url=here(request, f"{DOCS_ASSETS}/redoc.standalone.js"),
            redoc_favicon_url=here(request, f"{DOCS_ASSETS}/favicon.png"), with_google_fonts=False)


# --- the app -------------------------------------------------------------------------------------------------------

def _curve(lc) -> Any:
    dets = lc.detections
    mjd = np.fromiter((d.mjd for d in dets), float, len(dets))
    band = np.fromiter((BAND_INDEX[d.band] for d in dets), np.int64, len(dets))
    flux = np.empty(len(dets))
    err = np.empty(len(dets))
    for i, d in enumerate(dets):
        if d.flux is not None:
            flux[i], err[i] = d.flux, d.flux_err
        else:
            with np.errstate(over="ignore", invalid="ignore"):  # an absurd magnitude -> inf flux -> a rejection
                f, fe = mag_to_flux(d.mag, d.mag_err)
            flux[i], err[i] = float(f), float(fe)
    order = np.lexsort((band, mjd))
    return Curve(oid=lc.oid, mjd=mjd[order], band=band[order], flux=flux[order], flux_err=err[order])


def default_torch_threads() -> int:
    """Intra-op threads of the TCN: a single alert is fastest on one; big batches gain a little from a few."""
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def create_app(params: Params, model_loader: ModelLoader | None = None, *, holder: ModelHolder | None = None,
               torch_threads: int | None = None) -> FastAPI:
    """The FastAPI app serving ``params.model_uri()`` with the limits of ``params.serve``.

    The model is loaded when the app starts (its lifespan) unless ``holder`` already holds one (:func:`serve` loads
    it first, so a bad URI fails before the port is bound); the alias watcher runs while the app runs.
    ``model_loader(uri, tracking_uri, default_classes)`` replaces :func:`deeprubin.serving.classify.load_model`."""
    sp = params.serve
    holder = holder or holder_for(params, model_loader)
    _, ClassifyRequest = request_models(sp.max_curves_per_request, sp.max_detections_per_curve)
    batch_size = params.classify.batch_size
    assets = docs_assets_dir()
    if assets is None:
        log.warning("fastapi-offline is not installed: /docs and /redoc load Swagger UI and ReDoc from a CDN (blank "
                    "without internet); pip install fastapi-offline")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import torch

        torch.set_num_threads(torch_threads or default_torch_threads())
        if not holder.loaded:
            holder.load()  # ServiceError: uvicorn reports the startup failure and exits
        holder.start_watching()
        try:
            yield
        finally:
            holder.stop_watching()

    app = FastAPI(
        title=TITLE, version=__version__, lifespan=lifespan,
        summary="Classifies ZTF/LSST alert light curves into QSO, CEP, SNIa and SNII (GP-interpolated TCN).",
        description="POST a batch of light curves to `/classify` and get class probabilities per object from the "
                    "serving model (the registry champion by default, followed without a restart). Detections "
                    "carry `mjd`, `band` (g/r) and `flux`+`flux_err` in µJy or `mag`+`mag_err` (AB): difference "
                    "photometry, or apparent magnitudes (`photometry`: declared per curve or request, else "
                    "recognised). A repeated (mjd, band) point of an object is dropped, the first given kept, and "
                    "counted in `n_dropped` and `points_dropped`, not in `n_det`. Invalid payloads get 422 naming "
                    "the field; bodies over the size limit get 413; every error answers JSON with a `message`.",
        docs_url=None if assets else "/docs", redoc_url=None if assets else "/redoc")
    if assets is not None:
        _add_offline_docs(app, assets)
    app.state.models = holder
    app.add_middleware(BodySizeLimit, max_bytes=sp.max_request_bytes, timeout_s=sp.body_timeout_s)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        ctype = request.headers.get("content-type", "") if request.method == "POST" else None
        return validation_error_response(exc, ctype)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # 404, 405 (and any HTTPException): {"message": ...} as every other error here, not {"detail": ...}
        return http_error_response(exc, request.method, request.url.path, ENDPOINTS)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug: the traceback goes to the log (Starlette re-raises it to uvicorn); the client gets the same shape.
        return JSONResponse(status_code=500, content={
            "message": f"internal server error ({type(exc).__name__}) on {request.method} {shown(request.url.path)}; "
                       "the service log has the details"})

    def work(light_curves, model, photometry: str | None) -> tuple[dict, float]:
        started = time.perf_counter()
        settings = serving_settings(model, params)  # the model's own window and GP context
        declared = {lc.oid: lc.photometry for lc in light_curves if lc.photometry is not None}
        given = [_curve(lc) for lc in light_curves]
        # implausible points dropped, implausible objects rejected, then repeated (mjd, band) points dropped (as
        # files' validation does, in that order), before the photometry is resolved
        dropped: Counter = Counter()
        screened, implausible = screen_curves(given, dropped)
        curves = []
        for curve in screened:
            curve, n = drop_duplicate_points(curve)
            if n:
                dropped[DUPLICATE_POINT] += n
            curves.append(curve)
        n_given = {c.oid: len(c.mjd) for c in given}
        n_dropped = {c.oid: n_given[c.oid] - len(c.mjd) for c in curves}
        resolved = presentation.resolve(curves,
                                        photometry or params.classify.photometry, declared)
        out, rejected = classify_curves(resolved.curves, model, settings.grid_days, settings.fit_context_days,
                                        batch_size, paths=resolved.paths)
        ms = (time.perf_counter() - started) * 1e3
        return {"model": {"name": model.name, "version": str(model.version), "uri": model.uri},
                "classifications": _classifications(out, n_dropped),
                "rejected": implausible + resolved.rejected + _rejections(rejected),
                "points_dropped": dict(sorted(dropped.items()))}, ms

    too_large = {413: {"model": Problem, "description": f"Body over {sp.max_request_bytes} bytes."},
                 422: {"model": ValidationErrorResponse, "description": "Invalid payload; the field is named."},
                 503: {"model": Problem, "description": "No model loaded."}}

    @app.post("/classify", response_model=ClassifyResponse, responses=too_large, tags=["classification"],
              summary="Classify a batch of light curves")
    async def classify(request: ClassifyRequest, response: Response) -> Any:  # type: ignore[valid-type]
        """Class probabilities for each light curve, with the photometry path it took. Objects the GP cannot
        interpolate, and steady apparent curves (no point 5 sigma from their reference), are listed in `rejected`
        with the reason; the others are classified. `model` names the version that answered; the `Server-Timing`
        header gives the time spent classifying (GP + TCN)."""
        seen: dict[str, int] = {}
        for i, lc in enumerate(request.light_curves):
            if lc.oid in seen:
                raise RequestValidationError([{
                    "type": "value_error", "loc": ("body", "light_curves", i, "oid"),
                    "msg": f"duplicate oid {shown(lc.oid)!r} (also light_curves.{seen[lc.oid]}.oid)"}],
                    body={"light_curves": [{"oid": c.oid} for c in request.light_curves]})
            seen[lc.oid] = i
        model = holder.model  # read once: a reload during this request does not change it
        if model is None:
            return JSONResponse(status_code=503, content={"message": "no model loaded"})
        # The GP and the TCN are synchronous CPU work: one hop to the threadpool keeps the event loop free.
        body, ms = await run_in_threadpool(work, request.light_curves, model, request.photometry)
        response.headers["Server-Timing"] = f"classify;dur={ms:.2f}"
        return body

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}}, tags=["service"],
             summary="Liveness and readiness")
    def healthz() -> Any:
        model = holder.model
        body = {"status": "ok" if model is not None else "unavailable", "model_loaded": model is not None,
                "model_version": None if model is None else str(model.version),
                "last_reload_error": holder.last_reload_error}
        return body if model is not None else JSONResponse(status_code=503, content=body)

    @app.get("/model", response_model=ModelInfo, responses={503: {"model": Problem}}, tags=["service"],
             summary="The serving model version")
    def model_info() -> Any:
        model = holder.model
        if model is None:
            return JSONResponse(status_code=503, content={"message": "no model loaded"})
        return {"name": model.name, "version": str(model.version), "uri": model.uri, "source_uri": holder.uri,
                "run_id": model.run_id, "classes": list(model.classes), "loaded_at": holder.loaded_at,
                "last_checked_at": holder.last_checked_at, "reload_interval_s": holder.reload_interval_s,
                "follows_alias": holder.alias is not None, "last_reload_error": holder.last_reload_error}

    return app


_OUT_COLUMNS = ("oid", "predicted_class", "n_det", "days_since_first_detection", "photometry", "photometry_declared",
                *(f"p_{c}" for c in CLASSES))


def _classifications(out, n_dropped: dict[str, int] | None = None) -> list[dict]:
    """classify_curves' rows as response objects (column lists: a third of the cost of row iteration);
    ``n_dropped``: points dropped per oid before classification."""
    cols = {k: out[k].tolist() for k in _OUT_COLUMNS}
    n_dropped = n_dropped or {}
    return [{"oid": str(cols["oid"][i]), "predicted_class": str(cols["predicted_class"][i]),
             "probabilities": {c: float(cols[f"p_{c}"][i]) for c in CLASSES}, "n_det": int(cols["n_det"][i]),
             "n_dropped": int(n_dropped.get(str(cols["oid"][i]), 0)),
             "days_since_first_detection": float(cols["days_since_first_detection"][i]),
             "photometry": str(cols["photometry"][i]), "photometry_declared": bool(cols["photometry_declared"][i])}
            for i in range(len(out))]


def _rejections(rejected) -> list[dict]:
    if not len(rejected):
        return []
    return [{"oid": str(o), "reason": str(r), "detail": _text(d)}
            for o, r, d in zip(*(rejected[c].tolist() for c in ("oid", "reason", "detail")))]


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


# --- running it ----------------------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _log_config() -> dict:
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["deeprubin"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM (``deeprubin down``, a service manager) end the service as Ctrl-C does: uvicorn shuts down
    gracefully and re-raises the signal, which then becomes KeyboardInterrupt, so ``finally`` blocks and exit
    handlers run (the model's temporary copy is removed) rather than the process dying where it stands. Returns
    the function that puts the previous handler back. Only the main thread can set handlers: elsewhere, nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def serve(params: Params, host: str | None = None, port: int | None = None, *,
          model_loader: ModelLoader | None = None, torch_threads: int | None = None,
          ready: Callable[[str], None] | None = None) -> None:
    """Load the model, then serve the API with uvicorn until interrupted (Ctrl-C / SIGTERM).

    ``host``/``port`` default to ``params.serve`` (127.0.0.1:8000; port 0 picks a free one). Prints the URL once the
    server listens (or calls ``ready(url)``). A non-loopback address is allowed, with a warning. Raises
    :class:`ServiceError` when the model cannot be loaded (nothing is bound then)."""
    import uvicorn

    host = host or params.serve.host
    port = params.serve.port if port is None else int(port)
    logging.config.dictConfig(_log_config())
    if not is_loopback(host):
        log.warning("binding %s: the service is reachable from other machines, without authentication; "
                    "prefer 127.0.0.1 behind a reverse proxy", host)
    restore_sigterm = _sigterm_as_interrupt()  # deeprubin down: ends like Ctrl-C, the model's copy removed
    holder = holder_for(params, model_loader)
    try:
        model = holder.load()
    except BaseException:
        restore_sigterm()
        raise
    log.info("loaded %s version %s (%s)", model.name, model.version, model.uri)
    app = create_app(params, holder=holder, torch_threads=torch_threads)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if not self.started:
                return
            bound = [s.getsockname() for srv in getattr(self, "servers", []) for s in srv.sockets]
            actual = bound[0][1] if bound else port
            shown = f"[{host}]" if ":" in host else host
            url = f"http://{shown}:{actual}"
            if ready is not None:
                ready(url)
            else:
                print(f"DeepRubin classification service: {url} (model {model.name} version {model.version}; "
                      f"docs {url}/docs)", flush=True)

    sp = params.serve
    # Stalled clients are bounded: a head not whole within header_timeout_s or a body within body_timeout_s closes
    # the connection (408), an idle kept-alive one goes after keep_alive_timeout_s, and past max_concurrency open
    # connections a new request gets 503 at once, so they cannot hold memory or sockets for ever.
    config = uvicorn.Config(app, host=host, port=port, log_config=_log_config(), timeout_graceful_shutdown=10,
                            server_header=False, http=bounded_http_protocol(sp.header_timeout_s),
                            limit_concurrency=sp.max_concurrency,
                            timeout_keep_alive=sp.keep_alive_timeout_s)  # type: ignore[arg-type]  # a float is fine
    try:
        Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C (or SIGTERM) after its graceful shutdown: the normal way out
        pass
    finally:
        restore_sigterm()
