"""The three UIs a user opens after a night, rendered in headless Chromium (issue 17): real Prefect and MLflow servers
(``deeprubin up``'s servers, on free loopback ports), one tiny nightly run against them, and a ``deeprubin serve-api``
on the model it registered. Each page is a JavaScript app whose served HTML is a bare shell, so the rendered DOM must
hold what the page wrote from the servers' data: the flow run's name and its task runs (Prefect), the registered model
with its version and ``champion`` alias (MLflow), the service's operations (Swagger UI). Every host but 127.0.0.1 is
unresolvable to the browser. Screenshots and DOMs are left in the test's temporary directory.

Slow (two servers, a nightly run, a service, a browser run per page and view); skipped with the reason when no
Chromium is installed (``apt-get install chromium``).
"""

from __future__ import annotations

import os

import pytest

from deeprubin import servers
from tests.browser import browse, find_chromium, ink
from tests.integration.test_flows import night, servers_env  # noqa: F401  (the fixtures: servers and one night)
from tests.service_process import start_service, stop, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

QUIET = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "PYTHONUNBUFFERED": "1"}
MODEL = "deeprubin-tcn"
BUDGET_MS = 20000  # virtual time for the single-page apps to fetch their data and draw it


@pytest.fixture(scope="module")
def chromium() -> str:
    return find_chromium("the Prefect, MLflow and serve-api pages")


@pytest.fixture(scope="module")
def service(chromium, night, servers_env, tmp_path_factory):  # noqa: F811
    """``deeprubin serve-api`` in the night's project, serving the champion from the MLflow server."""
    project, _, _ = night
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(QUIET, MLFLOW_TRACKING_URI=servers_env["mlflow"])
    port = servers.free_port()
    log = tmp_path_factory.mktemp("ui-service") / "service.log"
    proc = start_service(project / "params.yaml", project, log, port, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log)
        yield url
    finally:
        stop(proc)


def test_prefect_mlflow_and_docs_pages_render_the_nights_data(chromium, night, servers_env, service,  # noqa: F811
                                                               tmp_path):
    _, result, flow_run_id = night
    prefect_ui = servers_env["prefect"].removesuffix("/api")
    version = result["promotion"]["version"]
    # page -> (url, what its DOM must hold once rendered)
    pages = {
        # The flow run's header (state, task-run count, flow) and its Logs tab, whose rows name the task run each log
        # line came from; the run graph above them is drawn on a canvas, so its task names are not in the DOM.
        "prefect-flow-run": (f"{prefect_ui}/runs/flow-run/{flow_run_id}",
                             ("nightly", "10 Task runs", "Completed", "Finished in state Completed()", "preprocess-",
                              "train-", "register-", "promote-", "classify-")),
        "mlflow-registry": (f"{servers_env['mlflow']}/#/models/{MODEL}",
                            (MODEL, f"Version {version}", "champion")),
        "docs": (f"{service}/docs", ('class="opblock', "classify", "Classify a batch of light curves")),
    }
    problems = []
    for name, (url, expected) in pages.items():  # every page browsed before any verdict: one run shows them all
        shot = tmp_path / f"{name}.png"
        browse(chromium, url, tmp_path / "profile", f"--screenshot={shot}", budget_ms=BUDGET_MS, window="1400,1000")
        dom = browse(chromium, url, tmp_path / "profile", "--dump-dom", budget_ms=BUDGET_MS,
                     window="1400,1000").stdout
        (tmp_path / f"{name}.html").write_text(dom)
        missing = [text for text in expected if text not in dom]
        if missing:
            problems.append(f"{name} ({url}) did not render {missing}; DOM in {tmp_path / f'{name}.html'}")
        if not shot.is_file():
            problems.append(f"{name}: no screenshot")
        else:
            share, colours = ink(shot)
            if not (share > 0.01 and colours > 200):  # a blank page is one colour; MLflow's is mostly white
                problems.append(f"{name} looks blank: {share:.1%} of pixels inked, {colours} colours ({shot})")
    assert not problems, "\n".join(problems)
