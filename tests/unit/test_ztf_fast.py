"""The compiled ZTF reader (issue 18) answers exactly what fastavro + ztf_alert answer, or declines."""

from __future__ import annotations

import copy
import io
import math

import fastavro
import numpy as np
import pytest

from deeprubin.serving.alerts import packets, ztf_fast
from deeprubin.serving.alerts.packets import Alert, Malformed, decode_packet
from tests.alert_packets import ZTF_SCHEMA, ztf_alert_record, ztf_ocf, ztf_point


def fastavro_path(data: bytes, name: str, monkeypatch) -> list:
    with monkeypatch.context() as m:
        m.setattr(packets, "decode_ocf", lambda _data: None)
        return decode_packet(data, name)


def assert_same(fast: list, slow: list) -> None:
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert type(a) is type(b), (a, b)
        if isinstance(a, Malformed):
            assert a == b
            continue
        assert (a.alert_id, a.oid, a.mjd, a.format, a.packet) == (b.alert_id, b.oid, b.mjd, b.format, b.packet)
        for field in ("t", "band", "flux", "flux_err"):
            x, y = getattr(a, field), getattr(b, field)
            assert x.dtype == y.dtype and np.array_equal(x, y), field  # bit for bit, not approximately


def check(data: bytes, monkeypatch, compiled: bool = True, name: str = "night/1.avro") -> list:
    """Both paths on ``data``; ``compiled``: the compiled reader must answer (not decline) this packet."""
    assert (ztf_fast.decode_ocf(data) is not None) is compiled
    fast = decode_packet(data, name)
    assert_same(fast, fastavro_path(data, name, monkeypatch))
    return fast


def ocf(schema: dict, records: list, codec: str = "null", block_records: int = 100) -> bytes:
    buf = io.BytesIO()
    fastavro.writer(buf, fastavro.parse_schema(copy.deepcopy(schema)), records, codec=codec,
                    sync_interval=16000 if block_records == 100 else 1)
    return buf.getvalue()


