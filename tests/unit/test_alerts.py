"""The alert-stream consumer: packet decoding (ZTF, LSST), the light-curve book, as-of classification, output
without duplicates, the directory consumer with a registered model, replay and the early-classification metrics."""

from __future__ import annotations

import sqlite3

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deeprubin.serving import alerts
from deeprubin.serving.alerts import (
    OUTPUT_COLUMNS,
    Alert,
    AlertClassifier,
    LightCurveBook,
    Malformed,
    consume,
    decode_packet,
    early_goal,
    early_markdown,
    early_metrics,
    iter_directory,
    read_classifications,
    read_rejections,
    replay_detections,
)
from deeprubin.models.served import ServingModel
from deeprubin.config import load_params
from deeprubin.schema import CLASSES, map_detections
from tests.alert_packets import (
    lsst_alert_record,
    lsst_ocf,
    lsst_schema,
    lsst_source,
    lsst_wire,
    ztf_alert_record,
    ztf_ocf,
    ztf_point,
)
from tests.model_fixtures import register_tcn, served_tcn, sqlite_uri


def ujy(mag: float) -> float:
    return 10 ** (-0.4 * (mag - 23.9))


@pytest.fixture(scope="module")
def model() -> ServingModel:
    return ServingModel(uri="local", name="test", version="0", classes=CLASSES, module=served_tcn())


def _alert(oid: str, aid: str, t: list[float], band: list[int] | None = None, flux: list[float] | None = None,
           mjd: float | None = None) -> Alert:
    t_arr = np.asarray(t, dtype=float)
    return Alert(alert_id=aid, oid=oid, mjd=float(t_arr.max()) if mjd is None else mjd, format="ztf", t=t_arr,
                 band=np.asarray(band if band is not None else [i % 2 for i in range(len(t))]),
                 flux=np.asarray(flux if flux is not None else [100.0 + 10 * i for i in range(len(t))], dtype=float),
                 flux_err=np.full(len(t), 5.0), packet=f"test:{aid}")


# ----------------------------------------------------------------------------------------------------------------
# Decoding.

def test_ztf_packet_is_decoded_like_alerce_detections():
    prv = [ztf_point(58997.0, 1, 19.0, 0.05, "t", 100),
           ztf_point(58998.0, 1, None),  # non-detection (upper limit): skipped
           ztf_point(58998.5, 3, 18.0, 0.1, "t", 101),  # i band: dropped
           ztf_point(58999.0, 2, 20.0, 0.2, "1", 102)]
    packet = ztf_ocf([ztf_alert_record("ZTF21abcdefg", 1234, 59000.25, 2, 18.5, 0.125, "f", prv)])
    [alert] = decode_packet(packet, "night/1234.avro")
    assert isinstance(alert, Alert)
    assert (alert.alert_id, alert.oid, alert.format) == ("1234", "ZTF21abcdefg", "ztf")
    assert alert.mjd == pytest.approx(59000.25, abs=1e-9)  # jd - 2400000.5
    np.testing.assert_allclose(alert.t, [58997.0, 58999.0, 59000.25], atol=1e-9)
    np.testing.assert_array_equal(alert.band, [0, 1, 1])
    # µJy with the AB zero point 23.9, negative for isdiffpos 'f'; errors by error propagation.
    np.testing.assert_allclose(alert.flux, [ujy(19.0), ujy(20.0), -ujy(18.5)], rtol=1e-6)
    np.testing.assert_allclose(alert.flux_err, [ujy(19.0) * 0.05 * np.log(10) / 2.5,
                                                ujy(20.0) * 0.2 * np.log(10) / 2.5,
                                                ujy(18.5) * 0.125 * np.log(10) / 2.5], rtol=1e-6)
    # Exactly how the contract maps ALeRCE rows with the same columns.
    rows = pd.DataFrame({"oid": "ZTF21abcdefg", "mjd": [58997.0, 58999.0, 59000.25], "fid": [1, 2, 2],
                         "magpsf": np.float32([19.0, 20.0, 18.5]), "sigmapsf": np.float32([0.05, 0.2, 0.125]),
                         "isdiffpos": ["t", "1", "f"]})
    mapped = map_detections(rows, "alerce")
    np.testing.assert_allclose(alert.flux, mapped["flux"], rtol=1e-12)
    np.testing.assert_allclose(alert.flux_err, mapped["flux_err"], rtol=1e-12)


def test_ztf_packet_with_a_null_history_and_several_records():
    records = [ztf_alert_record("ZTF1", 1, 59000.0, 1, 18.0, prv=None),
               ztf_alert_record("ZTF2", 2, 59001.0, 2, 18.0, prv=[])]
    out = decode_packet(ztf_ocf(records), "two.avro")
    assert [(a.alert_id, a.packet, len(a.t)) for a in out] == [("1", "two.avro#0", 1), ("2", "two.avro#1", 1)]


