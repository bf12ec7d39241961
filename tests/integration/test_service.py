"""The HTTP classification service against a real server: ``deeprubin serve-api`` (uvicorn) in a subprocess
on a free loopback port, serving a real (untrained) TCN from a real sqlite MLflow registry, called with httpx.

One server for the module (the hot-reload test runs last: it moves the champion alias); one failing start (an alias
that points nowhere) runs beside it. Two model versions are registered in all.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from deeprubin import servers
from deeprubin.schema import CLASSES, flux_to_mag
from tests.model_fixtures import register_tcn, sqlite_uri
from tests.service_process import stop, wait_healthy

pytestmark = pytest.mark.timeout(300)

MAX_CURVES = 5
MAX_DETECTIONS = 400
MAX_BYTES = 64 * 1024
QUIET = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "PYTHONUNBUFFERED": "1"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env.update(QUIET)
    return env


def _start(root: Path, name: str, overrides: list[str]) -> tuple[subprocess.Popen, int, Path]:
    port = servers.free_port()
    log = root / f"{name}.log"
    cmd = [sys.executable, "-m", "deeprubin.cli", "serve-api", "--params", str(root / "params.yaml"), "--port", str(port),
           *[a for o in overrides for a in ("--set", o)]]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=root, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                env=_env())
    return proc, port, log


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("service")
    uri = sqlite_uri(root)
    # Artifacts in the temporary directory, not ./mlruns of the checkout.
    mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).create_experiment(
        "test-models", artifact_location=(root / "artifacts").as_uri())
    version = register_tcn(uri, seed=0)
    (root / "params.yaml").write_text(json.dumps({  # JSON is YAML
        "train": {"tracking_uri": uri},
        "serve": {"reload_interval_s": 1, "max_request_bytes": MAX_BYTES, "max_curves_per_request": MAX_CURVES,
                  "max_detections_per_curve": MAX_DETECTIONS}}))
    return {"uri": uri, "root": root, "version": version}


@pytest.fixture(scope="module")
def failed_start(registry):
    """A service whose champion alias points nowhere, started beside the real one: it must exit with a clear error."""
    proc, _, log = _start(registry["root"], "nowhere", ["classify.model_uri=models:/deeprubin-tcn@nowhere"])
    yield proc, log
    stop(proc)


@pytest.fixture(scope="module")
def service(registry, failed_start):
    proc, port, log = _start(registry["root"], "service", [])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log)
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
            yield {"url": url, "port": port, "proc": proc, "log": log, "client": client}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def curves() -> list[dict]:
    """Simulated light curves (one or more per class), as the JSON the API takes: flux in µJy."""
    from deeprubin.config import SimulatorParams
    from deeprubin.sources.simulate import simulate

    det = simulate(SimulatorParams(n_per_class=1), seed=3, workers=1).detections
    out = []
    for oid, d in det.groupby("oid", sort=True):
        d = d.loc[d["mjd"] < d["mjd"].min() + 150].head(MAX_DETECTIONS)
        out.append({"oid": str(oid), "detections": [
            {"mjd": float(m), "band": str(b), "flux": float(f), "flux_err": float(e)}
            for m, b, f, e in zip(d["mjd"], d["band"], d["flux"], d["flux_err"])]})
    return out


def _post(service, payload, **kw) -> httpx.Response:
    return service["client"].post("/classify", json=payload, **kw)


def _probabilities(row) -> list[float]:
    return [row["probabilities"][c] for c in CLASSES]


def test_classify_returns_probabilities_per_object(service, registry, curves):
    r = _post(service, {"light_curves": curves[:4]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "deeprubin-tcn", "version": registry["version"],
                             "uri": f"models:/deeprubin-tcn/{registry['version']}"}
    assert body["rejected"] == []
    assert [c["oid"] for c in body["classifications"]] == [c["oid"] for c in curves[:4]]
    by_oid = {c["oid"]: c for c in curves}
    for row in body["classifications"]:
        assert set(row["probabilities"]) == set(CLASSES)
        p = _probabilities(row)
        assert math.isclose(sum(p), 1.0, abs_tol=1e-5) and all(0 <= x <= 1 for x in p)
        assert row["predicted_class"] == CLASSES[int(np.argmax(p))]
        assert row["n_det"] == len(by_oid[row["oid"]]["detections"])
        assert row["days_since_first_detection"] >= 0


def test_http_answer_equals_in_process_classification(service, registry, curves):
    """The service adds nothing of its own: same probabilities as classify_curves on the same curves."""
    from deeprubin.models.served import load_model
    from deeprubin.serving.classify import classify_curves
    from deeprubin.lightcurves.tensorize import Curve
    from deeprubin.schema import BAND_INDEX

    lc = curves[1]
    got = _post(service, {"light_curves": [lc]}).json()["classifications"][0]
    d = lc["detections"]
    curve = Curve(lc["oid"], np.array([x["mjd"] for x in d]), np.array([BAND_INDEX[x["band"]] for x in d]),
                  np.array([x["flux"] for x in d]), np.array([x["flux_err"] for x in d]))
    model = load_model("models:/deeprubin-tcn/1", registry["uri"])
    out, _ = classify_curves([curve], model)
    assert _probabilities(got) == pytest.approx([out.iloc[0][f"p_{c}"] for c in CLASSES], abs=1e-6)
    assert got["days_since_first_detection"] == pytest.approx(out.iloc[0]["days_since_first_detection"])


def test_magnitudes_give_the_same_answer_as_fluxes(service, curves):
    lc = next(c for c in curves if all(d["flux"] > 0 for d in c["detections"]))
    mags = []
    for d in lc["detections"]:
        mag, mag_err = flux_to_mag(np.array([d["flux"]]), np.array([d["flux_err"]]))
        mags.append({"mjd": d["mjd"], "band": d["band"], "mag": float(mag[0]), "mag_err": float(mag_err[0])})
    r = _post(service, {"light_curves": [lc, {"oid": lc["oid"] + "-mag", "detections": mags}]})
    assert r.status_code == 200, r.text
    flux_row, mag_row = sorted(r.json()["classifications"], key=lambda c: c["oid"])
    assert _probabilities(mag_row) == pytest.approx(_probabilities(flux_row), abs=1e-5)
    assert mag_row["n_det"] == flux_row["n_det"]


def test_an_object_the_gp_cannot_use_is_rejected_alone(service, curves):
    hopeless = {"oid": "hopeless", "detections": [  # finite and valid JSON, but the flux overflows to infinity
        {"mjd": 60000.0, "band": "g", "mag": -1000.0, "mag_err": 0.1},
        {"mjd": 60001.0, "band": "r", "mag": -1000.0, "mag_err": 0.1}]}
    r = _post(service, {"light_curves": [curves[0], hopeless]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["oid"] for c in body["classifications"]] == [curves[0]["oid"]]
    assert body["rejected"] == [{"oid": "hopeless", "reason": "no usable detections", "detail": "none finite in g or r"}]


def _mag_curve(oid: str, rows) -> dict:
    return {"oid": oid, "detections": [{"mjd": float(m), "band": str(b), "mag": float(v), "mag_err": float(e)}
                                       for m, b, v, e in zip(rows["mjd"], rows["band"], rows["mag"], rows["mag_err"])]}


@pytest.fixture(scope="module")
def photometries(shared_data) -> list[dict]:
    """A real OGLE-II Cepheid (apparent, every 3rd epoch), a real BTS supernova (difference magnitudes, no
    isdiffpos) and a steady star (the Cepheid's epochs and errors at a constant level)."""
    from tests.real_curves import bts_rows, ogle_as_ztf

    ogle = ogle_as_ztf(shared_data)
    cep = ogle.loc[ogle["oid"] == ogle.loc[ogle["label"] == "CEP", "oid"].iloc[0]].iloc[::3]
    bts = bts_rows(shared_data)
    sn = bts.loc[bts["oid"] == bts["oid"].iloc[0]].assign(band=lambda d: d["fid"].map({1: "g", 2: "r"}),
                                                          mag=lambda d: d["magpsf"], mag_err=lambda d: d["sigmapsf"])
    star = cep.assign(mag=17.0)
    return [_mag_curve(str(cep["oid"].iloc[0]), cep), _mag_curve(str(sn["oid"].iloc[0]), sn),
            _mag_curve("steady-star", star)]


def test_apparent_curves_are_recognised_or_declared_and_the_path_is_answered(service, photometries):
    cep, sn, star = photometries
    r = _post(service, {"light_curves": photometries})
    assert r.status_code == 200, r.text
    body = r.json()
    paths = {c["oid"]: (c["photometry"], c["photometry_declared"]) for c in body["classifications"]}
    assert paths == {cep["oid"]: ("apparent", False), sn["oid"]: ("difference", False)}
    [rejected] = body["rejected"]
    assert rejected["oid"] == "steady-star"
    assert rejected["reason"] == "steady source: no point 5 sigma from its reference"
    n_det = {c["oid"]: c["n_det"] for c in body["classifications"]}
    assert 0 < n_det[cep["oid"]] < len(cep["detections"]) and n_det[sn["oid"]] == len(sn["detections"])

    declared = _post(service, {"photometry": "difference",
                               "light_curves": [cep, {**sn, "photometry": "apparent"}, star]}).json()
    paths = {c["oid"]: (c["photometry"], c["photometry_declared"]) for c in declared["classifications"]}
    assert paths == {cep["oid"]: ("difference", True), sn["oid"]: ("apparent", True),
                     "steady-star": ("difference", True)}
    assert declared["rejected"] == []
    bad = _post(service, {"photometry": "magnitudes", "light_curves": [cep]})
    assert bad.status_code == 422 and "photometry" in bad.json()["message"]


def _det(**kw):
    return {"mjd": 60000.0, "band": "g", "flux": 10.0, "flux_err": 1.0, **kw}


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("payload, field, words", [
    ({"light_curves": [{"oid": "a", "detections": [_det(), _without(_det(), "band")]}]},
     "light_curves.0.detections.1.band", "Field required"),
    ({"light_curves": [{"oid": "a", "detections": [_det()]}, {"oid": "b", "detections": [_det(), _det(flux_err=-2)]}]},
     "light_curves.1.detections.1.flux_err", "greater than 0"),
    ({"light_curves": [{"oid": "a", "detections": [_det(band="i")]}]}, "light_curves.0.detections.0.band", "'g' or 'r'"),
    ({"light_curves": [{"oid": "a", "detections": [_without(_det(), "flux_err")]}]},
     "light_curves.0.detections.0", "flux_err is missing"),
    ({"light_curves": [{"oid": "a", "detections": [_det(flux=float("nan"))]}]},
     "light_curves.0.detections.0.flux", "finite"),
    ({"light_curves": []}, "light_curves", "at least 1"),
    ({"light_curves": [{"oid": str(i), "detections": [_det()]} for i in range(MAX_CURVES + 1)]},
     "light_curves", f"at most {MAX_CURVES}"),
    ({"light_curves": [{"oid": "a", "detections": [_det(mjd=60000.0 + i) for i in range(MAX_DETECTIONS + 1)]}]},
     "light_curves.0.detections", f"at most {MAX_DETECTIONS}"),
    ({"light_curves": [{"oid": "a", "detections": [_det()]}, {"oid": "a", "detections": [_det()]}]},
     "light_curves.1.oid", "duplicate oid 'a'"),
    ({"curves": []}, "light_curves", "Field required"),
], ids=["missing-band", "negative-flux-err", "unknown-band", "flux-without-error", "nan-flux", "empty", "too-many-curves",
        "too-many-detections", "duplicate-oid", "wrong-key"])
def test_invalid_payloads_get_422_naming_the_field(service, payload, field, words):
    r = service["client"].post("/classify", content=json.dumps(payload), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    body = r.json()
    assert any(e["field"] == field for e in body["errors"]), body
    assert f"{field}: " in body["message"] and words in body["message"], body["message"]
    curves = payload.get("light_curves") or []
    if field.startswith("light_curves.1") and len(curves) > 1:  # the message says which object
        assert f"(light curve {curves[1]['oid']!r})" in body["message"]


def test_malformed_json_and_wrong_content_type_are_explained(service):
    r = service["client"].post("/classify", content=b'{"light_curves": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body"
    assert "JSON decode error at character" in r.json()["message"]
    r = service["client"].post("/classify", content=b'{"light_curves": []}', headers={"content-type": "text/plain"})
    assert r.status_code == 422 and "Content-Type: application/json" in r.json()["message"]


def test_oversized_bodies_get_413_before_parsing(service):
    big = b'{"light_curves": [' + b" " * (MAX_BYTES + 10) + b"]}"
    r = service["client"].post("/classify", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "serve.max_request_bytes" in r.json()["message"]

    def chunks():  # no Content-Length: the bytes are counted as they arrive
        yield b'{"light_curves": ['
        for _ in range(20):
            yield b" " * 8192

    with httpx.Client(base_url=service["url"], timeout=30, trust_env=False) as fresh:
        r = fresh.post("/classify", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert _post(service, {"light_curves": [{"oid": "a", "detections": [_det()]}]}).status_code == 200


def test_healthz_and_model(service, registry):
    h = service["client"].get("/healthz")
    assert h.status_code == 200
    assert h.json() == {"status": "ok", "model_loaded": True, "model_version": registry["version"],
                        "last_reload_error": None}
    m = service["client"].get("/model").json()
    assert m["name"] == "deeprubin-tcn" and m["version"] == registry["version"]
    assert m["uri"] == f"models:/deeprubin-tcn/{registry['version']}"
    assert m["source_uri"] == "models:/deeprubin-tcn@champion" and m["follows_alias"] is True
    assert m["classes"] == list(CLASSES) and m["run_id"] and m["loaded_at"] and m["last_checked_at"]
    assert m["reload_interval_s"] == 1


def test_openapi_schema_is_published(service):
    spec = service["client"].get("/openapi.json").json()
    assert spec["info"]["title"] == "DeepRubin-Explorer classification service" and spec["info"]["version"]
    assert {"/classify", "/healthz", "/model"} <= set(spec["paths"])
    op = spec["paths"]["/classify"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ClassifyRequest")
    assert {"200", "413", "422"} <= set(op["responses"])
    schemas = spec["components"]["schemas"]
    assert schemas["ClassifyRequest"]["properties"]["light_curves"]["maxItems"] == MAX_CURVES
    assert schemas["Detection"]["properties"]["band"]["enum"] == ["g", "r"]
    assert "flux_err" in schemas["Detection"]["properties"] and "probabilities" in schemas["Classification"][
        "properties"]
    assert service["client"].get("/docs").status_code == 200


def test_404_and_405_answer_as_every_other_error_through_uvicorn(service):
    """Old: GET /classify answered Starlette's {"detail": "Method Not Allowed"}; the docs' scripts came from a CDN."""
    r = service["client"].get("/classify")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json() == {"message": "method GET not allowed on /classify; allowed: POST"}
    r = service["client"].get("/nope")
    assert r.status_code == 404 and set(r.json()) == {"message"} and "POST /classify" in r.json()["message"]
    js = service["client"].get("/static/docs/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000


def test_bound_to_loopback_by_default(service):
    import psutil

    listening = [c.laddr for c in psutil.Process(service["proc"].pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(a.ip == "127.0.0.1" and a.port == service["port"] for a in listening)


def test_the_service_runs_as_a_managed_background_server(registry, tmp_path):
    spec = servers.service_spec(registry["root"] / "params.yaml", tmp_path, port=servers.free_port())
    with servers.running(spec, tmp_path) as record:
        assert record["host"] == "127.0.0.1" and record["startup_s"] > 0
        with httpx.Client(base_url=record["url"], trust_env=False, timeout=30) as client:
            assert client.get("/healthz").json()["status"] == "ok"
            assert client.get("/model").json()["version"] == registry["version"]
    assert not any(s["alive"] for s in servers.status(tmp_path)) and not servers._healthy(spec.health_url)


def test_champion_pointing_nowhere_is_a_clear_startup_error(failed_start):
    proc, log = failed_start
    assert proc.wait(180) == 1
    text = " ".join(log.read_text().split())  # rich wraps long lines
    assert "serve-api failed: cannot load the model models:/deeprubin-tcn@nowhere" in text
    assert "no alias @nowhere of deeprubin-tcn" in text
    assert "Traceback" not in text


def test_new_champion_is_served_without_restart(service, registry, curves):
    """Last: moves the alias. Version 2 is picked up by the watcher; a broken alias keeps version 2 serving."""
    import mlflow

    before = _post(service, {"light_curves": [curves[0]]}).json()["classifications"][0]
    pid = service["proc"].pid
    new = register_tcn(registry["uri"], seed=1)
    assert new != registry["version"]
    deadline = time.monotonic() + 30
    while service["client"].get("/model").json()["version"] != new:
        assert time.monotonic() < deadline, "the new champion was not picked up within 30 s"
        time.sleep(0.2)
    after = _post(service, {"light_curves": [curves[0]]}).json()
    assert after["model"]["version"] == new and after["model"]["uri"] == f"models:/deeprubin-tcn/{new}"
    assert _probabilities(after["classifications"][0]) != pytest.approx(_probabilities(before), abs=1e-6)
    assert service["proc"].pid == pid and service["proc"].poll() is None

    # The alias disappears: the reload fails, is reported, and the current model keeps serving.
    mlflow.MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"]).delete_registered_model_alias(
        "deeprubin-tcn", "champion")
    deadline = time.monotonic() + 30
    while not (m := service["client"].get("/model").json())["last_reload_error"]:
        assert time.monotonic() < deadline, "the failed reload was not reported within 30 s"
        time.sleep(0.2)
    assert m["version"] == new and "champion" in m["last_reload_error"]
    h = service["client"].get("/healthz")
    assert h.status_code == 200 and h.json()["last_reload_error"]
    assert _post(service, {"light_curves": [curves[0]]}).json()["model"]["version"] == new
    assert "reload of models:/deeprubin-tcn@champion failed" in service["log"].read_text()
