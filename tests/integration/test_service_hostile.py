"""The HTTP service against careless and hostile clients: a real ``deeprubin serve-api`` (uvicorn) in a subprocess on
a free loopback port, serving a real (untrained) TCN from a sqlite MLflow registry, with short timeouts.

Stalled connections (bodies shorter than their Content-Length, half-sent request heads, silent connections) are
held open with raw sockets: they must be answered 408 and closed after ``serve.body_timeout_s`` /
``serve.header_timeout_s`` while other clients are served at once; past ``serve.max_concurrency`` connections new
requests get 503. Payloads that once gave a 500 or were silently coerced (a lone surrogate, a numeric string, a
boolean, a blank oid) get a 422 naming the field, and a 422 never echoes more than a bounded part of the input.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import httpx
import pytest

from deeprubin import servers
from tests.model_fixtures import register_tcn, sqlite_uri
from tests.service_process import start_service, stop, wait_healthy

pytestmark = pytest.mark.timeout(300)

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
KEEP_ALIVE_TIMEOUT_S = 1.0
MAX_CONCURRENCY = 150
MAX_BYTES = 64 * 1024
QUIET = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("hostile")
    uri = sqlite_uri(root)
    mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).create_experiment(
        "test-models", artifact_location=(root / "artifacts").as_uri())
    register_tcn(uri, seed=0)
    (root / "params.yaml").write_text(json.dumps({  # JSON is YAML
        "train": {"tracking_uri": uri},
        "serve": {"max_request_bytes": MAX_BYTES, "header_timeout_s": HEADER_TIMEOUT_S,
                  "body_timeout_s": BODY_TIMEOUT_S, "keep_alive_timeout_s": KEEP_ALIVE_TIMEOUT_S,
                  "max_concurrency": MAX_CONCURRENCY}}))
    port = servers.free_port()
    log = root / "service.log"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env.update(QUIET)
    proc = start_service(root / "params.yaml", root, log, port, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log)
        yield {"url": url, "port": port, "log": log}
    finally:
        stop(proc)


def _curve(oid: str = "ZTF21aaaaaaa") -> dict:
    return {"oid": oid, "detections": [
        {"mjd": 60000.0 + 2 * i, "band": "gr"[i % 2], "flux": 50.0 + 30.0 * (i % 7), "flux_err": 4.0}
        for i in range(24)]}


def _get(service, path: str) -> httpx.Response:
    return httpx.get(service["url"] + path, timeout=10, trust_env=False)


def _post_raw(service, body: bytes | str) -> httpx.Response:
    content = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    return httpx.post(service["url"] + "/classify", content=content, timeout=60, trust_env=False,
                      headers={"content-type": "application/json"})


def _open(service, first: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", service["port"]), timeout=10)
    if first:
        s.sendall(first)
    return s


def _until_closed(s: socket.socket, deadline: float) -> bytes:
    """All the server sends until it closes the connection; fails if it is still open at ``deadline``."""
    data = b""
    while True:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the server still holds the connection open (received {data[:200]!r})") from None
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _head(length: int) -> bytes:
    return (f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _close_all(sockets) -> None:
    for s in sockets:
        s.close()


def test_stalled_bodies_get_408_and_are_closed_while_others_are_served(service):
    stalled = []
    try:
        started = time.monotonic()
        for _ in range(100):  # each promises 50,000 bytes and sends 1,000
            stalled.append(_open(service, _head(50_000) + b'{"light_curves": [' + b" " * 982))
        t0 = time.monotonic()
        assert _get(service, "/healthz").status_code == 200
        r = _post_raw(service, json.dumps({"light_curves": [_curve()]}))
        assert r.status_code == 200, r.text
        assert time.monotonic() - t0 < BODY_TIMEOUT_S + 30  # promptly, not after the stalled ones
        deadline = started + BODY_TIMEOUT_S + 15
        for s in stalled:
            reply = _until_closed(s, deadline)
            assert reply.startswith(b"HTTP/1.1 408 "), reply[:300]
            assert b"serve.body_timeout_s" in reply
        assert time.monotonic() - started >= BODY_TIMEOUT_S * 0.9  # not cut before its time
    finally:
        _close_all(stalled)
    assert _get(service, "/healthz").status_code == 200


def test_half_sent_heads_and_silent_connections_are_closed(service):
    half = []
    silent = []
    try:
        started = time.monotonic()
        for i in range(60):  # the request line and part of the headers, never the blank line
            half.append(_open(service, b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Len"))
        for _ in range(40):  # connect and say nothing
            silent.append(_open(service))
        assert _get(service, "/healthz").status_code == 200
        deadline = started + HEADER_TIMEOUT_S + 15
        for s in half:
            reply = _until_closed(s, deadline)
            assert reply.startswith(b"HTTP/1.1 408 "), reply[:300]
            assert b"serve.header_timeout_s" in reply
        for s in silent:
            assert _until_closed(s, deadline) == b""  # closed without a word: it asked nothing
        assert time.monotonic() - started >= HEADER_TIMEOUT_S * 0.9
    finally:
        _close_all(half + silent)
    assert _get(service, "/healthz").status_code == 200


def test_a_dribbled_head_is_bounded_by_the_header_timeout(service):
    s = _open(service)
    try:
        started = time.monotonic()
        line = b"GET /healthz HTTP/1.1\r\nX-Slow: "
        s.sendall(line)
        closed = False
        while time.monotonic() - started < HEADER_TIMEOUT_S + 10:  # one byte every 0.2 s: never idle for long
            try:
                s.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.2)
        assert closed, "a head dribbled a byte at a time was never cut off"
    finally:
        s.close()


def test_idle_kept_alive_connections_are_closed(service):
    s = _open(service, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        started = time.monotonic()
        reply = _until_closed(s, started + KEEP_ALIVE_TIMEOUT_S + 3)
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]
    finally:
        s.close()


def test_connections_past_the_concurrency_limit_get_503_until_the_stalled_ones_go(service):
    held = []
    try:
        for _ in range(MAX_CONCURRENCY):
            held.append(_open(service))
        time.sleep(0.2)
        r = _get(service, "/healthz")
        assert r.status_code == 503, (r.status_code, r.text)
        deadline = time.monotonic() + HEADER_TIMEOUT_S + 15
        for s in held:
            _until_closed(s, deadline)
    finally:
        _close_all(held)
    assert _get(service, "/healthz").status_code == 200


# --- payloads -------------------------------------------------------------------------------------------------------

def _detection_json(**values: str) -> str:
    fields = {"mjd": "60000.0", "band": '"g"', "flux": "10.0", "flux_err": "1.0", **values}
    return "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"


def _request_json(oid_json: str = '"a"', **first: str) -> str:
    """A valid request as JSON text; ``first`` replaces fields of the first detection by raw JSON values."""
    dets = [_detection_json(mjd=str(60000.0 + 3 * i)) for i in range(12)]
    dets[0] = _detection_json(**first)
    return f'{{"light_curves": [{{"oid": {oid_json}, "detections": [{", ".join(dets)}]}}]}}'


def _field_error(r: httpx.Response, field: str) -> dict:
    assert r.status_code == 422, (r.status_code, r.text[:1000])
    body = r.json()
    assert f"{field}: " in body["message"], body["message"]
    return next(e for e in body["errors"] if e["field"] == field)


@pytest.mark.parametrize("oid_json", [r'"\ud800"', r'"ZTF\udfff21"', r'"\udc00\ud800"'])
def test_a_lone_surrogate_in_an_oid_is_a_422_naming_the_field(service, oid_json):
    r = _post_raw(service, _request_json(oid_json))
    error = _field_error(r, "light_curves.0.oid")
    assert "surrogate" in error["msg"], error
    r.content.decode("utf-8")  # the reply itself is valid UTF-8


def test_a_lone_surrogate_in_a_key_is_a_422_that_says_so(service):
    body = _request_json().replace('"light_curves"', r'"\ud800x": 1, "light_curves"', 1)
    r = _post_raw(service, body)
    assert r.status_code == 422, r.text
    assert "lone surrogate" in r.json()["message"], r.json()


def test_long_oids_and_keys_are_refused_and_not_echoed_in_full(service):
    long_oid = "Z" * 10_000
    r = _post_raw(service, _request_json(json.dumps(long_oid)))
    error = _field_error(r, "light_curves.0.oid")
    assert "at most 256 characters" in error["msg"]
    assert len(r.content) < 3_000, len(r.content)  # the oid is echoed truncated (once in errors, once in message)
    assert error["oid"].startswith("Z" * 50) and "…" in error["oid"] and len(error["oid"]) < 150
    long_key = "k" * 10_000
    r = _post_raw(service, _request_json().replace('"light_curves"', f'"{long_key}": 1, "light_curves"', 1))
    assert r.status_code == 422 and len(r.content) < 3_000, (r.status_code, len(r.content))
    r = _post_raw(service, json.dumps({"light_curves": [_curve("Z" * 256)]}))  # the longest oid allowed
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field, value", [("mjd", '"60000.5"'), ("flux", '"10.5"'), ("flux_err", "true"),
                                          ("flux", "false"), ("mjd", "true")])
def test_numbers_must_be_json_numbers(service, field, value):
    r = _post_raw(service, _request_json(**{field: value}))
    error = _field_error(r, f"light_curves.0.detections.0.{field}")
    assert "number" in error["msg"], error


def test_integers_are_numbers(service):
    r = _post_raw(service, _request_json(mjd="60000", flux="10", flux_err="1"))
    assert r.status_code == 200, r.text


def test_blank_oids_are_refused(service):
    for oid in ["", " ", "   ", "\t\n", "\u3000"]:
        r = _post_raw(service, json.dumps({"light_curves": [_curve(oid)]}))
        error = _field_error(r, "light_curves.0.oid")
        assert "blank" in error["msg"] or "at least 1" in error["msg"], (oid, error)
    r = _post_raw(service, json.dumps({"light_curves": [_curve(" padded ")]}))  # not blank: kept as given
    assert r.status_code == 200 and r.json()["classifications"][0]["oid"] == " padded ", r.text