@pytest.mark.parametrize("version", [None, "9.0", "7.4"])
def test_lsst_packet_wire_format_and_container(version):
    schema = lsst_schema(version)
    src = lsst_source(schema, 9001, 42, 60500.125, "r", -2500.0, 100.0)
    prv = [lsst_source(schema, 9000, 42, 60499.0, "g", 1234.0, 50.0),
           lsst_source(schema, 8999, 42, 60498.0, "i", 1000.0, 50.0),  # i band: dropped
           lsst_source(schema, 8998, 42, 60497.0, "g", None, None)]  # no flux: dropped
    record = lsst_alert_record(schema, src, prv)
    assert schema.validate(record)
    wire = lsst_wire(schema, record)
    assert wire[0] == 0 and int.from_bytes(wire[1:5], "big") == schema.get_schema_id()
    for packet in (wire, lsst_ocf(schema, [record])):
        [alert] = decode_packet(packet, "lsst-topic[0]@7")
        assert isinstance(alert, Alert), alert
        assert (alert.alert_id, alert.oid, alert.format) == ("9001", "42", "lsst")
        assert alert.mjd == 60500.125
        np.testing.assert_allclose(alert.t, [60499.0, 60500.125])
        np.testing.assert_array_equal(alert.band, [0, 1])
        np.testing.assert_allclose(alert.flux, [1.234, -2.5], rtol=1e-6)  # nJy -> µJy
        np.testing.assert_allclose(alert.flux_err, [0.05, 0.1], rtol=1e-6)


def test_bare_lsst_body_needs_the_lsst_format():
    schema = lsst_schema("9.0")
    body = schema.serialize(lsst_alert_record(schema, lsst_source(schema, 5, 6, 60500.0, "g", 1000.0)))
    [bad] = decode_packet(body, "bare", "auto")
    assert isinstance(bad, Malformed) and "alerts.format=lsst" in bad.reason
    [good] = decode_packet(body, "bare", "lsst", "9.0")
    assert isinstance(good, Alert) and good.oid == "6"
    with pytest.raises(alerts.SchemaVersionError, match="no alert schema '99.9'"):
        decode_packet(body, "bare", "lsst", "99.9")