def history(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    diffpos = ["t", "f", "1", "0", " F ", "false", "No", "x", "-1.0", "TRUE", ""]
    out = []
    for i in range(n):
        kind = rng.integers(0, 10)
        if kind == 0:
            out.append(ztf_point(59000.0 + i, 1, None))  # a non-detection
        else:
            out.append(ztf_point(59000.0 + i + rng.random(), int(rng.integers(1, 4)), float(rng.uniform(15, 21)),
                                 float(rng.uniform(0.01, 0.3)), diffpos[int(rng.integers(0, len(diffpos)))], i))
    return out


def test_the_two_readers_agree_bit_for_bit_on_varied_alerts(monkeypatch):
    for seed in range(30):
        prv = history(int(np.random.default_rng(seed).integers(0, 120)), seed)  # past 64 rows: grows its buffers
        diffpos = ["t", "f", "0", "1"][seed % 4]
        check(ztf_ocf([ztf_alert_record(f"ZTF{seed}", 10**17 + seed, 59100.5, 1 + seed % 3, 18.5, 0.1, diffpos,
                                        prv)]), monkeypatch)


def test_several_records_codecs_and_null_histories(monkeypatch):
    records = [ztf_alert_record("ZTF1", 1, 59000.0, 1, 18.0, prv=None),
               ztf_alert_record("ZTF2", 2, 59001.0, 2, 18.0, prv=[]),
               ztf_alert_record("ZTF3", 3, 59002.0, 2, 18.0, prv=history(40, 3))]
    for codec in ("null", "deflate"):
        for per_block in (100, 1):
            out = check(ocf(ZTF_SCHEMA, records, codec, per_block), monkeypatch)
            assert [a.packet for a in out] == ["night/1.avro#0", "night/1.avro#1", "night/1.avro#2"]


def test_nan_magnitudes_and_special_floats_agree(monkeypatch):
    prv = [ztf_point(59000.0, 1, float("nan"), 0.1, "t", 1), ztf_point(59001.0, 2, 18.0, float("inf"), "t", 2),
           ztf_point(59002.0, 2, 18.0, -0.1, "t", 3), ztf_point(59003.0, 1, 18.0, 0.0, "t", 4)]
    [alert] = check(ztf_ocf([ztf_alert_record("ZTFn", 9, 59004.0, 1, 17.0, prv=prv)]), monkeypatch)
    assert len(alert.t) == 1  # only the candidate keeps a finite flux and a positive error


def nullable(schema: dict, record_fields=(), candidate_fields=()) -> dict:
    """The test schema with some fields made nullable (union with null), as a broken stream could send."""
    s = copy.deepcopy(schema)
    for f in s["fields"]:
        if f["name"] in record_fields:
            f["type"] = ["null", f["type"]]
        if f["name"] == "candidate":
            for g in f["type"]["fields"]:
                if g["name"] in candidate_fields:
                    g["type"] = ["null", g["type"]]
    return s


@pytest.mark.parametrize("field", ["jd", "fid", "magpsf", "sigmapsf"])
def test_a_null_candidate_field_is_the_same_malformed_entry(field, monkeypatch):
    schema = nullable(ZTF_SCHEMA, candidate_fields=[field])
    record = ztf_alert_record("ZTFx", 77, 59000.0, 1, 18.0, prv=history(5))
    record["candidate"][field] = None
    [bad] = check(ocf(schema, [record]), monkeypatch)
    assert bad == Malformed("night/1.avro", f"ZTF alert 77 of ZTFx: candidate.{field} is null", "77", "ZTFx")


def test_missing_ids_and_implausible_times_are_the_same_malformed_entries(monkeypatch):
    schema = nullable(ZTF_SCHEMA, record_fields=["candid", "objectId"])
    no_candid = ztf_alert_record("ZTFc", 5, 59000.0, 1, 18.0)
    no_candid["candid"] = None
    empty_oid = ztf_alert_record("", 6, 59000.0, 1, 18.0)
    null_oid = ztf_alert_record("x", 7, 59000.0, 1, 18.0)
    null_oid["objectId"] = None
    jd_as_mjd = ztf_alert_record("ZTFj", 8, 59000.0, 1, 18.0)
    jd_as_mjd["candidate"]["jd"] = 59000.0  # an MJD where a JD belongs
    out = check(ocf(schema, [no_candid, empty_oid, null_oid, jd_as_mjd]), monkeypatch)
    assert [m.reason.split(":")[0] for m in out] == [
        "ZTF alert of ZTFc without candid", "ZTF alert without objectId", "ZTF alert without objectId",
        "ZTF alert 8 of ZTFj"]
    assert all(isinstance(m, Malformed) for m in out)


def test_the_alert_id_is_the_candidates_candid_when_the_record_has_none(monkeypatch):
    schema = copy.deepcopy(ZTF_SCHEMA)
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "candid"]
    record = ztf_alert_record("ZTFk", 123456789012345678, 59000.0, 2, 18.0)
    del record["candid"]
    [alert] = check(ocf(schema, [record]), monkeypatch)
    assert alert.alert_id == "123456789012345678"  # a 64-bit id kept exactly, not through a float


def test_skipped_fields_of_every_avro_type(monkeypatch):
    """Maps, enums, fixed, booleans, nested records and arrays and logical types are skipped unbuilt."""
    schema = copy.deepcopy(ZTF_SCHEMA)
    extra = [
        {"name": "flags", "type": {"type": "map", "values": {"type": "array", "items": "int"}}},
        {"name": "survey", "type": {"type": "enum", "name": "survey", "symbols": ["ZTF", "LSST"]}},
        {"name": "digest", "type": {"type": "fixed", "name": "digest", "size": 5}},
        {"name": "ok", "type": "boolean"},
        {"name": "when", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "nested", "type": {"type": "record", "name": "nested", "fields": [
            {"name": "xs", "type": {"type": "array", "items": ["null", "double", "string"]}}]}},
    ]
    schema["fields"] = schema["fields"][:3] + extra + schema["fields"][3:]
    import datetime

    record = ztf_alert_record("ZTFs", 11, 59000.0, 1, 18.0, prv=history(20))
    record.update(flags={"a": [1, -2, 3], "bb": []}, survey="LSST", digest=b"12345", ok=True,
                  when=datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone.utc),
                  nested={"xs": [None, 1.5, "two"]})
    check(ocf(schema, [record]), monkeypatch)


