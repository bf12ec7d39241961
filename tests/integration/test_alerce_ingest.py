"""The ALeRCE pull with the real `alerce` client against the local ALeRCE server (tests/alerce_server.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deeprubin.config import AlerceParams, IngestParams, Params, SimulatorParams
from deeprubin.sources.simulate import simulate
from deeprubin.stages.ingest import IngestPaths, run
from deeprubin.store import RawStore
from tests.alerce_server import AlerceReplayServer, Catalogue, FaultRule

REPO = Path(__file__).resolve().parents[2]
N_PER_CLASS = 6
BELOW_THRESHOLD = 0.55


def _probability(oid: str, label: str) -> float:
    # Deterministic: one object in four is below the 0.7 threshold.
    return BELOW_THRESHOLD if int(oid[-1]) % 4 == 0 else 0.9


@pytest.fixture(scope="module")
def lightcurves():
    return simulate(SimulatorParams(n_per_class=N_PER_CLASS, survey_days=365.0), seed=11)


@pytest.fixture(scope="module")
def night(lightcurves) -> tuple[float, float]:
    """Two 'nights': the first pull sees alerts up to t1, the second up to t2."""
    mjd = lightcurves.detections["mjd"]
    return float(mjd.quantile(0.6)), float(mjd.max()) + 1.0


@pytest.fixture
def server(lightcurves, shared_data_or_none):
    catalogue = Catalogue.from_lightcurves(lightcurves, probability=_probability)
    if shared_data_or_none is not None:
        catalogue.add_recorded("ZTF20aaelulu", shared_data_or_none / "alerce" / "ZTF20aaelulu_lightcurve.json",
                               class_name="SNIa", probability=0.95)
    with AlerceReplayServer(catalogue) as srv:
        yield srv


@pytest.fixture
def shared_data_or_none():
    from tests.conftest import shared_data_dir

    path = shared_data_dir()
    return path if (path / "alerce" / "ZTF20aaelulu_lightcurve.json").exists() else None


def ingest_params(server: AlerceReplayServer, raw_dir: Path, **alerce) -> IngestParams:
    settings = dict(base_url=server.url, page_size=4, concurrency=3, requests_per_second=500.0, timeout_s=1.0,
                    max_attempts=4, backoff_base_s=0.01, backoff_max_s=0.3, commit_every=5)
    settings.update(alerce)
    return IngestParams(source="alerce", raw_dir=raw_dir, alerce=AlerceParams(**settings))


def pull(server, raw_dir: Path, **alerce):
    params = Params(ingest=ingest_params(server, raw_dir, **alerce))
    return run(params, IngestPaths.from_params(params))


def tables(raw_dir: Path) -> dict[str, pd.DataFrame]:
    lcs = RawStore(raw_dir).read()
    return {"objects": lcs.objects.drop(columns="ingested_at").sort_values("oid").reset_index(drop=True),
            "detections": lcs.detections.sort_values(["oid", "mjd", "band"]).reset_index(drop=True),
            "non_detections": lcs.non_detections.sort_values(["oid", "mjd", "band"]).reset_index(drop=True)}


def assert_same(a: Path, b: Path) -> None:
    ta, tb = tables(a), tables(b)
    for name in ta:
        pd.testing.assert_frame_equal(ta[name], tb[name], check_dtype=False, obj=name)


def expected_objects(lightcurves, until: float | None = None) -> pd.DataFrame:
    det = lightcurves.detections
    if until is not None:
        det = det[det["mjd"] <= until]
    labels = lightcurves.objects.set_index("oid")["label"]
    oids = pd.Index(det["oid"].unique())
    probability = pd.Series([_probability(o, labels[o]) for o in oids], index=oids)
    keep = probability[probability >= 0.7].index
    det = det[det["oid"].isin(keep)]
    n_det = det.groupby("oid").size()
    return det[det["oid"].isin(n_det[n_det >= IngestParams().min_detections].index)]


def test_full_pull_arrives_complete_and_correctly_mapped(server, lightcurves, tmp_path, shared_data_or_none):
    result = pull(server, tmp_path / "raw")
    got = tables(tmp_path / "raw")
    want = expected_objects(lightcurves)
    sim_oids = set(want["oid"])
    assert set(got["objects"]["oid"]) - {"ZTF20aaelulu"} == sim_oids
    # Every simulated detection arrives with the same time, band, magnitude and signed flux.
    det = got["detections"][got["detections"]["oid"].isin(sim_oids)].reset_index(drop=True)
    ref = want.sort_values(["oid", "mjd", "band"]).reset_index(drop=True)
    assert len(det) == len(ref)
    np.testing.assert_allclose(det["mjd"], ref["mjd"], rtol=0, atol=1e-6)
    assert (det["band"].to_numpy() == ref["band"].to_numpy()).all()
    np.testing.assert_allclose(det["mag"], ref["mag"], atol=1e-4)
    assert (np.sign(det["flux"]) == np.sign(ref["flux"])).all()
    np.testing.assert_allclose(det["flux"], ref["flux"], rtol=1e-3)
    objects = got["objects"].set_index("oid")
    labels = lightcurves.objects.set_index("oid")["label"]
    for oid in sim_oids:
        assert objects.loc[oid, "label"] == labels[oid]
    assert (objects["label_source"] == "alerce:lc_classifier").all()
    assert (objects["label_probability"] >= 0.7).all()
    manifest = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["source"] == "alerce"
    for name, stats in manifest["classes"].items():
        assert stats["failures"] == [], name
        assert stats["listed"] == stats["fetched"]
    if shared_data_or_none is not None:
        assert objects.loc["ZTF20aaelulu", "n_det"] == 56  # 58 rows, two exposures served twice
    assert result.complete


def test_second_pull_with_nothing_new_adds_nothing(server, tmp_path):
    pull(server, tmp_path / "raw")
    first = tables(tmp_path / "raw")
    requests_before = len(server.requests)
    result = pull(server, tmp_path / "raw")
    assert all(c["fetched"] == 0 and c["detections_added"] == 0 for c in result.per_class.values())
    assert all(c["skipped_unchanged"] == c["listed"] for c in result.per_class.values())
    routes = {r.route for r in server.requests[requests_before:]}
    assert routes == {"objects"}  # no light curve fetched again
    second = tables(tmp_path / "raw")
    for name in first:
        pd.testing.assert_frame_equal(first[name], second[name], check_dtype=False)


def test_a_later_night_adds_exactly_the_new_detections(server, lightcurves, night, tmp_path):
    t1, t2 = night
    server.set_now(t1)
    pull(server, tmp_path / "raw")
    before = tables(tmp_path / "raw")["detections"]
    want1 = expected_objects(lightcurves, until=t1)
    assert len(before[before["oid"].str.startswith("SIM")]) == len(want1)
    watermarks = RawStore(tmp_path / "raw").read_state()["watermarks"]
    assert all(w is not None and w <= t1 for w in watermarks.values())

    server.set_now(t2)
    result = pull(server, tmp_path / "raw")
    after = tables(tmp_path / "raw")["detections"]
    after_sim = after[after["oid"].str.startswith("SIM")]
    want2 = expected_objects(lightcurves, until=t2)
    assert len(after_sim) == len(want2)
    keys = ["oid", "mjd", "band"]
    added = after_sim.merge(before[keys], on=keys, how="left", indicator=True)
    added = added[added["_merge"] == "left_only"]
    assert len(added) == len(want2) - len(want1)
    assert (added["mjd"] > t1).all()
    assert sum(c["detections_added"] for c in result.per_class.values()) == len(added)
    assert not after.duplicated(keys).any()


def test_a_scarce_class_can_have_a_lower_threshold(server, lightcurves, tmp_path):
    pull(server, tmp_path / "raw", class_min_probability={"SNII": 0.5})
    objects = tables(tmp_path / "raw")["objects"]
    probabilities = objects.groupby("label")["label_probability"].min()
    assert probabilities["SNII"] == pytest.approx(BELOW_THRESHOLD)
    assert (probabilities.drop("SNII") >= 0.7).all()
    n_snii = (lightcurves.objects["label"] == "SNII").sum()
    assert (objects["label"] == "SNII").sum() == n_snii


@pytest.fixture
def reference(server, tmp_path):
    """An uninterrupted, fault-free pull to compare against."""
    pull(server, tmp_path / "reference")
    server.requests.clear()
    return tmp_path / "reference"


TRANSIENT_FAULTS = [
    FaultRule(route="lightcurve", kind="http_500", times=2),
    FaultRule(route="lightcurve", kind="http_503", times=3),
    FaultRule(route="lightcurve", kind="http_429", retry_after=0.2, times=2),
    FaultRule(route="lightcurve", kind="slow", delay=2.0, times=1),
    FaultRule(route="lightcurve", kind="truncated_json", times=2),
    FaultRule(route="lightcurve", kind="malformed_json", times=1),
    FaultRule(route="lightcurve", kind="reset", times=2),
    FaultRule(route="objects", kind="http_500", page=2, times=2),
    FaultRule(route="objects", kind="http_429", retry_after=0.1, times=1),
    FaultRule(route="objects", kind="truncated_json", page=1, times=1),
    FaultRule(route="objects", kind="slow", delay=2.0, page=1, times=1),
]


@pytest.mark.parametrize("fault", TRANSIENT_FAULTS, ids=lambda f: f"{f.route}-{f.kind}")
def test_transient_faults_are_survived_with_nothing_lost_or_duplicated(server, reference, tmp_path, fault):
    server.add_fault(fault)
    result = pull(server, tmp_path / "raw")
    assert_same(tmp_path / "raw", reference)
    assert result.complete and all(not c["failures"] for c in result.per_class.values())
    hit = [r for r in server.requests if r.fault == fault.kind]
    assert len(hit) == fault.times  # the fault fired, and the pull retried past it
    assert result.extra["retries"] >= fault.times
    if fault.kind == "http_429":
        # Retry-After is honoured: the retry came no sooner than the server asked.
        times = [r.time for r in server.requests if r.route == fault.route]
        first = next(i for i, r in enumerate(server.requests) if r.fault == "http_429")
        asked = server.requests[first]
        later = [r for r in server.requests[first + 1:]
                 if (r.route, r.oid, r.page, r.query) == (asked.route, asked.oid, asked.page, asked.query)]
        assert later and later[0].time - server.requests[first].time >= fault.retry_after * 0.9
        assert times


def test_a_vanished_object_is_a_recorded_failure_not_a_crash(server, reference, lightcurves, tmp_path):
    victim = sorted(tables(reference)["objects"]["oid"])[0]
    server.add_fault(FaultRule(route="lightcurve", kind="not_found", oid=victim, times=-1))
    result = pull(server, tmp_path / "raw")
    got, want = tables(tmp_path / "raw"), tables(reference)
    assert set(got["objects"]["oid"]) == set(want["objects"]["oid"]) - {victim}
    failures = [f for c in result.per_class.values() for f in c["failures"]]
    assert [(f["what"], f["transient"]) for f in failures] == [(victim, False)]
    assert "404" in failures[0]["reason"]
    assert len([r for r in server.requests if r.oid == victim]) == 1  # a 404 is not retried
    rest = want["detections"][want["detections"]["oid"] != victim].reset_index(drop=True)
    pd.testing.assert_frame_equal(got["detections"], rest, check_dtype=False)


def test_a_persistent_server_error_holds_the_watermark_until_it_heals(server, reference, tmp_path):
    victim = sorted(tables(reference)["objects"]["oid"])[-1]
    server.add_fault(FaultRule(route="lightcurve", kind="http_500", oid=victim, times=-1))
    result = pull(server, tmp_path / "raw", max_attempts=2)
    failures = [f for c in result.per_class.values() for f in c["failures"]]
    assert [(f["what"], f["transient"], f["attempts"]) for f in failures] == [(victim, True, 2)]
    assert victim not in set(tables(tmp_path / "raw")["objects"]["oid"])
    server.clear_faults()
    again = pull(server, tmp_path / "raw")
    assert sum(c["fetched"] for c in again.per_class.values()) == 1  # only the one that failed
    assert_same(tmp_path / "raw", reference)


@pytest.mark.parametrize("kind", ["empty_page", "repeat_page", "http_500"])
def test_a_bad_objects_page_is_recorded_and_the_rerun_completes(server, reference, tmp_path, kind):
    server.add_fault(FaultRule(route="objects", kind=kind, page=2, times=-1))
    result = pull(server, tmp_path / "raw", max_attempts=2)
    failures = [f for c in result.per_class.values() for f in c["failures"]]
    assert failures and all("page 2" in f["what"] for f in failures)
    assert not all(c["listing_complete"] for c in result.per_class.values())
    server.clear_faults()
    pull(server, tmp_path / "raw")
    assert_same(tmp_path / "raw", reference)


def test_per_class_caps_are_caught_up_on_later_pulls(server, reference, tmp_path):
    sizes = []
    for _ in range(10):
        result = pull(server, tmp_path / "raw", max_objects_per_class=2, page_size=3)
        fetched = [c["fetched"] for c in result.per_class.values()]
        assert max(fetched) <= 2
        sizes.append(sum(fetched))
        if sum(fetched) == 0:
            break
    assert sizes[0] == 8 and sizes[-1] == 0
    assert_same(tmp_path / "raw", reference)


def test_a_pull_killed_midway_and_rerun_equals_an_uninterrupted_pull(server, reference, tmp_path):
    raw = tmp_path / "raw"
    server.add_fault(FaultRule(route="lightcurve", kind="slow", delay=0.25, times=-1))
    args = [sys.executable, "-m", "deeprubin.cli", "ingest", "--source", "alerce", "--alerce-url", server.url,
            "--out", str(raw), "--set", "ingest.alerce.commit_every=3", "--set", "ingest.alerce.concurrency=1",
            "--set", "ingest.alerce.page_size=4", "--set", "ingest.alerce.timeout_s=5"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (raw / "manifest.json").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the pull finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = json.loads((raw / "manifest.json").read_text())
    assert partial["complete"] is False
    assert 0 < len(tables(raw)["objects"]) < len(tables(reference)["objects"])

    server.clear_faults()
    rerun = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert_same(raw, reference)
    assert json.loads((raw / "manifest.json").read_text())["complete"] is True
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".raw", "raw."))) == []


def test_replacing_the_store_drops_the_pull_state(server, tmp_path):
    pull(server, tmp_path / "raw")
    assert RawStore(tmp_path / "raw").read_state()["watermarks"]
    params = Params(ingest=IngestParams(source="simulator", raw_dir=tmp_path / "raw",
                                        simulator=SimulatorParams(n_per_class=2, survey_days=365.0),
                                        mix_files=False))
    run(params, IngestPaths.from_params(params))
    assert RawStore(tmp_path / "raw").read_state() == {}
    assert set(RawStore(tmp_path / "raw").read().objects["source"]) == {"simulator"}


# ---------------------------------------------------------------------------------------------------------------
# Pulls that tell the truth (issue 15 B): no object is passed by a watermark unstored, an incomplete pull says so,
# a wrong URL fails fast, a 404 is remembered.
# ---------------------------------------------------------------------------------------------------------------


def listed_in_order(server: AlerceReplayServer, class_name: str, threshold: float = 0.7) -> list[dict]:
    """The class's /objects items in lastmjd order, as the fault-free server lists them."""
    from deeprubin.sources.alerce import make_client

    client = make_client(AlerceParams(base_url=server.url))
    return client.query_objects(survey="ztf", format="json", classifier="lc_classifier", class_name=class_name,
                                probability=threshold, page_size=1000, order_by="lastmjd", order_mode="ASC")["items"]


