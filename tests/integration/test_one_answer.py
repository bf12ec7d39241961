"""One answer per object, whatever the path (issue 14, item 6).

One set of simulated light curves (QSO and CEP with negative difference fluxes, and supernovae) goes through every
way the platform classifies an object, with one registered model (a real, untrained TCN in a real sqlite MLflow
registry, the champion):

* the nightly flow's classification of ``data/raw`` (the ``classify`` flow on a real Prefect server),
* ``deeprubin classify`` of ``data/raw/detections.parquet`` itself (contract columns: ``mag`` is the magnitude of
  |flux|, ``flux`` is signed), of the same table as CSV, and of an ALeRCE-style export (``magpsf`` + ``isdiffpos``)
  as CSV and as Parquet,
* ``deeprubin consume`` of ZTF Avro alerts (the latest alert of each object carries its whole curve),
* ``deeprubin serve-api`` over HTTP (all curves in one request, and one curve per request),
* evaluation: the ``preprocess`` stage's tensors scored as ``evaluate`` scores them (float32), and the held-out
  real-set path (files read by the ``files`` source, then tensorized).

Every path must give the same probabilities per object. The curves are what a ZTF alert can carry exactly (its
``magpsf``/``sigmapsf`` are Avro floats, its ``jd`` a double): magnitudes are float32 values and times a multiple
of 2^-20 day, and the signed flux of the contract table is computed from them once, so every path starts from the
same numbers. Then every path gives the same tensors bit for bit, and the probabilities differ only where the
network (float32) runs on batches of another size: up to ~1e-7 (``serve-api`` with one curve per request). ``TOL``
allows that and nothing more; ``evaluate`` scores at float32, the other paths write the same float32 numbers as
float64.

The test can fail: dropping the sign of the difference flux (what ``classify`` of the contract file did before
``map_detections`` read a signed flux first) moves the probabilities of the QSO and CEP with negative fluxes by more
than 100 times the tolerance; that is checked too.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from deeprubin import servers
from deeprubin.schema import CLASSES, NON_DETECTIONS_SCHEMA, LightCurves, build_objects, empty_frame, mag_to_flux
from tests.alert_packets import ztf_alert_record, ztf_ocf, ztf_point
from tests.model_fixtures import register_tcn, sqlite_uri
from tests.service_process import start_service, stop, wait_healthy

pytestmark = pytest.mark.timeout(300)

TOL = 1e-6  # max |Δp| between two paths, per object and class
SIGN_MATTERS = 1e-3  # what dropping the sign of the flux moves a QSO/CEP with negative fluxes by, at least
P = [f"p_{c}" for c in CLASSES]
QUIET = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}


def _curves() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(detections, labels): simulated curves, as exact as a ZTF alert can carry them."""
    from deeprubin.config import load_params
    from deeprubin.sources import simulate

    sim = simulate.simulate(load_params(None).ingest.simulator.model_copy(update={"n_per_class": 4}), seed=7,
                            workers=1)
    det = sim.detections.copy()
    mag = det["mag"].to_numpy(np.float32).astype(np.float64)  # Avro float
    mag_err = det["mag_err"].to_numpy(np.float32).astype(np.float64)
    flux, flux_err = mag_to_flux(mag, mag_err)
    det["flux"] = np.where(det["flux"].to_numpy() < 0, -1.0, 1.0) * flux
    det["flux_err"], det["mag"], det["mag_err"] = flux_err, mag, mag_err
    det["mjd"] = np.round(det["mjd"].to_numpy() * 2**20) / 2**20  # exact as jd - 2400000.5
    labels = sim.objects[["oid", "label"]].reset_index(drop=True)
    return det.reset_index(drop=True), labels


def _alerce(det: pd.DataFrame) -> pd.DataFrame:
    """The same detections as an ALeRCE export: objectId, mjd, fid, magpsf, sigmapsf, isdiffpos."""
    return pd.DataFrame({"objectId": det["oid"], "mjd": det["mjd"], "fid": det["band"].map({"g": 1, "r": 2}),
                         "magpsf": det["mag"], "sigmapsf": det["mag_err"],
                         "isdiffpos": np.where(det["flux"] < 0, "f", "t")})


