"""Loading a model never runs code from the model directory (deeprubin.models.trusted, deeprubin.models.served):
only the pt2 export that the MLmodel's pytorch flavour names is read, and only after it is checked. The hostile
models here are real MLflow model directories whose payload, if ever unpickled or evaluated, creates a marker file:
MLflow's and torch's own loaders do create it (the controls), ours never may."""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from deeprubin.models.served import load_exported, load_model, log_and_register
from deeprubin.models.trusted import ModelRejected
from deeprubin.schema import CLASSES
from tests.model_fixtures import served_tcn, sqlite_uri


class Touch:
    """Unpickling this creates ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    """A pt2 TCN saved as training saves it (MLflow's pt2 format, pytorch + python_function flavours)."""
    import mlflow

    path = tmp_path_factory.mktemp("good") / "good-model"
    mlflow.pytorch.save_model(served_tcn(), path, pip_requirements=["torch"], serialization_format="pt2",
                              input_example=np.zeros((2, 6, 100), dtype=np.float32))
    return path


def pickled_model_dir(root: Path, marker: Path, stray_pt2: Path | None = None) -> Path:
    """An MLflow model directory in MLflow's pickle serialization format (what ``mlflow.pytorch.save_model(...,
    serialization_format="pickle")`` writes) whose ``data/model.pth`` creates ``marker`` when unpickled. With
    ``stray_pt2``: a harmless pt2 export lies elsewhere in the directory too."""
    path = root / "evil-model"
    (path / "data").mkdir(parents=True)
    import torch

    torch.save(Touch(marker), path / "data" / "model.pth", pickle_module=pickle)  # as MLflow saves a pickled model
    (path / "data" / "pickle_module_info.txt").write_text("pickle")
    (path / "MLmodel").write_text(
        "flavors:\n"
        "  python_function:\n    data: data\n    loader_module: mlflow.pytorch\n    pickle_module_name: pickle\n"
        "    python_version: 3.11.7\n"
        "  pytorch:\n    code: null\n    model_data: data\n    pytorch_version: 2.13.0\n"
        "mlflow_version: 3.17.2\n")
    if stray_pt2 is not None:
        (path / "extra").mkdir()
        shutil.copy(stray_pt2, path / "extra" / "model.pt2")
    return path


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text.strip() == text, text
    return text


def test_a_pickled_model_directory_is_refused_and_its_pickle_never_runs(good_dir, marker, tmp_path):
    import mlflow

    bad = pickled_model_dir(tmp_path, marker, stray_pt2=good_dir / "data" / "model.pt2")
    # Control: MLflow's own loader runs the payload (what load_model and the workers used to call).
    with pytest.raises(AttributeError):  # the payload ran, then MLflow calls .eval() on what it returned
        mlflow.pytorch.load_model(str(bad))
    assert marker.exists()
    marker.unlink()

    for uri in (str(bad), bad.as_uri()):
        with pytest.raises(ModelRejected) as refused:
            load_model(uri, sqlite_uri(tmp_path))  # a local directory: the registry is not read
        text = one_line(refused.value)
        assert text.startswith(f"{uri}: model refused:") and "pickle" in text and "data/model.pth" in text
    # The worker processes' loader reads the file the MLmodel names, not any model.pt2 lying in the directory.
    with pytest.raises(ModelRejected, match="pickle"):
        load_exported(str(bad))
    assert not marker.exists()


def test_pool_workers_refuse_a_pickled_model_directory(small_input, marker, tmp_path):
    """The classification worker processes load the network themselves, from the model directory (a real pool)."""
    from concurrent.futures.process import BrokenProcessPool

    import pandas as pd

    from deeprubin.lightcurves.tensorize import curves_from_detections
    from deeprubin.models.served import ServingModel
    from deeprubin.serving.pool import Tensorizer

    bad = pickled_model_dir(tmp_path, marker)
    model = ServingModel(uri=str(bad), name="evil", version="local", classes=CLASSES, module=served_tcn(),
                         local_path=str(bad))
    curves = curves_from_detections(pd.read_parquet(small_input))[:2]
    pool = Tensorizer(2, model)
    pool._starter.join(120)  # the pool is up (until then jobs would run in this process, with its own model)
    try:
        with pytest.raises(BrokenProcessPool):  # the initializer refused the model: no worker to run the job
            list(pool.map([(0, (curves, 100, 100.0, None))]))
    finally:
        pool.close()
    assert not marker.exists()


@pytest.mark.parametrize("mlmodel, why", [
    ("flavors:\n  sklearn:\n    pickled_model: model.pkl\n  pytorch:\n    model_data: data\n", "flavour sklearn"),
    ("flavors:\n  python_function:\n    loader_module: evil_loader\n  pytorch:\n    model_data: data\n",
     "loader_module 'evil_loader'"),
    ("flavors:\n  python_function:\n    loader_module: mlflow.pytorch\n    cloudpickle_version: 3.0\n"
     "    python_model: python_model.pkl\n  pytorch:\n    model_data: data\n", "'python_model'"),
    ("flavors:\n  pytorch:\n    model_data: data\n    code: code\n", "code directory"),
    ("flavors:\n  pytorch:\n    model_data: ../../elsewhere\n", "outside the model directory"),
    ("flavors:\n  python_function:\n    loader_module: mlflow.pytorch\n", "no pytorch flavour"),
    ("!!python/object/apply:os.system ['true']\n", "cannot be read"),
])
def test_other_flavours_loaders_and_code_are_refused(good_dir, tmp_path, mlmodel, why):
    model = tmp_path / "m"
    shutil.copytree(good_dir, model)
    (model / "MLmodel").write_text(mlmodel)
    with pytest.raises(ModelRejected) as refused:
        load_exported(str(model))
    assert why in one_line(refused.value)


def test_malformed_metadata_is_a_one_line_error(good_dir, tmp_path):
    import yaml

    model = tmp_path / "m"
    shutil.copytree(good_dir, model)
    spec = yaml.safe_load((model / "MLmodel").read_text())
    spec["metadata"] = {"deeprubin": {"classes": ["QSO"], "preprocessing": "100 days"}}
    (model / "MLmodel").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"its MLmodel metadata \(deeprubin\) is malformed") as bad:
        load_model(str(model), sqlite_uri(tmp_path))
    one_line(bad.value)


