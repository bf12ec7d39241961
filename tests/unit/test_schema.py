import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deeprubin.schema import (
    DETECTIONS_SCHEMA,
    LightCurves,
    OBJECTS_SCHEMA,
    SchemaError,
    build_objects,
    flux_to_mag,
    map_detections,
    map_labels,
    map_non_detections,
    mag_to_flux,
    to_arrow,
    validate_detections,
    validate_non_detections,
)


def alerce_rows(**overrides):
    rows = {
        "oid": ["ZTF1", "ZTF1", "ZTF1"],
        "mjd": [59000.1, 59001.2, 59003.3],
        "fid": [1, 2, 1],
        "magpsf": [18.0, 18.5, 23.9],
        "sigmapsf": [0.05, 0.1, 0.2],
        "isdiffpos": ["t", "f", "1"],
    }
    rows.update(overrides)
    return pd.DataFrame(rows)


def test_flux_conversion_uses_the_ab_zero_point():
    flux, err = mag_to_flux(np.array([23.9, 18.9]), np.array([0.1, 0.1]))
    np.testing.assert_allclose(flux, [1.0, 100.0])
    np.testing.assert_allclose(err, flux * 0.1 * np.log(10) / 2.5)
    mag, mag_err = flux_to_mag(-flux, err)  # the sign lives in isdiffpos, not in the magnitude
    np.testing.assert_allclose(mag, [23.9, 18.9])
    np.testing.assert_allclose(mag_err, [0.1, 0.1])


def test_alerce_columns_map_onto_the_contract():
    out = map_detections(alerce_rows(), source="alerce")
    assert list(out.columns) == DETECTIONS_SCHEMA.names
    assert out["band"].tolist() == ["g", "r", "g"]
    np.testing.assert_allclose(out["flux"], [10 ** (0.4 * 5.9), -(10 ** (0.4 * 5.4)), 1.0])
    assert out["mag_corr"].isna().all()
    to_arrow(out, DETECTIONS_SCHEMA)  # types fit the schema


@pytest.mark.parametrize("value,sign", [("t", 1), ("f", -1), (1, 1), (-1, -1), (1.0, 1), (-1.0, -1),
                                        (True, 1), (False, -1)])
def test_isdiffpos_spellings(value, sign):
    out = map_detections(alerce_rows(isdiffpos=[value] * 3), source="alerce")
    assert (np.sign(out["flux"]) == sign).all()


def test_antares_columns_and_capital_band_names():
    frame = pd.DataFrame({"ant_objectid": ["A", "A"], "ant_mjd": [1.0, 2.0], "ant_passband": ["g", "R"],
                          "ant_mag": [19.0, 19.5], "ant_magerr": [0.1, 0.2]})
    out = map_detections(frame, source="antares")
    assert out["oid"].tolist() == ["A", "A"] and out["band"].tolist() == ["g", "r"]
    assert (out["flux"] > 0).all()


def test_flux_tables_get_magnitudes():
    frame = pd.DataFrame({"oid": ["S"], "mjd": [1.0], "band": ["r"], "flux": [-100.0], "flux_err": [10.0]})
    out = map_detections(frame, source="sim")
    assert out["mag"].iloc[0] == pytest.approx(18.9) and out["flux"].iloc[0] == -100.0


def test_missing_required_columns_are_named():
    with pytest.raises(SchemaError, match="no band column"):
        map_detections(alerce_rows().drop(columns="fid"), source="x")
    with pytest.raises(SchemaError, match="no mag_err column"):
        map_detections(alerce_rows().drop(columns="sigmapsf"), source="x")
    with pytest.raises(SchemaError, match="no oid column"):
        map_detections(alerce_rows().drop(columns="oid"), source="x")
    with pytest.raises(SchemaError, match="no time column"):
        map_detections(alerce_rows().drop(columns="mjd"), source="x")
    with pytest.raises(SchemaError, match="missing contract column"):
        LightCurves(objects=pd.DataFrame({"oid": []}), detections=pd.DataFrame(), non_detections=pd.DataFrame())


