"""Reading the raw store changes nothing, and its crash recovery touches only what the store made (issue 16); `plot`
writes only where it was asked to: a default name from the oid stays in the current directory, a directory for
--out is one clear line.

Real stores on disk, the real `deeprubin plot` (typer's CliRunner)."""

from __future__ import annotations

import os

import pandas as pd
import pytest
from typer.testing import CliRunner

from deeprubin.cli import app
from deeprubin.cli.inspection import safe_file_stem
from deeprubin.config import load_params
from deeprubin.schema import NON_DETECTIONS_SCHEMA, LightCurves, build_objects, empty_frame
from deeprubin.sources import simulate
from deeprubin.store import MARKER, RawStore
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def curves() -> LightCurves:
    sim = simulate.simulate(load_params(None).ingest.simulator.model_copy(update={"n_per_class": 1}), seed=2)
    return sim


def _lcs(detections: pd.DataFrame) -> LightCurves:
    objects = build_objects(detections, None, source="test", label_source=None)
    return LightCurves(objects, detections, empty_frame(NON_DETECTIONS_SCHEMA))


def _user_folders(parent, name: str = "raw") -> dict:
    """Folders a user keeps beside the store, named like the old code's temporaries, with a file each."""
    made = {}
    for folder in (f"{name}.old", f".{name}.tmp-foo", f".{name}.deeprubin-commit-mine",
                   f".{name}.deeprubin-previous-mine"):
        (parent / folder).mkdir()
        (parent / folder / "notes.txt").write_text(f"my {folder}")
        made[folder] = f"my {folder}"
    return made


def _intact(parent, made: dict) -> None:
    for folder, text in made.items():
        assert (parent / folder / "notes.txt").read_text() == text, folder


def plot(*args: str, cwd=None):
    here = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(app, ["plot", *args, "--params", str(REPO / "params.yaml")])
    finally:
        os.chdir(here)


def test_reading_and_plotting_never_remove_a_users_folders(curves, tmp_path):
    """Old: `deeprubin plot` (any read) removed <raw>.old and .<raw>.tmp-* beside the store."""
    raw = tmp_path / "raw"
    store = RawStore(raw)
    store.commit(curves, {"night": 1})
    made = _user_folders(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert store.exists() and len(store.read().detections) == len(curves.detections)
    assert store.read_manifest() == {"night": 1} and store.read_state() == {}
    oid = str(curves.objects["oid"].iloc[0])
    done = plot(oid, "--raw", str(raw), "--out", str(tmp_path / "plots" / "one.png"))
    assert done.exit_code == 0, done.output
    assert (tmp_path / "plots" / "one.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "plots"])
    _intact(tmp_path, made)


def test_writing_never_removes_a_users_folders_either(curves, tmp_path):
    raw = tmp_path / "raw"
    made = _user_folders(tmp_path)
    store = RawStore(raw)
    store.commit(curves, {"night": 1})
    store.commit(curves, {"night": 2})
    assert store.read_manifest() == {"night": 2}
    _intact(tmp_path, made)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["raw", *made])
    assert not (raw / MARKER).exists()  # the store itself carries no marker once a commit is done


def test_an_interrupted_commit_is_still_recovered_by_the_next_writer(curves, tmp_path):
    raw = tmp_path / "raw"
    store = RawStore(raw)
    store.commit(curves, {"night": 1})
    made = _user_folders(tmp_path)
    half = store._make_commit_dir()  # a commit that died while writing its new state
    (half / "detections.parquet").write_bytes(b"half written")
    assert (half / MARKER).is_file() and half.name.startswith(".raw.deeprubin-commit-")
    assert store.read_manifest() == {"night": 1} and half.exists()  # a read leaves it
    store.commit(curves, {"night": 2})
    assert not half.exists() and store.read_manifest() == {"night": 2}
    _intact(tmp_path, made)

    # a commit that died between its two renames: the previous state set aside, the store gone
    (raw / MARKER).write_text("{}")
    previous = store._previous_name()
    raw.rename(previous)
    assert store.exists() and store.read_manifest() == {"night": 2}  # a read finds it where it was set aside
    assert previous.exists() and not raw.exists()  # and moves nothing
    store.commit(_lcs(curves.detections.iloc[:10]), {"night": 3})  # the next writer restores, then commits
    assert not previous.exists() and store.read_manifest() == {"night": 3}
    assert len(store.read().detections) == 10
    _intact(tmp_path, made)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["raw", *made])


