"""The preprocess stage on a small simulated raw store: tensors, report, executors, incremental runs, the plot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deeprubin.config import load_params
from deeprubin.lightcurves import gp
from deeprubin.lightcurves.tensorize import CHANNELS, Curve, prepare
from deeprubin.processed import load_processed
from deeprubin.stages import ingest
from deeprubin.stages import preprocess as stage
from deeprubin.store import RawStore

REPO = Path(__file__).resolve().parents[2]


def params_for(raw: Path, out: Path, *extra: str):
    return load_params(None, [f"ingest.raw_dir={raw}", f"preprocess.processed_dir={out}",
                              "ingest.simulator.n_per_class=8", "ingest.mix_files=false", "preprocess.partitions=4",
                              "preprocess.workers=1", *extra])


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pre") / "raw"
    p = params_for(root, root.parent / "unused")
    ingest.run(p, ingest.IngestPaths.from_params(p))
    return root


def run_stage(raw: Path, out: Path, *extra: str) -> stage.PreprocessResult:
    p = params_for(raw, out, *extra)
    return stage.run(p, stage.PreprocessPaths.from_params(p))


def files(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def serial(raw, tmp_path_factory) -> tuple[Path, stage.PreprocessResult]:
    out = tmp_path_factory.mktemp("serial") / "processed"
    return out, run_stage(raw, out)


def test_tensors_index_and_report(raw, serial):
    out, result = serial
    x, index = load_processed(out)
    objects = RawStore(raw).read().objects
    assert x.dtype == np.float32 and x.shape == (len(index), len(CHANNELS), 100)
    assert np.isfinite(x).all() and (x[:, 2:4] > 0).all() and ((x[:, 4:] >= 0) & (x[:, 4:] <= 1)).all()
    assert result.objects_in == len(objects) == 32
    skipped = sum(result.skipped.values())
    assert result.written + skipped == result.objects_in
    assert result.ok + result.fallback_objects == result.written
    assert result.recomputed == 32 and result.reused == 0
    assert set(index["oid"]) == set(objects["oid"])  # the simulator makes curves that all interpolate
    assert index["label"].tolist() == objects.set_index("oid").loc[index["oid"], "label"].tolist()
    # window metadata: long curves end at their last detection, short ones start at their first
    assert np.allclose(index["window_end_mjd"] - index["window_start_mjd"], 99)
    assert (index["window_start_mjd"] >= index["first_mjd"]).all()
    assert (index["last_mjd"] <= index["window_end_mjd"] + 1e-9).all()
    long = index["anchored"] == "last"
    assert np.allclose(index.loc[long, "window_end_mjd"], index.loc[long, "last_mjd"])
    assert set(index.loc[index["label"].isin(["SNIa", "SNII"]), "anchored"]) <= {"first", "last"}
    assert (index["n_det_g"] + index["n_det_r"] >= 1).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["channels"] == list(CHANNELS) and manifest["shape"] == list(x.shape)
    assert manifest["report"]["ok"] == result.ok
    # Shards are one per partition, rows in oid order.
    for shard, rows in index.groupby("shard"):
        assert rows["oid"].is_monotonic_increasing and rows["row"].tolist() == list(range(len(rows)))
        assert np.load(out / shard).shape[0] == len(rows)


def test_process_pool_and_dask_give_identical_output(raw, serial, tmp_path):
    from dask.distributed import LocalCluster

    out, _ = serial
    pool = run_stage(raw, tmp_path / "pool", "preprocess.workers=2")
    assert pool.executor == "processes"
    assert files(tmp_path / "pool") == files(out)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        dask = run_stage(raw, tmp_path / "dask", "preprocess.executor=dask",
                         f"preprocess.dask_address={cluster.scheduler_address}")
    assert dask.executor == "dask"
    assert files(tmp_path / "dask") == files(out)


def _spy_dask_map(monkeypatch) -> list:
    from dask.distributed import Client

    sent = []
    real_map = Client.map

    def spy(self, fn, *iterables, **kwargs):
        sent.append((fn, list(iterables[0])))
        return real_map(self, fn, *iterables, **kwargs)

    monkeypatch.setattr(Client, "map", spy)
    return sent


def test_dask_tasks_carry_the_detections_path_not_the_curves(raw, serial, tmp_path, monkeypatch):
    """Issue 18: workers that see the raw store's file get the path, their oids and fingerprints (each reads its own
    rows), not the curves; the same bytes as the process pool."""
    import pickle

    from dask.distributed import LocalCluster

    out, _ = serial
    sent = _spy_dask_map(monkeypatch)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        run_stage(raw, tmp_path / "dask", "preprocess.executor=dask",
                  f"preprocess.dask_address={cluster.scheduler_address}")
    assert files(tmp_path / "dask") == files(out)
    (fn, refs), = sent
    assert fn is stage.compute_partition_ref and all(isinstance(r, stage.PartitionRef) for r in refs)
    assert all(Path(r.detections_path) == (raw / "detections.parquet").resolve() for r in refs)
    tasks = [stage.load_partition(r) for r in refs]  # what the workers read: the curves the pool gets
    assert sum(len(t.curves) for t in tasks) == len(RawStore(raw).read().objects)
    assert len(pickle.dumps(refs)) * 5 < len(pickle.dumps(tasks))


def test_dask_workers_without_the_raw_files_get_the_curves(raw, serial, tmp_path, monkeypatch):
    """Workers that do not see the raw store's file as this process does (infra/'s, without the data volume) are
    sent the curves, as before."""
    import threading

    from dask.distributed import LocalCluster

    out, _ = serial
    real_stamp = stage._file_stamp
    monkeypatch.setattr(stage, "_file_stamp", lambda path: real_stamp(path)
                        if threading.current_thread() is threading.main_thread() else None)
    sent = _spy_dask_map(monkeypatch)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        run_stage(raw, tmp_path / "dask", "preprocess.executor=dask",
                  f"preprocess.dask_address={cluster.scheduler_address}")
    assert files(tmp_path / "dask") == files(out)
    (fn, tasks), = sent
    assert fn is stage.compute_partition and all(isinstance(t, stage.PartitionTask) for t in tasks)


def test_a_dask_worker_refuses_rows_that_changed_since_the_stage_read_them(raw):
    oid = str(RawStore(raw).read().objects["oid"].iloc[0])
    ref = stage.PartitionRef(0, str(raw / "detections.parquet"), (oid,), ("not its fingerprint",), 100, 100.0)
    with pytest.raises(RuntimeError, match="changed while the stage ran"):
        stage.load_partition(ref)


def test_incremental_recomputes_only_changed_objects(raw, serial, tmp_path):
    out0, _ = serial
    work_raw, out = tmp_path / "raw", tmp_path / "processed"
    shutil.copytree(raw, work_raw)
    shutil.copytree(out0, out)

    again = run_stage(work_raw, out)
    assert again.recomputed == 0 and again.reused == 32
    assert files(out) == files(out0)

    # New detections for two objects, a relabel for a third, one object gone.
    store = RawStore(work_raw)
    lcs = store.read()
    oids = sorted(lcs.objects["oid"])
    changed, relabelled, gone = oids[:2], oids[5], oids[7]
    det = lcs.detections
    extra = det.loc[det["oid"].isin(changed)].groupby("oid").tail(1).copy()
    extra["mjd"] += 2.0
    det = pd.concat([det.loc[det["oid"] != gone], extra]).sort_values(["oid", "mjd", "band"]).reset_index(drop=True)
    objects = lcs.objects.loc[lcs.objects["oid"] != gone].copy()
    objects.loc[objects["oid"] == relabelled, "label"] = "QSO" if objects.loc[
        objects["oid"] == relabelled, "label"].item() != "QSO" else "CEP"
    nondet = lcs.non_detections.loc[lcs.non_detections["oid"] != gone]
    store.commit(type(lcs)(objects=objects, detections=det, non_detections=nondet), manifest={})

    inc = run_stage(work_raw, out)
    assert inc.recomputed == 2 and inc.reused == 29 and inc.objects_in == 31
    full = run_stage(work_raw, tmp_path / "full", "preprocess.incremental=false")
    assert full.recomputed == 31
    assert files(out) == files(tmp_path / "full")  # identical to a full recompute
    _, index = load_processed(out)
    assert gone not in set(index["oid"])
    assert index.set_index("oid").loc[relabelled, "label"] == objects.set_index("oid").loc[relabelled, "label"]
    assert (index.set_index("oid").loc[changed, "last_mjd"].to_numpy()
            == extra.set_index("oid").loc[changed, "mjd"].to_numpy()).all()

    # A change of configuration recomputes everything.
    regrid = run_stage(work_raw, out, "preprocess.grid_days=50")
    assert regrid.recomputed == 31 and regrid.shape[2] == 50


def test_one_bad_object_never_sinks_the_batch_nor_writes_nan(raw, tmp_path, monkeypatch):
    lcs = RawStore(raw).read()
    oids = sorted(lcs.objects["oid"])
    raising, nan_one, input_error = oids[0], oids[1], oids[2]
    real = gp.interpolate

    def batch(_curves):
        raise RuntimeError("vectorised path broke")

    def one(t, flux, flux_err, band, grid, **settings):
        who = by_key.get((len(t), round(float(np.sum(flux)), 6)))
        if who == raising:
            raise ZeroDivisionError("boom")
        if who == input_error:
            raise gp.GPInputError("no usable points: 0 given")
        res = real(t, flux, flux_err, band, grid, **settings)
        if who == nan_one:
            return gp.GPResult(mean=res.mean * np.nan, std=res.std, status="ok", params={})
        return res

    # recognise each object inside the GP call by what it is given
    by_key = {}
    for oid, d in lcs.detections.groupby("oid"):
        prep = prepare(Curve.from_frame(oid, d))
        by_key[(len(prep.t), round(float(np.sum(prep.flux)), 6))] = oid
    assert len(by_key) == len(oids)
    monkeypatch.setattr(gp, "interpolate_batch", batch)
    monkeypatch.setattr(gp, "interpolate", one)

    result = run_stage(raw, tmp_path / "out")
    assert result.skipped == {"GP failed: ZeroDivisionError": 1, "GP output is not finite": 1,
                              "cannot interpolate: no usable points": 1}
    assert result.written == 29
    x, index = load_processed(tmp_path / "out")
    assert np.isfinite(x).all() and not {raising, nan_one, input_error} & set(index["oid"])
    skipped = pd.read_parquet(tmp_path / "out" / "skipped.parquet")
    assert set(skipped["oid"]) == {raising, nan_one, input_error}
    assert skipped.set_index("oid").loc[raising, "detail"] == "boom"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deeprubin.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"PATH": str(Path(sys.executable).parent), "HOME": str(cwd),
                                            "COLUMNS": "200", "DO_NOT_TRACK": "1"})


def test_cli_preprocess_and_plot(raw, tmp_path):
    out = tmp_path / "processed"
    proc = cli("preprocess", "--raw", str(raw), "--out", str(out), "--workers", "1",
               "--set", "preprocess.partitions=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "recomputed / reused" in proc.stdout and "32 / 0" in proc.stdout
    assert (out / "index.parquet").exists() and (out / "part-00000.npy").exists()

    objects = RawStore(raw).read().objects
    for label in ("SNIa", "QSO"):
        oid = objects.loc[objects["label"] == label, "oid"].iloc[0]
        png = tmp_path / "plots" / f"{oid}.png"
        proc = cli("plot", oid, "--raw", str(raw), "--out", str(png), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    proc = cli("plot", "NOPE", "--raw", str(raw), cwd=tmp_path)
    assert proc.returncode == 1 and "NOPE" in proc.stderr
    proc = cli("preprocess", "--raw", str(tmp_path / "missing"), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 1 and "deeprubin ingest" in proc.stderr


def test_dask_local_cluster_when_no_address(raw, serial, tmp_path):
    out, _ = serial
    result = run_stage(raw, tmp_path / "dask", "preprocess.executor=dask", "preprocess.workers=1")
    assert result.executor == "dask" and files(tmp_path / "dask") == files(out)


# ----------------------------------------------------------------------------------------------------------------
# Byte-identity (issue 18): an object's tensor is a function of that object alone, whatever BLAS threads the process
# had, whichever executor ran it and whichever other objects shared its partition.

def blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def dense_curves(n: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Contract (objects, detections) of ``n`` densely sampled variables: 130-240 points in 200 days, so the GP's
    matrices are as large as those where OpenBLAS threads its factorisations (N >= ~113)."""
    rng = np.random.default_rng(seed)
    objects, detections = [], []
    for i in range(n):
        k = int(rng.integers(130, 240))
        mjd = np.sort(59000 + rng.uniform(0, 199, k))
        band = rng.integers(0, 2, k)
        amp, period = rng.uniform(50, 500), rng.uniform(5, 80)
        err = rng.uniform(5, 30, k)
        flux = amp * np.sin(2 * np.pi * mjd / period + band) + rng.uniform(-100, 300) + rng.normal(0, err)
        oid = f"DENSE{i:03d}"
        mag = 23.9 - 2.5 * np.log10(np.abs(flux))
        detections.append(pd.DataFrame({"oid": oid, "mjd": mjd, "band": np.where(band == 0, "g", "r"), "mag": mag,
                                        "mag_err": 1.0857 * err / np.abs(flux), "flux": flux, "flux_err": err,
                                        "mag_corr": np.nan, "mag_corr_err": np.nan, "source": "test"}))
        objects.append({"oid": oid, "label": "CEP", "label_source": "simulated", "label_probability": 1.0,
                        "first_mjd": mjd[0], "last_mjd": mjd[-1], "n_det": k, "source": "test",
                        "ingested_at": pd.Timestamp(0, tz="UTC")})
    return pd.DataFrame(objects), pd.concat(detections, ignore_index=True)


