"""Ingest of the simulator streams (issue 18): blocks of oids from the simulator's workers through validation,
selection, the files' objects, the upsert and the store's writers, with the same bytes as one block."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from deeprubin import store as store_module
from deeprubin.config import SimulatorParams, load_params
from deeprubin.schema import NON_DETECTIONS_SCHEMA, ValidationReport, to_arrow, validate_detections
from deeprubin.sources.simulate import simulate, simulate_blocks
from deeprubin.stages import ingest
from deeprubin.store import RawStore

REPO_PARAMS = "params.yaml"


def _params(raw, *overrides: str):
    return load_params(REPO_PARAMS, [f"ingest.raw_dir={raw}", *overrides])


def _files(raw) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(raw.iterdir())}


def _ingest(raw, block, monkeypatch, *overrides: str):
    monkeypatch.setattr(ingest, "BLOCK_OBJECTS", block)
    p = _params(raw, *overrides)
    return ingest.run(p, ingest.IngestPaths.from_params(p))


@pytest.mark.parametrize("block", [1, 29, 10_000])
def test_simulate_blocks_are_simulate_row_for_row(tmp_path, block):
    params = SimulatorParams(n_per_class=25)
    whole = simulate(params, seed=5)
    blocks = list(simulate_blocks(params, tmp_path, seed=5, block_objects=block))
    assert len(blocks) == -(-100 // block)
    for name in ("objects", "detections", "non_detections"):
        streamed = pd.concat([getattr(b, name) for b in blocks], ignore_index=True)
        pd.testing.assert_frame_equal(streamed, getattr(whole, name), check_exact=True)
    assert list(tmp_path.iterdir()) == []  # the workers' chunk files are gone once the last block is out


def test_ingest_in_small_blocks_writes_the_bytes_of_one_block(tmp_path, monkeypatch):
    """Simulator + the shipped BTS files, objects dropped by selection and by validation (files): every stored file,
    the manifest and the rejections included, is the same for blocks of 7 objects as for one block."""
    overrides = ("ingest.simulator.n_per_class=20", "ingest.min_detections=30")
    small = _ingest(tmp_path / "small", 7, monkeypatch, *overrides)
    one = _ingest(tmp_path / "one", 10_000, monkeypatch, *overrides)
    assert _files(tmp_path / "small") == _files(tmp_path / "one")
    assert small.manifest() == one.manifest()
    assert any("fewer than 30" in r.reason for r in small.objects_dropped)
    assert (tmp_path / "small" / "rejections.csv").read_text().count("\n") > 10
    assert sorted(p.name for p in (tmp_path / "small").iterdir()) == [
        "detections.parquet", "manifest.json", "non_detections.parquet", "objects.parquet", "rejections.csv",
        "state.json"]  # no scratch left in the store


def test_upsert_counts_and_tables_do_not_depend_on_the_block_size(tmp_path, monkeypatch):
    first = ("ingest.simulator.n_per_class=15", "ingest.mix_files=false")
    # Another size with the same seed: the same oids with other light curves, and new oids; then the same again
    # (every row replaced) with the files' objects beside them.
    second = ("ingest.simulator.n_per_class=25", "ingest.mode=upsert", "ingest.mix_files=false")
    third = ("ingest.simulator.n_per_class=25", "ingest.mode=upsert")
    results = {}
    for block in (3, 10_000):
        raw = tmp_path / f"raw{block}"
        _ingest(raw, block, monkeypatch, *first)
        results[block] = (_ingest(raw, block, monkeypatch, *second).counts,
                          _ingest(raw, block, monkeypatch, *third).counts)
    assert results[3] == results[10_000]
    (changed, again) = results[3]
    assert changed.objects_updated == 60 and changed.objects_new == 40 and changed.detections_added > 0
    assert again.objects_updated == 100 and again.objects_new > 0 and again.detections_replaced > 0
    assert _files(tmp_path / "raw3") == _files(tmp_path / "raw10000")
    objects = RawStore(tmp_path / "raw3").read().objects
    assert str(objects["ingested_at"].dtype) == "datetime64[us, UTC]"


def test_a_run_that_fails_half_way_leaves_the_stored_state_whole(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    _ingest(raw, 10_000, monkeypatch, "ingest.simulator.n_per_class=10", "ingest.mix_files=false")
    before = _files(raw)
    real = ingest.prepare_batch
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest, "prepare_batch", failing)
    with pytest.raises(OSError, match="disk full"):
        _ingest(raw, 5, monkeypatch, "ingest.simulator.n_per_class=12", "ingest.mix_files=false")
    assert calls["n"] == 3  # blocks 1 and 2 were written into the new state before the failure
    assert _files(raw) == before
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # the commit folder and its scratch are gone


def test_block_reports_merge_into_the_whole_tables_report():
    rows = []
    for i in range(12):
        oid = f"O{i:02d}"
        mjds = [58300.0 + k for k in range(5)]
        if i % 4 == 1:
            mjds[2] = 58299.0  # times run backwards
        for k, mjd in enumerate(mjds):
            rows.append((oid, mjd, "g" if k % 2 else "r", 18.0, 0.1))
    frame = pd.DataFrame(rows, columns=["oid", "mjd", "band", "mag", "mag_err"])
    frame["flux"], frame["flux_err"] = 10 ** (-0.4 * (frame["mag"] - 23.9)), 1.0
    frame.loc[3, "mag"] = np.nan
    frame.loc[27, "band"] = "i"
    frame.loc[44, "mag_err"] = -1.0
    frame = pd.concat([frame, frame.iloc[[50, 51]]], ignore_index=True).sort_values("oid", kind="mergesort")
    for policy in ("sort", "reject"):
        whole, report = validate_detections(frame, on_unsorted=policy)
        parts = [validate_detections(frame[frame["oid"].isin([f"O{i:02d}" for i in range(a, a + 5)])],
                                     on_unsorted=policy) for a in range(0, 12, 5)]
        merged = ValidationReport.merge_blocks([r for _, r in parts])
        assert merged.rejections == report.rejections and len(report.rejections) >= 4
        assert (merged.rows_in, merged.rows_out) == (report.rows_in, report.rows_out)
        pd.testing.assert_frame_equal(pd.concat([f for f, _ in parts], ignore_index=True), whole)


def test_a_streamed_table_has_the_bytes_of_write_table(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "ROW_GROUP_ROWS", 1000)
    rng = np.random.default_rng(0)
    n = 3500
    frame = pd.DataFrame({"oid": [f"SIM{i // 7:07d}" for i in range(n)], "mjd": rng.random(n),
                          "band": np.array(["g", "r"])[rng.integers(0, 2, n)], "diffmaglim": rng.random(n)})
    pq.write_table(to_arrow(frame, NON_DETECTIONS_SCHEMA), tmp_path / "whole.parquet", compression="zstd",
                   row_group_size=1000)
    stream = store_module._TableStream(tmp_path / "streamed.parquet", NON_DETECTIONS_SCHEMA)
    for start in range(0, n, 333):
        stream.write(frame.iloc[start:start + 333])
    stream.close()
    assert pq.ParquetFile(tmp_path / "streamed.parquet").metadata.num_row_groups == 4
    assert (tmp_path / "streamed.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