def manifest(raw_dir: Path) -> dict:
    return json.loads((raw_dir / "manifest.json").read_text())


def test_a_failed_page_holds_the_watermark_even_when_a_later_object_fails(server, reference, tmp_path):
    items = listed_in_order(server, "SNIa")
    stored = set(tables(reference)["objects"]["oid"])
    page2, victim = items[1], next(i for i in items[2:] if i["oid"] in stored)
    raw = tmp_path / "raw"
    server.add_fault(FaultRule(route="objects", kind="http_500", page=2, class_name="SNIa", times=-1))
    server.add_fault(FaultRule(route="lightcurve", kind="http_500", oid=victim["oid"], times=-1))
    first = pull(server, raw, page_size=1, max_attempts=1, overlap_days=0.0)
    assert not first.complete
    watermark = RawStore(raw).read_state()["watermarks"]["SNIa"]
    assert watermark is None or watermark <= page2["lastmjd"]  # never past the object of the failed page
    server.clear_faults()
    again = pull(server, raw, page_size=1, overlap_days=0.0)
    assert again.complete
    assert_same(raw, reference)


def test_a_server_that_ignores_the_order_never_moves_the_watermark_past_unlisted_objects(server, reference,
                                                                                       tmp_path):
    raw = tmp_path / "raw"
    # The first rule that matches applies: page 2 fails, every other page comes out of lastmjd order.
    server.add_fault(FaultRule(route="objects", kind="http_500", page=2, times=-1))
    server.add_fault(FaultRule(route="objects", kind="unsorted", times=-1))
    first = pull(server, raw, page_size=1, max_attempts=1, overlap_days=0.0)
    assert not first.complete
    assert any(r.fault == "unsorted" for r in server.requests)
    server.clear_faults()
    server.add_fault(FaultRule(route="objects", kind="unsorted", times=-1))  # still out of order, now complete
    again = pull(server, raw, page_size=1, overlap_days=0.0)
    assert again.complete
    assert_same(raw, reference)


