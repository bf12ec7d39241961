"""The Prefect flows against a real Prefect server and a real MLflow server (both on free loopback ports).

One nightly run on tiny parameters (module fixture) is checked from the outside: its state and artifacts in the
Prefect API, its run, metrics, registered version and aliases in MLflow, its DVC record and push, and the night's
classifications. Then: a deliberately worse model is not promoted (and says why), rollback, two promotions at once,
task retries on server errors (and none on client errors), and the served deployments with their cron schedule.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.alerce_server import AlerceReplayServer, Catalogue, FaultRule

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NIGHT = "2026-11-25"


def _git(args: list[str], cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_project(root: Path, remote: Path | None = None, **sections) -> Path:
    """A copy of the repository's pipeline files with tiny parameters, as its own git + DVC repository."""
    root.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "infra" / "dvc", root / "infra" / "dvc")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    shutil.copytree(REPO / "data" / "bts", root / "data" / "bts")  # a dep of the stages (evaluate.real, mix_files)
    params["ingest"]["simulator"]["n_per_class"] = 16
    params["ingest"]["mix_files"] = False  # the simulator alone keeps the flows small; BTS has its own tests
    params["preprocess"].update(partitions=2, workers=1)
    params["train"].update(max_epochs=12, patience=12, accelerator="cpu", truncations=1, tracking_uri=None)
    params["evaluate"].update(n_bootstrap=20, forest_trees=10, early_days=[10, 30])
    params["evaluate"]["real"].update(detections=None, labels=None)  # the real set has its own tests
    params["flows"].update(retries=2, retry_delay_s=0.05)
    for section, values in sections.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git(["init", "-q"], root)
    _git(["config", "user.email", "test@example.org"], root)
    _git(["config", "user.name", "test"], root)
    if remote is not None:
        subprocess.run([str(BIN / "dvc"), "remote", "add", "-d", "store", str(remote)], cwd=root, check=True,
                       capture_output=True, timeout=60)
    return root