@pytest.fixture(scope="module")
def dense_raw(raw, tmp_path_factory) -> Path:
    """A store of 8 densely sampled objects (seed 4: before issue 18, partition 0 of 2 came out different on 1 BLAS
    thread and on 2 or 4)."""
    root = tmp_path_factory.mktemp("dense") / "raw"
    shutil.copytree(raw, root)
    store = RawStore(root)
    lcs = store.read()
    objects, detections = dense_curves(8, seed=4)
    store.commit(type(lcs)(objects=objects.astype(lcs.objects.dtypes.to_dict()),
                           detections=detections.astype(lcs.detections.dtypes.to_dict()),
                           non_detections=lcs.non_detections.iloc[:0]), manifest={})
    return root


def test_blas_threads_change_no_byte_and_the_callers_setting_is_restored(dense_raw, tmp_path):
    """OpenBLAS's threaded factorisations of large matrices round differently from its serial ones: with the BLAS
    threads as inherited, the same partitions gave different float32 bytes on 1 and on 4 threads."""
    from threadpoolctl import threadpool_limits

    raw = dense_raw
    with threadpool_limits(limits=1):
        run_stage(raw, tmp_path / "one", "preprocess.partitions=2")
    with threadpool_limits(limits=4):
        run_stage(raw, tmp_path / "four", "preprocess.partitions=2")
        assert blas_threads() and set(blas_threads()) == {4}  # the caller's setting, restored after the run
    assert files(tmp_path / "four") == files(tmp_path / "one")


