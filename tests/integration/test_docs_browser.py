"""``/docs`` (Swagger UI) and ``/redoc`` of a real ``deeprubin serve-api``, rendered in headless Chromium with every
host but 127.0.0.1 unresolvable (issue 17: FastAPI's own pages load their scripts from a CDN, so without internet they
were blank). The rendered DOM must hold what only the pages' JavaScript writes, from the service's /openapi.json (the
operations, their summaries), and the screenshot must not be a blank page. Screenshots and DOMs are left in the
test's temporary directory.

Slow (a model registered, a service started, a browser run twice per page); skipped with the reason when no Chromium
is installed (``apt-get install chromium``).
"""

from __future__ import annotations

import json
import os

import pytest

from deeprubin import servers
from tests.browser import browse, find_chromium, ink
from tests.model_fixtures import register_tcn, sqlite_uri
from tests.service_process import start_service, stop, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUIET = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "PYTHONUNBUFFERED": "1"}
# What only the rendered page has (the served HTML is a bare shell): the API's operations from /openapi.json, and
# each renderer's own furniture.
RENDERED = {"/docs": ('class="opblock', "opblock-summary-path", "Classify a batch of light curves", "/healthz"),
            "/redoc": ("Classify a batch of light curves", "Download OpenAPI specification", "/healthz")}
ASSETS = {"/docs": ("/static/docs/swagger-ui-bundle.js", "/static/docs/swagger-ui.css"),
          "/redoc": ("/static/docs/redoc.standalone.js",)}


@pytest.fixture(scope="module")
def chromium() -> str:
    return find_chromium("/docs and /redoc")


@pytest.fixture(scope="module")
def service(tmp_path_factory, chromium):
    import mlflow

    root = tmp_path_factory.mktemp("docs-browser")
    uri = sqlite_uri(root)
    mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).create_experiment(
        "test-models", artifact_location=(root / "artifacts").as_uri())
    register_tcn(uri, seed=0)
    (root / "params.yaml").write_text(json.dumps({"train": {"tracking_uri": uri}}))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env.update(QUIET)
    port = servers.free_port()
    log = root / "service.log"
    proc = start_service(root / "params.yaml", root, log, port, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log)
        yield {"url": url, "log": log}
    finally:
        stop(proc)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_render_offline_in_a_browser(chromium, service, page, tmp_path):
    url = service["url"] + page
    name = page.strip("/")
    shot = tmp_path / f"{name}.png"
    browse(chromium, url, tmp_path / "profile", f"--screenshot={shot}")
    dom = browse(chromium, url, tmp_path / "profile", "--dump-dom").stdout
    (tmp_path / f"{name}.html").write_text(dom)

    missing = [text for text in RENDERED[page] if text not in dom]
    assert not missing, f"{page} did not render (no {missing}; DOM in {tmp_path / f'{name}.html'}):\n{dom[:2000]}"
    assert shot.is_file(), f"no screenshot of {page}"
    share, colours = ink(shot)
    assert share > 0.03 and colours > 50, f"{page} looks blank: {share:.1%} of pixels inked, {colours} colours ({shot})"

    log = service["log"].read_text()  # the browser took the scripts and the schema from the service itself
    for path in (*ASSETS[page], "/openapi.json"):
        assert f'"GET {path} HTTP/1.1" 200' in log, f"{path} not fetched from the service:\n{log[-3000:]}"
