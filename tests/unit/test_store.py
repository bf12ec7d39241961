import pandas as pd
import pyarrow.parquet as pq
import pytest

from deeprubin.schema import NON_DETECTIONS_SCHEMA, LightCurves, build_objects, empty_frame, map_detections, map_labels
from deeprubin.store import MARKER, RawStore, upsert


def batch(rows: list[tuple[str, float, int, float]], labels: dict[str, str | None]) -> LightCurves:
    frame = pd.DataFrame(rows, columns=["oid", "mjd", "fid", "magpsf"]).assign(sigmapsf=0.1)
    det = map_detections(frame, source="test")
    lab = map_labels(pd.DataFrame({"oid": list(labels), "label": list(labels.values())}))
    objects = build_objects(det, lab, source="test", label_source="test:labels",
                            ingested_at=pd.Timestamp("2026-01-01", tz="UTC"))
    return LightCurves(objects=objects, detections=det, non_detections=empty_frame(NON_DETECTIONS_SCHEMA))


NIGHT1 = batch([("A", 1.0, 1, 18.0), ("A", 2.0, 2, 18.1), ("B", 1.5, 1, 19.0)], {"A": "SNIa", "B": "QSO"})
NIGHT2 = batch([("A", 2.0, 2, 18.2), ("A", 4.0, 1, 18.5), ("C", 4.0, 2, 17.0)], {"A": None, "C": "CEP"})


def test_commit_and_read_round_trip(tmp_path):
    store = RawStore(tmp_path / "raw")
    assert not store.exists()
    assert store.read().detections.empty
    store.commit(NIGHT1, {"night": 1})
    back = store.read()
    assert back.detections[["oid", "mjd", "band", "mag"]].equals(NIGHT1.detections[["oid", "mjd", "band", "mag"]])
    assert back.objects["oid"].tolist() == ["A", "B"]
    assert store.read_manifest() == {"night": 1}
    assert pq.read_schema(tmp_path / "raw" / "detections.parquet").names[:3] == ["oid", "mjd", "band"]


def test_a_table_is_read_with_only_the_columns_asked_for(tmp_path):
    """Issue 18: preprocess reads five detection columns, not the whole store (~1 GB less at 100,000 objects)."""
    store = RawStore(tmp_path / "raw")
    assert store.read_table("detections", ["oid", "mjd"]).columns.tolist() == ["oid", "mjd"]  # nothing stored yet
    store.commit(NIGHT1, {"night": 1})
    cols = ["oid", "mjd", "band", "flux", "flux_err"]
    det = store.read_table("detections", cols)
    assert det.columns.tolist() == cols
    pd.testing.assert_frame_equal(det, store.read().detections[cols])
    assert store.read_table("objects", ["oid", "label"])["label"].tolist() == ["SNIa", "QSO"]
    with pytest.raises(KeyError, match="no column.*colour"):
        store.read_table("detections", ["oid", "colour"])


def test_upsert_is_idempotent():
    once, _ = upsert(NIGHT1, NIGHT1)
    twice, counts = upsert(once, NIGHT1)
    assert len(twice.detections) == len(NIGHT1.detections) == 3
    assert counts.objects_new == 0 and counts.objects_updated == 2
    assert counts.detections_added == 0 and counts.detections_replaced == 3


def test_upsert_adds_new_rows_replaces_same_key_and_keeps_labels():
    merged, counts = upsert(NIGHT1, NIGHT2)
    det = merged.detections.set_index(["oid", "mjd", "band"])
    assert len(det) == 5 and not det.index.duplicated().any()
    assert det.loc[("A", 2.0, "r"), "mag"] == pytest.approx(18.2)  # the newer value wins
    assert (counts.objects_new, counts.objects_updated, counts.detections_added, counts.detections_replaced) == (
        1, 1, 2, 1)
    objects = merged.objects.set_index("oid")
    assert objects.loc["A", "n_det"] == 3 and objects.loc["A", "last_mjd"] == 4.0
    assert objects.loc["A", "label"] == "SNIa"  # an unlabelled update keeps the known label
    assert objects.loc["C", "label"] == "CEP" and objects.loc["B", "label"] == "QSO"


def test_failed_commit_leaves_previous_state_intact(tmp_path, monkeypatch):
    store = RawStore(tmp_path / "raw")
    store.commit(NIGHT1, {"night": 1})
    calls = {"n": 0}
    real_write = pq.write_table

    def failing_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_write(*args, **kwargs)

    monkeypatch.setattr("deeprubin.store.pq.write_table", failing_write)
    merged, _ = upsert(store.read(), NIGHT2)
    with pytest.raises(OSError, match="disk full"):
        store.commit(merged, {"night": 2})
    monkeypatch.undo()
    assert store.read_manifest() == {"night": 1}
    assert len(store.read().detections) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no temporary left behind


def test_recovery_after_a_crash_between_the_two_renames(tmp_path):
    store = RawStore(tmp_path / "raw")
    store.commit(NIGHT1, {"night": 1})
    store._make_commit_dir()  # the new state written aside (marked), not yet renamed in
    (tmp_path / "raw" / MARKER).write_text("{}")
    (tmp_path / "raw").rename(store._previous_name())  # the state a crash after the first rename leaves
    listing = sorted(p.name for p in tmp_path.iterdir())
    assert store.read_manifest() == {"night": 1}  # a read finds the state the commit set aside ...
    assert store.exists() and len(store.read().detections) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # ... and moves nothing
    store.recover()  # the next writer does
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
    assert store.read_manifest() == {"night": 1} and not (tmp_path / "raw" / MARKER).exists()


def test_recovery_after_a_crash_before_cleanup(tmp_path):
    store = RawStore(tmp_path / "raw")
    store.commit(NIGHT1, {"night": 1})
    store.commit(NIGHT2, {"night": 2})
    previous = store._previous_name()  # the old state not yet removed
    previous.mkdir()
    (previous / MARKER).write_text("{}")
    (tmp_path / "raw" / MARKER).write_text("{}")  # the new state's marker not yet removed
    assert store.read_manifest() == {"night": 2}
    assert previous.exists()  # reading changes nothing
    store.recover()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["detections.parquet", "manifest.json",
                                                                   "non_detections.parquet", "objects.parquet"]


def test_a_spectroscopic_label_is_replaced_only_by_a_spectroscopic_one():
    def labelled(label: str, source: str) -> LightCurves:
        lcs = batch([("A", 1.0, 1, 18.0), ("A", 2.0, 2, 18.1)], {"A": label})
        return LightCurves(objects=lcs.objects.assign(label_source=source), detections=lcs.detections,
                           non_detections=lcs.non_detections)

    spectro, guess = labelled("SNIa", "bts:spectroscopic"), labelled("SNII", "alerce:lc_classifier")
    kept, _ = upsert(spectro, guess)  # the classifier lists it later: the spectroscopic label stays
    assert kept.objects[["label", "label_source"]].values.tolist() == [["SNIa", "bts:spectroscopic"]]
    replaced, _ = upsert(guess, spectro)  # a spectroscopic type arrives: it replaces the classifier's
    assert replaced.objects[["label", "label_source"]].values.tolist() == [["SNIa", "bts:spectroscopic"]]
    retyped, _ = upsert(spectro, labelled("SNIbc", "bts:spectroscopic"))  # re-typed by the BTS
    assert retyped.objects[["label", "label_source"]].values.tolist() == [["SNIbc", "bts:spectroscopic"]]