def test_a_high_fault_rate_loses_nothing_and_every_short_pull_says_so(server, reference, tmp_path):
    from tests.alerce_server import RandomFaults

    raw = tmp_path / "raw"
    want = set(tables(reference)["objects"]["oid"])
    server.set_random_faults(RandomFaults(rate=0.7, seed=3))
    settings = dict(page_size=2, max_attempts=2, concurrency=1, overlap_days=0.0)
    for _ in range(3):  # a pull and two reruns, all at 70 % faults
        result = pull(server, raw, **settings)
        got = set(tables(raw)["objects"]["oid"]) if (raw / "objects.parquet").exists() else set()
        if got != want:
            assert not result.complete and not manifest(raw)["complete"]
            assert manifest(raw)["missing"]
    server.clear_faults()
    final = pull(server, raw, **settings)
    assert final.complete and manifest(raw)["complete"] is True and not manifest(raw)["missing"]
    assert_same(raw, reference)


def test_an_object_that_keeps_failing_makes_the_pull_incomplete_and_is_named(server, reference, tmp_path):
    victim = sorted(tables(reference)["objects"]["oid"])[-1]
    server.add_fault(FaultRule(route="lightcurve", kind="http_500", oid=victim, times=-1))
    result = pull(server, tmp_path / "raw", max_attempts=2)
    assert not result.complete
    written = manifest(tmp_path / "raw")
    assert written["complete"] is False
    assert [m["what"] for m in written["missing"]] == [victim]
    server.clear_faults()
    assert pull(server, tmp_path / "raw").complete and manifest(tmp_path / "raw")["missing"] == []