def test_pool_and_dask_worker_processes_run_one_blas_thread_and_write_the_same_bytes(dense_raw, tmp_path,
                                                                                      monkeypatch):
    """Workers started with 4 BLAS threads (the pool's through the environment when its forkserver starts here,
    Dask's through the nanny's) still run every partition on one, and the process pool, Dask worker processes and
    this process (on one thread) write the same bytes."""
    from dask.distributed import LocalCluster
    from threadpoolctl import threadpool_limits

    raw = dense_raw
    many = {"OPENBLAS_NUM_THREADS": "4", "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
    for name, value in many.items():
        monkeypatch.setenv(name, value)
    with threadpool_limits(limits=1):
        serial = run_stage(raw, tmp_path / "serial", "preprocess.partitions=2")
    pool = run_stage(raw, tmp_path / "pool", "preprocess.partitions=2", "preprocess.workers=2")
    assert pool.executor == "processes" and serial.executor == "serial"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      env=many) as cluster:
        dask = run_stage(raw, tmp_path / "dask", "preprocess.partitions=2", "preprocess.executor=dask",
                         f"preprocess.dask_address={cluster.scheduler_address}")
        assert dask.executor == "dask"
        assert files(tmp_path / "dask") == files(tmp_path / "pool") == files(tmp_path / "serial")

        # What the workers saw while they ran a partition (threadpoolctl inside the worker).
        curves = tensorize_curves_input(raw)
        tasks = [stage.PartitionTask(p, curves[p::2], 100, 100.0) for p in range(2)]
        in_dask = list(stage._run_dask(tasks, 2, cluster.scheduler_address, lambda *a, **k: None))
    in_pool = list(stage._run_pool(tasks, 2, lambda *a, **k: None))
    assert [o.threads for o in in_dask] == [1, 1] and [o.threads for o in in_pool] == [1, 1]


