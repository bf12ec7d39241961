"""The HTTP service in process (FastAPI's TestClient, a small untrained TCN; issue 17):

* ``/docs`` and ``/redoc`` load every script, style and icon from the app itself (no CDN, no Google Fonts), so they
  work without internet; the browser that proves they render is tests/integration/test_docs_browser.py (slow).
* A repeated (mjd, band) point of one object is dropped as ``deeprubin classify`` drops it from a file: the first
  given kept, not counted in ``n_det``, counted by the same reason.
* Every error (404, 405, those StaticFiles raises, a 500) answers ``{"message": ...}`` as the 413s and 422s do, not
  Starlette's ``{"detail": ...}``.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from deeprubin.config import load_params
from deeprubin.lightcurves.tensorize import DUPLICATE_POINT, Curve, drop_duplicate_points
from deeprubin.models.served import ServingModel
from deeprubin.schema import CLASSES, MAG_TOO_FAINT
from deeprubin.serving import classify as clf
from deeprubin.serving.service import DOCS_ASSETS, create_app
from tests.model_fixtures import served_tcn

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def model() -> ServingModel:
    return ServingModel(uri="local:test", name="test", version="0", classes=tuple(CLASSES), module=served_tcn())


@pytest.fixture(scope="module")
def client(model):
    params = load_params(None, ["classify.model_uri=local-test"])
    with TestClient(create_app(params, model_loader=lambda uri, tracking, classes: model)) as c:
        yield c


# --- the documentation pages, offline ---------------------------------------------------------------------------

_REFS = re.compile(r"""<(?:script|link)\b[^>]*?\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.I)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_the_app_itself(client, page):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    refs = _REFS.findall(html)
    assert len(refs) >= (3 if page == "/docs" else 2), refs  # Swagger: css, favicon, js; ReDoc: favicon, js
    for url in refs:
        assert url.startswith(f"{DOCS_ASSETS}/") and "//" not in url, f"{page} loads {url} from elsewhere"
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, (url, asset.status_code)
    assert "http://" not in html and "https://" not in html  # no CDN, no Google Fonts: nothing off the app
    spec = "url: '/openapi.json'" if page == "/docs" else 'spec-url="/openapi.json"'
    assert spec in html and client.get("/openapi.json").status_code == 200


def test_the_docs_assets_are_the_scripts_they_claim_to_be(client):
    js = client.get(f"{DOCS_ASSETS}/swagger-ui-bundle.js")
    assert "SwaggerUIBundle" in js.text[:2000] and "javascript" in js.headers["content-type"]
    assert "swagger-ui" in client.get(f"{DOCS_ASSETS}/swagger-ui.css").text
    assert "Redoc" in client.get(f"{DOCS_ASSETS}/redoc.standalone.js").text[:2000]
    assert client.get(f"{DOCS_ASSETS}/favicon.png").content[:8] == b"\x89PNG\r\n\x1a\n"


def test_behind_a_prefix_the_pages_point_under_it(model):
    params = load_params(None, ["classify.model_uri=local-test"])
    app = create_app(params, model_loader=lambda uri, tracking, classes: model)
    with TestClient(app, root_path="/deeprubin") as c:
        html = c.get("/docs").text
    assert f'src="/deeprubin{DOCS_ASSETS}/swagger-ui-bundle.js"' in html and "url: '/deeprubin/openapi.json'" in html


# --- duplicate points -------------------------------------------------------------------------------------------

def _points(n: int = 12) -> list[dict]:
    return [{"mjd": 60000.0 + 2.0 * i, "band": "gr"[i % 2], "flux": 40.0 + 5.0 * np.sin(i), "flux_err": 3.0}
            for i in range(n)]


def test_drop_duplicate_points_keeps_the_first_given_of_each_mjd_and_band():
    c = Curve("x", np.array([1.0, 2.0, 1.0, 1.0, 2.0]), np.array([0, 0, 1, 0, 0]), np.arange(5.0), np.ones(5))
    kept, n = drop_duplicate_points(c)
    assert n == 2 and kept.mjd.tolist() == [1.0, 2.0, 1.0] and kept.band.tolist() == [0, 0, 1]
    assert kept.flux.tolist() == [0.0, 1.0, 2.0]  # (1, g) and (2, g) as first given; (1, r) is another band
    same, none = drop_duplicate_points(kept)
    assert none == 0 and same is kept