def test_a_failed_swap_puts_the_previous_state_back(curves, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    store = RawStore(raw)
    store.commit(curves, {"night": 1})
    made = _user_folders(tmp_path)
    real_rename = type(raw).rename

    def failing(self, target):
        if self.name.startswith(".raw.deeprubin-commit-"):
            raise OSError("disk gone")
        return real_rename(self, target)

    monkeypatch.setattr(type(raw), "rename", failing)
    with pytest.raises(OSError, match="disk gone"):
        store.commit(curves, {"night": 2})
    monkeypatch.undo()
    assert store.read_manifest() == {"night": 1} and not (raw / MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["raw", *made])


# --- plot: where it writes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("oid", ["../x", "/abs/x", "a/b", "..", ".", ".hidden", "-rf", "a" * 300, "ZTF21/../../etc"])
def test_a_default_plot_name_is_a_safe_slug_of_the_oid(oid):
    stem = safe_file_stem(oid)
    assert "/" not in stem and "\\" not in stem and not stem.startswith((".", "-")) and stem
    assert len(stem) <= 100
    assert stem != oid  # changed, so it carries a hash: two oids never share a file
    assert safe_file_stem(oid) == stem and safe_file_stem(oid + "y") != stem


def test_a_plain_oid_keeps_its_own_name():
    assert safe_file_stem("ZTF21abcdefg") == "ZTF21abcdefg" and safe_file_stem("SIM00a0000012") == "SIM00a0000012"
    assert safe_file_stem("a/b") != safe_file_stem("a_b")


@pytest.mark.parametrize("oid", ["../x", "/abs/x", "a/b", ".."])
def test_plot_without_out_writes_inside_the_current_directory(curves, tmp_path, oid):
    """Old: the oid was the path: `../x` wrote beside the working directory, `/abs/x` anywhere."""
    det = curves.detections.loc[curves.detections["oid"] == curves.detections["oid"].iloc[0]].assign(oid=oid)
    raw = tmp_path / "store" / "raw"
    RawStore(raw).commit(_lcs(det), {"night": 1})
    work = tmp_path / "work"
    work.mkdir()
    outside = sorted(p.name for p in tmp_path.iterdir())
    done = plot(oid, "--raw", str(raw), cwd=work)
    assert done.exit_code == 0, done.output
    written = list(work.iterdir())
    assert [p.name for p in written] == [f"{safe_file_stem(oid)}.png"]
    assert written[0].read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == outside
    assert not os.path.exists("/abs/x.png")


def test_plot_out_naming_a_directory_is_one_line(curves, tmp_path):
    raw = tmp_path / "raw"
    RawStore(raw).commit(curves, {"night": 1})
    oid = str(curves.objects["oid"].iloc[0])
    (tmp_path / "figs").mkdir()
    done = plot(oid, "--raw", str(raw), "--out", str(tmp_path / "figs"))
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit), (done.output, done.exception)
    lines = [line for line in done.output.splitlines() if "plot failed" in line]
    assert len(lines) == 1 and "is a directory" in lines[0] and str(tmp_path / "figs") in lines[0]
    assert "Traceback" not in done.output
    assert list((tmp_path / "figs").iterdir()) == []
    (tmp_path / "a-file").write_text("x")  # a parent that is a file
    done = plot(oid, "--raw", str(raw), "--out", str(tmp_path / "a-file" / "one.png"))
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit), (done.output, done.exception)
    assert "cannot write" in done.output and (tmp_path / "a-file").read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written PNG left


def test_a_commit_in_progress_in_another_live_process_is_left_alone(curves, tmp_path):
    import json
    import socket
    import subprocess
    import sys

    store = RawStore(tmp_path / "raw")
    store.commit(curves, {"night": 1})
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = store._make_commit_dir()
        (busy / MARKER).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        store.commit(curves, {"night": 2})
        assert busy.exists()  # another writer's work in progress
    finally:
        live.kill()
        live.wait()
    store.commit(curves, {"night": 3})
    assert not busy.exists()  # its writer is gone: an interrupted commit
