"""The BTS pull, with its real download and parsing code against a local BTS explorer (tests/bts_server.py) and
the real `alerce` client against the local ALeRCE server serving the same objects' real light curves."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from deeprubin.config import AlerceParams, BtsParams, IngestParams, Params
from deeprubin.schema import SPECTROSCOPIC
from deeprubin.sources.bts import BtsFormatError, CatalogueRefused, CatalogueUnavailable, label_changes_since, \
    read_types
from deeprubin.stages.ingest import IngestPaths, run
from deeprubin.store import RawStore
from tests.alerce_server import AlerceReplayServer, Catalogue, FaultRule
from tests.bts_server import BtsFault, BtsServer, catalogue_rows, lightcurves, shared_labels

PER_TYPE = {"SN Ia": 4, "SN Ia-91T": 1, "SN II": 2, "SN IIP": 1, "SN Ic": 1, "TDE": 1, "SN IIn": 1}
UNTYPED = "ZTF21aaaaaaa"


@pytest.fixture(scope="module")
def chosen() -> pd.DataFrame:
    labels = shared_labels()
    labels = labels.loc[labels["n_obs"] >= 10]
    parts = [labels.loc[labels["bts_type"] == t].sort_values("oid").head(n) for t, n in PER_TYPE.items()]
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def contested(chosen) -> str:
    """An SN Ia (spectroscopically) that ALeRCE's classifier lists as SNII with p = 0.9."""
    return str(chosen.loc[chosen["bts_type"] == "SN Ia", "oid"].iloc[0])


@pytest.fixture
def alerce(chosen, contested):
    oids = list(chosen["oid"])
    lcs = lightcurves(oids, alerce_class={contested: "SNII"})
    # Only the contested object is listed by the classifier (p >= 0.7); the rest serve their light curves only.
    catalogue = Catalogue.from_lightcurves(lcs, probability=lambda oid, label: 0.9 if oid == contested else 0.3)
    with AlerceReplayServer(catalogue) as srv:
        yield srv


@pytest.fixture
def bts(chosen):
    with BtsServer(catalogue_rows(chosen, untyped=[UNTYPED])) as srv:
        yield srv


def params(alerce, bts, raw_dir: Path, source: str = "bts", **bts_settings) -> Params:
    fast = dict(base_url=alerce.url, page_size=4, concurrency=3, requests_per_second=500.0, timeout_s=1.0,
                max_attempts=4, backoff_base_s=0.01, backoff_max_s=0.2, commit_every=4)
    settings = dict(url=bts.url, timeout_s=1.0, max_attempts=4)
    settings.update(bts_settings)
    return Params(ingest=IngestParams(source=source, raw_dir=raw_dir, alerce=AlerceParams(**fast),
                                      bts=BtsParams(**settings)))


def pull(alerce, bts, raw_dir: Path, source: str = "bts", **bts_settings):
    p = params(alerce, bts, raw_dir, source, **bts_settings)
    return run(p, IngestPaths.from_params(p))


def tables(raw_dir: Path) -> dict[str, pd.DataFrame]:
    lcs = RawStore(raw_dir).read()
    return {"objects": lcs.objects.drop(columns="ingested_at").sort_values("oid").reset_index(drop=True),
            "detections": lcs.detections.sort_values(["oid", "mjd", "band"]).reset_index(drop=True),
            "non_detections": lcs.non_detections.sort_values(["oid", "mjd", "band"]).reset_index(drop=True)}


def assert_same(a: Path, b: Path) -> None:
    ta, tb = tables(a), tables(b)
    for name in ta:
        pd.testing.assert_frame_equal(ta[name], tb[name], check_dtype=False, obj=name)


