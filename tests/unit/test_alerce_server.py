"""The local ALeRCE replay server, seen through the real ``alerce`` client (and plain ``requests`` for faults)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from alerce.core import Alerce
from alerce.exceptions import APIError, ObjectNotFoundError, ParseError

from deeprubin.config import SimulatorParams
from deeprubin.sources.simulate import simulate
from tests.alerce_server import (
    ITEM_COLUMNS,
    OBJECT_COLUMNS,
    RECORDED_LIGHTCURVE,
    RECORDED_OID,
    AlerceReplayServer,
    Catalogue,
    FaultRule,
    RandomFaults,
    unused_url,
)

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def lcs():
    return simulate(SimulatorParams(n_per_class=8), seed=3)


@pytest.fixture(scope="module")
def catalogue(lcs):
    cat = Catalogue.from_lightcurves(lcs, seed=3)
    if RECORDED_LIGHTCURVE.exists():
        cat.add_recorded(RECORDED_OID, RECORDED_LIGHTCURVE, class_name="SNIa", probability=0.93)
    return cat


@pytest.fixture
def server(catalogue):
    with AlerceReplayServer(catalogue) as srv:
        yield srv


@pytest.fixture
def client(server):
    c = Alerce()
    c.legacy_ztf_client.config["ZTF_API_URL"] = server.url
    return c


def sim_oids(catalogue) -> list[str]:
    return [o for o in catalogue.oids if o != RECORDED_OID]


def all_pages(client, page_size: int, **kw) -> list[dict]:
    items, page = [], 1
    while True:
        resp = client.query_objects(survey="ztf", format="json", page=page, page_size=page_size, count=True, **kw)
        items += resp["items"]
        if not resp["has_next"]:
            return items
        assert resp["next"] == page + 1
        page += 1


# --------------------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------------------


def test_catalogue_from_contract_tables(lcs, catalogue):
    assert len(catalogue) == len(lcs.objects) + (1 if RECORDED_LIGHTCURVE.exists() else 0)
    oid = sim_oids(catalogue)[0]
    label = lcs.objects.set_index("oid").loc[oid, "label"]
    assert catalogue.label(oid) == label
    probs = [catalogue.probability(o) for o in sim_oids(catalogue)]
    assert all(0.4 <= p < 1.0 for p in probs)
    assert any(p < 0.7 for p in probs) and any(p >= 0.7 for p in probs)
    # deterministic, and the callable overrides the draw
    again = Catalogue.from_lightcurves(lcs, seed=3)
    assert again.probability(oid) == catalogue.probability(oid)
    assert again.detections(oid) == catalogue.detections(oid)
    fixed = Catalogue.from_lightcurves(lcs, seed=3, probability=lambda o, lab: 0.55)
    assert {fixed.probability(o) for o in fixed.oids} == {0.55}


def test_objects_items_have_the_23_columns(client, catalogue):
    resp = client.query_objects(survey="ztf", classifier="lc_classifier", class_name="SNIa", probability=0.0,
                                lastmjd=[50000, 70000], page=1, page_size=20, order_by="lastmjd", order_mode="ASC",
                                format="json")
    assert set(resp) == {"total", "page", "next", "has_next", "prev", "has_prev", "items"}
    assert resp["page"] is None and resp["total"] is None and resp["prev"] is None and resp["has_prev"] is False
    assert resp["items"]
    for item in resp["items"]:
        assert tuple(item) == ITEM_COLUMNS
        assert isinstance(item["ndethist"], str)
        assert item["class"] == "SNIa" and item["classifier"] == "lc_classifier"
        assert math.isclose(item["probability"], catalogue.probability(item["oid"]))
    df = client.query_objects(survey="ztf", classifier="lc_classifier", page_size=5, format="pandas")
    assert list(df.columns) == list(ITEM_COLUMNS) and len(df) == 5


def test_object_detections_non_detections_lightcurve_probabilities(client, catalogue, lcs):
    oid = sim_oids(catalogue)[0]
    obj = client.query_object(oid, survey="ztf", format="json")
    assert tuple(obj) == OBJECT_COLUMNS and obj["oid"] == oid
    n_det = int((lcs.detections["oid"] == oid).sum())
    assert obj["ndet"] == n_det and obj["ndethist"] == str(n_det)

    dets = client.query_detections(oid, survey="ztf", format="json")
    assert len(dets) == n_det
    candids = set()
    for d in dets:
        assert "oid" not in d
        assert d["tid"] == "ztf" and d["fid"] in (1, 2) and d["isdiffpos"] in (1, -1)
        assert isinstance(d["candid"], str)
        candids.add(d["candid"])
        assert all(v is not None and not (isinstance(v, float) and math.isnan(v)) for v in d.values())
        assert ("magpsf_corr" in d) == d["corrected"]
        assert "candid_alert" not in d
    assert len(candids) == len(dets)
    assert [d["mjd"] for d in dets] == sorted(d["mjd"] for d in dets)
    mine = lcs.detections[lcs.detections["oid"] == oid].sort_values("mjd")
    assert [d["magpsf"] for d in dets] == pytest.approx(mine["mag"].tolist())
    assert [d["isdiffpos"] for d in dets] == [1 if f >= 0 else -1 for f in mine["flux"]]

    nondets = client.query_non_detections(oid, survey="ztf", format="json")
    assert len(nondets) == int((lcs.non_detections["oid"] == oid).sum())
    assert all(set(n) == {"tid", "mjd", "fid", "diffmaglim"} for n in nondets)

    lc = client.query_lightcurve(oid, survey="ztf", format="json")
    assert set(lc) == {"detections", "non_detections"}
    assert lc["detections"] == dets and lc["non_detections"] == nondets

    probs = client.query_probabilities(oid, survey="ztf", format="json")
    lc_rows = [p for p in probs if p["classifier_name"] == "lc_classifier"]
    assert {tuple(sorted(p)) for p in probs} == {
        ("class_name", "classifier_name", "classifier_version", "probability", "ranking")}
    top = [p for p in lc_rows if p["ranking"] == 1]
    assert len(top) == 1 and top[0]["class_name"] == catalogue.label(oid)
    assert math.isclose(top[0]["probability"], catalogue.probability(oid))
    assert math.isclose(sum(p["probability"] for p in lc_rows), 1.0)
    assert sorted(p["ranking"] for p in lc_rows) == list(range(1, len(lc_rows) + 1))
    # (AlerceCommonSearch.query_probabilities does not forward classifier=; the legacy client does)
    only = client.legacy_ztf_client.query_probabilities(oid, format="json", classifier="lc_classifier")
    assert only == lc_rows


@pytest.mark.skipif(not RECORDED_LIGHTCURVE.exists(), reason="recorded ZTF20aaelulu response not available")
def test_recorded_object_is_served_as_recorded(client):
    recorded = json.loads(RECORDED_LIGHTCURVE.read_text())
    lc = client.query_lightcurve(RECORDED_OID, survey="ztf", format="json")
    assert len(lc["detections"]) == 58 and len(lc["non_detections"]) == 17
    assert lc["detections"] == recorded["detections"] and lc["non_detections"] == recorded["non_detections"]
    assert len(client.query_detections(RECORDED_OID, survey="ztf", format="json")) == 58
    assert len(client.query_non_detections(RECORDED_OID, survey="ztf", format="json")) == 17
    obj = client.query_object(RECORDED_OID, survey="ztf", format="json")
    assert obj["ndet"] == 58 and obj["firstmjd"] == min(d["mjd"] for d in recorded["detections"])
    found = client.query_objects(survey="ztf", oid=[RECORDED_OID], format="json")["items"]
    assert [i["class"] for i in found] == ["SNIa"]


def test_unknown_object_is_404_as_the_client_expects(client, server):
    with pytest.raises(ObjectNotFoundError) as exc:
        client.query_detections("ZTF99zzzzzzz", survey="ztf", format="json")
    assert exc.value.code == 404 and exc.value.message
    resp = requests.get(f"{server.url}/ztf/v1/objects/ZTF99zzzzzzz/lightcurve", timeout=5)
    assert resp.status_code == 404 and {"message", "errors", "detail"} <= set(resp.json())
    with pytest.raises(ParseError):
        client.query_objects(survey="ztf", page="abc", format="json")
    with pytest.raises(ParseError):
        client.query_objects(survey="ztf", order_by="nonsense", format="json")


def test_client_config_file(server, tmp_path, monkeypatch, catalogue):
    path = server.write_client_config(tmp_path / "alerce.json")
    config = json.loads(path.read_text())
    assert config["ztf"]["ZTF_API_URL"] == server.url
    assert {"multisurvey", "ztf", "stamps", "stamps_ztf"} <= set(config)
    monkeypatch.setenv("ALERCE_CONFIG_PATH", str(path))
    c = Alerce()
    oid = sim_oids(catalogue)[1]
    assert c.query_object(oid, survey="ztf", format="json")["oid"] == oid


# --------------------------------------------------------------------------------------------------------------
# Pagination and filters
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order_by,mode", [("oid", "ASC"), ("lastmjd", "DESC"), ("probability", "ASC"),
                                           ("ndet", "DESC"), ("firstmjd", "ASC")])
def test_pagination_covers_every_object_once_in_order(client, catalogue, order_by, mode):
    items = all_pages(client, 7, classifier="lc_classifier", order_by=order_by, order_mode=mode)
    oids = [i["oid"] for i in items]
    assert sorted(oids) == catalogue.oids  # every object exactly once
    keys = [(i[order_by], i["oid"]) for i in items]
    expect = sorted(keys, key=lambda k: k[1])
    expect = sorted(expect, key=lambda k: k[0], reverse=(mode == "DESC"))
    assert keys == expect


def test_pagination_fields_and_the_count_quirk(client, catalogue):
    n = len(catalogue)
    first = client.query_objects(survey="ztf", format="json", page_size=10, count="true")
    assert first["total"] == n and first["has_next"] is True and first["next"] == 2 and first["prev"] is None
    last_page = math.ceil(n / 10)
    last = client.query_objects(survey="ztf", format="json", page=last_page, page_size=10, count=True)
    assert last["has_next"] is False and last["next"] is None and last["prev"] == last_page - 1
    assert len(last["items"]) == n - 10 * (last_page - 1)
    beyond = client.query_objects(survey="ztf", format="json", page=last_page + 1, page_size=10, count=True)
    assert beyond["items"] == []
    # As on the real server: without count, total is null and has_next is always false.
    nocount = client.query_objects(survey="ztf", format="json", page_size=10)
    assert nocount["total"] is None and nocount["has_next"] is False and len(nocount["items"]) == 10


def test_filters(client, catalogue):
    def oids(**kw):
        return sorted(i["oid"] for i in all_pages(client, 50, **kw))

    rows = {o: catalogue.object_row(o) for o in catalogue.oids}
    snia = [o for o in catalogue.oids if catalogue.label(o) == "SNIa"]
    assert oids(classifier="lc_classifier", class_name="SNIa") == snia
    assert oids(classifier="lc_classifier", class_name="SNIa", probability=0.7) == [
        o for o in snia if catalogue.probability(o) >= 0.7]
    assert 0 < len(oids(classifier="lc_classifier", probability=0.7)) < len(catalogue)
    lo, hi = sorted(r["lastmjd"] for r in rows.values())[len(rows) // 4], 58900.0
    assert oids(classifier="lc_classifier", lastmjd=[lo, hi]) == sorted(
        o for o, r in rows.items() if lo <= r["lastmjd"] <= hi)
    assert oids(classifier="lc_classifier", lastmjd=[lo]) == sorted(o for o, r in rows.items() if r["lastmjd"] >= lo)
    assert oids(classifier="lc_classifier", firstmjd=[58400, 58700]) == sorted(
        o for o, r in rows.items() if 58400 <= r["firstmjd"] <= 58700)
    assert oids(classifier="lc_classifier", ndet=[20]) == sorted(o for o, r in rows.items() if r["ndet"] >= 20)
    assert oids(classifier="lc_classifier", ndet=[10, 30]) == sorted(
        o for o, r in rows.items() if 10 <= r["ndet"] <= 30)
    some = catalogue.oids[:3]
    assert oids(oid=some) == some
    assert oids(oid=[some[0]]) == [some[0]]
    assert oids(classifier="stamp_classifier") == []
    assert oids(classifier="lc_classifier", class_name="NoSuchClass") == []
    # ranking 2 lists each object under its second class
    second = all_pages(client, 100, classifier="lc_classifier", ranking=2)
    assert len(second) == len(catalogue)
    assert all(i["class"] != catalogue.label(i["oid"]) for i in second)


def test_set_now_hides_the_future(client, server, catalogue):
    rows = {o: catalogue.object_row(o) for o in sim_oids(catalogue)}
    firsts = sorted(r["firstmjd"] for r in rows.values())
    now = firsts[len(firsts) // 2] + 0.5
    server.set_now(now)
    visible = sorted(o for o, r in rows.items() if r["firstmjd"] <= now)
    listed = all_pages(client, 25, classifier="lc_classifier")
    assert sorted(i["oid"] for i in listed) == visible
    assert all(i["lastmjd"] <= now and i["firstmjd"] <= now for i in listed)
    # an object with data on both sides of now: detections and counts are cut at now
    straddling = next(o for o in visible if rows[o]["lastmjd"] > now)
    dets = client.query_detections(straddling, survey="ztf", format="json")
    nondets = client.query_non_detections(straddling, survey="ztf", format="json")
    assert dets and all(d["mjd"] <= now for d in dets) and all(n["mjd"] <= now for n in nondets)
    obj = client.query_object(straddling, survey="ztf", format="json")
    assert obj["ndet"] == len(dets) and obj["lastmjd"] == max(d["mjd"] for d in dets)
    assert len(dets) < rows[straddling]["ndet"]
    hidden = next(o for o, r in rows.items() if r["firstmjd"] > now)
    with pytest.raises(ObjectNotFoundError):
        client.query_lightcurve(hidden, survey="ztf", format="json")
    late = client.query_objects(survey="ztf", format="json", classifier="lc_classifier", firstmjd=[now + 1])
    assert late["items"] == []
    server.set_now(None)
    assert len(client.query_detections(straddling, survey="ztf", format="json")) == rows[straddling]["ndet"]
    assert client.query_object(hidden, survey="ztf", format="json")["oid"] == hidden


# --------------------------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------------------------


def test_http_errors_then_heal(client, server, catalogue):
    oid = sim_oids(catalogue)[0]
    server.add_fault(FaultRule("detections", "http_500", oid=oid, times=2))
    for _ in range(2):
        with pytest.raises(APIError) as exc:
            client.query_detections(oid, survey="ztf", format="json")
        assert exc.value.code == 500 and exc.value.data
    assert client.query_detections(oid, survey="ztf", format="json")
    other = sim_oids(catalogue)[1]
    server.add_fault(FaultRule("*", "http_503"))
    with pytest.raises(APIError) as exc:
        client.query_lightcurve(other, survey="ztf", format="json")
    assert exc.value.code == 503
    assert client.query_lightcurve(other, survey="ztf", format="json")["detections"]
    statuses = [(r.route, r.status, r.fault) for r in server.requests]
    assert statuses == [("detections", 500, "http_500")] * 2 + [("detections", 200, None),
                                                                  ("lightcurve", 503, "http_503"),
                                                                  ("lightcurve", 200, None)]


def test_rate_limit_sends_retry_after(client, server):
    server.add_fault(FaultRule("objects", "http_429", retry_after=2.5, page=2))
    with pytest.raises(APIError) as exc:
        client.query_objects(survey="ztf", format="json", page=2)
    assert exc.value.code == 429 and exc.value.response.headers["Retry-After"] == "2.5"
    assert client.query_objects(survey="ztf", format="json", page=2)["items"]


def test_slow_times_out_without_blocking_others(server, catalogue):
    oid, other = sim_oids(catalogue)[:2]
    server.add_fault(FaultRule("lightcurve", "slow", oid=oid, delay=1.5))
    url = f"{server.url}/ztf/v1/objects"
    with pytest.raises(requests.Timeout):
        requests.get(f"{url}/{oid}/lightcurve", timeout=0.3)
    assert [(r.route, r.status, r.fault) for r in server.requests] == [("lightcurve", 200, "slow")]  # on arrival
    t0 = time.monotonic()  # the sleeping handler does not hold up another request
    assert requests.get(f"{url}/{other}/lightcurve", timeout=5).status_code == 200
    assert time.monotonic() - t0 < 1.0
    server.add_fault(FaultRule("detections", "slow", delay=0.3))
    t0 = time.monotonic()
    assert requests.get(f"{url}/{oid}/detections", timeout=5).status_code == 200  # slow but whole
    assert time.monotonic() - t0 >= 0.3
    assert requests.get(f"{url}/{oid}/lightcurve", timeout=5).status_code == 200  # healed


@pytest.mark.parametrize("kind", ["truncated_json", "malformed_json"])
def test_bad_json_bodies(client, server, catalogue, kind):
    oid = sim_oids(catalogue)[0]
    server.add_fault(FaultRule("detections", kind, oid=oid))
    with pytest.raises(requests.exceptions.JSONDecodeError):
        client.query_detections(oid, survey="ztf", format="json")
    assert client.query_detections(oid, survey="ztf", format="json")
    server.add_fault(FaultRule("objects", kind))
    with pytest.raises(requests.exceptions.JSONDecodeError):
        client.query_objects(survey="ztf", format="json")
    raw_fault = FaultRule("lightcurve", kind, oid=oid)
    server.add_fault(raw_fault)
    resp = requests.get(f"{server.url}/ztf/v1/objects/{oid}/lightcurve", timeout=5)
    assert resp.status_code == 200 and int(resp.headers["Content-Length"]) == len(resp.content)
    assert server.requests[-1].fault == kind


def test_reset_mid_body(client, server, catalogue):
    oid = sim_oids(catalogue)[0]
    server.add_fault(FaultRule("lightcurve", "reset", oid=oid))
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
        client.query_lightcurve(oid, survey="ztf", format="json")
    assert client.query_lightcurve(oid, survey="ztf", format="json")["detections"]  # the session recovers
    assert [r.fault for r in server.requests] == ["reset", None]


def test_not_found_fault_then_back(client, server, catalogue):
    oid = sim_oids(catalogue)[2]
    server.add_fault(FaultRule("non_detections", "not_found", oid=oid, times=1))
    with pytest.raises(ObjectNotFoundError):
        client.query_non_detections(oid, survey="ztf", format="json")
    assert isinstance(client.query_non_detections(oid, survey="ztf", format="json"), list)


def test_forever_fault_until_cleared(client, server, catalogue):
    oid = sim_oids(catalogue)[0]
    server.add_fault(FaultRule("object", "http_500", times=-1))
    for _ in range(3):
        with pytest.raises(APIError):
            client.query_object(oid, survey="ztf", format="json")
    server.clear_faults()
    assert client.query_object(oid, survey="ztf", format="json")["oid"] == oid


def test_empty_and_repeated_pages(client, server, catalogue):
    kw = dict(survey="ztf", format="json", page_size=5, count=True, order_by="oid", order_mode="ASC")
    page1 = client.query_objects(page=1, **kw)["items"]
    page2 = client.query_objects(page=2, **kw)["items"]
    server.add_fault(FaultRule("objects", "empty_page", page=2))
    empty = client.query_objects(page=2, **kw)
    assert empty["items"] == [] and empty["has_next"] is True
    assert client.query_objects(page=2, **kw)["items"] == page2
    server.add_fault(FaultRule("objects", "repeat_page", page=2))
    assert client.query_objects(page=2, **kw)["items"] == page1
    assert client.query_objects(page=2, **kw)["items"] == page2
    # page faults never hit per-object routes
    server.add_fault(FaultRule("*", "empty_page"))
    assert client.query_detections(catalogue.oids[0], survey="ztf", format="json")
    assert [r.fault for r in server.requests if r.route == "objects"] == [None, None, "empty_page", None,
                                                                          "repeat_page", None]


def test_unsorted_pages_ignore_order_by(client, server, catalogue):
    kw = dict(classifier="lc_classifier", order_by="lastmjd", order_mode="ASC")
    server.add_fault(FaultRule("objects", "unsorted", times=-1))
    items = all_pages(client, 7, **kw)
    assert [i["oid"] for i in items] == catalogue.oids  # every object once, in oid order
    lastmjd = [i["lastmjd"] for i in items]
    assert lastmjd != sorted(lastmjd)
    assert {r.fault for r in server.requests} == {"unsorted"}


def test_a_page_fault_can_target_one_class(client, server, catalogue):
    server.add_fault(FaultRule("objects", "http_500", page=1, class_name="SNIa", times=-1))
    kw = dict(survey="ztf", format="json", classifier="lc_classifier", page=1)
    with pytest.raises(APIError):
        client.query_objects(class_name="SNIa", **kw)
    assert client.query_objects(class_name="QSO", **kw)["items"]
    assert client.query_objects(class_name="SNIa", survey="ztf", format="json", classifier="lc_classifier",
                                page=2)["items"] is not None


def test_random_faults_fail_about_the_rate_asked_then_stop(client, server, catalogue):
    server.set_random_faults(RandomFaults(rate=0.7, seed=1))
    oid = sim_oids(catalogue)[0]
    failed = 0
    for _ in range(100):
        try:
            client.query_object(oid, survey="ztf", format="json")
        except (APIError, requests.exceptions.RequestException):
            failed += 1
    assert 55 <= failed <= 85
    assert {r.fault for r in server.requests} - {None} <= {"http_500", "http_503", "http_429", "truncated_json",
                                                            "malformed_json", "reset"}
    server.clear_faults()
    assert client.query_object(oid, survey="ztf", format="json")["oid"] == oid
    with pytest.raises(ValueError):
        RandomFaults(rate=1.5)


def test_unused_url_refuses_connections():
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(unused_url() + "/ztf/v1/objects", timeout=2)


def test_add_fault_leaves_the_callers_rule_alone(client, server, catalogue):
    rule = FaultRule("object", "http_503", times=2)
    server.add_fault(rule)
    for _ in range(3):
        try:
            client.query_object(catalogue.oids[0], survey="ztf", format="json")
        except APIError:
            pass
    assert rule.times == 2 and server.faults[0].times == 0
    assert [r.status for r in server.requests] == [503, 503, 200]
    stamps = [r.time for r in server.requests]
    assert stamps == sorted(stamps) and stamps[0] > 0


def test_fault_rule_validation():
    with pytest.raises(ValueError):
        FaultRule("detection", "http_500")
    with pytest.raises(ValueError):
        FaultRule("detections", "http_501")


# --------------------------------------------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------------------------------------------


def test_keep_alive_connections_are_reused(server, catalogue):
    with requests.Session() as s:
        ports = set()
        for oid in sim_oids(catalogue)[:5]:
            r = s.get(f"{server.url}/ztf/v1/objects/{oid}/detections", timeout=5, stream=True)
            ports.add(r.raw.connection.sock.getsockname()[1])
            r.content
    assert len(ports) == 1


def test_two_servers_and_stop_frees_the_port(catalogue):
    a = AlerceReplayServer(catalogue).start()
    b = AlerceReplayServer(catalogue).start()
    try:
        assert a.port != b.port
        oid = catalogue.oids[0]
        for srv in (a, b):
            assert requests.get(f"{srv.url}/ztf/v1/objects/{oid}", timeout=5).json()["oid"] == oid
        b.add_fault(FaultRule("object", "slow", delay=30))
        def hang():
            with pytest.raises(requests.ConnectionError):  # cut off by stop()
                requests.get(f"{b.url}/ztf/v1/objects/{oid}", timeout=30)

        hung = threading.Thread(target=hang, daemon=True)
        hung.start()
        time.sleep(0.2)
    finally:
        a.stop()
        port = b.port
        t0 = time.monotonic()
        b.stop()
    assert time.monotonic() - t0 < 5  # a sleeping handler does not hold up stop()
    hung.join(timeout=5)
    assert not hung.is_alive()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/ztf/v1/objects", timeout=2)
    with socket.socket() as sock:  # the port can be bound again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    again = AlerceReplayServer(catalogue, port=port).start()
    try:
        assert again.port == port and requests.get(f"{again.url}/ztf/v1/objects", timeout=5).ok
    finally:
        again.stop()


def test_cli_serves_until_sigterm():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "tests.alerce_server", "--n-per-class", "3", "--seed", "1",
                             "--port", "0", "--recorded"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("ALERCE_URL=http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split("=", 1)[1]
        resp = requests.get(f"{url}/ztf/v1/objects", params={"count": "true", "page_size": 100}, timeout=5).json()
        assert resp["total"] == 12 + (1 if RECORDED_LIGHTCURVE.exists() else 0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
