"""Alert packets built by the tests, with the real schemas: ZTF Avro alerts and LSST alert packets.

ZTF: :data:`ZTF_SCHEMA` is a *subset* of the ZTF alert schema authored here (not a copy of the upstream .avsc
files): it follows the published layout (namespace ``ztf.alert``, records ``alert``, ``candidate``,
``prv_candidate`` and ``cutout``, the real field names and Avro types) for the fields the consumer reads and a few
others. Packets are Avro object container files with the schema embedded, as ZTF distributes them.

LSST: the schemas are the ``lsst-alert-packet`` package's own (the official ones). :func:`fill` walks a schema and
gives every field its default, or a plausible zero value when it has none, so that a test sets only the fields it
is about. Packets are Confluent wire-format messages (magic byte 0, 4-byte schema id, schemaless Avro body) or
OCF files written with the package's ``Schema.store_alerts``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import fastavro

JD_MJD = 2400000.5

_NULL = "null"


def _opt(kind: Any) -> list:
    return [_NULL, kind]


CUTOUT = {"type": "record", "name": "cutout", "namespace": "ztf.alert",
          "fields": [{"name": "fileName", "type": "string"}, {"name": "stampData", "type": "bytes"}]}

_CANDIDATE_FIELDS = [
    {"name": "jd", "type": "double"},
    {"name": "fid", "type": "int"},
    {"name": "pid", "type": "long"},
    {"name": "diffmaglim", "type": _opt("float"), "default": None},
    {"name": "programid", "type": "int"},
    {"name": "candid", "type": "long"},
    {"name": "isdiffpos", "type": "string"},
    {"name": "nid", "type": _opt("int"), "default": None},
    {"name": "rcid", "type": _opt("int"), "default": None},
    {"name": "field", "type": _opt("int"), "default": None},
    {"name": "ra", "type": "double"},
    {"name": "dec", "type": "double"},
    {"name": "magpsf", "type": "float"},
    {"name": "sigmapsf", "type": "float"},
    {"name": "magap", "type": _opt("float"), "default": None},
    {"name": "distnr", "type": _opt("float"), "default": None},
    {"name": "magnr", "type": _opt("float"), "default": None},
    {"name": "sigmanr", "type": _opt("float"), "default": None},
    {"name": "rb", "type": _opt("float"), "default": None},
    {"name": "ssdistnr", "type": _opt("float"), "default": None},
    {"name": "ndethist", "type": "int"},
    {"name": "ncovhist", "type": "int"},
    {"name": "jdstarthist", "type": _opt("double"), "default": None},
    {"name": "magzpsci", "type": _opt("float"), "default": None},
    {"name": "drb", "type": _opt("float"), "default": None},
]
_PRV_FIELDS = [
    {"name": "jd", "type": "double"},
    {"name": "fid", "type": "int"},
    {"name": "pid", "type": "long"},
    {"name": "diffmaglim", "type": _opt("float"), "default": None},
    {"name": "programid", "type": "int"},
    {"name": "candid", "type": _opt("long"), "default": None},
    {"name": "isdiffpos", "type": _opt("string"), "default": None},
    {"name": "nid", "type": _opt("int"), "default": None},
    {"name": "rcid", "type": _opt("int"), "default": None},
    {"name": "field", "type": _opt("int"), "default": None},
    {"name": "ra", "type": _opt("double"), "default": None},
    {"name": "dec", "type": _opt("double"), "default": None},
    {"name": "magpsf", "type": _opt("float"), "default": None},
    {"name": "sigmapsf", "type": _opt("float"), "default": None},
    {"name": "magnr", "type": _opt("float"), "default": None},
    {"name": "sigmanr", "type": _opt("float"), "default": None},
    {"name": "rb", "type": _opt("float"), "default": None},
]
ZTF_SCHEMA: dict[str, Any] = {
    "type": "record", "name": "alert", "namespace": "ztf.alert", "doc": "subset of the ZTF alert schema (tests)",
    "fields": [
        {"name": "schemavsn", "type": "string"},
        {"name": "publisher", "type": "string"},
        {"name": "objectId", "type": "string"},
        {"name": "candid", "type": "long"},
        {"name": "candidate", "type": {"type": "record", "name": "candidate", "namespace": "ztf.alert",
                                       "fields": _CANDIDATE_FIELDS}},
        {"name": "prv_candidates", "type": _opt({"type": "array", "items": {
            "type": "record", "name": "prv_candidate", "namespace": "ztf.alert", "fields": _PRV_FIELDS}}),
         "default": None},
        {"name": "cutoutScience", "type": _opt(CUTOUT), "default": None},
        {"name": "cutoutTemplate", "type": _opt("ztf.alert.cutout"), "default": None},
        {"name": "cutoutDifference", "type": _opt("ztf.alert.cutout"), "default": None},
    ],
}
_ZTF_PARSED = fastavro.parse_schema(ZTF_SCHEMA)


def ztf_point(mjd: float, fid: int, magpsf: float | None, sigmapsf: float | None = 0.1,
              isdiffpos: str | None = "t", candid: int | None = None) -> dict[str, Any]:
    """A prv_candidate (a non-detection when ``magpsf`` is None: only diffmaglim then)."""
    detection = magpsf is not None
    return {"jd": mjd + JD_MJD, "fid": fid, "pid": 1, "diffmaglim": 20.5, "programid": 1,
            "candid": candid if detection else None, "isdiffpos": isdiffpos if detection else None,
            "nid": 1, "rcid": 1, "field": 600, "ra": 150.0 if detection else None, "dec": 2.0 if detection else None,
            "magpsf": magpsf, "sigmapsf": sigmapsf if detection else None, "magnr": None, "sigmanr": None,
            "rb": 0.9 if detection else None}


def ztf_alert_record(object_id: str, candid: int, mjd: float, fid: int, magpsf: float, sigmapsf: float = 0.1,
                     isdiffpos: str = "t", prv: Sequence[dict[str, Any]] | None = ()) -> dict[str, Any]:
    """A ZTF alert: the triggering candidate plus ``prv`` (from :func:`ztf_point`; None: a null history)."""
    candidate = {f["name"]: f.get("default") for f in _CANDIDATE_FIELDS}
    candidate.update(jd=mjd + JD_MJD, fid=fid, pid=candid, programid=1, candid=candid, isdiffpos=isdiffpos,
                     ra=150.0, dec=2.0, magpsf=magpsf, sigmapsf=sigmapsf, rb=0.9, drb=0.99, ndethist=1, ncovhist=1)
    return {"schemavsn": "3.3", "publisher": "ZTF (www.ztf.caltech.edu)", "objectId": object_id, "candid": candid,
            "candidate": candidate, "prv_candidates": None if prv is None else list(prv),
            "cutoutScience": {"fileName": f"candid{candid}_sci.fits.gz", "stampData": b"\x1f\x8b"},
            "cutoutTemplate": None, "cutoutDifference": None}


def ztf_ocf(records: Sequence[dict[str, Any]]) -> bytes:
    """An Avro object container file holding ``records`` (the schema embedded), as ZTF distributes alerts."""
    buf = io.BytesIO()
    fastavro.writer(buf, _ZTF_PARSED, list(records))
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# LSST.

def lsst_schema(version: str | None = None):
    """The lsst-alert-packet schema ``version`` ("7.4"; None: the package's latest)."""
    from lsst.alert.packet import Schema, get_latest_schema_version
    from lsst.alert.packet.schema import get_schema_path

    major, minor = get_latest_schema_version() if version is None else map(int, version.split("."))
    return Schema.from_file(f"{get_schema_path(major, minor)}/lsst.v{major}_{minor}.alert.avsc")


_PRIMITIVE_ZERO = {"null": None, "boolean": False, "int": 0, "long": 0, "float": 0.0, "double": 0.0, "string": "",
                   "bytes": b""}


def _collect(node: Any, named: dict[str, Any], namespace: str = "") -> None:
    if isinstance(node, list):
        for n in node:
            _collect(n, named, namespace)
    elif isinstance(node, dict):
        kind = node.get("type")
        if kind in ("record", "enum", "fixed") and "name" in node:
            ns = node.get("namespace", namespace)
            name = node["name"] if "." in node["name"] or not ns else f"{ns}.{node['name']}"
            named[name] = node
            named.setdefault(node["name"].split(".")[-1], node)
            namespace = name.rsplit(".", 1)[0] if "." in name else ns
        for key in ("fields", "items", "values"):
            if key in node:
                _collect(node[key], named, namespace)
        if isinstance(kind, (dict, list)):
            _collect(kind, named, namespace)
        if "fields" in node:
            for f in node["fields"]:
                _collect(f["type"], named, namespace)


def fill(schema: Any, overrides: dict[str, Any] | None = None, named: dict[str, Any] | None = None) -> Any:
    """A value valid for ``schema``: each field's default, or a zero value when it has none (null for a nullable
    field, 0, "", an empty array, a record filled the same way). ``overrides`` set fields of the top record."""
    if named is None:
        named = {}
        _collect(schema, named)
    if isinstance(schema, str):
        if schema in _PRIMITIVE_ZERO:
            return _PRIMITIVE_ZERO[schema]
        return fill(named.get(schema) or named[schema.split(".")[-1]], None, named)
    if isinstance(schema, list):
        return None if "null" in schema else fill(schema[0], None, named)
    kind = schema["type"]
    if kind == "record":
        out = {}
        for f in schema["fields"]:
            out[f["name"]] = f["default"] if "default" in f else fill(f["type"], None, named)
        out.update(overrides or {})
        return out
    if kind == "array":
        return []
    if kind == "map":
        return {}
    if kind == "enum":
        return schema["symbols"][0]
    if kind == "fixed":
        return b"\0" * schema["size"]
    return fill(kind, overrides, named)  # {"type": "long", "logicalType": ...} and the like


def _field_type(record_schema: dict[str, Any], name: str) -> Any:
    return next(f["type"] for f in record_schema["fields"] if f["name"] == name)


def lsst_source(schema, source_id: int, object_id: int | None, mjd: float, band: str, flux_njy: float | None,
                flux_err_njy: float | None = 100.0) -> dict[str, Any]:
    """A diaSource of ``schema`` (its own field definitions), the other required fields filled."""
    source_schema = _field_type(schema.definition, "diaSource")
    named: dict[str, Any] = {}
    _collect(schema.definition, named)
    return fill(source_schema, {"diaSourceId": source_id, "diaObjectId": object_id, "midpointMjdTai": mjd,
                                "band": band, "psfFlux": flux_njy, "psfFluxErr": flux_err_njy, "ra": 150.0,
                                "dec": 2.0, "snr": None if flux_njy is None else abs(flux_njy) / 100.0}, named)


def lsst_alert_record(schema, source: dict[str, Any], prv: Sequence[dict[str, Any]] | None = (),
                      with_object: bool = True) -> dict[str, Any]:
    """An alert of ``schema`` triggered by ``source`` with history ``prv``; a diaObject when ``with_object``."""
    named: dict[str, Any] = {}
    _collect(schema.definition, named)
    record = fill(schema.definition, None, named)
    record["diaSource"] = source
    record["prvDiaSources"] = None if prv is None else list(prv)
    if "alertId" in record:
        record["alertId"] = source["diaSourceId"]
    if "diaSourceId" in record:
        record["diaSourceId"] = source["diaSourceId"]
    if with_object and source.get("diaObjectId") is not None:
        obj_schema = next(t for t in _field_type(schema.definition, "diaObject") if t != "null")
        record["diaObject"] = fill(obj_schema, {"diaObjectId": source["diaObjectId"], "ra": 150.0, "dec": 2.0},
                                   named)
    return record


def lsst_wire(schema, record: dict[str, Any], schema_id: int | None = None) -> bytes:
    """Confluent wire format: magic byte 0, the 4-byte big-endian schema id, the schemaless Avro body."""
    sid = schema.get_schema_id() if schema_id is None else schema_id
    return b"\x00" + int(sid).to_bytes(4, "big") + schema.serialize(record)


def lsst_ocf(schema, records: Sequence[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    schema.store_alerts(buf, list(records))
    return buf.getvalue()