def test_recorded_alerce_lightcurve_response(shared_data):
    body = json.loads((shared_data / "alerce" / "ZTF20aaelulu_lightcurve.json").read_text())
    det = map_detections(pd.DataFrame(body["detections"]), source="alerce", oid="ZTF20aaelulu")
    det, report = validate_detections(det)
    # 58 rows, but two exposures are reported twice (two candids, same mjd and band): kept once, and said so.
    assert len(det) == 56 and report.rows_in == 58
    assert [(r.oid, r.rows) for r in report.rejections] == [("ZTF20aaelulu", 2)]
    assert set(det["band"]) <= {"g", "r"} and (det["oid"] == "ZTF20aaelulu").all()
    nd = map_non_detections(pd.DataFrame(body["non_detections"]), oid="ZTF20aaelulu")
    nd, nd_report = validate_non_detections(nd)
    assert len(nd) == 17 and nd_report.rows_dropped == 0


def test_alerce_lc_classifier_exports(shared_data):
    root = shared_data / "alerce" / "lc_classifier_examples"
    det = map_detections(pd.read_csv(root / "30_sne_detections_corr.csv"), source="alerce")
    assert det["oid"].str.startswith("ZTF").all()
    assert (det["flux"] < 0).sum() == (pd.read_csv(root / "30_sne_detections_corr.csv")["isdiffpos"] < 0).sum()
    nd = map_non_detections(pd.read_csv(root / "30_sne_non_detections.csv"))
    assert nd["mjd"].between(58000, 61000).all()  # jd was converted to mjd
    periodic = map_detections(pd.read_csv(root / "25_periodic_detections.csv"), source="alerce")
    assert periodic["mag_corr"].notna().mean() > 0.5
    labels = map_labels(pd.read_csv(root / "25_periodic_labels.csv"))
    assert "CEP" in set(labels["label"]) and "Ceph" not in set(labels["label"])


def test_validation_names_each_object_and_reason():
    frame = map_detections(pd.DataFrame({
        "oid": ["nan_mag", "inf_time", "zero_err", "band_i", "dup", "dup", "ok", "ok"],
        "mjd": list(60000.0 + np.array([1.0, np.inf, 1.0, 1.0, 5.0, 5.0, 1.0, 2.0])),
        "fid": [1, 1, 2, 3, 1, 1, 1, 2],
        "magpsf": [np.nan, 18.0, 18.0, 18.0, 18.0, 18.1, 18.0, 18.0],
        "sigmapsf": [0.1, 0.1, 0.0, 0.1, 0.1, 0.1, 0.1, 0.1],
    }), source="t")
    kept, report = validate_detections(frame)
    assert kept["oid"].tolist() == ["dup", "ok", "ok"]
    reasons = {(r.oid, r.reason) for r in report.rejections}
    assert ("nan_mag", "mag is NaN") in reasons
    assert ("inf_time", "time is NaN or infinite") in reasons
    assert ("zero_err", "mag_err is not positive") in reasons
    assert ("band_i", "band not in ['g', 'r']") in reasons
    assert ("dup", "duplicate key ('oid', 'mjd', 'band')") in reasons
    assert report.rows_in == 8 and report.rows_out == 3 and report.rows_dropped == 5
    assert "dropped" in report.summary() and "mag is NaN (1)" in report.summary()


def test_unsorted_objects_are_resorted_or_rejected():
    frame = map_detections(pd.DataFrame({"oid": ["a", "a", "b", "b"], "mjd": [60003.0, 60001.0, 60001.0, 60002.0],
                                         "fid": [1, 1, 1, 1], "magpsf": [18.0] * 4, "sigmapsf": [0.1] * 4}),
                           source="t")
    kept, report = validate_detections(frame, on_unsorted="sort")
    assert kept.loc[kept["oid"] == "a", "mjd"].tolist() == [60001.0, 60003.0]
    assert [(r.oid, r.rows) for r in report.rejections] == [("a", 0)]
    kept, report = validate_detections(frame, on_unsorted="reject")
    assert kept["oid"].unique().tolist() == ["b"]
    assert [(r.oid, r.reason, r.rows) for r in report.rejections] == [("a", "times not sorted", 2)]