def tensorize_curves_input(raw: Path) -> list[Curve]:
    from deeprubin.lightcurves.tensorize import curves_from_detections

    return curves_from_detections(RawStore(raw).read().detections)


def test_incremental_run_after_new_objects_writes_the_bytes_of_a_full_run(raw, tmp_path):
    """New objects join the partitions of old ones: the old objects' stored tensors (copied) and the new ones
    (computed alone or with few others) are those a full run computes with all of them together. Small partitions:
    a batch of a few short curves is where the GP's default would switch to the dense likelihood."""
    extra = ("preprocess.partitions=8",)
    work_raw, out = tmp_path / "raw", tmp_path / "processed"
    shutil.copytree(raw, work_raw)
    first = run_stage(work_raw, out, *extra)
    assert first.recomputed == 32

    newcomers = tmp_path / "raw2"
    # seed 20: one of its objects, computed alone (the dense likelihood of a tiny batch), came out 1 float32 ulp
    # from the same object computed with its partition-mates (the Kalman filter), before issue 18
    p = params_for(newcomers, tmp_path / "unused", "ingest.simulator.seed=20", "ingest.simulator.n_per_class=6")
    ingest.run(p, ingest.IngestPaths.from_params(p))
    new = RawStore(newcomers).read()
    rename = {o: f"new-{o}" for o in new.objects["oid"]}
    store = RawStore(work_raw)
    old = store.read()
    both = type(old)(**{name: pd.concat([getattr(old, name), getattr(new, name).assign(
        oid=getattr(new, name)["oid"].map(rename))], ignore_index=True)
        for name in ("objects", "detections", "non_detections")})
    store.commit(both, manifest={})

    inc = run_stage(work_raw, out, *extra)
    assert inc.recomputed == 24 and inc.reused == 32
    full = run_stage(work_raw, tmp_path / "full", *extra, "preprocess.incremental=false")
    assert full.recomputed == 56
    assert files(out) == files(tmp_path / "full")