def test_duplicate_points_are_dropped_as_the_file_path_drops_them(client, model, tmp_path):
    """Old: a point sent twice was counted twice in n_det and weighed twice in the GP. Now the answer is the file
    path's (``deeprubin classify``): same n_det, same probabilities, the same reason counted."""
    clean = _points()
    repeats = [dict(clean[i], flux=clean[i]["flux"] * 3) for i in (1, 4, 4)]  # later copies differ: first is kept
    sent = clean[:6] + repeats + clean[6:]
    r = client.post("/classify", json={"light_curves": [{"oid": "dup", "detections": sent},
                                                        {"oid": "clean", "detections": clean}]})
    assert r.status_code == 200, r.text
    body = r.json()
    rows = {c["oid"]: c for c in body["classifications"]}
    assert rows["dup"]["n_det"] == rows["clean"]["n_det"] == len(clean)
    assert rows["dup"]["n_dropped"] == 3 and rows["clean"]["n_dropped"] == 0
    assert body["points_dropped"] == {DUPLICATE_POINT: 3}
    assert rows["dup"]["probabilities"] == pytest.approx(rows["clean"]["probabilities"], abs=1e-6)

    frame = pd.DataFrame([{"oid": "dup", **p} for p in sent])
    src = tmp_path / "dup.csv"
    frame.to_csv(src, index=False)
    result = clf.run_file(load_params(None, ["classify.workers=1"]), src, tmp_path / "out.parquet", model=model)
    assert result.n_points_dropped == body["points_dropped"]  # the same reason, named alike, the same count
    out = pd.read_parquet(tmp_path / "out.parquet").iloc[0]
    assert out["n_det"] == rows["dup"]["n_det"]
    assert [out[f"p_{c}"] for c in CLASSES] == pytest.approx([rows["dup"]["probabilities"][c] for c in CLASSES],
                                                             abs=1e-5)


def test_points_dropped_counts_implausible_points_too(client):
    sentinel = {"mjd": 60100.0, "band": "g", "mag": 99.0, "mag_err": 99.0}
    points = _points()
    r = client.post("/classify", json={"light_curves": [
        {"oid": "a", "detections": [*points, sentinel, points[0]]}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["points_dropped"] == {DUPLICATE_POINT: 1, MAG_TOO_FAINT: 1}
    assert body["classifications"][0]["n_dropped"] == 2 and body["classifications"][0]["n_det"] == len(points)
    plain = client.post("/classify", json={"light_curves": [{"oid": "a", "detections": points}]}).json()
    assert plain["points_dropped"] == {} and plain["classifications"][0]["n_dropped"] == 0


def test_the_schema_documents_the_dropped_counts(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert "duplicate key" in schemas["ClassifyResponse"]["properties"]["points_dropped"]["description"]
    assert "n_dropped" in schemas["Classification"]["properties"]
    assert "mjd, band" in schemas["Classification"]["properties"]["n_dropped"]["description"]


# --- one error shape -------------------------------------------------------------------------------------------

def _problem(r, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json", r.headers
    body = r.json()
    assert set(body) == {"message"} and body["message"], body
    return body["message"]


def test_404_and_405_answer_in_the_same_shape_as_the_other_errors(client):
    """Old: GET /classify answered {"detail": "Method Not Allowed"}, the 422s {"message", "errors", "n_errors"}."""
    r = client.get("/classify")
    message = _problem(r, 405)
    assert message == "method GET not allowed on /classify; allowed: POST" and r.headers["allow"] == "POST"
    message = _problem(client.post("/healthz"), 405)
    assert "allowed: GET" in message
    message = _problem(client.get("/nope"), 404)
    assert message.startswith("not found: GET /nope; the endpoints are POST /classify")
    _problem(client.get(f"{DOCS_ASSETS}/nope.js"), 404)  # StaticFiles' own errors, too
    _problem(client.post(f"{DOCS_ASSETS}/swagger-ui.css"), 405)
    long = "/x" * 500
    assert len(_problem(client.get(long), 404)) < 400  # a long path is not echoed whole
    invalid = client.post("/classify", json={"light_curves": []})  # the 422 has the same message, and more
    assert invalid.status_code == 422 and {"message", "errors", "n_errors"} == set(invalid.json())


def test_a_server_error_answers_in_the_same_shape(model):
    class Broken:
        name, version, uri, classes = "broken", "1", "local:broken", tuple(CLASSES)

        def predict_proba(self, x, batch_size):
            raise RuntimeError("a bug, with a secret in its message")

    params = load_params(None, ["classify.model_uri=local-broken"])
    app = create_app(params, model_loader=lambda uri, tracking, classes: Broken())
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/classify", json={"light_curves": [{"oid": "a", "detections": _points()}]})
    message = _problem(r, 500)
    assert "RuntimeError" in message and "secret" not in message and "service log" in message
