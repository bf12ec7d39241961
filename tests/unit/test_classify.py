"""Batch classification of files: streaming in bounded batches, any contract-mapped format, rejections on the side,
atomic output (deeprubin.serving.classify)."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from deeprubin.serving import classify as clf
from deeprubin.config import load_params
from deeprubin.models.served import ServingModel, load_model
from deeprubin.serving import reading
from deeprubin.serving.pool import Tensorizer
from deeprubin.schema import CLASSES
from deeprubin.sources import simulate
from tests.model_fixtures import served_tcn


@pytest.fixture(scope="module")
def detections() -> pd.DataFrame:
    sim = simulate.simulate(load_params(None).ingest.simulator.model_copy(update={"n_per_class": 15}), seed=3)
    return sim.detections.sort_values(["oid", "mjd"], kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def model() -> ServingModel:
    return ServingModel(uri="local:test", name="test", version="0", classes=tuple(CLASSES), module=served_tcn())


@pytest.fixture
def params():
    return load_params(None, ["classify.batch_size=16", "classify.workers=1"])


def _chunks(frame: pd.DataFrame, rows: int):
    for start in range(0, len(frame), rows):
        yield frame.iloc[start:start + rows]


def test_grouped_reader_yields_whole_objects_across_chunk_boundaries(detections):
    frames = list(reading.grouped_objects(_chunks(detections, 37)))
    seen = [f["oid"].unique() for f in frames]
    flat = np.concatenate(seen)
    assert len(flat) == len(set(flat)) == detections["oid"].nunique()  # no object split between two frames
    assert max(len(f) for f in frames) <= 37 + detections.groupby("oid").size().max()  # a chunk plus one object
    pd.testing.assert_frame_equal(pd.concat(frames).reset_index(drop=True), detections)


def test_grouped_reader_refuses_interleaved_objects(detections):
    interleaved = detections.sample(frac=1, random_state=0)
    with pytest.raises(reading.NotGroupedError, match="not contiguous"):
        list(reading.grouped_objects(_chunks(interleaved, 50)))


def test_partitioned_reader_gives_each_object_once_with_all_its_rows(detections, tmp_path):
    shuffled = detections.sample(frac=1, random_state=1)
    frames = list(reading.partitioned_objects(_chunks(shuffled, 41), tmp_path / "spill", partitions=5))
    assert len(frames) <= 5
    per_frame = [set(f["oid"]) for f in frames]
    assert sum(len(s) for s in per_frame) == len(set().union(*per_frame)) == detections["oid"].nunique()
    back = pd.concat(frames).sort_values(["oid", "mjd", "band"]).reset_index(drop=True)
    want = detections.sort_values(["oid", "mjd", "band"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(back[want.columns], want, check_dtype=False)
    assert not list((tmp_path / "spill").glob("*.parquet"))  # spilled partitions are removed once read


def test_batches_are_bounded_and_bad_points_are_counted(detections):
    bad = detections.copy()
    bad.loc[bad.index[:3], "flux_err"] = -1.0
    dropped: Counter = Counter()
    batches = list(reading.curve_batches(reading.grouped_objects(_chunks(bad, 100)), 8, dropped))
    assert all(len(b.curves) <= 8 for b in batches)
    assert sum(len(b.curves) for b in batches) == detections["oid"].nunique()
    assert sum(b.rows_read for b in batches) == len(bad)
    assert sum(dropped.values()) == 3


def _alerce_csv(detections: pd.DataFrame) -> pd.DataFrame:
    """The same detections in ALeRCE's columns (fid, magpsf, sigmapsf, isdiffpos)."""
    return pd.DataFrame({"oid": detections["oid"], "mjd": detections["mjd"],
                         "fid": detections["band"].map({"g": 1, "r": 2}), "magpsf": detections["mag"],
                         "sigmapsf": detections["mag_err"],
                         "isdiffpos": np.where(detections["flux"] >= 0, "t", "f")})