@pytest.fixture(scope="module")
def servers_env(prefect_server, mlflow_server):
    """PREFECT_API_URL and MLFLOW_TRACKING_URI for the module (the flows pick servers by configuration alone)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_API_URL", prefect_server["url"])
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server["url"])
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        with temporary_settings(updates={PREFECT_API_URL: prefect_server["url"]}):
            yield {"prefect": prefect_server["url"], "mlflow": mlflow_server["url"]}


@pytest.fixture(scope="module")
def night(servers_env, tmp_path_factory):
    """One nightly run in a fresh project; yields (project, flow result, flow run id)."""
    from deeprubin_flows.nightly import nightly

    base = tmp_path_factory.mktemp("nightly")
    project = make_project(base / "project", remote=base / "remote")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        state = nightly(params_path="params.yaml", night=NIGHT, return_state=True)
        result = state.result()
        yield project, result, state.state_details.flow_run_id


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def test_nightly_flow_completes_with_its_artifacts(night):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    project, result, flow_run_id = night
    with _client() as client:
        run = client.read_flow_run(flow_run_id)
        assert run.state.type.value == "COMPLETED"
        tasks = {t.name.rsplit("-", 1)[0]: t.state.type.value for t in client.read_task_runs()
                 if t.flow_run_id == flow_run_id}
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    assert {"ingest", "preprocess", "version-data", "train", "baseline", "evaluate", "register", "promote",
            "classify"} <= set(tasks)
    assert set(tasks.values()) == {"COMPLETED"}
    by_key = {a.key: a for a in artifacts}
    assert {"nightly-pull", "nightly-evaluation", "promotion-decision", "nightly-classifications"} <= set(by_key)
    pulled = by_key["nightly-pull"].data
    pulled = yaml.safe_load(pulled) if isinstance(pulled, str) else pulled
    assert {row["class"]: row["stored"] for row in pulled} == {"QSO": 16, "CEP": 16, "SNIa": 16, "SNII": 16}
    assert "promoted" in by_key["promotion-decision"].data
    assert "| tcn | test |" in by_key["nightly-evaluation"].data
    assert result["retrain"]["reason"] == "no model trained yet"
    assert result["changed_objects"] == 64


def test_nightly_run_is_tracked_registered_and_champion(night, servers_env):
    import mlflow

    project, result, _ = night
    client = mlflow.MlflowClient(tracking_uri=servers_env["mlflow"])
    run = client.get_run(result["train"]["run_id"])
    assert run.info.status == "FINISHED"
    assert {"best_val_macro_f1", "val/macro_f1"} <= set(run.data.metrics)
    assert any(k.startswith("eval") or k.startswith("test") for k in run.data.metrics), sorted(run.data.metrics)
    assert run.data.tags["data_hash_source"] == "dvc.lock"  # trained on the data version DVC recorded
    champion = client.get_model_version_by_alias("deeprubin-tcn", "champion")
    assert champion.run_id == result["train"]["run_id"]
    assert champion.tags["promotion/decision"] == "promoted"
    assert champion.description.startswith("Promotion: promoted (") and "no champion yet" in champion.description
    assert champion.tags["classes"] == "QSO,CEP,SNIa,SNII" and len(champion.tags) <= 8


def test_nightly_data_is_versioned_and_pushed(night):
    project, result, _ = night
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert {"ingest", "preprocess", "train", "baseline", "evaluate"} <= set(lock)
    raw_md5 = lock["ingest"]["outs"][0]["md5"]
    assert result["data_version"]["outs"]["data/raw"] == raw_md5
    assert result["data_version"]["pushed_to"] == "store"
    status = subprocess.run([str(BIN / "dvc"), "status", "--cloud"], cwd=project, capture_output=True, text=True,
                            timeout=120)
    assert status.returncode == 0 and "new:" not in status.stdout, status.stdout  # everything is in the remote


def test_the_nights_classifications_are_written_once(night):
    project, result, _ = night
    out = project / "data" / "classifications" / f"{NIGHT}.parquet"
    frame = pd.read_parquet(out)
    assert list(frame.columns[:8]) == ["oid", "predicted_class", "p_QSO", "p_CEP", "p_SNIa", "p_SNII", "n_det",
                                       "days_since_first_detection"]
    assert len(frame) == frame["oid"].nunique() == result["classify"]["n_classified"] > 0
    assert (frame["model_version"] == result["promotion"]["version"]).all()
    assert frame[["p_QSO", "p_CEP", "p_SNIa", "p_SNII"]].sum(axis=1).round(5).eq(1).all()


def test_rerunning_a_night_replaces_its_rows_and_never_duplicates_them(night):
    from deeprubin_flows.classify import classify

    project, _, _ = night
    out = project / "data" / "classifications" / f"{NIGHT}.parquet"
    before = pd.read_parquet(out).set_index("oid")
    again = sorted(before.index)[:5]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        done = classify(params_path="params.yaml", oids=again, output=str(out))
    after = pd.read_parquet(out).set_index("oid")
    assert sorted(after.index) == sorted(before.index) and after.index.is_unique
    assert done["n_classified"] == len(after)
    assert (after.loc[again, "classified_at"] > before.loc[again, "classified_at"]).all()
    others = sorted(set(before.index) - set(again))
    pd.testing.assert_frame_equal(after.loc[others], before.loc[others])


def test_a_worse_model_is_not_promoted_and_the_reason_is_recorded(night, servers_env):
    import mlflow
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from deeprubin_flows.train import train

    project, first, _ = night
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        # Deliberately worse: one epoch at a learning rate too small to move the weights.
        state = train(params_path="params.yaml", overrides=["train.max_epochs=1", "train.lr=1e-9"],
                      return_state=True)
        result = state.result()
    decision = result["promotion"]
    assert decision["outcome"] == "rejected", decision
    assert decision["champion_after"] == first["promotion"]["version"]
    assert "does not beat the champion" in decision["reason"] or "recall" in decision["reason"]
    client = mlflow.MlflowClient(tracking_uri=servers_env["mlflow"])
    version = client.get_model_version("deeprubin-tcn", decision["version"])
    assert version.tags["promotion/decision"] == "rejected"
    assert version.description.startswith("Promotion: rejected (") and decision["reason"] in version.description
    assert version.aliases == ["challenger"]
    assert client.get_model_version_by_alias("deeprubin-tcn", "champion").version == first["promotion"]["version"]
    with _client() as pc:
        artifacts = pc.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[state.state_details.flow_run_id])))
    assert any(a.key == "promotion-decision" and "rejected" in a.data for a in artifacts)


NIGHTLY_CHAIN = ["ingest", "preprocess", "version-data", "train", "baseline", "evaluate", "version-data", "register",
                 "promote", "classify"]


def _chain(flow_run_id) -> list[str]:
    """The task runs of a flow run in the order their inputs in the Prefect API link them (what the UI's flow-run graph
    draws). Fails unless they form one chain: one task run without upstream, every other one with exactly one
    upstream task run, none with two downstream ones, none left out."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    name = {r.id: r.name.rsplit("-", 1)[0] for r in runs}
    upstream = {r.id: {i.id for inputs in r.task_inputs.values() for i in inputs
                       if getattr(i, "input_type", None) == "task_run"} for r in runs}
    edges = sorted((name[u], name[r]) for r, ups in upstream.items() for u in ups)
    roots = [r for r, ups in upstream.items() if not ups]
    assert len(roots) == 1 and all(len(ups) <= 1 for ups in upstream.values()), edges
    order = roots
    while True:
        after = [r for r, ups in upstream.items() if ups == {order[-1]}]
        assert len(after) <= 1, edges
        if not after:
            break
        order += after
    assert len(order) == len(runs), edges
    return [name[r] for r in order]


