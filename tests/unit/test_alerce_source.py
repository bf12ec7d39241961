"""Pieces of the ALeRCE source that need no server: pacing, error classification, retries, watermarks."""

from __future__ import annotations

import math
import random

import pandas as pd
import pytest
import requests
from alerce.exceptions import APIError, ObjectNotFoundError, ParseError

from deeprubin.config import AlerceParams
from deeprubin.sources.alerce import Caller, Failure, Listing, RateLimiter, RequestFailed, classify_error
from deeprubin.sources.alerce_pull import _needs_fetch, _new_watermark


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_rate_limiter_spaces_calls():
    clock = FakeClock()
    limiter = RateLimiter(4.0, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        limiter.acquire()
    assert clock.now == pytest.approx(1.0)  # 5 calls at 4/s: the 5th starts at t = 1 s
    clock.now += 10
    limiter.acquire()
    assert clock.sleeps[-1] == pytest.approx(0.25)  # no sleep for the first call after idling
    assert len(clock.sleeps) == 4


def response_with(status: int, headers: dict | None = None) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp.headers.update(headers or {})
    return resp


@pytest.mark.parametrize("exc,retry,reason", [
    (ObjectNotFoundError(code=404), False, "not found"),
    (ParseError(message="bad query", code=400), False, "client error (HTTP 400)"),
    (APIError(code=403, message="forbidden"), False, "client error (HTTP 403)"),
    (APIError(code=500), True, "server error (HTTP 500)"),
    (APIError(code=503), True, "server error (HTTP 503)"),
    (requests.exceptions.ReadTimeout(), True, "timed out"),
    (requests.exceptions.ConnectionError(), True, "connection failed"),
    (requests.exceptions.ChunkedEncodingError(), True, "connection failed"),
    (requests.exceptions.JSONDecodeError("Expecting value", "{", 1), True, "malformed or truncated JSON"),
])
def test_errors_are_classified(exc, retry, reason):
    got_reason, got_retry, wait = classify_error(exc)
    assert got_retry is retry and got_reason.startswith(reason) and wait is None


def test_429_carries_its_retry_after():
    exc = APIError(code=429, response=response_with(429, {"Retry-After": "7"}))
    assert classify_error(exc) == ("rate limited (HTTP 429)", True, 7.0)
    exc = APIError(code=429, response=response_with(429, {"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}))
    assert classify_error(exc)[2] is None  # a date falls back to backoff


def test_unknown_exceptions_are_not_swallowed():
    with pytest.raises(KeyError):
        classify_error(KeyError("bug"))


def make_caller(**params) -> tuple[Caller, FakeClock]:
    clock = FakeClock()
    settings = dict(max_attempts=4, backoff_base_s=1.0, backoff_max_s=5.0, requests_per_second=1000.0)
    settings.update(params)
    p = AlerceParams(**settings)
    return Caller(p, RateLimiter(p.requests_per_second, clock=clock, sleep=clock.sleep), sleep=clock.sleep,
                  rng=random.Random(0)), clock


def failing(times: int, exc: Exception, value="ok"):
    state = {"n": 0}

    def fn():
        state["n"] += 1
        if state["n"] <= times:
            raise exc
        return value

    return fn, state


def test_retries_then_succeeds_with_bounded_jittered_backoff():
    caller, clock = make_caller()
    fn, state = failing(3, APIError(code=502))
    assert caller(fn) == "ok" and state["n"] == 4 and caller.retries == 3
    waits = [s for s in clock.sleeps if s > 0.01]
    assert len(waits) == 3
    assert all(0 <= w <= cap for w, cap in zip(waits, [1.0, 2.0, 4.0]))


def test_retry_after_is_honoured_and_capped():
    caller, clock = make_caller(backoff_max_s=5.0)
    fn, _ = failing(1, APIError(code=429, response=response_with(429, {"Retry-After": "3"})))
    caller(fn)
    assert 3.0 in clock.sleeps
    fn, _ = failing(1, APIError(code=429, response=response_with(429, {"Retry-After": "600"})))
    caller(fn)
    assert max(clock.sleeps) == 5.0


def test_gives_up_after_max_attempts_and_never_retries_a_404():
    caller, _ = make_caller(max_attempts=3)
    fn, state = failing(10, APIError(code=500))
    with pytest.raises(RequestFailed) as err:
        caller(fn)
    assert state["n"] == 3 and err.value.attempts == 3 and err.value.transient
    fn, state = failing(10, ObjectNotFoundError(code=404))
    with pytest.raises(RequestFailed) as err:
        caller(fn)
    assert state["n"] == 1 and not err.value.transient


def listing(lastmjds: list[float], safe: float | None, complete=True) -> Listing:
    rows = pd.DataFrame({"oid": [f"o{i}" for i in range(len(lastmjds))], "class": "SNIa", "probability": 0.9,
                         "ndet": 5, "firstmjd": 0.0, "lastmjd": lastmjds})
    return Listing("SNIa", rows, [], complete, safe)


def test_only_new_or_moved_objects_are_fetched():
    lst = listing([10.0, 20.0, float("nan")], safe=20.0)
    todo = _needs_fetch(lst, seen={"o0": 10.0, "o1": 15.0})
    assert list(todo["oid"]) == ["o1", "o2"]


def test_watermark_advances_only_past_what_is_safely_stored():
    lst = listing([10.0, 20.0, 30.0], safe=30.0)
    lastmjd = dict(zip(lst.rows["oid"], lst.rows["lastmjd"]))
    assert _new_watermark(None, lst, [], lastmjd) == 30.0
    assert _new_watermark(40.0, lst, [], lastmjd) == 40.0  # never backwards without a failure
    held = [Failure("o1", "server error (HTTP 500)", 5, transient=True)]
    assert _new_watermark(5.0, lst, held, lastmjd) == 20.0  # the next pull lists from the failed object
    gone = [Failure("o1", "not found (HTTP 404)", 1, transient=False)]
    assert _new_watermark(5.0, lst, gone, lastmjd) == 30.0  # a vanished object does not hold it
    assert _new_watermark(7.0, listing([], safe=None), [], {}) == 7.0
    assert math.isclose(_new_watermark(None, listing([10.0], safe=10.0), [], {"o0": 10.0}), 10.0)


def test_a_failed_page_holds_the_watermark_below_later_failed_objects():
    # Listed without a gap up to 10.0, then a page failed; o2 (30.0), listed after the gap, failed to fetch.
    lst = listing([5.0, 10.0, 30.0], safe=10.0, complete=False)
    lastmjd = dict(zip(lst.rows["oid"], lst.rows["lastmjd"]))
    held = [Failure("o2", "server error (HTTP 500)", 5, transient=True)]
    assert _new_watermark(None, lst, held, lastmjd) == 10.0  # not 30.0: the failed page's objects lie between
    assert _new_watermark(8.0, lst, held, lastmjd) == 10.0
    assert _new_watermark(20.0, listing([25.0], safe=19.0, complete=False), [], {"o0": 25.0}) == 20.0
    # The first page failed on a first pull: nothing is proven, whatever failed after it.
    failed = [Failure("o0", "server error (HTTP 500)", 5, transient=True)]
    assert _new_watermark(None, listing([30.0], safe=None, complete=False), failed, {"o0": 30.0}) is None