def _rewrite_pt2(good_dir: Path, dest: Path, change, twice: bool = False) -> Path:
    """A copy of ``good_dir`` whose pt2 archive went through ``change(records: dict[name, bytes])``; ``twice``: the
    graph record is in the archive twice (zip readers differ on which one they take)."""
    shutil.copytree(good_dir, dest)
    pt2 = dest / "data" / "model.pt2"
    with zipfile.ZipFile(pt2) as z:
        records = {i.filename: z.read(i) for i in z.infolist()}
    change(records)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in records.items():
            z.writestr(name, data)
        if twice:
            with pytest.warns(UserWarning, match="Duplicate name"):
                z.writestr(_graph_name(records), records[_graph_name(records)])
    pt2.write_bytes(buf.getvalue())
    return dest


def _graph_name(records) -> str:
    return next(n for n in records if n.endswith("models/model.json"))


def test_a_pt2_archive_whose_shape_expression_runs_code_is_refused(good_dir, marker, tmp_path):
    """torch.export.load evaluates symbolic shapes with sympy.sympify, an eval."""
    import torch

    payload = f"__import__('pathlib').Path('{marker}').touch()"

    def evil(records):
        name = _graph_name(records)
        graph = json.loads(records[name])
        text = json.dumps(graph)
        assert "Symbol(" in text  # the TCN is exported with a dynamic batch size
        graph = json.loads(text.replace("\"Symbol('s", "\"" + payload.replace("'", "\\u0027") + " or Symbol('s", 1))
        records[name] = json.dumps(graph).encode()

    bad = _rewrite_pt2(good_dir, tmp_path / "sympy-model", evil)
    torch.export.load(str(bad / "data" / "model.pt2"))  # control: torch's own loader runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ModelRejected, match="shape expression"):
        load_model(str(bad), sqlite_uri(tmp_path))
    with pytest.raises(ModelRejected, match="shape expression"):
        load_exported(str(bad))
    assert not marker.exists()


def test_a_pt2_archive_with_pickled_sample_inputs_is_refused(good_dir, marker, tmp_path):
    """torch reads the sample inputs with weights_only=True and, when that fails, unpickles them in full."""
    import torch

    def evil(records):
        name = next(n for n in records if n.endswith("data/sample_inputs/model.pt"))
        buf = io.BytesIO()
        torch.save(Touch(marker), buf)
        records[name] = buf.getvalue()

    bad = _rewrite_pt2(good_dir, tmp_path / "sample-model", evil)
    with pytest.raises(Exception):  # noqa: B017 - control: torch's own loader unpickles it
        torch.export.load(str(bad / "data" / "model.pt2"))
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ModelRejected, match="sample_inputs/model.pt is not a plain tensor file"):
        load_exported(str(bad))
    assert not marker.exists()