def test_the_flow_run_graph_is_the_pipeline(night):
    """Prefect draws what runs: ingest -> preprocess -> version-data -> train -> baseline -> evaluate -> version-data
    -> register -> promote -> classify, and no edge from ingest (or the shared configuration) to anything else."""
    _, _, flow_run_id = night
    assert _chain(flow_run_id) == NIGHTLY_CHAIN


def _pull_table(flow_run_id) -> list[dict]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    (pulled,) = [a for a in artifacts if a.key == "nightly-pull"]
    return yaml.safe_load(pulled.data) if isinstance(pulled.data, str) else pulled.data


def test_the_simulators_pull_table_has_no_empty_columns(night):
    _, result, flow_run_id = night
    rows = _pull_table(flow_run_id)
    assert [list(r) for r in rows] == [["class", "stored", "new", "changed", "removed"]] * 4
    assert {r["class"]: r["new"] for r in rows} == {"QSO": 16, "CEP": 16, "SNIa": 16, "SNII": 16}
    assert result["objects"] == {"new": 64, "changed": 0, "removed": 0}


def _fake_scores(table: dict[str, float]):
    from deeprubin.registry import Scores

    def score(uri: str) -> Scores:
        version = uri.rsplit("/", 1)[1]
        return Scores(metric=table[version], recall={"QSO": table[version]}, n_objects=10)

    return score


def _register_copies(tracking_uri: str, name: str, n: int) -> list[str]:
    """Register ``n`` more versions of the champion's logged model (real versions, scored by the test)."""
    import mlflow

    source = mlflow.MlflowClient(tracking_uri=tracking_uri).get_model_version_by_alias("deeprubin-tcn", "champion")
    from deeprubin.tracking import using

    with using(tracking_uri):
        return [str(mlflow.register_model(source.source, name).version) for _ in range(n)]


def test_rollback_restores_the_previous_champion(night, servers_env):
    import mlflow

    from deeprubin.registry import Registry, promote
    from deeprubin_flows.promote import rollback

    project, _, _ = night
    name = "rollback-model"
    v1, v2 = _register_copies(servers_env["mlflow"], name, 2)
    registry = Registry(servers_env["mlflow"], name)
    scores = _fake_scores({v1: 0.5, v2: 0.8})
    assert promote(registry, v1, scores).promoted
    assert promote(registry, v2, scores).promoted
    assert registry.aliases() == {"champion": v2, "previous": v1, "challenger": v2}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        done = rollback(params_path="params.yaml", overrides=[f"base.model_name={name}"])
    assert done["champion_after"] == v1 and done["champion_before"] == v2
    assert registry.alias("champion") == v1 and registry.alias("previous") is None
    demoted = mlflow.MlflowClient(tracking_uri=servers_env["mlflow"]).get_model_version(name, v2)
    assert demoted.tags["promotion/decision"] == "rolled_back"
    with pytest.raises(Exception, match="no previous champion"):
        rollback(params_path=str(project / "params.yaml"), overrides=[f"base.model_name={name}"])


