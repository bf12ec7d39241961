"""The ALeRCE source: objects classified by ALeRCE's light-curve classifier, and their light curves, through the
official `alerce` client (``survey="ztf"``).

The client does the HTTP; this module configures its session (a per-request timeout, the base URL), paces requests
(one rate limit shared by all threads), retries what is worth retrying (5xx, 429 after its Retry-After, timeouts,
dropped connections, truncated bodies) with exponential backoff and full jitter, and turns everything else (a 404,
another 4xx, a body that stays malformed) into a recorded failure of that object or page. Nothing here raises for
one bad object or page: callers get results plus failures. Two things do raise: :class:`ApiUnreachable` when the
server has never answered and a connection cannot even be opened (not retried: a wrong URL fails in seconds), and
:class:`ApiRefused` (raised by the pull) when the server refuses every class's first page.
"""

from __future__ import annotations

import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import pandas as pd
import requests
from requests.adapters import HTTPAdapter

from deeprubin.config import AlerceParams
from deeprubin.schema import DETECTIONS_SCHEMA, NON_DETECTIONS_SCHEMA, empty_frame, map_detections, \
    map_non_detections, normalise_label
from deeprubin.sources.files import MappedTables

SURVEY = "ztf"


@dataclass(frozen=True)
class Failure:
    """One object or page that could not be had, and why."""

    what: str  # an oid, or "objects page N of CLASS"
    reason: str
    attempts: int = 1
    transient: bool = True  # worth trying again on a later pull (retries ran out); False: 404, other 4xx, no data

    def as_dict(self) -> dict[str, Any]:
        return {"what": self.what, "reason": self.reason, "attempts": self.attempts, "transient": self.transient}


class ApiUnreachable(ConnectionError):
    """No connection could be opened to the API, which has not answered once in this pull (wrong URL, or down)."""


class ApiRefused(ValueError):
    """The API answered the first page of every listing with a client error (4xx): a wrong URL or query."""


class RequestFailed(Exception):
    def __init__(self, reason: str, attempts: int, transient: bool = False):
        super().__init__(reason)
        self.reason, self.attempts, self.transient = reason, attempts, transient


class RateLimiter:
    """At most ``rate`` calls per second across all threads (calls are spaced 1/rate apart)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()
        self._clock, self._sleep = clock, sleep

    def acquire(self) -> None:
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


class _TimeoutAdapter(HTTPAdapter):
    """The client calls ``session.request`` without a timeout; this adapter supplies one to every request."""

    def __init__(self, timeout: float, pool_maxsize: int):
        super().__init__(pool_connections=1, pool_maxsize=pool_maxsize, max_retries=0)
        self.timeout = timeout

    def send(self, request, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        return super().send(request, **kwargs)


def make_client(params: AlerceParams):
    """An `alerce` client whose ZTF calls go to ``params.base_url`` with ``params.timeout_s`` per request."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the client warns about its own deprecations on import/construction
        from alerce.core import Alerce

        client = Alerce()
    ztf = client.legacy_ztf_client
    ztf.config["ZTF_API_URL"] = params.base_url.rstrip("/")
    adapter = _TimeoutAdapter(params.timeout_s, pool_maxsize=max(1, params.concurrency))
    ztf.session.mount("http://", adapter)
    ztf.session.mount("https://", adapter)
    return client


def _retry_after(response: requests.Response | None) -> float | None:
    value = response.headers.get("Retry-After") if response is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to backoff


def could_not_connect(exc: BaseException) -> bool:
    """True when no connection was opened at all (refused, unresolvable host, connect timeout), as opposed to one
    that broke during a request."""
    from urllib3.exceptions import NewConnectionError

    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError):
        cause = exc.args[0] if exc.args else None
        return isinstance(getattr(cause, "reason", cause), NewConnectionError)
    return False