@pytest.mark.parametrize("attack, why", [
    ("target", "not an ATen operator"),
    ("pickled_weight", "is pickled"),
    ("opaque_constant", "not a plain tensor"),
    ("aoti", "compiled code"),
    ("guards", "guard code"),
    ("enum", "import modules"),
    ("duplicate", "twice"),
])
def test_pt2_archives_that_could_run_code_are_refused(good_dir, tmp_path, attack, why):
    def evil(records):
        graph_name = _graph_name(records)
        root = graph_name.split("/")[0]
        graph = json.loads(records[graph_name])
        if attack == "target":  # a graph node calling os.system through an attribute chain of torch
            graph["graph_module"]["graph"]["nodes"][0]["target"] = "torch.serialization.os.system"
        elif attack == "pickled_weight":
            cfg_name = f"{root}/data/weights/model_weights_config.json"
            cfg = json.loads(records[cfg_name])
            next(iter(cfg["config"].values()))["use_pickle"] = True
            records[cfg_name] = json.dumps(cfg).encode()
        elif attack == "opaque_constant":  # torch pickle.loads "opaque" constants
            cfg_name = f"{root}/data/constants/model_constants_config.json"
            cfg = json.loads(records[cfg_name])
            cfg["config"]["evil"] = {"path_name": "opaque_0", "is_param": False, "use_pickle": True,
                                     "tensor_meta": None}
            records[cfg_name] = json.dumps(cfg).encode()
            records[f"{root}/data/constants/opaque_0"] = pickle.dumps(0)
        elif attack == "aoti":
            records[f"{root}/data/aotinductor/model/model.so"] = b"\x7fELF"
        elif attack == "guards":
            graph["guards_code"] = ["__import__('os').system('true')"]
        elif attack == "enum":
            spec = graph["graph_module"]["module_call_graph"][0]["signature"]
            spec["in_spec"] = spec["in_spec"].replace('"context": "null"',
                                                      '"context": "{\\"__enum__\\": true, \\"fqn\\": \\"os:x\\"}"', 1)
        if attack in ("target", "guards", "enum"):
            records[graph_name] = json.dumps(graph).encode()

    bad = _rewrite_pt2(good_dir, tmp_path / "m", evil, twice=attack == "duplicate")
    with pytest.raises(ModelRejected) as refused:
        load_exported(str(bad))
    assert why in one_line(refused.value)


def test_the_pt2_export_training_logs_is_loaded_and_classifies(good_dir, tmp_path):
    import torch

    model = load_model(str(good_dir), sqlite_uri(tmp_path))
    assert model.classes == CLASSES and model.local_path == str(good_dir)
    assert model.predict_proba(np.zeros((3, 6, 100), np.float32)).shape == (3, len(CLASSES))
    net = load_exported(str(_rewrite_pt2(good_dir, tmp_path / "rewritten", lambda records: None)))  # as the attacks
    np.testing.assert_allclose(net(torch.zeros(2, 6, 100)).detach().numpy(),
                               model.module(torch.zeros(2, 6, 100)).detach().numpy())


# --- the registry, the service's reload, leftovers -------------------------------------------------------------------

