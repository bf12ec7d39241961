"""End-to-end: the real `deeprubin ingest` command, in a subprocess, on the simulator and on real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from deeprubin.schema import DETECTIONS_SCHEMA, NON_DETECTIONS_SCHEMA, OBJECTS_SCHEMA

REPO = Path(__file__).resolve().parents[2]


def deeprubin(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deeprubin.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={"PATH": str(Path(sys.executable).parent), "HOME": str(cwd),
                                            "COLUMNS": "200", "DO_NOT_TRACK": "1"})


def read_raw(out: Path) -> dict[str, pd.DataFrame]:
    schemas = {"objects": OBJECTS_SCHEMA, "detections": DETECTIONS_SCHEMA, "non_detections": NON_DETECTIONS_SCHEMA}
    tables = {}
    for name, schema in schemas.items():
        table = pq.read_table(out / f"{name}.parquet")
        assert table.schema.equals(schema, check_metadata=False), name
        tables[name] = table.to_pandas()
    return tables


def test_ingest_simulator_end_to_end(tmp_path):
    out = tmp_path / "raw"
    proc = deeprubin("ingest", "--n-per-class", "12", "--out", str(out), "--set", "ingest.mix_files=false")
    assert proc.returncode == 0, proc.stderr
    assert "summary" in proc.stdout and "SNII" in proc.stdout
    tables = read_raw(out)
    counts = tables["objects"]["label"].value_counts().to_dict()
    assert set(counts) == {"QSO", "CEP", "SNIa", "SNII"}
    dropped = json.loads((out / "manifest.json").read_text())["objects_dropped_by_reason"]
    assert sum(counts.values()) + sum(dropped.values()) == 48
    assert min(counts.values()) >= 9  # the simulator makes objects alerts would have caught
    det = tables["detections"]
    assert not det.duplicated(["oid", "mjd", "band"]).any()
    assert set(det["oid"]) == set(tables["objects"]["oid"])
    assert (tables["objects"].set_index("oid")["n_det"] == det.groupby("oid").size()).all()

    # Deterministic: a rerun writes the same bytes (what `dvc repro` relies on).
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert deeprubin("ingest", "--n-per-class", "12", "--out", str(out), "--set",
                     "ingest.mix_files=false").returncode == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_default_ingest_mixes_the_embedded_bts_supernovae(tmp_path):
    """params.yaml: the simulator plus the BTS supernovae shipped in data/bts (spectroscopic labels, target classes
    only), reproducibly."""
    out = tmp_path / "raw"
    assert deeprubin("ingest", "--n-per-class", "5", "--out", str(out)).returncode == 0
    objects = read_raw(out)["objects"]
    sources = objects.groupby("label_source")["label"].value_counts().to_dict()
    labels = pd.read_csv(REPO / "data" / "bts" / "labels.csv")
    real = labels[labels["label"].isin(["SNIa", "SNII"])]
    assert sources[("bts:spectroscopic", "SNII")] >= 0.95 * (real["label"] == "SNII").sum()
    assert sources[("bts:spectroscopic", "SNIa")] >= 0.95 * (real["label"] == "SNIa").sum()
    assert {c for (s, c) in sources if s == "bts:spectroscopic"} == {"SNIa", "SNII"}
    assert {c for (s, c) in sources if s == "simulated"} == {"QSO", "CEP", "SNIa", "SNII"}
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert deeprubin("ingest", "--n-per-class", "5", "--out", str(out)).returncode == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_ingest_bts_files(tmp_path, shared_data):
    out = tmp_path / "bts"
    proc = deeprubin("ingest", "--source", "files", "--detections", str(shared_data / "bts" / "detections.parquet"),
                     "--labels", str(shared_data / "bts" / "labels.csv"), "--label-source", "bts:spectroscopic",
                     "--out", str(out), "--mode", "upsert")
    assert proc.returncode == 0, proc.stderr
    tables = read_raw(out)
    labels = pd.read_csv(shared_data / "bts" / "labels.csv")
    objects = tables["objects"]
    assert set(objects["label"]) == {"SNIa", "SNII"}
    assert (objects["label_source"] == "bts:spectroscopic").all()
    n_target = labels["label"].isin(["SNIa", "SNII"]).sum()
    rejections = pd.read_csv(out / "rejections.csv")
    too_few = rejections[rejections["reason"].str.startswith("fewer than")]
    assert len(objects) + len(too_few) == n_target
    # Nothing silent: every detection row is kept or named in rejections.csv.
    raw = pd.read_parquet(shared_data / "bts" / "detections.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    det_report = manifest["validation"][0]
    assert det_report["rows_in"] == len(raw)
    assert det_report["rows_in"] - det_report["rows_out"] == rejections.query("table == 'detections'")["rows"].sum()

    # A rerun in upsert mode duplicates nothing.
    before = tables["detections"]
    assert deeprubin("ingest", "--source", "files", "--detections", str(shared_data / "bts" / "detections.parquet"),
                     "--labels", str(shared_data / "bts" / "labels.csv"), "--out", str(out),
                     "--mode", "upsert").returncode == 0
    after = read_raw(out)["detections"]
    assert len(after) == len(before) and not after.duplicated(["oid", "mjd", "band"]).any()
    assert json.loads((out / "manifest.json").read_text())["upsert"]["detections_added"] == 0


def test_bad_rows_are_dropped_and_named_not_fatal(tmp_path):
    csv = tmp_path / "alerts.csv"
    csv.write_text("objectId,mjd,fid,magpsf,sigmapsf,isdiffpos\n"
                   + "".join(f"ZTFgood,{59000 + i},1,18.{i},0.1,t\n" for i in range(4))
                   + "ZTFbad,59000,1,nan,0.1,t\nZTFbad,59001,1,18,-0.1,t\nZTFbad,59002,5,18,0.1,t\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("oid,classALeRCE\nZTFgood,Ceph\nZTFbad,QSO\n")
    out = tmp_path / "raw"
    proc = deeprubin("ingest", "--source", "files", "--detections", str(csv), "--labels", str(labels),
                     "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    objects = read_raw(out)["objects"]
    assert objects["oid"].tolist() == ["ZTFgood"] and objects["label"].tolist() == ["CEP"]
    rejections = pd.read_csv(out / "rejections.csv")
    assert set(rejections["oid"]) == {"ZTFbad"}
    assert {"mag is NaN", "mag_err is not positive", "band not in ['g', 'r']"} <= set(rejections["reason"])
    assert "ZTFbad" in proc.stdout


def test_clear_errors_for_unusable_input(tmp_path):
    proc = deeprubin("ingest", "--source", "files", "--detections", str(tmp_path / "missing.parquet"),
                     "--out", str(tmp_path / "raw"))
    assert proc.returncode == 1 and "missing.parquet does not exist" in proc.stderr
    csv = tmp_path / "nobands.csv"
    csv.write_text("oid,mjd,magpsf,sigmapsf\nA,1,18,0.1\n")
    proc = deeprubin("ingest", "--source", "files", "--detections", str(csv), "--out", str(tmp_path / "raw"))
    assert proc.returncode == 1 and "no band column" in proc.stderr
    assert not (tmp_path / "raw").exists()
    proc = deeprubin("ingest", "--set", "ingest.simulator.n_per_clas=3", "--out", str(tmp_path / "raw"))
    assert proc.returncode == 2 and "ingest.simulator.n_per_clas: unknown key" in proc.stderr


def test_help_is_complete():
    top = deeprubin("--help")
    assert top.returncode == 0 and "ingest" in top.stdout and "config" in top.stdout
    sub = deeprubin("ingest", "--help")
    for option in ("--source", "--detections", "--labels", "--n-per-class", "--out", "--mode", "--set", "--params"):
        assert option in sub.stdout, option
    assert deeprubin("config", "show", "ingest").stdout.startswith("source: simulator")


# ---------------------------------------------------------------------------------------------------------------
# ALeRCE pulls: the exit status tells a complete pull (0) from an incomplete one (3) and a failed one (1).
# ---------------------------------------------------------------------------------------------------------------

ALERCE_FAST = ["--set", "ingest.alerce.backoff_base_s=0.01", "--set", "ingest.alerce.backoff_max_s=0.1",
               "--set", "ingest.alerce.max_attempts=2", "--set", "ingest.alerce.requests_per_second=500"]


def _alerce_server():
    from deeprubin.config import SimulatorParams
    from deeprubin.sources.simulate import simulate
    from tests.alerce_server import AlerceReplayServer, Catalogue

    lcs = simulate(SimulatorParams(n_per_class=3, survey_days=365.0), seed=5)
    return AlerceReplayServer(Catalogue.from_lightcurves(lcs, probability=lambda oid, label: 0.9))


def test_an_incomplete_alerce_pull_exits_3_and_names_what_is_missing(tmp_path):
    from tests.alerce_server import FaultRule

    out = tmp_path / "raw"
    with _alerce_server() as server:
        victim = server.catalogue.oids[0]
        server.add_fault(FaultRule(route="lightcurve", kind="http_500", oid=victim, times=-1))
        proc = deeprubin("ingest", "--source", "alerce", "--alerce-url", server.url, "--out", str(out),
                         *ALERCE_FAST, cwd=tmp_path)
        assert proc.returncode == 3, proc.stderr
        assert "incomplete" in proc.stderr and victim in proc.stderr
        assert "(incomplete)" in proc.stdout  # the summary's title
        written = json.loads((out / "manifest.json").read_text())
        assert written["complete"] is False and [m["what"] for m in written["missing"]] == [victim]
        server.clear_faults()
        rerun = deeprubin("ingest", "--source", "alerce", "--alerce-url", server.url, "--out", str(out),
                          *ALERCE_FAST, cwd=tmp_path)
        assert rerun.returncode == 0, rerun.stderr
        assert json.loads((out / "manifest.json").read_text())["complete"] is True


def test_an_alerce_url_with_nothing_listening_fails_in_seconds_with_one_line(tmp_path):
    import time

    from tests.alerce_server import unused_url

    url = unused_url()
    started = time.monotonic()
    # The default retry settings (5 attempts, backoff from 0.5 s): connecting must not be retried for minutes.
    proc = deeprubin("ingest", "--source", "alerce", "--alerce-url", url, "--out", str(tmp_path / "raw"),
                     cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and url in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert elapsed < 30  # mostly interpreter start-up; the pull itself gives up at the first refused connection
    assert not (tmp_path / "raw" / "manifest.json").exists()


def test_an_alerce_url_that_answers_404_fails_with_one_line(tmp_path):
    with _alerce_server() as server:
        url = f"{server.url}/no-such-api"
        proc = deeprubin("ingest", "--source", "alerce", "--alerce-url", url, "--out", str(tmp_path / "raw"),
                         *ALERCE_FAST, cwd=tmp_path, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert url in proc.stderr and "HTTP 404" in proc.stderr
        assert len(server.requests) <= 4