def test_a_page_that_keeps_failing_is_named_as_missing(server, tmp_path):
    server.add_fault(FaultRule(route="objects", kind="http_500", page=2, class_name="QSO", times=-1))
    result = pull(server, tmp_path / "raw", max_attempts=2)
    assert not result.complete
    missing = manifest(tmp_path / "raw")["missing"]
    assert [m["what"] for m in missing] == ["objects page 2 of QSO"]
    assert "HTTP 500" in missing[0]["reason"]


@pytest.mark.timeout(120)
def test_a_server_failing_every_page_stops_each_listing_after_a_run_of_failed_pages_and_exits_3(server, tmp_path):
    from deeprubin.sources.alerce import MAX_CONSECUTIVE_FAILED_PAGES as RUN
    from tests.integration.test_ingest_cli import ALERCE_FAST, deeprubin

    classes = Params().base.classes
    server.add_fault(FaultRule(route="objects", kind="http_500", times=-1))
    out = tmp_path / "raw"
    proc = deeprubin("ingest", "--source", "alerce", "--alerce-url", server.url, "--out", str(out), *ALERCE_FAST,
                     "--set", "ingest.alerce.page_size=4", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "incomplete" in proc.stderr
    asked = server.requests_for("objects")
    for c in classes:
        pages = sorted({r.page for r in asked if r.query.get("class") == [c]})
        assert pages == list(range(1, RUN + 1)), (c, pages)  # not max_pages (here 135) pages of 500s
    assert len(asked) == len(classes) * RUN * 2  # each failed page was retried (max_attempts=2), then no more
    written = manifest(out)
    assert written["complete"] is False
    for c in classes:
        what = [m["what"] for m in written["missing"] if m["class"] == c]
        assert what == [f"objects page {p} of {c}" for p in range(1, RUN + 1)] + [f"objects of {c} after page {RUN}"]
        rest = next(m for m in written["missing"] if m["what"] == f"objects of {c} after page {RUN}")
        assert rest["transient"] is True and f"{RUN} consecutive failed pages" in rest["reason"]
    # The server heals: the rerun lists every class from where it was (no watermark moved) and completes.
    server.clear_faults()
    rerun = deeprubin("ingest", "--source", "alerce", "--alerce-url", server.url, "--out", str(out), *ALERCE_FAST,
                      "--set", "ingest.alerce.page_size=4", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert manifest(out)["complete"] is True and manifest(out)["missing"] == []


def test_a_failed_page_between_good_ones_does_not_stop_the_listing(server, reference, tmp_path):
    from deeprubin.sources.alerce import MAX_CONSECUTIVE_FAILED_PAGES as RUN

    # RUN - 1 failed pages in a row, then good pages: the listing goes on past them (only a run of RUN stops it).
    for page in range(2, RUN + 1):
        server.add_fault(FaultRule(route="objects", kind="http_500", page=page, class_name="QSO", times=-1))
    result = pull(server, tmp_path / "raw", max_attempts=1, page_size=1)
    missing = manifest(tmp_path / "raw")["missing"]
    assert [m["what"] for m in missing] == [f"objects page {p} of QSO" for p in range(2, RUN + 1)]
    assert not result.complete
    qso_pages = {r.page for r in server.requests_for("objects") if r.query.get("class") == ["QSO"]}
    assert max(qso_pages) > RUN + 1
    server.clear_faults()
    pull(server, tmp_path / "raw")
    assert_same(tmp_path / "raw", reference)


@pytest.mark.timeout(60)  # retrying the connection page after page took minutes
def test_nothing_listening_fails_within_seconds_naming_the_url(tmp_path):
    from deeprubin.sources.alerce import ApiUnreachable
    from tests.alerce_server import unused_url

    url = unused_url()
    params = Params(ingest=IngestParams(source="alerce", raw_dir=tmp_path / "raw",
                                        alerce=AlerceParams(base_url=url, max_attempts=5, backoff_base_s=0.5)))
    started = time.monotonic()
    with pytest.raises(ApiUnreachable, match=url.replace(".", r"\.")):
        run(params, IngestPaths.from_params(params))
    assert time.monotonic() - started < 5
    assert not (tmp_path / "raw" / "manifest.json").exists()  # nothing committed


def test_a_wrong_path_stops_each_listing_at_its_first_page_and_fails(server, tmp_path):
    from deeprubin.sources.alerce import ApiRefused

    url = f"{server.url}/no-such-api"
    with pytest.raises(ApiRefused, match="no-such-api") as err:
        pull(server, tmp_path / "raw", base_url=url)
    assert "HTTP 404" in str(err.value)
    assert len(server.requests) <= len(Params().base.classes)  # one refused first page per class, no retries
    assert not (tmp_path / "raw" / "manifest.json").exists()


def test_a_404_object_is_remembered_until_it_changes(server, lightcurves, night, tmp_path):
    t1, t2 = night
    server.set_now(t1)
    det = lightcurves.detections
    spans = det.groupby("oid")["mjd"].agg(["min", "max"])
    moving = spans[(spans["min"] <= t1) & (spans["max"] > t1)].index
    listed = {i["oid"] for c in Params().base.classes for i in listed_in_order(server, c)}
    victim = sorted(set(moving) & listed)[0]
    server.add_fault(FaultRule(route="lightcurve", kind="not_found", oid=victim, times=-1))
    raw = tmp_path / "raw"
    window = 400.0  # every object stays inside the overlap window, so every pull lists the victim again
    first = pull(server, raw, overlap_days=window)
    assert first.complete  # a vanished object is reported, but a rerun could not fetch it either
    assert len(server.requests_for("lightcurve", victim)) == 1
    again = pull(server, raw, overlap_days=window)
    assert len(server.requests_for("lightcurve", victim)) == 1  # not asked again while unchanged
    assert sum(c["skipped_unavailable"] for c in again.per_class.values()) == 1
    server.clear_faults()
    server.set_now(t2)  # new detections move its lastmjd: it is tried again, and now arrives
    pull(server, raw, overlap_days=window)
    assert len(server.requests_for("lightcurve", victim)) == 2
    assert victim in set(tables(raw)["objects"]["oid"])
