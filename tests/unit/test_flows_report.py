"""What the flows tell their users, without running them: the pull's counts and table, the nightly summary, the
deployments' concurrency limits, and where embedded runs keep their Prefect database."""

from __future__ import annotations

import os
from pathlib import Path

from deeprubin import servers
from deeprubin.config import SimulatorParams, load_params
from deeprubin.processed import fingerprints
from deeprubin.sources.simulate import simulate
from deeprubin_flows import tasks
from deeprubin_flows.artifacts import pull_counts

CLASSES = ["QSO", "CEP", "SNIa", "SNII"]


def test_a_pull_is_counted_new_changed_and_removed_from_the_fingerprints():
    before = {"a": "1", "b": "2", "c": "3"}
    after = {"a": "1", "b": "9", "d": "4"}
    assert tasks.compare(before, after) == {"new": ["d"], "changed": ["b"], "removed": ["c"], "unchanged": ["a"]}
    assert tasks._changed_oids(before, after) == ["b", "d"]  # what the night classifies


def test_more_simulated_objects_are_new_and_the_redrawn_ones_are_said_to_be_redrawn():
    # The simulator draws its whole sample anew: 6 -> 10 per class adds 16 objects and redraws the 24 stored ones.
    small = fingerprints(simulate(SimulatorParams(n_per_class=6, survey_days=365.0)).detections)
    large = fingerprints(simulate(SimulatorParams(n_per_class=10, survey_days=365.0)).detections)
    diff = tasks.compare(small, large)
    assert (len(diff["new"]), len(diff["changed"]), len(diff["removed"])) == (16, 24, 0)
    text = pull_counts({"source": "simulator", "counts": {k: len(v) for k, v in diff.items()}})
    assert text.startswith("16 objects new, 24 changed (redrawn: the simulator draws its whole sample anew")
    assert pull_counts({"source": "alerce", "counts": {"new": 3, "changed": 2, "removed": 0}}) == \
        "3 objects new, 2 changed"


def test_the_pull_table_shows_only_the_columns_that_apply_to_the_source():
    diff = {"new": ["n1", "n2"], "changed": ["c1"], "removed": [], "unchanged": ["u1"]}
    labels = {"n1": "QSO", "n2": "SNIa", "c1": "QSO", "u1": "CEP"}
    stored = {"QSO": 2, "CEP": 1, "SNIa": 1, "SNII": 0}
    simulated = tasks.pull_rows(CLASSES, stored, diff, labels, None)
    assert [list(r) for r in simulated] == [["class", "stored", "new", "changed", "removed"]] * 4
    assert simulated[0] == {"class": "QSO", "stored": 2, "new": 1, "changed": 1, "removed": 0}
    assert all(v != "" for r in simulated for v in r.values())  # no empty cells

    alerce = {c: {"listed": 5, "fetched": 2, "objects_new": 1, "objects_updated": 1, "detections_added": 7,
                  "failures": [{"what": "x"}] if c == "CEP" else []} for c in CLASSES}
    pulled = tasks.pull_rows(CLASSES, stored, diff, labels, alerce)
    assert list(pulled[0]) == ["class", "stored", "new", "changed", "removed", "listed", "fetched",
                               "detections_added", "failures"]
    assert pulled[1]["failures"] == 1 and pulled[0]["detections_added"] == 7

    bts = {c: {"listed": 4, "fetched": 1, "label_changes": 1, "failures": []} for c in ("SNIa", "SNII")}
    spectro = tasks.pull_rows(CLASSES, stored, diff, labels, bts)
    assert list(spectro[2]) == ["class", "stored", "new", "changed", "removed", "listed", "fetched", "label_changes",
                                "failures"]
    assert spectro[0]["listed"] == 0  # a class the catalogue does not type: zero, not blank


def _night(changed: int, now: int, in_file: int, new: int | None = None) -> dict:
    new = changed if new is None else new
    return {"night": "2026-11-25", "pulled": {"source": "simulator"}, "changed_objects": changed,
            "objects": {"new": new, "changed": changed - new, "removed": 0},
            "retrain": {"retrain": False, "reason": "only 0 new labelled objects"},
            "classify": {"n_classified": in_file, "classified_now": now, "objects_in_file": in_file,
                         "model_uri": "models:/deeprubin-tcn@champion", "output": "data/classifications/x.parquet"}}


def test_the_nightly_summary_never_contradicts_itself():
    from deeprubin.cli.ops import nightly_lines

    # A rerun of the night: nothing changed, nothing classified now; the file keeps the first run's 400 objects.
    lines = nightly_lines(_night(changed=0, now=0, in_file=400))
    assert lines[0] == "night 2026-11-25: pulled from simulator: 0 objects new, 0 changed"
    assert "classified 0 objects (none new or changed) with models:/deeprubin-tcn@champion" in lines
    assert "the night's file data/classifications/x.parquet holds 400 objects" in lines
    assert not any(line.startswith("classified 400") for line in lines)

    lines = nightly_lines(_night(changed=400, now=400, in_file=400, new=160))
    assert lines[0].startswith("night 2026-11-25: pulled from simulator: 160 objects new, 240 changed (redrawn")
    assert "classified 400 objects (the new or changed ones) with models:/deeprubin-tcn@champion" in lines

    rejected = _night(changed=10, now=8, in_file=8)
    rejected["classify"].update(n_rejected=2, rejections="data/classifications/x.rejected.csv")
    assert ("classified 8 objects (the new or changed ones; 2 rejected, reasons in "
            "data/classifications/x.rejected.csv) with models:/deeprubin-tcn@champion") in nightly_lines(rejected)


def test_every_deployment_allows_one_run_at_a_time():
    from deeprubin_flows.serve import deployments

    built = deployments(load_params(None, []))
    assert sorted(d.name for d in built) == ["classify", "nightly", "promote", "rollback", "train"]
    assert {d.name: d.concurrency_limit for d in built} == {d.name: 1 for d in built}


def test_embedded_prefect_keeps_its_database_in_the_project(tmp_path, monkeypatch):
    for name in ("PREFECT_API_URL", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", *servers._DATABASE_URL_VARS):
        monkeypatch.setenv(name, "")  # so that monkeypatch restores what use_embedded_prefect sets below
        monkeypatch.delenv(name)
    one, two = tmp_path / "one", tmp_path / "two"
    env_one, env_two = servers.embedded_prefect_env(one), servers.embedded_prefect_env(two)
    db_one = Path(env_one["PREFECT_SERVER_DATABASE_CONNECTION_URL"].split("///", 1)[1])
    db_two = Path(env_two["PREFECT_SERVER_DATABASE_CONNECTION_URL"].split("///", 1)[1])
    assert db_one == one.absolute() / ".prefect" / "prefect.db" and db_two.is_relative_to(two.absolute())
    assert db_one != db_two
    # Servers mode (or a database chosen by the user) is left alone.
    assert servers.embedded_prefect_env(one, {"PREFECT_API_URL": "http://127.0.0.1:4200/api"}) == {}
    assert servers.embedded_prefect_env(one, {"PREFECT_API_DATABASE_CONNECTION_URL": "sqlite+aiosqlite:///x"}) == {}
    assert servers.use_embedded_prefect(one) == db_one and db_one.parent.is_dir()
    assert os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == env_one["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