def classify_error(exc: BaseException) -> tuple[str, bool, float | None]:
    """(reason, retry?, wait demanded by the server) for an exception from a client call."""
    from alerce.exceptions import APIError, ObjectNotFoundError

    retry_reason = getattr(exc, "retry_reason", None)  # a body found incomplete by its reader (e.g. a cut CSV)
    if isinstance(retry_reason, str):
        return retry_reason, True, None
    if isinstance(exc, ObjectNotFoundError):
        return "not found (HTTP 404)", False, None
    if isinstance(exc, APIError):
        code = int(exc.code) if isinstance(exc.code, int) or str(exc.code).isdigit() else -1
        if code == 429:
            return "rate limited (HTTP 429)", True, _retry_after(exc.response)
        if code >= 500:
            return f"server error (HTTP {code})", True, None
        return f"client error (HTTP {code}): {exc.message}", False, None
    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:  # raise_for_status()
        code = exc.response.status_code
        if code == 429:
            return "rate limited (HTTP 429)", True, _retry_after(exc.response)
        if code >= 500:
            return f"server error (HTTP {code})", True, None
        return f"client error (HTTP {code})", False, None
    if isinstance(exc, requests.exceptions.JSONDecodeError):
        return "malformed or truncated JSON body", True, None
    if isinstance(exc, requests.exceptions.Timeout):
        return "timed out", True, None
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        return f"connection failed: {type(exc).__name__}", True, None
    if isinstance(exc, requests.exceptions.RequestException):
        return f"request failed: {type(exc).__name__}: {exc}", False, None
    raise exc


@dataclass
class Caller:
    """Runs client calls under the rate limit, with retries and backoff; counts what it did."""

    params: AlerceParams
    limiter: RateLimiter
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    requests_made: int = 0
    retries: int = 0
    reached: bool = False  # the server has answered (or a connection was opened) at least once
    service: str = "the ALeRCE API"  # named, with its URL and setting, when it cannot be reached
    url_setting: str = "ingest.alerce.base_url"
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def backoff(self, attempt: int) -> float:
        cap = min(self.params.backoff_max_s, self.params.backoff_base_s * 2 ** (attempt - 1))
        return self.rng.uniform(0, cap)  # full jitter

    def __call__(self, fn: Callable[[], Any]) -> Any:
        for attempt in range(1, self.params.max_attempts + 1):
            self.limiter.acquire()
            with self._lock:
                self.requests_made += 1
            try:
                result = fn()
                self.reached = True
                return result
            except Exception as exc:  # noqa: BLE001 - classify_error re-raises what it does not know
                if could_not_connect(exc) and not self.reached:
                    # Retrying a server that never answered turns a wrong URL into minutes of waiting.
                    raise ApiUnreachable(f"cannot connect to {self.service} at {self.params.base_url}: "
                                         f"{_connect_reason(exc)}; check {self.url_setting}") from exc
                self.reached = True
                reason, retry, wait = classify_error(exc)
                if not retry or attempt == self.params.max_attempts:
                    raise RequestFailed(reason, attempt, transient=retry) from exc
                with self._lock:
                    self.retries += 1
                self.sleep(min(wait, self.params.backoff_max_s) if wait is not None else self.backoff(attempt))
        raise AssertionError("unreachable")


def _connect_reason(exc: BaseException) -> str:
    cause = exc.args[0] if exc.args else None
    cause = getattr(cause, "reason", cause)
    text = str(cause) if cause is not None else type(exc).__name__
    # urllib3 prefixes "HTTPConnection(host=..., port=...): "; the URL is named by the caller.
    return text.split("): ", 1)[1] if text.startswith("HTTP") and "): " in text else text


@dataclass
class Listing:
    """Objects of one class listed by /objects, in lastmjd order, and what went wrong on the way."""

    class_name: str
    rows: pd.DataFrame  # oid, class, probability, ndet, firstmjd, lastmjd
    failures: list[Failure]
    complete: bool  # every page was read (no failed page, cap not reached)
    safe_lastmjd: float | None  # every object with a lower lastmjd was listed (None: nothing proven)
    ordered: bool = True  # the server's items came in non-decreasing lastmjd order
    capped: bool = False  # stopped at max_objects_per_class
    refused: Failure | None = None  # the first page got a client error (4xx), so the listing stopped there


#: A class listing stops after this many failed pages in a row (each already retried with backoff): a server that
#: fails every request is not asked for every page up to max_pages; the rest of the listing is reported missing.
MAX_CONSECUTIVE_FAILED_PAGES = 3

LISTING_COLUMNS = ["oid", "class", "probability", "ndet", "firstmjd", "lastmjd"]