@pytest.fixture
def reference(alerce, bts, chosen, tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("reference") / "raw"
    result = pull(alerce, bts, raw)
    assert result.complete, result.missing
    alerce.clear_requests()
    bts.requests.clear()
    return raw


def test_a_pull_stores_spectroscopic_labels_and_keeps_other_types_outside_the_classes(alerce, bts, chosen, tmp_path):
    raw = tmp_path / "raw"
    result = pull(alerce, bts, raw)
    assert result.complete and result.missing == []
    objects = tables(raw)["objects"].set_index("oid")
    assert set(objects.index) == set(chosen["oid"]) and UNTYPED not in objects.index
    assert (objects["label_source"] == SPECTROSCOPIC).all()
    want = dict(zip(chosen["oid"], chosen["label"]))
    assert objects["label"].to_dict() == want  # SN Ia-91T -> SNIa, IIP -> SNII, Ic -> SNIbc, TDE -> other
    assert read_types(raw) == dict(zip(chosen["oid"], chosen["bts_type"]))  # the exact type is kept
    assert result.per_class["SNIa"]["listed"] == 5 and result.per_class["SNII"]["new"] == 3
    assert result.extra["untyped"] == 1 and result.extra["label_changes"] == 0
    # The light curves are the real BTS detections, as the ALeRCE server serves them.
    assert len(tables(raw)["detections"]) == sum(len(alerce.catalogue.detections(o)) for o in chosen["oid"])
    (query,) = [q for _, q, _, _ in bts.requests]
    assert query["format"] == ["csv"] and query["f"] == ["s"]


def test_a_rerun_fetches_nothing_and_duplicates_nothing(alerce, bts, reference, tmp_path):
    before = tables(reference)
    result = pull(alerce, bts, reference)
    assert result.complete and result.extra["unchanged"] == len(before["objects"])
    assert alerce.requests_for("lightcurve") == []
    after = tables(reference)
    for name in before:
        pd.testing.assert_frame_equal(before[name], after[name], obj=name)
    assert not after["detections"].duplicated(["oid", "mjd", "band"]).any()


def test_a_retyped_object_updates_its_label_and_counts_as_a_change(alerce, bts, chosen, reference):
    oid = str(chosen.loc[chosen["bts_type"] == "SN II", "oid"].iloc[0])
    since = pd.Timestamp.now(tz="UTC")
    bts.set_type(oid, "SN IIb")
    result = pull(alerce, bts, reference)
    assert result.complete and result.extra["retyped"] == 1 and result.extra["changed_labels"] == [oid]
    assert [r.oid for r in alerce.requests_for("lightcurve")] == [oid]  # only the re-typed object is fetched
    objects = tables(reference)["objects"].set_index("oid")
    assert objects.loc[oid, "label"] == "SNIIb" and objects.loc[oid, "label_source"] == SPECTROSCOPIC
    assert read_types(reference)[oid] == "SN IIb"
    assert label_changes_since(reference, since) == 1
    assert len(objects) == len(chosen)  # updated in place, not duplicated


@pytest.mark.parametrize("kind", ["http_500", "http_503", "http_429", "truncated", "cut", "slow"])
def test_faults_on_the_catalogue_download_are_retried(alerce, bts, reference, tmp_path, kind):
    bts.add_fault(BtsFault(kind, times=2, delay=1.5))
    result = pull(alerce, bts, tmp_path / "raw")
    assert result.complete
    assert [f for _, _, _, f in bts.requests] == [kind, kind, None]
    assert_same(reference, tmp_path / "raw")


def test_a_download_that_keeps_failing_changes_nothing(alerce, bts, reference):
    before = tables(reference)
    bts.add_fault(BtsFault("http_500", times=-1))
    with pytest.raises(CatalogueUnavailable, match=r"HTTP 500.*nothing was changed"):
        pull(alerce, bts, reference)
    bts.add_fault(BtsFault("not_found", times=1))
    for name, frame in tables(reference).items():
        pd.testing.assert_frame_equal(before[name], frame, obj=name)


def test_a_wrong_url_or_a_page_that_is_not_the_catalogue_is_a_clear_error(alerce, bts, tmp_path):
    with pytest.raises(CatalogueRefused, match="HTTP 404.*ingest.bts.url"):
        pull(alerce, bts, tmp_path / "raw", url=bts.url.replace("explorer", "nowhere"))
    bts.add_fault(BtsFault("html", times=1))
    with pytest.raises(BtsFormatError, match="HTML"):
        pull(alerce, bts, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_a_light_curve_that_fails_is_named_and_the_rerun_finishes(alerce, bts, chosen, reference, tmp_path):
    victim, gone = str(chosen["oid"].iloc[1]), str(chosen["oid"].iloc[2])
    alerce.add_fault(FaultRule(route="lightcurve", kind="http_500", oid=victim, times=-1))
    alerce.add_fault(FaultRule(route="lightcurve", kind="not_found", oid=gone, times=-1))
    raw = tmp_path / "raw"
    first = pull(alerce, bts, raw)
    assert not first.complete and [m["what"] for m in first.missing] == [victim]
    assert {victim, gone}.isdisjoint(set(tables(raw)["objects"]["oid"]))
    alerce.clear_faults()
    alerce.clear_requests()
    second = pull(alerce, bts, raw)
    # The 404 is remembered (not asked again until re-typed); the transient failure is fetched now.
    assert second.complete and [r.oid for r in alerce.requests_for("lightcurve")] == [victim]
    assert set(tables(raw)["objects"]["oid"]) == set(chosen["oid"]) - {gone}


def test_a_spectroscopic_label_outranks_the_classifiers_either_way(alerce, bts, contested, tmp_path):
    # ALeRCE first: the classifier says SNII; the BTS pull replaces it with the spectroscopic SNIa (a change).
    raw = tmp_path / "raw"
    pull(alerce, bts, raw, source="alerce")
    objects = tables(raw)["objects"].set_index("oid")
    assert list(objects.index) == [contested] and objects.loc[contested, "label"] == "SNII"
    result = pull(alerce, bts, raw)
    assert contested in result.extra["changed_labels"]
    objects = tables(raw)["objects"].set_index("oid")
    assert (objects.loc[contested, "label"], objects.loc[contested, "label_source"]) == ("SNIa", SPECTROSCOPIC)
    # BTS first: a later ALeRCE pull stores the object's light curve but keeps the spectroscopic label.
    raw2 = tmp_path / "raw2"
    pull(alerce, bts, raw2)
    pull(alerce, bts, raw2, source="alerce")
    objects = tables(raw2)["objects"].set_index("oid")
    assert (objects.loc[contested, "label"], objects.loc[contested, "label_source"]) == ("SNIa", SPECTROSCOPIC)
    # Each pull keeps the other's state.
    state = RawStore(raw2).read_state()
    assert state["bts"]["types"] and state["watermarks"] and contested in state["seen"]


def test_the_cli_pulls_bts_with_a_summary_and_says_when_it_is_incomplete(alerce, bts, chosen, tmp_path):
    import json

    from tests.integration.test_ingest_cli import ALERCE_FAST, deeprubin

    out = tmp_path / "raw"
    victim = str(chosen["oid"].iloc[0])
    alerce.add_fault(FaultRule(route="lightcurve", kind="http_500", oid=victim, times=-1))
    args = ["ingest", "--source", "bts", "--bts-url", bts.url, "--alerce-url", alerce.url, "--out", str(out),
            *ALERCE_FAST, "--set", "ingest.bts.max_attempts=2"]
    proc = deeprubin(*args, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "BTS pull (incomplete)" in proc.stdout and victim in proc.stderr
    alerce.clear_faults()
    proc = deeprubin(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "BTS pull" in proc.stdout and "SNIa" in proc.stdout and "bts:spectroscopic" in proc.stdout
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    bts.add_fault(BtsFault("http_500", times=-1))
    proc = deeprubin(*args, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "HTTP 500" in lines[0], proc.stderr


def test_the_nightly_pull_runs_bts_beside_alerce_and_reports_label_changes(alerce, bts, contested, prefect_api,
                                                                          tmp_path):
    from prefect import flow

    from deeprubin_flows import tasks
    from deeprubin_flows.common import load

    @flow(name="nightly-pull")
    def nightly_pull(overrides: list[str]):
        return tasks.pull_sources(load(None, overrides))  # what the nightly flow runs first

    overrides = ["ingest.source=alerce", f"ingest.raw_dir={tmp_path / 'raw'}", f"ingest.alerce.base_url={alerce.url}",
                 "ingest.alerce.requests_per_second=500", "ingest.alerce.backoff_base_s=0.01",
                 "ingest.bts.enabled=true", f"ingest.bts.url={bts.url}", "flows.retries=1",
                 "flows.retry_delay_s=0.05"]
    bts.add_fault(BtsFault("http_503", times=1))  # retried inside the pull, not by the task
    state = nightly_pull(overrides, return_state=True)
    assert state.is_completed()
    pulled = state.result()
    assert pulled["source"] == "alerce+bts" and pulled["label_changes"] == [contested]
    assert {r["source"] for r in pulled["per_class"]} == {"alerce", "bts"}
    objects = tables(tmp_path / "raw")["objects"].set_index("oid")
    assert objects.loc[contested, "label_source"] == SPECTROSCOPIC and len(objects) == len(set(bts_oids(bts)))
    assert label_changes_since(tmp_path / "raw", None) == 1
    # The night again: nothing new, nothing duplicated.
    again = nightly_pull(overrides, return_state=True).result()
    assert again["changed_oids"] == [] and again["label_changes"] == []
    assert len(tables(tmp_path / "raw")["objects"]) == len(objects)


def bts_oids(bts: BtsServer) -> list[str]:
    return [r["ZTFID"] for r in bts.rows if r["type"] != "-"]
