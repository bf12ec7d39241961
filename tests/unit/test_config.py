from pathlib import Path

import pytest
import yaml

from deeprubin.config import ConfigError, IngestParams, Params, dump_params, load_params

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_repository_params_yaml_is_valid_and_complete():
    params = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw) == set(Params.model_fields) == {
        "base", "ingest", "preprocess", "train", "evaluate", "promote", "classify", "alerts", "serve", "flows"}
    assert params.base.classes == ["QSO", "CEP", "SNIa", "SNII"]
    assert params.ingest.source == "simulator"
    assert params.preprocess.grid_days == 100


def test_defaults_equal_params_yaml():
    # params.yaml spells out the defaults: a key changed in one place only is a bug.
    assert load_params(REPO / "params.yaml") == load_params(None)


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"ingest\.simulator\.n_per_clas: unknown key"):
        load_params(write(tmp_path, {"ingest": {"simulator": {"n_per_clas": 3}}}))


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        load_params(write(tmp_path, {"trian": {"max_epochs": 3}}))


def test_wrong_type_is_an_error_naming_key_and_value(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, {"train": {"batch_size": "sixty-four"}}))
    assert "train.batch_size" in str(err.value) and "sixty-four" in str(err.value)


def test_out_of_range_and_unknown_class_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"ingest\.simulator\.n_per_class"):
        load_params(write(tmp_path, {"ingest": {"simulator": {"n_per_class": 0}}}))
    with pytest.raises(ConfigError, match=r"base\.classes.*SNIb"):
        load_params(write(tmp_path, {"base": {"classes": ["QSO", "SNIb"]}}))


def test_files_source_needs_a_detections_file():
    with pytest.raises(ConfigError, match="files.detections"):
        load_params(None, ["ingest.source=files", "ingest.files.detections=null"])


def test_cli_overrides_beat_environment_which_beats_file(tmp_path):
    path = write(tmp_path, {"ingest": {"simulator": {"n_per_class": 7}}})
    assert load_params(path, environ={}).ingest.simulator.n_per_class == 7
    env = {"DEEPRUBIN_INGEST__SIMULATOR__N_PER_CLASS": "11"}
    assert load_params(path, environ=env).ingest.simulator.n_per_class == 11
    assert load_params(path, ["ingest.simulator.n_per_class=13"], environ=env).ingest.simulator.n_per_class == 13


def test_override_values_are_typed_by_yaml_and_validated():
    params = load_params(None, ["base.classes=[SNIa, SNII]", "train.lr=3e-4"], environ={})
    assert params.base.classes == ["SNIa", "SNII"]
    assert params.train.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="not of the form"):
        load_params(None, ["train.lr"], environ={})
    with pytest.raises(ConfigError, match=r"environment DEEPRUBIN_TRAIN__NOPE.*|train\.nope: unknown key"):
        load_params(None, environ={"DEEPRUBIN_TRAIN__NOPE": "1"})


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_params(REPO / "params.yaml", ["base.seed.x=1"], environ={})
    with pytest.raises(ConfigError, match=r"base\.seed: Input should be a valid integer"):
        load_params(None, ["base.seed.x=1"], environ={})


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("ingest: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(bad)


def test_dump_round_trips(tmp_path):
    params = load_params(None, ["ingest.simulator.n_per_class=5"], environ={})
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_params(params))
    assert load_params(path, environ={}) == params


def test_sections_validate_assignment():
    section = IngestParams()
    with pytest.raises(ValueError):
        section.min_detections = 0


def test_tracking_uri_follows_mlflow_tracking_uri_unless_set(monkeypatch, tmp_path):
    # Servers by configuration alone: the standard MLflow variable picks the tracking server.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert load_params(None).train.tracking_uri == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert load_params(REPO / "params.yaml").train.tracking_uri == "http://127.0.0.1:5999"
    assert load_params(None, ["train.tracking_uri=sqlite:///x.db"]).train.tracking_uri == "sqlite:///x.db"


def test_flows_schedule_is_validated():
    params = load_params(REPO / "params.yaml")
    assert params.flows.nightly.cron == "0 9 * * *" and params.flows.nightly.timezone == "America/Los_Angeles"
    with pytest.raises(ConfigError, match="flows.nightly.cron"):
        load_params(None, ["flows.nightly={timezone: UTC}"])
    with pytest.raises(ConfigError, match="not a cron expression"):
        load_params(REPO / "params.yaml", ["flows.nightly.cron=every night"])
    with pytest.raises(ConfigError, match="unknown time zone"):
        load_params(REPO / "params.yaml", ["flows.nightly.timezone=Mars/Olympus"])