def _write_alerts(det: pd.DataFrame, directory: Path) -> None:
    """Two ZTF alerts per object: one halfway through its curve, and the latest, whose history is the whole curve."""
    directory.mkdir()
    candid = 1000
    for oid, rows in det.groupby("oid", sort=True):
        points = []
        for r in rows.sort_values(["mjd", "band"]).itertuples():
            candid += 1
            points.append((r.mjd, 1 if r.band == "g" else 2, float(r.mag), float(r.mag_err),
                           "f" if r.flux < 0 else "t", candid))
        for k, last in enumerate((len(points) // 2, len(points) - 1)):
            mjd, fid, mag, err, sign, cid = points[last]
            prv = [ztf_point(m, f, mg, e, s, c) for m, f, mg, e, s, c in points[:last]]
            record = ztf_alert_record(oid, cid, mjd, fid, mag, err, sign, prv)
            (directory / f"{oid}-{k}.avro").write_bytes(ztf_ocf([record]))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env.update(QUIET)
    return env


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The curves, the champion in a sqlite registry, ``data/raw`` holding the curves and a params file."""
    import mlflow

    from deeprubin.store import RawStore

    root = tmp_path_factory.mktemp("one-answer")
    det, labels = _curves()
    uri = sqlite_uri(root)
    mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).create_experiment(
        "test-models", artifact_location=(root / "artifacts").as_uri())
    register_tcn(uri, seed=0)
    raw = root / "data" / "raw"
    objects = build_objects(det, labels.assign(label_probability=np.nan), "simulator", "simulated")
    RawStore(raw).commit(LightCurves(objects, det, empty_frame(NON_DETECTIONS_SCHEMA)), {"source": "test"})
    params = root / "params.yaml"
    params.write_text(json.dumps({  # JSON is YAML
        "train": {"tracking_uri": uri},
        "ingest": {"raw_dir": str(raw)},
        "preprocess": {"processed_dir": str(root / "data" / "processed"), "partitions": 2, "workers": 1},
        "classify": {"output_dir": str(root / "data" / "classifications"), "workers": 1, "device": "cpu"},
        "alerts": {"output_dir": str(root / "data" / "alerts")},
    }))
    return {"root": root, "det": det, "labels": labels, "uri": uri, "raw": raw, "params": params}


def _params(world, *overrides: str):
    from deeprubin.config import load_params

    return load_params(world["params"], list(overrides))


def _frame(oids, proba) -> pd.DataFrame:
    return pd.DataFrame(np.asarray(proba, dtype=np.float64), columns=P, index=pd.Index(oids, name="oid")).sort_index()


@pytest.fixture
def nightly(world, prefect_api):
    """The nightly flow's classification step (``tasks.classify_night``, what ``nightly`` ends with) on data/raw,
    run by the ``classify`` flow on a real Prefect server."""
    from deeprubin_flows.classify import classify

    out = world["root"] / "night.parquet"
    done = classify(params_path=str(world["params"]), output=str(out))
    assert done["n_rejected"] == 0, done
    frame = pd.read_parquet(out)
    return frame.set_index("oid")[P].sort_index()


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from deeprubin.cli import app

    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    return done


def _classify_file(world, path: Path) -> pd.DataFrame:
    out = path.with_name(path.name + ".out.parquet")
    _cli(["classify", "--input", str(path), "--output", str(out), "--params", str(world["params"])])
    assert not out.with_suffix(".rejected.csv").exists(), out.with_suffix(".rejected.csv").read_text()
    return pd.read_parquet(out).set_index("oid")[P].sort_index()


def _classify_files(world) -> dict[str, pd.DataFrame]:
    root, det = world["root"], world["det"]
    contract = pd.read_parquet(world["raw"] / "detections.parquet")
    assert {"mag", "flux"} <= set(contract.columns) and "isdiffpos" not in contract.columns
    files = {"classify data/raw/detections.parquet": world["raw"] / "detections.parquet"}
    contract.to_csv(root / "contract.csv", index=False)
    files["classify contract CSV"] = root / "contract.csv"
    _alerce(det).to_csv(root / "alerce.csv", index=False)
    files["classify ALeRCE CSV"] = root / "alerce.csv"
    _alerce(det).to_parquet(root / "alerce.parquet", index=False)
    files["classify ALeRCE Parquet"] = root / "alerce.parquet"
    return {name: _classify_file(world, path) for name, path in files.items()}


def _consume(world) -> pd.DataFrame:
    from deeprubin.serving.alerts import read_classifications

    alerts, out = world["root"] / "alerts", world["root"] / "consumed"
    _write_alerts(world["det"], alerts)
    _cli(["consume", "--dir", str(alerts), "--output", str(out), "--params", str(world["params"])])
    rows = read_classifications(out)
    last = world["det"].groupby("oid")["mjd"].max()
    latest = rows.loc[np.isclose(rows["alert_mjd"].to_numpy(), last.reindex(rows["oid"]).to_numpy(), atol=1e-7, rtol=0)]
    assert latest["oid"].is_unique and len(latest) == len(last), rows[["oid", "alert_mjd"]]
    return latest.set_index("oid")[P].sort_index()


def _serve_api(world) -> dict[str, pd.DataFrame]:
    port = servers.free_port()
    log = world["root"] / "serve-api.log"
    proc = start_service(world["params"], world["root"], log, port, _env())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log)
        curves = [{"oid": oid, "detections": [{"mjd": float(r.mjd), "band": r.band, "flux": float(r.flux),
                                               "flux_err": float(r.flux_err)} for r in rows.itertuples()]}
                  for oid, rows in world["det"].groupby("oid", sort=True)]
        got = {}
        with httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
            for name, requests in (("serve-api (one request)", [curves]),
                                   ("serve-api (one curve per request)", [[c] for c in curves])):
                rows = []
                for light_curves in requests:
                    reply = client.post("/classify", json={"light_curves": light_curves})
                    assert reply.status_code == 200, reply.text
                    assert reply.json()["rejected"] == [], reply.text
                    rows += reply.json()["classifications"]
                got[name] = _frame([c["oid"] for c in rows], [[c["probabilities"][k] for k in CLASSES] for c in rows])
    finally:
        stop(proc)
    return got


def _evaluation(world, model) -> dict[str, pd.DataFrame]:
    """How ``evaluate`` scores a set: the test split's tensors come from the ``preprocess`` stage (data/processed),
    the held-out real set is read from its files and tensorized; both are scored at the network's float32."""
    from deeprubin.evaluation.sets import real_set
    from deeprubin.processed import load_processed, preprocessing_of
    from deeprubin.stages import preprocess
    from deeprubin.stages.evaluate import _probabilities

    params = _params(world)
    preprocess.run(params, preprocess.PreprocessPaths.from_params(params))
    x, index = load_processed(params.preprocess.processed_dir)
    out = {"evaluate (preprocess stage tensors)": _frame(index["oid"].astype(str), _probabilities(model, x))}
    contract = world["root"] / "real.parquet"
    world["det"].to_parquet(contract, index=False)
    world["labels"].to_csv(world["root"] / "real-labels.csv", index=False)
    params = _params(world, f"evaluate.real.detections={contract}",
                     f"evaluate.real.labels={world['root'] / 'real-labels.csv'}",
                     f"evaluate.real.classes={json.dumps(list(CLASSES))}", "evaluate.real.test_fraction=0.9")
    real = real_set(params, preprocessing_of(params.preprocess.processed_dir))
    assert not isinstance(real, str), real
    assert len(real.oids) >= len(CLASSES), real.oids  # the held-out part of the set: most objects
    out["evaluate (held-out real set from files)"] = _frame(real.oids, _probabilities(model, real.x))
    return out


def _sign_dropped(world, model) -> pd.DataFrame:
    """What a path that lost the sign of the difference flux would answer (the bug of issue 14)."""
    from deeprubin.lightcurves.tensorize import curves_from_detections, tensorize_curves

    settings = model.preprocessing
    curves = [replace(c, flux=np.abs(c.flux)) for c in curves_from_detections(world["det"])]
    t = tensorize_curves(curves, settings.grid_days, settings.fit_context_days)
    return _frame([r["oid"] for r in t.rows], model.predict_proba(t.x))


def test_every_path_gives_the_same_probabilities(world, nightly):
    from deeprubin.models.served import load_model

    model = load_model("models:/deeprubin-tcn@champion", world["uri"])
    labels = world["labels"].set_index("oid")["label"]
    det = world["det"]

    # The set exercises signs: QSO and CEP with negative fluxes, and supernovae; all classified by the nightly flow.
    negative = set(det.loc[det["flux"] < 0, "oid"])
    assert set(labels[list(negative)]) == {"QSO", "CEP"} and {"SNIa", "SNII"} <= set(labels)
    assert list(nightly.index) == sorted(labels.index)

    # The test can fail: without the sign, QSO/CEP whose window holds negative fluxes get other probabilities.
    moved = (_sign_dropped(world, model) - nightly).abs().max(axis=1)
    assert (moved[sorted(negative)] > SIGN_MATTERS).sum() >= 3, moved
    assert (moved.drop(sorted(negative)) <= TOL).all(), moved  # curves without a negative flux: the same either way

    paths = {**_classify_files(world), "consume (ZTF alerts)": _consume(world), **_serve_api(world),
             **_evaluation(world, model)}
    diffs = {}
    for name, got in paths.items():
        common = got.index.intersection(nightly.index)
        assert len(common) == len(got), f"{name}: objects the nightly flow did not classify: {got.index}"
        if not name.startswith("evaluate (held-out"):
            assert list(got.index) == list(nightly.index), f"{name}: {list(got.index)}"
        diffs[name] = float((got - nightly.loc[got.index]).abs().to_numpy().max())
    assert all(d <= TOL for d in diffs.values()), "max |Δp| against the nightly flow: " + json.dumps(diffs, indent=1)