def test_one_blas_thread_is_reference_counted_across_threads_of_a_process():
    """Two partitions on threads of one process (a threaded Dask worker): the first to finish must not restore the
    thread count under the second. In a fresh process, as a Dask worker is: OpenBLAS (0.3.30 measured) ignores a
    thread count set from another thread once the main thread has set one, as this test process's have."""
    script = """
import threading
import numpy
from threadpoolctl import threadpool_info
from deeprubin.stages import preprocess as stage

def blas():
    return sorted({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})

before = blas()
first_in, first_out, seen = threading.Event(), threading.Event(), []

def first():
    with stage.one_blas_thread():
        first_in.set()
        seen.append(("first", blas()))
    first_out.set()

def second():
    with stage.one_blas_thread():
        first_in.wait()
        first_out.wait()
        seen.append(("second, after the first left", blas()))

threads = [threading.Thread(target=second), threading.Thread(target=first)]
for t in threads:
    t.start()
for t in threads:
    t.join(60)
print(before, seen, blas())
assert seen == [("first", [1]), ("second, after the first left", [1])], seen
assert blas() == before, (before, blas())
"""
    env = {"PATH": str(Path(sys.executable).parent), "OPENBLAS_NUM_THREADS": "2", "HOME": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if proc.stdout.startswith("[1]"):
        pytest.skip("one core: OpenBLAS starts with one thread, nothing to limit")
    assert proc.stdout.startswith("[2]"), proc.stdout


def test_a_partition_that_ran_on_several_blas_threads_is_named(raw, tmp_path, monkeypatch):
    """Where the limit cannot take (OpenBLAS ignores a count set from a thread other than the main one once the
    main thread has set one), the run says which partitions may differ in the last bit."""
    monkeypatch.setattr(stage, "_threads_now", lambda: 2)
    with pytest.warns(RuntimeWarning, match=r"partitions \[0, 1\] ran with 2 BLAS threads"):
        run_stage(raw, tmp_path / "out", "preprocess.partitions=2")