def test_classify_file_any_format_equals_in_memory_and_reports_bad_objects(detections, model, params, tmp_path):
    frame = detections.copy()
    lonely = pd.DataFrame({"oid": ["ZTFbad_nan"] * 2, "mjd": [60000.0, 60001.0], "band": ["g", "g"],
                           "mag": [np.nan, np.nan], "mag_err": [0.1, 0.1], "flux": [np.nan, np.nan],
                           "flux_err": [1.0, 1.0], "source": "test"})
    frame = pd.concat([frame, lonely], ignore_index=True)
    csv = tmp_path / "alerce.csv"
    _alerce_csv(frame).to_csv(csv, index=False)

    result = clf.run_file(params, csv, tmp_path / "out.parquet", model=model, read_rows=97)
    out = pd.read_parquet(result.output)
    assert list(out.columns) == clf.COLUMNS
    assert out["oid"].is_unique and result.n_classified == len(out) == detections["oid"].nunique()
    assert np.allclose(out[[f"p_{c}" for c in CLASSES]].sum(axis=1), 1.0)
    assert set(out["predicted_class"]) <= set(CLASSES)
    assert (out["model_version"] == "0").all() and result.input_grouped
    side = pd.read_csv(result.rejections)
    assert list(side.columns) == clf.REJECTION_COLUMNS
    assert side.loc[side["oid"] == "ZTFbad_nan", "reason"].tolist() == ["no valid detection"]
    assert "mag is NaN" in side.loc[side["oid"] == "ZTFbad_nan", "detail"].iloc[0]

    memory = clf.run(params, detections, tmp_path / "memory.parquet", model=model)
    mem = pd.read_parquet(memory.output).set_index("oid").sort_index()
    got = out.set_index("oid").sort_index()
    assert (got["n_det"] == mem["n_det"]).all()
    np.testing.assert_allclose(got["days_since_first_detection"], mem["days_since_first_detection"])
    # magnitudes round-trip to fluxes to ~1e-6 relative: the probabilities agree closely, not bit for bit
    np.testing.assert_allclose(got[[f"p_{c}" for c in CLASSES]], mem[[f"p_{c}" for c in CLASSES]], atol=1e-4)


def test_unsorted_input_is_partitioned_on_disk_and_gives_the_same_result(detections, model, params, tmp_path):
    grouped = tmp_path / "grouped.parquet"
    shuffled = tmp_path / "shuffled.parquet"
    detections.to_parquet(grouped, index=False)
    detections.sample(frac=1, random_state=2).to_parquet(shuffled, index=False)
    a = clf.run_file(params, grouped, tmp_path / "a.parquet", model=model, read_rows=200)
    b = clf.run_file(params, shuffled, tmp_path / "b.parquet", model=model, read_rows=200)
    assert a.input_grouped and not b.input_grouped
    pa_, pb = (pd.read_parquet(r.output).set_index("oid").sort_index() for r in (a, b))
    cols = [f"p_{c}" for c in CLASSES] + ["n_det", "days_since_first_detection"]
    pd.testing.assert_frame_equal(pa_[cols], pb[cols])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".classify-")]  # temporary files cleaned


def test_a_failed_run_leaves_the_previous_output_whole(detections, model, params, tmp_path):
    src = tmp_path / "in.parquet"
    detections.to_parquet(src, index=False)
    out = tmp_path / "out.parquet"
    clf.run_file(params, src, out, model=model)
    before = out.read_bytes()

    class Exploding(ServingModel):
        def predict_proba(self, x, batch=1024):
            raise RuntimeError("GPU fell off")

    broken = Exploding(uri="local:x", name="x", version="1", classes=tuple(CLASSES), module=None)
    with pytest.raises(RuntimeError, match="GPU fell off"):
        clf.run_file(params, src, out, model=broken)
    assert out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_upsert_replaces_the_rows_of_reclassified_objects_only(detections, model, params, tmp_path):
    out = tmp_path / "night.parquet"
    clf.run(params, detections, out, model=model)
    first = pd.read_parquet(out).set_index("oid")
    some = sorted(first.index)[:4]
    again = clf.run(params, detections[detections["oid"].isin(some)], out, model=model, upsert=True)
    after = pd.read_parquet(out).set_index("oid")
    assert after.index.is_unique and sorted(after.index) == sorted(first.index)
    assert again.n_classified == len(after)
    assert (after.loc[some, "classified_at"] >= first.loc[some, "classified_at"]).all()