def zigzag(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def test_array_blocks_with_negative_counts_and_byte_sizes(monkeypatch):
    """Avro lets a writer give an array block as -count and its size in bytes; fastavro writes positive counts,
    so the packet is built by hand: the history in two blocks, one of them negative."""
    parsed = fastavro.parse_schema(copy.deepcopy(ZTF_SCHEMA))
    named = {s["name"]: s for s in [parsed["fields"][4]["type"], parsed["fields"][5]["type"][1]["items"]]}
    record = ztf_alert_record("ZTFneg", 21, 59010.0, 2, 18.0, prv=history(7, 5))

    def body(item_schema, value) -> bytes:
        b = io.BytesIO()
        fastavro.schemaless_writer(b, item_schema, value)
        return b.getvalue()

    def string(v: str) -> bytes:
        return zigzag(len(v.encode())) + v.encode()

    items = [body(named["ztf.alert.prv_candidate"], p) for p in record["prv_candidates"]]
    first, second = b"".join(items[:3]), b"".join(items[3:])
    prv = zigzag(1) + zigzag(-3) + zigzag(len(first)) + first + zigzag(4) + second + zigzag(0)
    raw = (string(record["schemavsn"]) + string(record["publisher"]) + string(record["objectId"]) + zigzag(21)
           + body(named["ztf.alert.candidate"], record["candidate"]) + prv + zigzag(0) * 3)
    header = io.BytesIO()
    fastavro.writer(header, parsed, [], sync_marker=b"S" * 16)
    data = header.getvalue() + zigzag(1) + zigzag(len(raw)) + raw + b"S" * 16
    assert fastavro_path(data, "x", monkeypatch)[0].oid == "ZTFneg"  # fastavro reads it as an alert
    [alert] = check(data, monkeypatch)
    assert len(alert.t) > 1


def test_a_read_field_of_another_type_or_a_truncated_packet_is_declined_and_read_by_fastavro(monkeypatch):
    schema = copy.deepcopy(ZTF_SCHEMA)
    for f in schema["fields"]:
        if f["name"] == "candidate":
            for g in f["type"]["fields"]:
                if g["name"] == "isdiffpos":
                    g["type"] = "int"  # not the string ZTF sends
    record = ztf_alert_record("ZTFi", 12, 59000.0, 1, 18.0)
    record["candidate"]["isdiffpos"] = 1
    check(ocf(schema, [record]), monkeypatch, compiled=False)
    good = ztf_ocf([ztf_alert_record("ZTFt", 13, 59000.0, 1, 18.0, prv=history(10))])
    [bad] = check(good[:-40], monkeypatch, compiled=False)
    assert isinstance(bad, Malformed) and bad.reason.startswith("cannot decode Avro")


def test_a_non_ascii_isdiffpos_is_declined(monkeypatch):
    record = ztf_alert_record("ZTFu", 14, 59000.0, 1, 18.0, 0.1, "\u2212", prv=history(3))  # a Unicode minus sign
    check(ztf_ocf([record]), monkeypatch, compiled=False)


def test_the_compiled_reader_is_what_decode_packet_uses(monkeypatch):
    calls = []
    real = ztf_fast.decode_ocf
    monkeypatch.setattr(packets, "decode_ocf", lambda data: calls.append(1) or real(data))
    [alert] = decode_packet(ztf_ocf([ztf_alert_record("ZTFz", 15, 59000.0, 1, 18.0)]), "p")
    assert isinstance(alert, Alert) and calls == [1]
    assert math.isclose(alert.mjd, 59000.0, abs_tol=1e-6)
    # LSST packets never reach it
    assert packets.OCF_MAGIC == b"Obj\x01"


def test_the_compiled_point_filter_is_the_numpy_definition():
    """packets._points (compiled) against its definition in numpy: the same points, bit for bit, in
    np.lexsort((band, t))'s order, on random inputs with ties, NaN, infinities and JDs where MJDs belong."""
    lo, hi = packets.MJD_RANGE

    def definition(t, band, flux, err):
        ok = np.isfinite(flux) & np.isfinite(err) & (err > 0) & ((band == 0) | (band == 1)) & (t >= lo) & (t <= hi)
        t, band, flux, err = t[ok], band[ok], flux[ok], err[ok]
        order = np.lexsort((band, t))
        return t[order], band[order], flux[order], err[order]

    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(0, 60))
        t = np.round(rng.uniform(58990, 59010, n), int(rng.integers(0, 3)))  # rounding makes ties
        t[rng.random(n) < 0.05] = np.nan
        t[rng.random(n) < 0.05] = 2459000.0
        band = rng.integers(-1, 3, n)
        flux = rng.normal(0, 100, n)
        flux[rng.random(n) < 0.05] = np.inf
        err = rng.normal(5, 3, n)
        err[rng.random(n) < 0.05] = np.nan
        for x, y in zip(packets._points(t, band, flux, err), definition(t, band, flux, err)):
            assert x.dtype == y.dtype and np.array_equal(x, y)