def test_two_promotions_at_once_leave_exactly_one_champion(night, servers_env):
    from deeprubin.registry import Registry, promote

    name = "race-model"
    v1, v2, v3 = _register_copies(servers_env["mlflow"], name, 3)
    registry = Registry(servers_env["mlflow"], name)
    table = {v1: 0.5, v2: 0.6, v3: 0.7}
    assert promote(registry, v1, _fake_scores(table)).promoted
    inside = threading.Event()

    def slow(uri):  # both promotions would read champion v1 without the lock
        inside.set()
        time.sleep(0.5)
        return _fake_scores(table)(uri)

    decisions = {}
    threads = [threading.Thread(target=lambda v=v: decisions.__setitem__(v, promote(Registry(
        servers_env["mlflow"], name), v, slow))) for v in (v2, v3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    champion = registry.alias("champion")
    assert champion == v3  # the better one wins, whatever the order
    befores = sorted(d.champion_before for d in decisions.values())
    assert befores in ([v1, v2], [v1, v3]), befores  # the second compared against the first one's outcome
    assert registry.history()[-1] == v3 and len(set(registry.history())) == len(registry.history())


def test_rerunning_the_night_counts_nothing_new_and_says_what_the_file_holds(night):
    """The night again (last of the tests on the night's project): nothing new or changed, so no retraining and
    nothing classified now, while the night's file keeps its objects; the summary says exactly that, and the graph is
    the chain without training."""
    from deeprubin.cli.ops import nightly_lines
    from deeprubin_flows.nightly import nightly

    project, first, _ = night
    in_file = len(pd.read_parquet(project / "data" / "classifications" / f"{NIGHT}.parquet"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        state = nightly(params_path="params.yaml", night=NIGHT, return_state=True)
        again = state.result()
    assert again["retrain"]["retrain"] is False, again["retrain"]
    assert again["objects"] == {"new": 0, "changed": 0, "removed": 0} and again["changed_objects"] == 0
    assert again["classify"]["classified_now"] == 0
    assert again["classify"]["objects_in_file"] == again["classify"]["n_classified"] == in_file > 0
    lines = nightly_lines(again)
    assert lines[0] == f"night {NIGHT}: pulled from simulator: 0 objects new, 0 changed"
    assert any(line.startswith("classified 0 objects (none new or changed) with models:/") for line in lines), lines
    assert f"the night's file {again['classify']['output']} holds {in_file} objects" in lines
    assert _chain(state.state_details.flow_run_id) == ["ingest", "preprocess", "version-data", "classify"]
    assert [r["new"] + r["changed"] for r in _pull_table(state.state_details.flow_run_id)] == [0] * 4


def test_more_simulated_objects_are_counted_new_and_the_redrawn_ones_changed(servers_env, tmp_path):
    """6 -> 10 objects per class: 16 new; the simulator draws its sample anew, so the 24 stored ones are redrawn
    (changed), which the pull says, instead of calling all 40 new or changed without a word."""
    overrides = ["ingest.source=simulator", "ingest.mix_files=false", f"ingest.raw_dir={tmp_path / 'raw'}",
                 "ingest.simulator.survey_days=365"]
    flow = _ingest_flow()
    first = flow([*overrides, "ingest.simulator.n_per_class=6"])
    assert first["counts"] == {"new": 24, "changed": 0, "removed": 0} and len(first["changed_oids"]) == 24
    second = flow([*overrides, "ingest.simulator.n_per_class=10"])
    assert second["counts"] == {"new": 16, "changed": 24, "removed": 0} and len(second["changed_oids"]) == 40
    assert [list(r) for r in second["per_class"]] == [["class", "stored", "new", "changed", "removed"]] * 4
    assert sum(r["new"] for r in second["per_class"]) == 16 and sum(r["stored"] for r in second["per_class"]) == 40
    from deeprubin_flows.artifacts import pull_counts

    assert pull_counts(second).startswith("16 objects new, 24 changed (redrawn: the simulator draws its whole sample")


@pytest.fixture
def alerce(servers_env):
    from deeprubin.config import SimulatorParams
    from deeprubin.sources.simulate import simulate

    lcs = simulate(SimulatorParams(n_per_class=3, survey_days=365.0), seed=5)
    with AlerceReplayServer(Catalogue.from_lightcurves(lcs, probability=lambda oid, label: 0.9)) as srv:
        yield srv


def _ingest_flow():
    from prefect import flow

    from deeprubin_flows import tasks
    from deeprubin_flows.common import configured, load

    @flow(name="ingest-only")
    def ingest_only(overrides: list[str]):
        params = load(None, overrides)
        return configured(tasks.ingest, params)(params)

    return ingest_only


def _task_runs(flow_run_id):
    with _client() as client:
        return [t for t in client.read_task_runs() if t.flow_run_id == flow_run_id]


def test_a_task_that_fails_twice_with_a_server_error_succeeds_on_retry(alerce, tmp_path):
    overrides = ["ingest.source=alerce", f"ingest.raw_dir={tmp_path / 'raw'}", f"ingest.alerce.base_url={alerce.url}",
                 "ingest.alerce.max_attempts=1", "ingest.alerce.page_size=50", "flows.retries=2",
                 "flows.retry_delay_s=0.05"]
    flow = _ingest_flow()
    # How many first listing pages one pull asks for (a clean pull into a scratch store).
    assert flow([*overrides, f"ingest.raw_dir={tmp_path / 'scratch'}"], return_state=True).is_completed()
    first_pages = sum(r.route == "objects" and r.page in (None, 1) for r in alerce.requests)
    assert first_pages >= 4
    # Every first page fails on two attempts, then the server heals.
    alerce.add_fault(FaultRule(route="objects", kind="http_500", page=1, times=2 * first_pages))
    state = flow(overrides, return_state=True)
    (run,) = _task_runs(state.state_details.flow_run_id)
    assert state.is_completed(), (run.run_count, [r.status for r in alerce.requests if r.route == "objects"])
    assert run.run_count == 3 and run.state.type.value == "COMPLETED"
    assert sum(r["stored"] for r in state.result()["per_class"]) == 12


def test_a_client_error_is_not_retried(alerce, tmp_path):
    overrides = ["ingest.source=alerce", f"ingest.raw_dir={tmp_path / 'raw'}",
                 f"ingest.alerce.base_url={alerce.url}/no-such-api", "ingest.alerce.max_attempts=1",
                 "flows.retries=2", "flows.retry_delay_s=0.05"]
    state = _ingest_flow()(overrides, return_state=True)
    assert state.is_failed()
    (run,) = _task_runs(state.state_details.flow_run_id)
    assert run.run_count == 1, "a 404 must not be retried"


def test_an_incomplete_pull_fails_the_task_after_retries_and_says_what_is_missing(alerce, tmp_path):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    victim = alerce.catalogue.oids[0]
    alerce.add_fault(FaultRule(route="lightcurve", kind="http_500", oid=victim, times=-1))
    overrides = ["ingest.source=alerce", f"ingest.raw_dir={tmp_path / 'raw'}", f"ingest.alerce.base_url={alerce.url}",
                 "ingest.alerce.max_attempts=1", "flows.retries=1", "flows.retry_delay_s=0.05"]
    state = _ingest_flow()(overrides, return_state=True)
    assert state.is_failed()
    (run,) = _task_runs(state.state_details.flow_run_id)
    assert run.run_count == 2 and run.state.type.value == "FAILED"  # retried, then failed
    assert victim in (run.state.message or ""), run.state.message
    with _client() as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[state.state_details.flow_run_id])))
    pulled = [a for a in artifacts if a.key == "nightly-pull"]
    assert pulled and all("incomplete" in a.data.lower() and victim in a.data for a in pulled)
    stored = pd.read_parquet(tmp_path / "raw" / "objects.parquet")
    assert len(stored) == len(alerce.catalogue) - 1 and victim not in set(stored["oid"])


def test_served_deployments_have_their_cron_schedule(servers_env, tmp_path):
    project = make_project(tmp_path / "project")
    env = {**os.environ, "PREFECT_API_URL": servers_env["prefect"], "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.Popen([str(BIN / "deeprubin"), "serve-flows"], cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        listed = ""
        while time.monotonic() < deadline:
            listed = subprocess.run([str(BIN / "prefect"), "deployment", "ls"], env=env, capture_output=True,
                                    text=True, timeout=60).stdout
            if "nightly/nightly" in listed and "classify/classify" in listed:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(2)
        assert "nightly/nightly" in listed, listed
        with _client() as client:
            deployment = client.read_deployment_by_name("nightly/nightly")
        (schedule,) = deployment.schedules
        assert schedule.schedule.cron == "0 9 * * *"
        assert schedule.schedule.timezone == "America/Los_Angeles"
        for name in ("nightly/nightly", "train/train", "promote/promote", "rollback/rollback", "classify/classify"):
            with _client() as client:
                served = client.read_deployment_by_name(name)
            limit = getattr(served, "global_concurrency_limit", None)
            assert (limit is not None and limit.limit == 1) or served.concurrency_limit == 1, name
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    with _client() as client:
        assert client.read_deployment_by_name("nightly/nightly").schedules[0].active  # pause_on_shutdown=False