def test_build_objects_summarises_detections_and_labels():
    det, _ = validate_detections(map_detections(alerce_rows(), source="alerce"))
    labels = map_labels(pd.DataFrame({"objectId": ["ZTF1"], "classALeRCE": ["Ceph"], "probability": [0.8]}))
    objects = build_objects(det, labels, source="alerce", label_source="alerce:lc_classifier")
    row = objects.iloc[0]
    assert (row["oid"], row["label"], row["n_det"], row["label_source"]) == ("ZTF1", "CEP", 3, "alerce:lc_classifier")
    assert row["first_mjd"] == 59000.1 and row["last_mjd"] == 59003.3 and row["label_probability"] == 0.8
    to_arrow(objects, OBJECTS_SCHEMA)


# --- malformed tables: validation never crashes and what it keeps always satisfies the contract -------------

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                   st.sampled_from([0.0, -0.1, 0.05, 18.0, np.nan, np.inf, -np.inf]))
rows = st.fixed_dictionaries({
    "oid": st.sampled_from(["A", "B", "C", ""]),
    "mjd": st.one_of(st.sampled_from([1.0, 2.0, 2.0, 3.0, np.nan, np.inf]), st.floats(0, 10)),
    "fid": st.sampled_from([1, 2, 3, 0, 1]),
    "magpsf": floats,
    "sigmapsf": floats,
    "isdiffpos": st.sampled_from(["t", "f", 1, -1]),
})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(rows, max_size=40), st.sampled_from(["sort", "reject"]))
def test_validation_of_malformed_tables(records, on_unsorted):
    frame = pd.DataFrame(records, columns=["oid", "mjd", "fid", "magpsf", "sigmapsf", "isdiffpos"])
    with np.errstate(over="ignore", invalid="ignore"):
        mapped = map_detections(frame, source="fuzz")
    kept, report = validate_detections(mapped, on_unsorted=on_unsorted)
    # Every row is accounted for: kept, or dropped with a reason naming its object.
    assert report.rows_in == len(frame)
    assert report.rows_out == len(kept)
    assert sum(r.rows for r in report.rejections) == report.rows_dropped
    assert all(r.reason for r in report.rejections)
    # What is kept satisfies the contract.
    assert kept["band"].isin(["g", "r"]).all()
    for col in ("mjd", "mag", "mag_err", "flux", "flux_err"):
        assert np.isfinite(kept[col].to_numpy(dtype=float)).all()
    assert (kept["mag_err"] > 0).all() and (kept["flux_err"] > 0).all()
    assert not kept.duplicated(["oid", "mjd", "band"]).any()
    assert (kept["oid"] != "").all()
    for _, group in kept.groupby("oid"):
        assert group["mjd"].is_monotonic_increasing
    to_arrow(kept, DETECTIONS_SCHEMA)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.fixed_dictionaries({"oid": st.sampled_from(["A", "B"]), "jd": st.floats(2.45e6, 2.47e6),
                                       "fid": st.sampled_from([1, 2, 4]), "diffmaglim": floats}), max_size=30))
def test_validation_of_malformed_upper_limits(records):
    frame = pd.DataFrame(records, columns=["oid", "jd", "fid", "diffmaglim"])
    kept, report = validate_non_detections(map_non_detections(frame))
    assert report.rows_in == len(frame) and report.rows_out == len(kept)
    assert np.isfinite(kept["diffmaglim"].to_numpy(dtype=float)).all()
    assert not kept.duplicated(["oid", "mjd", "band"]).any()
    pa.Table.from_pandas(kept, preserve_index=False)