def test_missing_or_unknown_input_is_a_clear_error(model, params, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clf.run_file(params, tmp_path / "nope.parquet", tmp_path / "o.parquet", model=model)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="unknown format"):
        clf.run_file(params, tmp_path / "x.json", tmp_path / "o.parquet", model=model)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A local MLflow model directory holding a pt2 TCN, as training logs it (weight norm does not pickle)."""
    import mlflow

    path = tmp_path_factory.mktemp("model") / "local-model"
    example = np.zeros((2, 6, 100), dtype=np.float32)
    mlflow.pytorch.save_model(served_tcn(), path, pip_requirements=["torch"], serialization_format="pt2",
                              input_example=example)
    return path


def test_classification_on_a_process_pool_equals_in_process(detections, model, model_dir, tmp_path):
    src = tmp_path / "in.parquet"
    detections.to_parquet(src, index=False)
    params = load_params(None, ["classify.batch_size=8"])
    # model: an in-memory network, run by the main process; logged: workers load it from disk and run it too
    logged = load_model(str(model_dir), f"sqlite:///{tmp_path}/unused.db")  # a local path: no registry read
    assert logged.local_path == str(model_dir)
    for m in (model, logged):
        one = clf.run_file(params, src, tmp_path / "one.parquet", model=m, workers=1)
        pool = clf.run_file(params, src, tmp_path / "pool.parquet", model=m, workers=2, min_rows_for_pool=0)
        a, b = (pd.read_parquet(r.output).drop(columns="classified_at") for r in (one, pool))
        pd.testing.assert_frame_equal(a, b, rtol=1e-6)
    from deeprubin.lightcurves.tensorize import curves_from_detections

    pool = Tensorizer(2, logged)  # the logged network runs in the workers: only probabilities come back
    try:
        [(_, (t, proba))] = list(pool.map([(0, (curves_from_detections(detections)[:5], 100, 100.0, None))]))
    finally:
        pool.close()
    assert proba is not None and proba.shape == (len(t.rows), len(CLASSES)) and len(t.x) == 0


def test_jobs_run_in_this_process_until_the_pool_has_started(detections, model_dir, monkeypatch, tmp_path):
    """Issue 18: the pool is started from a thread (its first submit blocks while the forkserver imports torch);
    until then map() runs every job here, in order, with the probabilities the workers give afterwards."""
    import threading

    from deeprubin.lightcurves.tensorize import curves_from_detections

    release = threading.Event()
    start = Tensorizer._start_workers

    def held(self):
        release.wait(60)
        start(self)

    monkeypatch.setattr(Tensorizer, "_start_workers", held)
    logged = load_model(str(model_dir), f"sqlite:///{tmp_path}/unused.db")
    curves = curves_from_detections(detections)
    jobs = [(k, (curves[k:k + 2], 100, 100.0, None)) for k in range(0, 8, 2)]
    pool = Tensorizer(2, logged)
    try:
        here = list(pool.map(jobs))
        assert pool._starter.is_alive() and [k for k, _ in here] == [0, 2, 4, 6]
        release.set()
        pool._starter.join(60)
        there = list(pool.map(jobs))
    finally:
        release.set()
        pool.close()
    for (_, (t1, p1)), (_, (t2, p2)) in zip(here, there):
        assert list(t1.rows) == list(t2.rows) and np.allclose(p1, p2, rtol=1e-6, atol=1e-7)


def test_a_job_sent_to_a_worker_is_packed_and_rebuilt_curve_for_curve(detections):
    """Issue 18: jobs travel to the workers as one array per field (pickling each small Curve cost ~22 us); the
    worker rebuilds the same curves, empty ones and other jobs included."""
    from deeprubin.lightcurves.tensorize import Curve, curves_from_detections
    from deeprubin.serving.pool import _pack_job, _run_packed

    curves = curves_from_detections(detections)[:6]
    curves.insert(2, Curve("empty", *(np.zeros(0, dtype=d) for d in (float, np.int64, float, float))))
    job = (curves, 100, 100.0, None)
    packed, rest = _pack_job(job)
    assert packed is not None and rest == (100, 100.0, None)
    rebuilt, *tail = _run_packed(lambda j: j, *pickle.loads(pickle.dumps((packed, rest))))
    assert tail == [100, 100.0, None] and [c.oid for c in rebuilt] == [c.oid for c in curves]
    for a, b in zip(curves, rebuilt):
        for f in ("mjd", "band", "flux", "flux_err"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
            assert getattr(a, f).dtype == getattr(b, f).dtype
    assert _pack_job(([], 100, 100.0)) == (None, ([], 100, 100.0))  # nothing to pack: sent as it is
    assert _run_packed(len, None, ("x", 1)) == 2


def test_classify_command_reads_alerce_csv_with_a_local_model_and_summarises(detections, model_dir, tmp_path):
    from typer.testing import CliRunner

    from deeprubin.cli import app
    from tests.conftest import REPO

    src = tmp_path / "alerce.csv"
    _alerce_csv(detections).to_csv(src, index=False)
    out = tmp_path / "out.parquet"
    done = CliRunner().invoke(app, ["classify", "--input", str(src), "--output", str(out), "--model",
                                    str(model_dir), "--params", str(REPO / "params.yaml")])
    assert done.exit_code == 0, done.output
    assert f"{detections['oid'].nunique()} objects classified" in done.output and "predicted class" in done.output
    frame = pd.read_parquet(out)
    assert (frame["model_name"] == "local-model").all() and (frame["model_version"] == "local").all()
    bad = CliRunner().invoke(app, ["classify", "--input", str(tmp_path / "nope.csv"), "--output", str(out),
                                   "--model", str(model_dir), "--params", str(REPO / "params.yaml")])
    assert bad.exit_code == 1 and "nope.csv" in bad.output


# --- photometry: apparent magnitudes (real OGLE-II curves) beside difference magnitudes (real BTS supernovae) ------

@pytest.fixture(scope="module")
def mixed_photometry(shared_data) -> tuple[pd.DataFrame, dict[str, str]]:
    """Rows oid, mjd, band, mag, mag_err of 2 OGLE Cepheids and 2 OGLE quasars (apparent), 3 BTS supernovae
    (difference, no isdiffpos) and one steady star (a real OGLE curve's epochs and errors at a constant level)."""
    from tests.real_curves import bts_rows, ogle_as_ztf

    ogle = ogle_as_ztf(shared_data)
    label = ogle.groupby("oid")["label"].first()
    ceps = list(label[label == "CEP"].index[:2])
    qsos = ["LMC_SC10_10560", "LMC_SC16_178924"]  # vary by 5 sigma from their median at some epochs
    bts = bts_rows(shared_data)
    sne = list(bts["oid"].drop_duplicates().iloc[[0, 5, 10]])
    bts = bts.loc[bts["oid"].isin(sne)]
    rng = np.random.default_rng(1)
    star = ogle.loc[ogle["oid"] == ceps[0]].assign(oid="steady-star")
    star["mag"] = 17.0 + rng.normal(0, 1, len(star)) * star["mag_err"] / 5
    rows = pd.concat([ogle.loc[ogle["oid"].isin(ceps + qsos)], star,
                      pd.DataFrame({"oid": bts["oid"], "mjd": bts["mjd"], "band": bts["fid"].map({1: "g", 2: "r"}),
                                    "mag": bts["magpsf"], "mag_err": bts["sigmapsf"]})], ignore_index=True)
    kinds = {**{o: "apparent" for o in ceps + qsos}, **{o: "difference" for o in sne}}
    return rows.drop(columns="label"), kinds


def test_classify_recognises_apparent_curves_converts_them_and_says_the_path(mixed_photometry, model, params,
                                                                            tmp_path):
    from deeprubin.lightcurves.presentation import apparent_to_difference

    rows, kinds = mixed_photometry
    src = tmp_path / "mixed.csv"
    rows.to_csv(src, index=False)
    result = clf.run_file(params, src, tmp_path / "out.parquet", model=model)
    out = pd.read_parquet(result.output).set_index("oid")
    assert list(out.reset_index().columns) == clf.COLUMNS
    assert out["photometry"].to_dict() == kinds and not out["photometry_declared"].any()
    assert result.per_photometry == {"apparent (recognised)": 4, "difference (recognised)": 3}
    side = pd.read_csv(result.rejections)
    assert side.to_dict("records") == [{"oid": "steady-star",
                                        "reason": "steady source: no point 5 sigma from its reference",
                                        "detail": side["detail"].iloc[0]}]
    assert "recognised" in side["detail"].iloc[0]

    # The apparent curves were classified as the difference flux of their 5 sigma points, declared so here.
    from tests.real_curves import contract

    diff = apparent_to_difference(contract(rows.loc[rows["oid"].map(kinds) == "apparent"], "test"))
    given = clf.run(load_params(None, ["classify.batch_size=16", "classify.workers=1",
                                       "classify.photometry=difference"]), diff, tmp_path / "diff.parquet",
                    model=model)
    same = pd.read_parquet(given.output).set_index("oid")
    assert same["photometry_declared"].all()
    probs = [f"p_{c}" for c in CLASSES]
    np.testing.assert_allclose(out.loc[same.index, probs], same[probs], atol=1e-6)
    assert (out.loc[same.index, "n_det"] == same["n_det"]).all()
    assert (same["n_det"] < rows.loc[rows["oid"].isin(same.index)].groupby("oid").size()).all()


def test_a_declared_photometry_column_or_setting_wins_over_recognition(mixed_photometry, model, params, tmp_path):
    rows, kinds = mixed_photometry
    cep = next(o for o, k in kinds.items() if k == "apparent")
    sn = next(o for o, k in kinds.items() if k == "difference")
    declared = rows.assign(photometry=rows["oid"].map({cep: "difference", sn: "apparent"}))
    src = tmp_path / "declared.parquet"
    declared.sample(frac=1, random_state=0).to_parquet(src, index=False)  # not grouped: the column survives the spill
    result = clf.run_file(params, src, tmp_path / "out.parquet", model=model, read_rows=500)
    out = pd.read_parquet(result.output).set_index("oid")
    assert not result.input_grouped
    assert out.loc[cep, "photometry"] == "difference" and out.loc[cep, "photometry_declared"]
    assert out.loc[sn, "photometry"] == "apparent" and out.loc[sn, "photometry_declared"]
    others = out.drop(index=[cep, sn])
    assert (others["photometry"] == others.index.map(kinds)).all() and not others["photometry_declared"].any()

    plain = tmp_path / "plain.csv"
    rows.to_csv(plain, index=False)
    setting = load_params(None, ["classify.batch_size=16", "classify.workers=1", "classify.photometry=difference"])
    every = pd.read_parquet(clf.run_file(setting, plain, tmp_path / "all.parquet", model=model).output)
    assert (every["photometry"] == "difference").all() and every["photometry_declared"].all()
    assert "steady-star" in set(every["oid"])  # taken as given: nothing is subtracted

    from tests.real_curves import contract

    stored = clf.run(params, contract(rows, "store"), tmp_path / "night.parquet", model=model, photometry="difference")
    night = pd.read_parquet(stored.output)
    assert len(night) == len(kinds) + 1 and night["photometry_declared"].all()


def test_classify_command_takes_the_photometry_option(mixed_photometry, model_dir, tmp_path):
    from typer.testing import CliRunner

    from deeprubin.cli import app
    from tests.conftest import REPO

    rows, kinds = mixed_photometry
    src = tmp_path / "mixed.csv"
    rows.loc[rows["oid"].isin(kinds)].to_csv(src, index=False)
    out = tmp_path / "out.parquet"
    done = CliRunner().invoke(app, ["classify", "--input", str(src), "--output", str(out), "--model", str(model_dir),
                                    "--params", str(REPO / "params.yaml"), "--photometry", "apparent"])
    assert done.exit_code == 0, done.output
    assert "photometry apparent (declared): 7 object(s)" in done.output
    frame = pd.read_parquet(out)
    assert (frame["photometry"] == "apparent").all() and frame["photometry_declared"].all()
    wrong = CliRunner().invoke(app, ["classify", "--input", str(src), "--output", str(out), "--model",
                                     str(model_dir), "--photometry", "magnitudes"])
    assert wrong.exit_code == 2
