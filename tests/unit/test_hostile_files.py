"""`deeprubin classify` with careless and hostile files (issue 16): no file it was asked to read is ever written over
or removed, rows without an oid are dropped and named, a damaged file or a bad output path is one clear line (no
traceback, no partial output), and implausible magnitudes and times are flagged, never classified silently.

Real files, the real command (typer's CliRunner), a real (untrained) TCN saved as a local MLflow model."""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from deeprubin.cli import app
from deeprubin.config import load_params
from deeprubin.schema import MAG_TOO_BRIGHT, MAG_TOO_FAINT, TIME_LOOKS_LIKE_JD, TIME_NOT_PLAUSIBLE_MJD
from deeprubin.sources import simulate
from deeprubin.serving import classify as clf
from tests.conftest import REPO
from tests.model_fixtures import served_tcn

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def detections() -> pd.DataFrame:
    sim = simulate.simulate(load_params(None).ingest.simulator.model_copy(update={"n_per_class": 2}), seed=5)
    det = sim.detections.sort_values(["oid", "mjd"], kind="stable").reset_index(drop=True)
    return det[["oid", "mjd", "band", "flux", "flux_err"]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import mlflow

    path = tmp_path_factory.mktemp("model") / "local-model"
    mlflow.pytorch.save_model(served_tcn(), path, pip_requirements=["torch"], serialization_format="pt2",
                              input_example=np.zeros((2, 6, 100), dtype=np.float32))
    return path


def classify(model_dir, *args: str):
    return CliRunner().invoke(app, ["classify", *args, "--model", str(model_dir), "--params",
                                    str(REPO / "params.yaml"), "--set", "classify.workers=1"])


def failed_cleanly(done, *words: str) -> str:
    """Exit 1, no traceback, and one line of output naming every word; returns that line."""
    assert done.exit_code == 1, done.output
    assert isinstance(done.exception, SystemExit), repr(done.exception)  # not an uncaught exception
    assert "Traceback" not in done.output
    lines = [line for line in done.output.splitlines() if "failed" in line]
    assert len(lines) == 1, done.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- 1. never write over, or remove, the input -------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_output_named_as_the_input_is_refused_and_the_input_is_untouched(detections, model_dir, tmp_path, suffix):
    src = tmp_path / f"in{suffix}"
    detections.to_parquet(src, index=False) if suffix == ".parquet" else detections.to_csv(src, index=False)
    before = src.read_bytes()
    for name in (str(src), str(tmp_path / "sub" / ".." / src.name), src.name):
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            done = classify(model_dir, "-i", str(src), "-o", name)
        finally:
            os.chdir(cwd)
        failed_cleanly(done, "is the input file")
        assert src.read_bytes() == before
    assert listing(tmp_path) == [src.name]  # no output, no rejections file, no temporary


def test_an_output_that_is_a_link_to_the_input_is_refused(detections, model_dir, tmp_path):
    src = tmp_path / "in.parquet"
    detections.to_parquet(src, index=False)
    before = src.read_bytes()
    (tmp_path / "soft.parquet").symlink_to(src)
    os.link(src, tmp_path / "hard.parquet")
    (tmp_path / "dir").symlink_to(tmp_path, target_is_directory=True)
    for out in ("soft.parquet", "hard.parquet", "dir/in.parquet"):
        failed_cleanly(classify(model_dir, "-i", str(src), "-o", str(tmp_path / out)), "is the input file")
        assert src.read_bytes() == before
    # the other way round too: the input named through a link
    failed_cleanly(classify(model_dir, "-i", str(tmp_path / "soft.parquet"), "-o", str(src)), "is the input file")
    assert src.read_bytes() == before and (tmp_path / "soft.parquet").is_symlink()


def test_an_input_named_like_the_rejections_file_is_never_removed(detections, model_dir, tmp_path):
    """Old: a run with no rejection deleted <output>.rejected.csv, here the input itself."""
    src = tmp_path / "out.rejected.csv"
    detections.to_csv(src, index=False)
    before = src.read_bytes()
    done = classify(model_dir, "-i", str(src), "-o", str(tmp_path / "out.parquet"))
    failed_cleanly(done, "rejections file", "is the input file")
    assert src.read_bytes() == before
    assert listing(tmp_path) == ["out.rejected.csv"]
    # through a link as well
    (tmp_path / "elsewhere.csv").symlink_to(src)
    failed_cleanly(classify(model_dir, "-i", str(tmp_path / "elsewhere.csv"), "-o", str(tmp_path / "out.parquet")),
                   "is the input file")
    assert src.read_bytes() == before


@pytest.mark.parametrize("name", ["out.csv", "out.json", "out.txt", "out"])
def test_an_output_named_for_another_format_is_refused(detections, model_dir, tmp_path, name):
    """Old: `-o out.csv` got Parquet bytes. The README documents Parquet output, so the name must say .parquet."""
    src = tmp_path / "in.parquet"
    detections.to_parquet(src, index=False)
    done = classify(model_dir, "-i", str(src), "-o", str(tmp_path / name))
    failed_cleanly(done, name, "Parquet", ".parquet")
    assert listing(tmp_path) == ["in.parquet"]


def test_a_parquet_output_beside_the_input_still_works(detections, model_dir, tmp_path):
    src = tmp_path / "in.csv"
    detections.to_csv(src, index=False)
    out = tmp_path / "new" / "deeper" / "in.pq"
    done = classify(model_dir, "-i", str(src), "-o", str(out))
    assert done.exit_code == 0, done.output
    assert set(pd.read_parquet(out)["oid"]) == set(detections["oid"])


# --- 3. rows without an oid ----------------------------------------------------------------------------------------

def _with_orphans(detections: pd.DataFrame, n: int, where: str) -> pd.DataFrame:
    orphans = detections.iloc[:n].copy()
    orphans["oid"] = None
    orphans["mjd"] = orphans["mjd"] + 0.123
    first = detections["oid"].iloc[0]
    if where == "start":
        at = 0
    elif where == "middle":  # between two objects
        at = int(np.flatnonzero(detections["oid"].to_numpy() != first)[0])
    elif where == "inside":  # within one object's rows
        at = 2
    else:
        at = len(detections)
    return pd.concat([detections.iloc[:at], orphans, detections.iloc[at:]], ignore_index=True)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("where", ["start", "middle", "inside", "end"])
@pytest.mark.parametrize("n", [2, 3])
def test_consecutive_rows_without_oid_are_dropped_and_named(detections, model_dir, tmp_path, fmt, where, n):
    """Old: two or more in a row crashed with "generator raised StopIteration"."""
    frame = _with_orphans(detections, n, where)
    src = tmp_path / f"in.{fmt}"
    frame.to_csv(src, index=False) if fmt == "csv" else frame.to_parquet(src, index=False)
    if fmt == "csv":
        assert src.read_text().count("\n,") == n  # really empty oid fields
    out = tmp_path / "out.parquet"
    done = classify(model_dir, "-i", str(src), "-o", str(out))
    assert done.exit_code == 0, done.output
    assert f"dropped {n} detection(s): missing object id" in done.output
    assert sorted(pd.read_parquet(out)["oid"]) == sorted(detections["oid"].unique())
    assert not out.with_suffix(".rejected.csv").exists()  # rows without an oid are no object to reject


def test_rows_without_oid_in_every_chunk_and_not_grouped(detections, model_dir, tmp_path):
    """Small read chunks (each with orphan rows) and an input not grouped by object (partitioned on disk)."""
    frame = pd.concat([_with_orphans(detections, 3, "start"), _with_orphans(detections, 2, "end").iloc[-2:]],
                      ignore_index=True)
    params = load_params(None, ["classify.batch_size=4", "classify.workers=1"])
    from deeprubin.models.served import ServingModel
    from deeprubin.schema import CLASSES

    model = ServingModel(uri="local:test", name="test", version="0", classes=tuple(CLASSES), module=served_tcn())
    for name, rows in (("grouped.csv", frame), ("shuffled.parquet", frame.sample(frac=1, random_state=0))):
        src = tmp_path / name
        rows.to_csv(src, index=False) if name.endswith(".csv") else rows.to_parquet(src, index=False)
        result = clf.run_file(params, src, tmp_path / f"{name}.out.parquet", model=model, read_rows=7)
        assert result.n_points_dropped == {"missing object id": 5}
        assert result.n_classified == detections["oid"].nunique() and result.n_rejected == 0
    assert not result.input_grouped


# --- 5. a damaged input, an output that is a directory: one line, nothing left behind -----------------------------

def _corrupt_parquet(detections: pd.DataFrame, path) -> None:
    """Snappy pages, three row groups; bytes flipped in the middle of the last row group's `band` data page."""
    detections.to_parquet(path, index=False, compression="snappy", use_dictionary=False,
                          row_group_size=len(detections) // 3 + 1)
    meta = pq.ParquetFile(path).metadata
    group = meta.row_group(meta.num_row_groups - 1)
    column = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == "band")
    data = bytearray(path.read_bytes())
    middle = column.data_page_offset + column.total_compressed_size // 2
    for i in range(middle, middle + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(OSError, match="Corrupt snappy"):  # the damage is real
        pq.read_table(path)
    assert pq.ParquetFile(path).read_row_group(0).num_rows > 0  # and the first row groups read


def test_a_corrupt_parquet_page_is_one_line_naming_the_file(detections, model_dir, tmp_path):
    src = tmp_path / "broken.parquet"
    _corrupt_parquet(detections, src)
    out = tmp_path / "new" / "out.parquet"
    line = failed_cleanly(classify(model_dir, "-i", str(src), "-o", str(out)), str(src), "Corrupt snappy")
    assert "cannot be read" in line
    assert listing(tmp_path) == ["broken.parquet"]  # no output, no temporary, not even the folder it made
    previous = tmp_path / "previous.parquet"  # an existing output stays whole
    previous.write_bytes(b"an earlier run")
    failed_cleanly(classify(model_dir, "-i", str(src), "-o", str(previous)), "Corrupt snappy")
    assert previous.read_bytes() == b"an earlier run" and listing(tmp_path) == ["broken.parquet", "previous.parquet"]


@pytest.mark.parametrize("content", [b"PAR1 not really parquet PAR1", b"", b"\x00\xff" * 100])
def test_an_unreadable_parquet_footer_or_empty_file_is_one_line(model_dir, tmp_path, content):
    src = tmp_path / "bad.parquet"
    src.write_bytes(content)
    failed_cleanly(classify(model_dir, "-i", str(src), "-o", str(tmp_path / "out.parquet")), str(src))
    assert listing(tmp_path) == ["bad.parquet"]


def test_a_csv_that_is_not_text_is_one_line(model_dir, tmp_path):
    src = tmp_path / "bad.csv"
    src.write_bytes(b"oid,mjd,band,flux,flux_err\n" + bytes(range(128, 256)) * 4)
    failed_cleanly(classify(model_dir, "-i", str(src), "-o", str(tmp_path / "out.parquet")), str(src))
    assert listing(tmp_path) == ["bad.csv"]


def test_an_output_that_is_a_directory_is_refused_before_any_work(detections, model_dir, tmp_path, monkeypatch):
    src = tmp_path / "in.parquet"
    detections.to_parquet(src, index=False)
    (tmp_path / "results").mkdir()
    (tmp_path / "results.parquet").mkdir()
    for out in ("results", "results.parquet"):
        failed_cleanly(classify(model_dir, "-i", str(src), "-o", str(tmp_path / out)), "is a directory")
    assert listing(tmp_path) == ["in.parquet", "results", "results.parquet"]
    (tmp_path / "x.rejected.csv").mkdir()  # the rejections file would be a directory
    failed_cleanly(classify(model_dir, "-i", str(src), "-o", str(tmp_path / "x.parquet")), "is a directory")

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded: the work started before the output was checked")

    monkeypatch.setattr(clf, "load_model", no_work)
    with pytest.raises(clf.OutputError, match="is a directory"):
        clf.run_file(load_params(None), src, tmp_path / "results.parquet")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(clf.OutputError, match="not a directory"):
        clf.run_file(load_params(None), src, tmp_path / "a-file" / "out.parquet")
    with pytest.raises(clf.OutputError, match="is the input file"):
        clf.run_file(load_params(None), src, src)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clf.run_file(load_params(None), tmp_path / "nope.csv", tmp_path / "o.parquet")
    with pytest.raises(ValueError, match="is not a file but a directory"):
        clf.run_file(load_params(None), tmp_path / "results.parquet", tmp_path / "o.parquet")


# --- 6. implausible magnitudes and times ---------------------------------------------------------------------------

def _magnitudes(detections: pd.DataFrame) -> pd.DataFrame:
    """The simulated curves as ALeRCE-like magnitude rows (oid, mjd, fid, magpsf, sigmapsf, isdiffpos)."""
    mag = 23.9 - 2.5 * np.log10(np.abs(detections["flux"]))
    err = 2.5 / np.log(10) * detections["flux_err"] / np.abs(detections["flux"])
    return pd.DataFrame({"oid": detections["oid"], "mjd": detections["mjd"],
                         "fid": detections["band"].map({"g": 1, "r": 2}), "magpsf": mag, "sigmapsf": err.clip(0.01),
                         "isdiffpos": np.where(detections["flux"] >= 0, "t", "f")})


def test_implausible_magnitudes_and_times_are_flagged_not_classified(detections, model_dir, tmp_path):
    rows = _magnitudes(detections)
    oids = list(rows["oid"].drop_duplicates())
    some, sentinel, bright, jd, old, future = oids[:6]
    rows.loc[rows.index[rows["oid"] == some][:3], "magpsf"] = 99.0  # 3 sentinel points: dropped, the rest kept
    rows.loc[rows["oid"] == sentinel, ["magpsf", "sigmapsf"]] = 99.0  # every point a sentinel
    rows.loc[rows["oid"] == bright, "magpsf"] = -5.0
    rows.loc[rows["oid"] == jd, "mjd"] += 2400000.5  # a JD in the mjd column
    rows.loc[rows["oid"] == old, "mjd"] -= 15000.0  # 1977
    rows.loc[rows["oid"] == future, "mjd"] += 40000.0  # 2128
    src = tmp_path / "in.csv"
    rows.to_csv(src, index=False)
    out = tmp_path / "out.parquet"
    done = classify(model_dir, "-i", str(src), "-o", str(out))
    assert done.exit_code == 0, done.output
    got = pd.read_parquet(out).set_index("oid")
    assert set(got.index) == set(oids) - {sentinel, bright, jd, old, future}
    assert got.loc[some, "n_det"] == (rows["oid"] == some).sum() - 3
    side = pd.read_csv(tmp_path / "out.rejected.csv").set_index("oid")
    assert side.loc[sentinel, "reason"] == MAG_TOO_FAINT
    assert side.loc[bright, "reason"] == MAG_TOO_BRIGHT
    assert side.loc[jd, "reason"] == TIME_LOOKS_LIKE_JD and "2400000.5" in side.loc[jd, "reason"]
    assert "as MJD" in side.loc[jd, "detail"]
    assert side.loc[old, "reason"] == side.loc[future, "reason"] == TIME_NOT_PLAUSIBLE_MJD
    text = re.sub(r"\s+", " ", done.output)
    n_sentinel = 3 + (rows["oid"] == sentinel).sum()
    assert f"dropped {n_sentinel} detection(s): {MAG_TOO_FAINT}" in text
    assert f"dropped {(rows['oid'] == jd).sum()} detection(s): {TIME_LOOKS_LIKE_JD}" in text
    assert "5 rejected objects" in text