@pytest.fixture
def scratch_root(tmp_path, monkeypatch) -> Path:
    """A private temporary directory: where load_model keeps a registry model's copy."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> dict:
    """A sqlite registry with a good champion (version 1) of ``tcn``; artifacts in the temporary directory. Tests add
    versions; none moves @champion."""
    root = tmp_path_factory.mktemp("registry")
    uri = sqlite_uri(root)
    version = log_and_register(served_tcn(), uri, "tcn", CLASSES, alias="champion", experiment="test-models",
                               artifact_location=(root / "artifacts").as_uri())
    return {"uri": uri, "version": version}


def _register_dir(uri: str, name: str, path: Path) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    return str(client.create_model_version(name, source=str(path)).version)


def test_a_pickled_registry_version_is_refused_and_leaves_no_copy(registry, marker, tmp_path, scratch_root):
    bad = pickled_model_dir(tmp_path, marker)
    version = _register_dir(registry["uri"], "tcn", bad)
    with pytest.raises(ModelRejected) as refused:
        load_model(f"models:/tcn/{version}", registry["uri"])
    assert one_line(refused.value).startswith(f"models:/tcn/{version}: model refused:")
    assert not marker.exists()
    assert list(scratch_root.iterdir()) == []  # the downloaded copy went with the failure
    missing = _register_dir(registry["uri"], "tcn", tmp_path / "no-such-dir")
    with pytest.raises(ModelRejected) as lost:  # MLflow "downloads" nothing
        load_model(f"models:/tcn/{missing}", registry["uri"])
    assert one_line(lost.value).startswith(f"models:/tcn/{missing}: model refused: it is not an MLflow model")
    assert list(scratch_root.iterdir()) == []


def test_registry_uris_without_a_version_and_missing_paths_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^models:/deeprubin-tcn: a registry model URI names a version or an alias"):
        load_model("models:/deeprubin-tcn", sqlite_uri(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such model directory") as missing:
        load_model(str(tmp_path / "nope"), sqlite_uri(tmp_path))
    one_line(missing.value)
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_model((tmp_path / "nope").as_uri(), sqlite_uri(tmp_path))


def test_the_service_keeps_its_model_when_the_alias_moves_to_a_pickled_version_and_tries_it_once(
        registry, marker, tmp_path, scratch_root, caplog):
    import mlflow

    from deeprubin.serving.service import ModelHolder, ServiceError

    client = mlflow.MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    client.set_registered_model_alias("tcn", "live", registry["version"])
    holder = ModelHolder("models:/tcn@live", registry["uri"], CLASSES, reload_interval_s=3600)
    holder.load()
    assert holder.model.version == registry["version"]
    bad = _register_dir(registry["uri"], "tcn", pickled_model_dir(tmp_path, marker))
    client.set_registered_model_alias("tcn", "live", bad)
    loads = []
    real_load = holder._load
    holder._load = lambda uri: loads.append(uri) or real_load(uri)
    with caplog.at_level(logging.ERROR, logger="deeprubin.serving.service"):
        for _ in range(3):  # three reload intervals
            assert holder.check() is False
    assert not marker.exists()
    assert holder.model.version == registry["version"]  # still serving the good one
    assert loads == [f"models:/tcn/{bad}"]  # tried once, not at every interval
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and f"version {bad}" in refusals[0].getMessage()
    assert "model refused" in holder.last_reload_error and "\n" not in holder.last_reload_error
    assert list(scratch_root.iterdir()) == [Path(holder.model.local_path)]  # the serving copy, no leftovers
    # At start, the same version is a clean one-line ServiceError.
    with pytest.raises(ServiceError) as failed:
        ModelHolder(f"models:/tcn/{bad}", registry["uri"], CLASSES).load()
    assert one_line(failed.value).startswith(f"cannot load the model models:/tcn/{bad} from ")
    assert not marker.exists()


def test_stale_model_copies_of_dead_processes_are_removed_at_the_next_load(registry, scratch_root):
    from deeprubin.scratch import remove_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = scratch_root / f"deeprubin-model-{dead.pid}-abc"
    live = scratch_root / f"deeprubin-model-{os.getppid()}-def"  # pytest's parent: alive
    unknown = scratch_root / "deeprubin-model-q1w2e3"  # the old naming: its owner is unknown, left alone
    for folder in (stale, live, unknown):
        (folder / "data").mkdir(parents=True)
    model = load_model("models:/tcn@champion", registry["uri"])
    assert not stale.exists() and live.exists() and unknown.exists()
    assert Path(model.local_path).is_relative_to(scratch_root)
    assert Path(model.local_path).relative_to(scratch_root).parts[0].startswith(f"deeprubin-model-{os.getpid()}-")
    assert remove_stale("deeprubin-model-", scratch_root) == []


# --- the command line: a bad --model is one line, no traceback -------------------------------------------------------

@pytest.fixture(scope="module")
def small_input(tmp_path_factory) -> Path:
    from deeprubin.config import load_params
    from deeprubin.sources import simulate

    sim = simulate.simulate(load_params(None).ingest.simulator.model_copy(update={"n_per_class": 1}), seed=2,
                            workers=1)
    path = tmp_path_factory.mktemp("input") / "in.parquet"
    sim.detections.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("model, says", [
    ("{tmp}/no/such/model", "no such model directory"),
    ("file://{tmp}/no/such/model", "no such model directory"),
    ("models:/deeprubin-tcn", "a registry model URI names a version or an alias"),
    ("{evil}", "model refused"),
])
@pytest.mark.parametrize("command", ["classify", "serve-api"])
def test_a_bad_model_on_the_command_line_is_one_clear_line(command, model, says, small_input, marker, tmp_path):
    from typer.testing import CliRunner

    from deeprubin.cli import app

    model = model.format(tmp=tmp_path, evil=pickled_model_dir(tmp_path, marker))
    (tmp_path / "params.yaml").write_text(json.dumps({"train": {"tracking_uri": sqlite_uri(tmp_path)}}))
    args = (["classify", "--input", str(small_input), "--output", str(tmp_path / "out.parquet")]
            if command == "classify" else ["serve-api", "--port", "0"])
    done = CliRunner().invoke(app, [*args, "--model", model, "--params", str(tmp_path / "params.yaml")])
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit), done.output  # not an escaped exception
    text = "".join(done.output.split())  # rich wraps long lines at the console's width, even inside a word
    assert all("".join(s.split()) in text for s in (f"{command} failed:", model, says)), done.output
    assert "Traceback" not in done.output
    assert not marker.exists()
