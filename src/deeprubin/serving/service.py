"""The HTTP classification service (``deeprubin serve-api``): FastAPI on uvicorn.

Endpoints
---------
* ``POST /classify``: a batch of light curves (JSON) -> class probabilities per object, from the serving model.
  Each detection is ``mjd``, ``band`` (``g``/``r``) and either ``flux`` + ``flux_err`` (µJy) or ``mag`` + ``mag_err``
  (AB, zero point 23.9), as difference photometry or apparent magnitudes: a curve's or the request's ``photometry``
  (default ``classify.photometry``; ``auto`` recognises it per curve), and each classification says which path it
  took (``photometry``, ``photometry_declared``). Invalid payloads get a 422 whose ``message`` names the field path
  (``light_curves.3.detections.7.flux_err``) and the object's oid; an object the GP cannot interpolate is a
  per-object rejection in a 200 reply, never a 500.
* ``GET /healthz``: 200 while a model is loaded, else 503.
* ``GET /model``: the serving version (name, version, pinned URI, run id, classes, when loaded and last checked).
* ``/openapi.json`` and ``/docs``: the published schema.

The model (``classify.model_uri``, default ``models:/deeprubin-tcn@champion`` in ``train.tracking_uri``) is loaded
before the server accepts connections; when the URI is an alias, a background thread looks the alias up every
``serve.reload_interval_s`` and swaps in the version it points at, without a restart. Requests in flight finish on
the model they started with; a failed reload keeps the old model and is logged (and shown in ``/model``).

Limits (``serve``): bodies over ``max_request_bytes`` get 413 before any parsing (Content-Length, or the bytes
counted as they stream in); more than ``max_curves_per_request`` light curves or ``max_detections_per_curve``
detections in one curve get 422. The server binds 127.0.0.1 unless told otherwise.

Run it with :func:`serve` (or ``deeprubin serve-api --set serve.port=8001``). The request and response schemas, and
the 422 reply, are in :mod:`deeprubin.serving.api_schemas`.
"""

import copy
import ipaddress
import logging
import logging.config
import math
import os
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from deeprubin import __version__
from deeprubin.config import Params
from deeprubin.lightcurves import presentation
from deeprubin.lightcurves.tensorize import Curve
from deeprubin.models.served import load_model, parse_registry_uri
from deeprubin.schema import BAND_INDEX, CLASSES, mag_to_flux
from deeprubin.serving.api_schemas import (
    ClassifyResponse,
    Health,
    ModelInfo,
    Problem,
    ValidationErrorResponse,
    request_models,
    validation_error_response,
)
from deeprubin.serving.classify import classify_curves, serving_settings

log = logging.getLogger("deeprubin.serving.service")

TITLE = "DeepRubin-Explorer classification service"
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
            reason = str(exc) if isinstance(exc, LookupError) else f"{type(exc).__name__}: {exc}"
            raise ServiceError(f"cannot load the model {self.uri} from {self.tracking_uri}: {reason}") from exc
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
        ``last_reload_error``; the current model keeps serving."""
        if self.alias is None:  # a pinned version or a local directory: nothing to follow
            self.last_checked_at = _now()
            return False
        with self._check_lock:
            try:
                version = self._alias_version()
                current = getattr(self.model, "version", None)
                if version == current:
                    self.last_reload_error = None
                    return False
                model = self._load(self.uri)
                if getattr(model, "version", None) == current:  # the alias moved back meanwhile
                    return False
                self._swap(model)
                self.last_reload_error = None
                log.info("now serving %s version %s (was %s), followed %s", model.name, model.version, current,
                         self.uri)
                return True
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


# --- request size bound --------------------------------------------------------------------------------------------

class BodySizeLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413 before the app sees (or parses) any of it.

    A declared Content-Length over the limit is refused at once; otherwise the body is read as it streams in
    (chunked bodies too), counting bytes, and refused as soon as the count passes the limit. A body within the limit
    is handed to the app whole (FastAPI reads it whole anyway)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

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
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self._too_large(send, f"more than {self.max_bytes} bytes sent")
            chunks.append(body)
            if not message.get("more_body", False):
                break
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


async def _send_json(send, status: int, content: dict) -> None:
    import json

    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


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
                    "recognised). Invalid payloads get 422 naming the field; bodies over the size limit get 413.")
    app.state.models = holder
    app.add_middleware(BodySizeLimit, max_bytes=sp.max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        ctype = request.headers.get("content-type", "") if request.method == "POST" else None
        return validation_error_response(exc, ctype)

    def work(light_curves, model, photometry: str | None) -> tuple[dict, float]:
        started = time.perf_counter()
        settings = serving_settings(model, params)  # the model's own window and GP context
        declared = {lc.oid: lc.photometry for lc in light_curves if lc.photometry is not None}
        resolved = presentation.resolve([_curve(lc) for lc in light_curves],
                                        photometry or params.classify.photometry, declared)
        out, rejected = classify_curves(resolved.curves, model, settings.grid_days, settings.fit_context_days,
                                        batch_size, paths=resolved.paths)
        ms = (time.perf_counter() - started) * 1e3
        return {"model": {"name": model.name, "version": str(model.version), "uri": model.uri},
                "classifications": _classifications(out),
                "rejected": resolved.rejected + _rejections(rejected)}, ms

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
                    "msg": f"duplicate oid {lc.oid!r} (also light_curves.{seen[lc.oid]}.oid)"}],
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


def _classifications(out) -> list[dict]:
    """classify_curves' rows as response objects (column lists: a third of the cost of row iteration)."""
    cols = {k: out[k].tolist() for k in _OUT_COLUMNS}
    return [{"oid": str(cols["oid"][i]), "predicted_class": str(cols["predicted_class"][i]),
             "probabilities": {c: float(cols[f"p_{c}"][i]) for c in CLASSES}, "n_det": int(cols["n_det"][i]),
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
    holder = holder_for(params, model_loader)
    model = holder.load()
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

    config = uvicorn.Config(app, host=host, port=port, log_config=_log_config(), timeout_graceful_shutdown=10,
                            server_header=False)
    try:
        Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: that is the normal way out
        pass