def test_the_container_reader_equals_fastavro_and_falls_back_to_it():
    """Issue 18: read_container parses each distinct embedded schema once; its records are fastavro.reader's for
    one-record files, several blocks, deflate, and (through fastavro itself) other codecs and broken files."""
    import io

    import fastavro

    from deeprubin.serving.alerts.packets import read_container

    records = [ztf_alert_record(f"ZTF{i}", i, 59000.0 + i, 1 + i % 2, 18.0,
                                prv=[ztf_point(58990.0 + i, 1, 18.5, 0.1, "t", candid=100 + i)]) for i in range(5)]
    one = ztf_ocf(records[:1])
    assert read_container(one) == list(fastavro.reader(io.BytesIO(one)))
    schema = fastavro.reader(io.BytesIO(one)).writer_schema
    for codec in ("null", "deflate", "bzip2"):  # bzip2: not read here, fastavro's reader does it
        buf = io.BytesIO()
        fastavro.writer(buf, schema, records, codec=codec, sync_interval=1)  # a block per record
        data = buf.getvalue()
        want = list(fastavro.reader(io.BytesIO(data)))
        assert len(want) == 5 and read_container(data) == want, codec
    with pytest.raises(Exception) as ours:
        read_container(one[: len(one) // 2])
    with pytest.raises(Exception) as theirs:
        list(fastavro.reader(io.BytesIO(one[: len(one) // 2])))
    assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)


def test_the_prefetched_source_keeps_order_and_raises_where_the_source_failed():
    from deeprubin.serving.alerts.consume import Prefetched

    def source(fail_at=None):
        for k in range(50):
            if k == fail_at:
                raise OSError("disk gone")
            yield k

    assert list(Prefetched(source(), depth=3)) == list(range(50))
    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in Prefetched(source(fail_at=20), depth=3):
            got.append(item)
    assert got == list(range(20))
    stopped = Prefetched(source(), depth=2)
    assert next(iter(stopped)) == 0
    stopped.close()  # the reader thread ends though the queue is full and nobody reads it
    assert not stopped._thread.is_alive()


def test_malformed_packets_are_reported_by_name_and_skipped(tmp_path):
    schema = lsst_schema()
    ok = ztf_ocf([ztf_alert_record("ZTF1", 1, 59000.0, 1, 18.0)])
    (tmp_path / "a_good.avro").write_bytes(ok)
    (tmp_path / "b_garbage.avro").write_bytes(b"this is not an alert packet")
    (tmp_path / "c_empty.avro").write_bytes(b"")
    bad_record = ztf_alert_record("ZTF3", 3, 59000.0, 1, 18.0)
    bad_record["candidate"]["jd"] = 59000.0  # an MJD where a JD belongs
    (tmp_path / "d_bad_time.avro").write_bytes(ztf_ocf([bad_record]))
    (tmp_path / "e_truncated.avro").write_bytes(ok[: len(ok) // 2])
    moving = lsst_alert_record(schema, lsst_source(schema, 7, None, 60500.0, "r", 500.0), with_object=False)
    (tmp_path / "f_solar_system.avro").write_bytes(lsst_wire(schema, moving))
    (tmp_path / "g_unknown_schema.avro").write_bytes(lsst_wire(schema, moving, schema_id=4242))
    (tmp_path / "h_not_an_alert.avro").write_bytes(_other_ocf())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z_good.avro").write_bytes(ztf_ocf([ztf_alert_record("ZTF2", 2, 59001.0, 2, 18.0)]))

    items = list(iter_directory(tmp_path))
    good = [i for i in items if isinstance(i, Alert)]
    bad = {i.packet.rsplit("/", 1)[-1]: i for i in items if isinstance(i, Malformed)}
    assert [a.oid for a in good] == ["ZTF1", "ZTF2"]  # the stream went on past every bad packet
    assert set(bad) == {"b_garbage.avro", "c_empty.avro", "d_bad_time.avro", "e_truncated.avro",
                        "f_solar_system.avro", "g_unknown_schema.avro", "h_not_an_alert.avro"}
    assert "neither an Avro container" in bad["b_garbage.avro"].reason
    assert "not a plausible MJD" in bad["d_bad_time.avro"].reason and "ZTF3" in bad["d_bad_time.avro"].reason
    assert "cannot decode Avro" in bad["e_truncated.avro"].reason
    assert "no diaObjectId" in bad["f_solar_system.avro"].reason
    assert bad["f_solar_system.avro"].alert_id == "7"
    assert "schema id 4242" in bad["g_unknown_schema.avro"].reason
    assert "neither a ZTF nor an LSST alert" in bad["h_not_an_alert.avro"].reason


def test_a_forced_format_rejects_the_other_one():
    packet = ztf_ocf([ztf_alert_record("ZTF1", 1, 59000.0, 1, 18.0)])
    [m] = decode_packet(packet, "p", "lsst")
    assert isinstance(m, Malformed) and "expected a lsst alert, got a ztf alert" in m.reason


def _other_ocf() -> bytes:
    import io

    import fastavro

    buf = io.BytesIO()
    fastavro.writer(buf, fastavro.parse_schema({"type": "record", "name": "x", "fields": [
        {"name": "a", "type": "int"}]}), [{"a": 1}])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# The book.

def test_book_merges_overlapping_histories_once():
    book = LightCurveBook(max_objects=10)
    book.update(_alert("A", "1", [50000.0, 50001.0, 50002.0], [0, 1, 0]))
    book.update(_alert("A", "2", [50001.0, 50002.0, 50003.0], [1, 0, 0]))  # two points again + a new one
    book.update(_alert("A", "3", [50002.0, 50002.0, 50004.0], [0, 1, 1]))  # same time, other band: a new point
    curve, n_det = book.as_of("A", 50010.0)
    np.testing.assert_allclose(curve.mjd, [50000.0, 50001.0, 50002.0, 50002.0, 50003.0, 50004.0])
    np.testing.assert_array_equal(curve.band, [0, 1, 0, 1, 0, 1])
    assert n_det == 6 and book.n_points("A") == 6


def test_ztf_histories_dedupe_through_the_decoder():
    def pkt(candid, mjd, fid, mag, prv):
        return decode_packet(ztf_ocf([ztf_alert_record("ZTF9", candid, mjd, fid, mag, prv=prv)]), str(candid))[0]

    # Each candidate comes back in the next alerts' prv_candidates (jd as a double, magpsf as a float).
    p1 = ztf_point(59000.0, 1, 18.0, 0.1, "t", 1)
    p2 = ztf_point(59001.1, 2, 18.2, 0.1, "t", 2)
    p3 = ztf_point(59003.0, 1, 18.1, 0.1, "t", 3)
    book = LightCurveBook()
    for alert in (pkt(2, 59001.1, 2, 18.2, [p1]), pkt(3, 59003.0, 1, 18.1, [p1, p2, ztf_point(59002.0, 2, None)]),
                  pkt(4, 59004.0, 1, 17.9, [p1, p2, p3])):
        book.update(alert)
    curve, n = book.as_of("ZTF9", 59004.0)
    np.testing.assert_allclose(curve.mjd, [59000.0, 59001.1, 59003.0, 59004.0], atol=1e-7)
    assert n == 4


def test_book_is_a_bounded_lru():
    book = LightCurveBook(max_objects=2)
    book.update(_alert("A", "1", [50000.0]))
    book.update(_alert("B", "2", [50000.0]))
    book.update(_alert("A", "3", [50001.0]))  # A is now the most recently updated
    book.update(_alert("C", "4", [50000.0]))  # evicts B
    assert "A" in book and "C" in book and "B" not in book
    assert len(book) == 2 and book.evicted == 1
    assert book.n_points("A") == 2


def test_trimming_keeps_the_first_detection_and_counts_every_point():
    book = LightCurveBook(keep_days=100.0)
    t = 50000.0 + 3.0 * np.arange(100)  # 297 days
    book.update(_alert("A", "1", list(t)))
    kept = book.n_points("A")
    assert kept < 100
    curve, n_det = book.as_of("A", t[-1])
    assert curve.mjd[0] == t[0] and curve.mjd[1] >= t[-1] - 100.0
    assert n_det == 100
    book.update(_alert("A", "2", list(t[-40:]) + [t[-1] + 1]))  # re-sent history: not counted again
    assert book.as_of("A", t[-1] + 1)[1] == 101


def test_trimming_does_not_change_any_classification(model):
    rng = np.random.default_rng(3)
    t = np.sort(50000.0 + rng.uniform(0, 420, 90))
    det = pd.DataFrame({"oid": "LONG", "mjd": t, "band": np.where(rng.random(90) < 0.5, "g", "r"),
                        "flux": 100 + 50 * np.sin(t / 30.0) + rng.normal(0, 3, 90), "flux_err": 3.0})
    items = list(alerts.alerts_from_detections(det))
    trimmed = AlertClassifier(model, trim=True).classify(items)
    whole = AlertClassifier(model, trim=False).classify(items)
    assert len(trimmed.rows) == len(whole.rows) == 90
    cols = [f"p_{c}" for c in CLASSES] + ["n_det", "days_since_first_detection"]
    pd.testing.assert_frame_equal(trimmed.rows[cols], whole.rows[cols], check_exact=False, rtol=1e-9)


def test_a_late_alert_older_than_the_kept_history_is_rejected(model):
    clf = AlertClassifier(model, grid_days=100, fit_context_days=100.0)
    t = list(50000.0 + 3.0 * np.arange(120))  # 357 days: trimmed
    out = clf.classify([_alert("A", "1", t), _alert("A", "0", t[:10], mjd=t[9])])
    assert list(out.rows["alert_id"]) == ["1"]
    assert out.rejections["reason"].tolist() == ["late alert"] and "A" in out.rejections["detail"].iloc[0]


# ----------------------------------------------------------------------------------------------------------------
# Classification of batches.

def test_each_alert_is_classified_as_of_its_own_time(model):
    # Three alerts of one object in one batch, the latest delivered first: none may see a later point.
    t = [50000.0, 50001.5, 50004.0, 50007.25]
    items = [_alert("A", "a4", t), _alert("A", "a2", t[:2]), _alert("A", "a3", t[:3]),
             _alert("B", "b1", [50003.0])]
    out = AlertClassifier(model).classify(items)
    rows = out.rows.set_index("alert_id")
    assert list(out.rows.columns) == OUTPUT_COLUMNS
    assert rows.loc["a2", "n_det"] == 2 and rows.loc["a2", "days_since_first_detection"] == pytest.approx(1.5)
    assert rows.loc["a3", "n_det"] == 3 and rows.loc["a3", "days_since_first_detection"] == pytest.approx(4.0)
    assert rows.loc["a4", "n_det"] == 4 and rows.loc["a4", "days_since_first_detection"] == pytest.approx(7.25)
    assert rows.loc["b1", "n_det"] == 1 and rows.loc["b1", "days_since_first_detection"] == 0.0
    assert rows.loc["a2", "alert_mjd"] == 50001.5 and (rows["oid"] == ["A", "A", "A", "B"]).all()
    # The as-of classification equals classifying the truncated curve on its own.
    alone = AlertClassifier(model).classify([_alert("A", "x", t[:2])]).rows.iloc[0]
    for c in CLASSES:
        assert rows.loc["a2", f"p_{c}"] == pytest.approx(alone[f"p_{c}"], rel=1e-5)  # float32 TCN, other batch


def test_consumer_writes_parts_and_a_rerun_adds_no_duplicates(tmp_path, model):
    packets = tmp_path / "packets"
    packets.mkdir()
    hist: list[dict] = []
    for k in range(6):
        mjd = 59000.0 + 2.0 * k
        (packets / f"{k:03d}.avro").write_bytes(
            ztf_ocf([ztf_alert_record("ZTF1", 100 + k, mjd, 1 + k % 2, 18.0 - 0.1 * k, prv=list(hist))]))
        hist.append(ztf_point(mjd, 1 + k % 2, 18.0 - 0.1 * k, 0.1, "t", 100 + k))
    (packets / "bad.avro").write_bytes(b"junk")
    out = tmp_path / "out"

    def run(batch):
        writer = alerts.AlertWriter(out)
        try:
            return consume(iter_directory(packets), AlertClassifier(model), writer, batch_alerts=batch)
        finally:
            writer.close()

    first = run(4)
    assert (first.alerts_read, first.classified, first.malformed, first.duplicates) == (6, 6, 1, 0)
    assert first.parts_written == 2 and first.objects_tracked == 1
    rows = read_classifications(out)
    assert sorted(rows["alert_id"]) == [str(100 + k) for k in range(6)]
    assert rows.set_index("alert_id").loc["105", "n_det"] == 6
    rej = read_rejections(out)
    assert rej["packet"].str.endswith("bad.avro").tolist() == [True] and rej["reason"].iloc[0] == "malformed packet"

    again = run(3)  # other batch boundaries: still nothing new
    assert (again.duplicates, again.classified, again.parts_written) == (6, 0, 0)
    assert len(read_classifications(out)) == 6 and len(read_rejections(out)) == 1

    # A crash after a part was written but before the manifest recorded it: the part is adopted, not duplicated.
    with sqlite3.connect(out / "manifest.sqlite") as db:
        db.execute("DELETE FROM written")
        db.execute("DELETE FROM parts")
    third = run(4)
    assert third.classified == 0 and len(read_classifications(out)) == 6 and len(read_rejections(out)) == 1


# ----------------------------------------------------------------------------------------------------------------
# End to end with a registered model.

@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    uri = sqlite_uri(tmp_path_factory.mktemp("alerts-registry"))
    register_tcn(uri)
    return uri


PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def _mixed_packets(packets: Path) -> Path:
    """Five ZTF alerts of one object and five LSST alerts of another, each with the history before it."""
    packets.mkdir()
    schema = lsst_schema()
    prv_z: list[dict] = []
    prv_l: list[dict] = []
    for k in range(5):
        mjd = 60400.0 + 1.5 * k
        (packets / f"ztf_{k}.avro").write_bytes(ztf_ocf([ztf_alert_record("ZTF24aaaaaaa", 500 + k, mjd, 1 + k % 2,
                                                                          19.0 - 0.2 * k, prv=list(prv_z))]))
        prv_z.append(ztf_point(mjd, 1 + k % 2, 19.0 - 0.2 * k, 0.1, "t", 500 + k))
        src = lsst_source(schema, 7000 + k, 313, mjd + 0.3, "gr"[k % 2], 2000.0 + 300 * k, 80.0)
        (packets / f"lsst_{k}.avro").write_bytes(lsst_wire(schema, lsst_alert_record(schema, src, list(prv_l))))
        prv_l.append(src)
    return packets


def test_directory_consumer_end_to_end_with_a_registered_model(tmp_path, registry):
    packets = _mixed_packets(tmp_path / "packets")
    out = tmp_path / "alerts"
    params = load_params(None, [f"train.tracking_uri={registry}", f"alerts.output_dir={out}",
                                "alerts.batch_alerts=4"])
    result = alerts.run(params, packets)
    report = result.report()
    assert report["alerts_read"] == 10 and report["classified"] == 10 and report["malformed"] == 0
    assert report["objects_tracked"] == 2 and report["model_version"] == "1" and report["batches"] == 3
    assert report["alerts_per_s"] > 0
    assert 0 <= report["first_alert_s"] <= report["seconds"]
    rows = read_classifications(out)
    assert list(rows.columns) == OUTPUT_COLUMNS
    assert set(rows["format"]) == {"ztf", "lsst"} and set(rows["oid"]) == {"ZTF24aaaaaaa", "313"}
    assert (rows["model_name"] == "deeprubin-tcn").all()
    np.testing.assert_allclose(rows[[f"p_{c}" for c in CLASSES]].sum(axis=1), 1.0, rtol=1e-5)
    by_id = rows.set_index("alert_id")
    assert by_id.loc["504", "n_det"] == 5 and by_id.loc["7004", "n_det"] == 5
    assert by_id.loc["7004", "days_since_first_detection"] == pytest.approx(6.0)


def test_consume_command_classifies_a_directory_and_a_rerun_adds_nothing(tmp_path, registry):
    from typer.testing import CliRunner

    from deeprubin.cli import app

    packets = _mixed_packets(tmp_path / "packets")
    out = tmp_path / "alerts"
    args = ["consume", "--dir", str(packets), "--output", str(out), "--params", str(PARAMS),
            "--set", f"train.tracking_uri={registry}"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "10 alerts" in first.output and "classified" in first.output
    assert f"wrote {out}" in first.output and "┃" not in first.output  # no (empty) header row
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "nothing new to write" in again.output and f"wrote {out}" not in again.output
    assert len(read_classifications(out)) == 10  # the rerun found every alert already written
    missing = CliRunner().invoke(app, ["consume", "--dir", str(tmp_path / "nope"), "--params",
                                       str(PARAMS), "--set", f"train.tracking_uri={registry}"])
    assert missing.exit_code == 1 and "nope" in missing.output


def test_run_needs_a_source():
    with pytest.raises(ValueError, match="no alert source"):
        alerts.run(load_params(None), None, model=object())


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released): connections to it are refused at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kafka_source_without_a_broker_fails_after_the_bound_and_says_so_once(capfd, caplog):
    """No broker at the address: one warning of ours while it retries, then BrokerUnreachable naming the bootstrap
    servers and the setting, after alerts.kafka.connect_timeout_s; none of librdkafka's per-attempt lines."""
    import logging
    import time

    pytest.importorskip("confluent_kafka")
    bootstrap = f"127.0.0.1:{_closed_port()}"
    params = load_params(None, [f"alerts.kafka.bootstrap_servers={bootstrap}", "alerts.kafka.topic=alerts",
                                "alerts.kafka.connect_timeout_s=1.5"])
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="deeprubin.serving.alerts.kafka"):
        with pytest.raises(alerts.BrokerUnreachable) as raised:
            alerts.KafkaSource(params.alerts.kafka)
    assert 1.5 <= time.monotonic() - started < 10
    message = str(raised.value)
    assert "\n" not in message and bootstrap in message and "alerts.kafka.connect_timeout_s" in message
    assert "Connection refused" in message  # what librdkafka said, once, at the end
    ours = [r.getMessage() for r in caplog.records if r.name == "deeprubin.serving.alerts.kafka"]
    assert len(ours) == 1 and ours[0].startswith(f"Kafka: cannot reach {bootstrap}"), ours
    out, err = capfd.readouterr()
    assert "rdkafka" not in out + err and "Connect to" not in out + err, err


def test_consume_command_without_a_broker_exits_with_one_line(tmp_path):
    """`deeprubin consume` with an unreachable Kafka broker: exit code 1 within the configured bound, before any
    model is loaded, with one line naming the brokers and the setting; not librdkafka's endless retries."""
    import os
    import subprocess
    import sys
    import time

    pytest.importorskip("confluent_kafka")
    bootstrap = f"127.0.0.1:{_closed_port()}"
    env = {**os.environ, "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    started = time.monotonic()
    done = subprocess.run([str(Path(sys.executable).parent / "deeprubin"), "consume", "--params", str(PARAMS),
                           "--set", f"alerts.kafka.bootstrap_servers={bootstrap}", "--set", "alerts.kafka.topic=alerts",
                           "--set", "alerts.kafka.connect_timeout_s=1", "--model", str(tmp_path / "no-model")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 60
    assert done.returncode == 1, done.stdout + done.stderr
    failed = [line for line in done.stderr.splitlines() if line.startswith("consume failed:")]
    assert len(failed) == 1, done.stderr
    assert bootstrap in failed[0] and "alerts.kafka.connect_timeout_s" in failed[0], done.stderr
    assert "rdkafka" not in done.stderr and len(done.stderr.splitlines()) <= 2, done.stderr


# ----------------------------------------------------------------------------------------------------------------
# Replay and early metrics.

def _toy_detections() -> pd.DataFrame:
    rows = []
    for oid, n, t0 in (("X", 5, 58000.0), ("Y", 3, 58001.0)):
        for j in range(n):
            rows.append({"oid": oid, "mjd": t0 + 2.5 * j, "band": "gr"[j % 2], "flux": 50.0 + 20 * j,
                         "flux_err": 4.0})
    return pd.DataFrame(rows)


def test_replay_classifies_every_detection_with_the_history_before_it(model):
    result = replay_detections(_toy_detections(), model, batch_alerts=3)
    rows = result.classifications.sort_values(["oid", "alert_mjd"])
    assert result.alerts_read == 8 and len(rows) == 8 and result.batches == 3
    assert rows["n_det"].tolist() == [1, 2, 3, 4, 5, 1, 2, 3]
    np.testing.assert_allclose(rows["days_since_first_detection"], [0, 2.5, 5, 7.5, 10, 0, 2.5, 5])
    capped = replay_detections(_toy_detections(), model, max_days=5.0)
    assert capped.classifications["days_since_first_detection"].max() == 5.0 and capped.alerts_read == 6


def test_early_metrics_per_bin_by_hand():
    def row(oid, days, p_ia, p_qso=0.0):
        p = {f"p_{c}": 0.0 for c in CLASSES}
        p.update(p_SNIa=p_ia, p_SNII=1 - p_ia - p_qso, p_QSO=p_qso)
        return {"oid": oid, "days_since_first_detection": days, "alert_mjd": 60000.0 + days, **p}

    rows = pd.DataFrame([
        row("a", 0.0, 0.9), row("a", 1.0, 0.2),  # bin 0-2: latest of a (1.0 d) says SNII: wrong
        row("b", 1.5, 0.8),  # SNIa, right
        row("c", 0.5, 0.05, p_qso=0.8),  # SNII: QSO is the argmax but not a choice; restricted -> SNII, right
        row("a", 3.0, 0.7), row("c", 4.0, 0.6),  # bin 2-5: a right, c wrong
        row("d", 3.0, 0.5),  # label outside the classes: left out
    ])
    labels = {"a": "SNIa", "b": "SNIa", "c": "SNII", "d": "SLSN"}
    m = early_metrics(rows, labels, bins=(0, 2, 5, 10)).set_index("bin")
    assert m.loc["0-2", "n_objects"] == 3 and m.loc["0-2", "n_alerts"] == 4
    assert (m.loc["0-2", "n_SNIa"], m.loc["0-2", "n_SNII"]) == (2, 1)
    # 0-2: a -> SNII (wrong), b -> SNIa, c -> SNII: F1(SNIa) = 2/3 (P 1, R 1/2), F1(SNII) = 2/3 (P 1/2, R 1)
    assert m.loc["0-2", "accuracy"] == pytest.approx(2 / 3)
    assert m.loc["0-2", "macro_f1"] == pytest.approx(2 / 3)
    # 2-5: a right (SNIa), c wrong (SNIa predicted for a SN II): accuracy 1/2; F1(SNIa)=2/3, F1(SNII)=0
    assert m.loc["2-5", "accuracy"] == 0.5
    assert m.loc["2-5", "macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert m.loc["5-10", "n_objects"] == 0 and np.isnan(m.loc["5-10", "macro_f1"])


def test_early_metrics_restricts_predictions_to_the_scored_classes():
    p = {f"p_{c}": 0.0 for c in CLASSES}
    rows = pd.DataFrame([{"oid": "a", "days_since_first_detection": 1.0, "alert_mjd": 1.0,
                          **p, "p_QSO": 0.7, "p_SNIa": 0.2, "p_SNII": 0.1},
                         {"oid": "b", "days_since_first_detection": 1.0, "alert_mjd": 1.0,
                          **p, "p_CEP": 0.6, "p_SNIa": 0.1, "p_SNII": 0.3}])
    labels = {"a": "SNIa", "b": "SNII"}
    m = early_metrics(rows, labels, bins=(0, 2))
    assert m["accuracy"].iloc[0] == 1.0 and m["macro_f1"].iloc[0] == 1.0
    m = early_metrics(rows, labels, bins=(0, 2), restrict=False)
    assert m["accuracy"].iloc[0] == 0.0


def test_early_metrics_recall_and_calibration_error_per_bin_by_hand():
    def row(oid, days, p_ia, p_qso=0.0):
        p = {f"p_{c}": 0.0 for c in CLASSES}
        p.update(p_SNIa=p_ia, p_SNII=1 - p_ia - p_qso, p_QSO=p_qso)
        return {"oid": oid, "days_since_first_detection": days, "alert_mjd": 60000.0 + days, **p}

    rows = pd.DataFrame([
        # 0-5: a, b (SN Ia) right; c (SN II) called SN Ia; d (SN II) right. Top probabilities .92 .72 .63 .83.
        row("a", 1.0, 0.92), row("b", 2.0, 0.72), row("c", 3.0, 0.63), row("d", 4.0, 0.17),
        # 5-10: a right (.62 of four classes, .62/.70 of SN Ia + SN II), c wrong (.55), d right (.72).
        row("a", 6.0, 0.62, p_qso=0.30), row("c", 7.0, 0.55), row("d", 8.0, 0.28),
        row("a", 12.0, 0.9),  # 10-20: only a SN Ia, right
    ])
    labels = {"a": "SNIa", "b": "SNIa", "c": "SNII", "d": "SNII"}
    m = early_metrics(rows, labels, bins=(0, 5, 10, 20)).set_index("bin")
    assert (m.loc["0-5", "recall_SNIa"], m.loc["0-5", "recall_SNII"]) == (1.0, 0.5)
    # Each object alone in its confidence bin: ECE = mean |correct - confidence|.
    assert m.loc["0-5", "ece"] == pytest.approx((0.08 + 0.28 + 0.63 + 0.17) / 4)
    assert m.loc["0-5", "ece_all_classes"] == pytest.approx((0.08 + 0.28 + 0.63 + 0.17) / 4)
    assert m.loc["0-5", "low_recall"] == []  # younger than 5 days: not flagged
    assert (m.loc["5-10", "recall_SNIa"], m.loc["5-10", "recall_SNII"]) == (1.0, 0.5)
    assert m.loc["5-10", "ece"] == pytest.approx(((1 - 0.62 / 0.70) + 0.55 + 0.28) / 3)
    assert m.loc["5-10", "ece_all_classes"] == pytest.approx(((1 - 0.62) + 0.55 + 0.28) / 3)
    assert m.loc["5-10", "low_recall"] == ["SNII"]
    assert m.loc["10-20", "recall_SNIa"] == 1.0 and np.isnan(m.loc["10-20", "recall_SNII"])
    assert m.loc["10-20", "low_recall"] == [] and m.loc["10-20", "ece"] == pytest.approx(0.1)

    table = m.reset_index()
    goal = early_goal(table, max_ece=0.2)
    assert not goal["met"] and not goal["recall_met"] and not goal["ece_met"]
    assert [f["bin"] for f in goal["failing"]] == ["5-10", "5-10"]  # recall of SN II, ECE 0.31 > 0.2
    assert early_goal(table.iloc[[2]], max_ece=0.2)["met"]
    assert not early_goal(table.iloc[[2]], max_ece=0.05)["met"]
    md = early_markdown(table).splitlines()
    assert md[0].startswith("| days since first detection | objects | SNIa | SNII | accuracy | macro-F1 |")
    assert len(md) == 2 + 3 and md[3].startswith("| 5-10 | 3 | 1 | 2 |") and md[3].endswith("| **SNII** |")
    assert "| 0.315 |" in md[3] and md[2].endswith("|  |")


@pytest.mark.real_data
def test_replay_on_real_bts_supernovae(shared_data, model):
    from deeprubin.config import BaseParams, RealSetParams
    from deeprubin.evaluation.sets import load_heldout

    real = load_heldout(RealSetParams(detections=shared_data / "bts" / "detections.parquet",
                                      labels=shared_data / "bts" / "labels.csv"), BaseParams())
    det, labels = real.detections, real.labels
    oids = list(labels[labels == "SNIa"].index[:3]) + list(labels[labels == "SNII"].index[:3])
    det = det[det["oid"].isin(oids)]
    result = replay_detections(det, model, max_days=30.0)
    rows = result.classifications
    assert set(rows["oid"]) <= set(oids) and result.alerts_read == len(rows) + len(result.rejections)
    assert (rows["days_since_first_detection"] <= 30.0).all()
    m = early_metrics(rows, labels)
    assert m["n_objects"].iloc[0] == 6 and m["n_alerts"].sum() == len(rows)


def test_ctrl_c_writes_the_batch_in_hand_and_max_alerts_stops(model):
    def source():
        for k in range(3):
            yield _alert("A", f"k{k}", [50000.0 + j for j in range(k + 1)])
        raise KeyboardInterrupt

    result = consume(source(), AlertClassifier(model), None, batch_alerts=10)
    assert result.interrupted and result.classified == 3 and result.report()["interrupted"] is True
    capped = consume(source(), AlertClassifier(model), None, batch_alerts=10, max_alerts=2)
    assert not capped.interrupted and capped.alerts_read == 2


def test_a_failing_source_still_writes_the_batches_before_the_failure(tmp_path, model):
    def source():
        yield _alert("A", "a1", [59000.0, 59001.0])
        yield _alert("A", "a2", [59000.0, 59001.0, 59002.0])
        raise OSError("the disk went away")

    writer = alerts.AlertWriter(tmp_path / "out")
    try:
        with pytest.raises(OSError, match="disk went away"):
            consume(source(), AlertClassifier(model), writer, batch_alerts=2)
    finally:
        writer.close()
    assert sorted(read_classifications(tmp_path / "out")["alert_id"]) == ["a1", "a2"]


def test_a_missing_directory_is_named_before_anything_is_written(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        alerts.consume_directory(load_params(None), tmp_path / "nowhere", tmp_path / "out", model=model)
    assert not (tmp_path / "out").exists()


def test_a_consumer_on_a_worker_pool_classifies_as_in_process_and_keeps_its_pool(monkeypatch, model):
    """Issue 18: with ``workers`` > 1 each batch is split across a pool started once for the consumer (not per
    batch); every alert gets the same probabilities as in this process (within 1e-6), in order, nothing twice."""
    import importlib

    from deeprubin.serving import classify as clf
    from deeprubin.sources import simulate

    consume_module = importlib.import_module("deeprubin.serving.alerts.consume")

    monkeypatch.setattr(clf, "MIN_SLICE", 4)
    monkeypatch.setattr(consume_module, "MIN_SLICE", 4)
    sim = simulate.simulate(load_params(None).ingest.simulator.model_copy(update={"n_per_class": 2}), seed=11)
    det = sim.detections.loc[lambda d: d["band"].isin(["g", "r"])]
    det = det.loc[det.groupby("oid")["mjd"].rank(method="first") <= 12]  # 8 objects, at most 12 alerts each
    here = replay_detections(det, model, batch_alerts=40).classifications
    pooled = AlertClassifier(model, max_objects=100, workers=2)
    try:
        result = consume(alerts.alerts_from_detections(det), pooled, None, batch_alerts=40)
        pool = pooled._tensorizer
        assert pool is not None and pool.pool is not None and result.batches > 1
        assert pooled._tensorizer is pool  # one pool for every batch
    finally:
        pooled.close()
    rows = result.classifications
    assert rows["alert_id"].tolist() == here["alert_id"].tolist() and rows["alert_id"].is_unique
    p = [f"p_{c}" for c in CLASSES]
    np.testing.assert_allclose(rows[p].to_numpy(float), here[p].to_numpy(float), rtol=0, atol=1e-6)
    assert rows["n_det"].tolist() == here["n_det"].tolist()