def list_class(client, call: Caller, params: AlerceParams, class_name: str, lastmjd_from: float | None,
               is_new: Callable[[str, float], bool] = lambda _oid, _lastmjd: True) -> Listing:
    """Page through /objects for one class (top-class probability >= its threshold, lastmjd >= ``lastmjd_from``),
    oldest lastmjd first, until the pages run out or ``max_objects_per_class`` objects for which
    ``is_new(oid, lastmjd)`` holds have been listed (objects already up to date do not use up the cap).
    A failed page is recorded and skipped; after :data:`MAX_CONSECUTIVE_FAILED_PAGES` failed pages in a row the
    listing stops and records the rest of the class as one failure (transient: a rerun lists it again)."""
    query: dict[str, Any] = dict(survey=SURVEY, format="json", classifier=params.classifier, class_name=class_name,
                                 probability=params.threshold(class_name), page_size=params.page_size,
                                 order_by="lastmjd", order_mode="ASC")
    if params.classifier_version:
        query["classifier_version"] = params.classifier_version
    if lastmjd_from is not None:
        query["lastmjd"] = [lastmjd_from]
    rows: dict[str, dict] = {}
    n_new = 0
    failures: list[Failure] = []
    previous: list[str] | None = None
    safe = lastmjd_from
    gap = False
    complete = False
    ordered = True
    latest = -math.inf  # the highest lastmjd received so far, to check the server's order
    refused: Failure | None = None
    max_pages = -(-params.max_objects_per_class // params.page_size) + 10
    failed_run = 0  # failed pages in a row
    for page in range(1, max_pages + 1):
        if failed_run >= MAX_CONSECUTIVE_FAILED_PAGES:
            failures.append(Failure(f"objects of {class_name} after page {page - 1}",
                                    f"listing stopped after {failed_run} consecutive failed pages; the next pull "
                                    "lists them again", 0, True))
            break
        what = f"objects page {page} of {class_name}"
        failed_run += 1  # until the page is read
        try:
            body = call(lambda: client.query_objects(page=page, **query))
        except RequestFailed as exc:
            failures.append(Failure(what, exc.reason, exc.attempts, exc.transient))
            gap = True
            if not exc.transient and page == 1:
                refused = failures[-1]  # a 4xx for the query itself: later pages would be refused too
                break
            continue
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            failures.append(Failure(what, "unexpected response shape (no 'items' list)"))
            gap = True
            continue
        items = [it for it in body["items"] if isinstance(it, dict) and it.get("oid")]
        oids = [str(it["oid"]) for it in items]
        if not items:
            if body.get("has_next"):
                failures.append(Failure(what, "empty page although has_next is true"))
                gap = True
                continue
            complete = not gap
            break
        if previous is not None and oids == previous:
            failures.append(Failure(what, f"page repeats page {page - 1}"))
            gap = True
            continue
        previous = oids
        failed_run = 0
        for item in items:
            lastmjd = _as_float(item.get("lastmjd"))
            if not math.isnan(lastmjd):
                ordered = ordered and lastmjd >= latest
                latest = max(latest, lastmjd)
        for item in items:
            oid = str(item["oid"])
            if oid in rows or (item.get("class") is not None and normalise_label(item.get("class")) != class_name):
                continue
            lastmjd = _as_float(item.get("lastmjd"))
            if n_new >= params.max_objects_per_class:
                break
            rows[oid] = item
            n_new += bool(is_new(oid, lastmjd))
            if not gap and not math.isnan(lastmjd):
                safe = max(safe if safe is not None else -math.inf, lastmjd)
        if n_new >= params.max_objects_per_class:
            break
        # Without count=true the server leaves has_next false: a full page means there may be more.
        if not body.get("has_next") and len(body["items"]) < params.page_size:
            complete = not gap
            break
    else:
        failures.append(Failure(f"objects of {class_name}", f"stopped after {max_pages} pages"))
    capped = n_new >= params.max_objects_per_class
    if not ordered and not complete:
        # Out of order, the objects of a failed page or past the cap may lie anywhere: nothing is proven.
        safe = lastmjd_from
    frame = pd.DataFrame(list(rows.values()))
    for col in LISTING_COLUMNS:
        if col not in frame.columns:
            frame[col] = pd.NA
    frame = frame[LISTING_COLUMNS].copy()
    frame["oid"] = frame["oid"].astype(str)
    frame["class"] = class_name
    for col in ("probability", "firstmjd", "lastmjd"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    frame["ndet"] = pd.to_numeric(frame["ndet"], errors="coerce")
    return Listing(class_name=class_name, rows=frame, failures=failures, complete=complete, safe_lastmjd=safe,
                   ordered=ordered, capped=capped, refused=refused)


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class FetchedLightCurve:
    oid: str
    detections: pd.DataFrame  # contract columns, not yet validated
    non_detections: pd.DataFrame


def fetch_lightcurve(client, call: Caller, oid: str) -> FetchedLightCurve:
    """Detections and non-detections of one object from /lightcurve, mapped onto the contract.

    Raises RequestFailed with a reason for anything unusable (after retries)."""
    body = call(lambda: client.query_lightcurve(oid, survey=SURVEY, format="json"))
    if not isinstance(body, dict) or not isinstance(body.get("detections"), list):
        raise RequestFailed("unexpected lightcurve shape (no 'detections' list)", 1)
    detections = [d for d in body["detections"] if isinstance(d, dict)]
    if not detections:
        raise RequestFailed("no detections", 1)
    non_detections = [d for d in body.get("non_detections") or [] if isinstance(d, dict)]
    try:
        det = map_detections(pd.DataFrame(detections), source="alerce", oid=oid)
        nd_frame = pd.DataFrame(non_detections)
        nd = (map_non_detections(nd_frame, oid=oid) if len(nd_frame)
              else map_non_detections(pd.DataFrame({"mjd": [], "fid": [], "diffmaglim": []}), oid=oid))
    except ValueError as exc:  # SchemaError: a required column is missing from every row
        raise RequestFailed(f"lightcurve does not map onto the contract: {exc}", 1) from exc
    return FetchedLightCurve(oid=oid, detections=det, non_detections=nd)


class ThreadLocalClients:
    """One `alerce` client (and so one requests session) per worker thread."""

    def __init__(self, params: AlerceParams, factory: Callable[[AlerceParams], Any] = make_client):
        self._local = threading.local()
        self._params, self._factory = params, factory

    def get(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._factory(self._params)
        return client


def fetch_in_chunks(clients: ThreadLocalClients, call: Caller, oids: Sequence[str], concurrency: int,
                    chunk_size: int, step: Callable[..., None]
                    ) -> Iterator[tuple[list[FetchedLightCurve], list[Failure]]]:
    """:func:`fetch_many` in chunks of ``chunk_size`` objects (a pull commits after each): yields (light curves
    fetched, failures) per chunk and reports the progress over all ``oids`` to ``step``."""
    done = 0
    step("fetching light curves", completed=0, total=len(oids))
    for start in range(0, len(oids), chunk_size):
        fetched: list[FetchedLightCurve] = []
        failed: list[Failure] = []
        for item in fetch_many(clients, call, oids[start:start + chunk_size], concurrency):
            (failed if isinstance(item, Failure) else fetched).append(item)
            done += 1
            step("fetching light curves", completed=done, total=len(oids))
        yield fetched, failed


def light_curve_tables(fetched: Sequence[FetchedLightCurve], labels: pd.DataFrame, source: str,
                       label_source: str) -> MappedTables:
    """The fetched light curves of a chunk as the contract tables a batch is prepared from."""
    return MappedTables(
        detections=(pd.concat([f.detections for f in fetched], ignore_index=True) if fetched
                    else empty_frame(DETECTIONS_SCHEMA)),
        non_detections=(pd.concat([f.non_detections for f in fetched], ignore_index=True) if fetched
                        else empty_frame(NON_DETECTIONS_SCHEMA)),
        labels=labels, source=source, label_source=label_source)


def fetch_many(clients: ThreadLocalClients, call: Caller, oids: Iterable[str], concurrency: int
               ) -> Iterator[FetchedLightCurve | Failure]:
    """Fetch light curves with at most ``concurrency`` in flight; yields each result or failure as it completes."""
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="alerce") as pool:
        futures = {pool.submit(lambda o=oid: fetch_lightcurve(clients.get(), call, o)): oid for oid in oids}
        for future in as_completed(futures):
            oid = futures[future]
            try:
                yield future.result()
            except RequestFailed as exc:
                yield Failure(oid, exc.reason, exc.attempts, exc.transient)
