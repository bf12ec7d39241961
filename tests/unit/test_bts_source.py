"""The BTS source's pure parts: the type grouping, the CSV parsing and the watermark diff."""

from __future__ import annotations

import pandas as pd
import pytest

from deeprubin.sources.bts import BtsFormatError, TruncatedBody, diff_catalogue, map_type, parse_catalogue
from tests.bts_server import catalogue_rows, pick, shared_labels, to_csv


def test_the_type_grouping_reproduces_the_shared_labels_for_every_row():
    labels = shared_labels()
    labels = labels.assign(got=labels["bts_type"].map(map_type))
    wrong = labels.loc[labels["got"] != labels["label"], ["oid", "bts_type", "label", "got"]]
    assert len(labels) == 1897
    assert wrong.empty, wrong.head(10).to_string()


@pytest.mark.parametrize("spelling, label", [
    ("SN Ia", "SNIa"), ("Ia", "SNIa"), ("SNIa", "SNIa"), ("sn ia-91T", "SNIa"), ("Ia-91bg", "SNIa"),
    ("SN Iax", "SNIa"), ("Ia-CSM", "SNIa"), ("SN  Ia-pec ", "SNIa"),
    ("SN II", "SNII"), ("II", "SNII"), ("SN IIP", "SNII"), ("IIP", "SNII"), ("SN II-pec", "SNII"),
    ("SN IIn", "SNIIn"), ("IIn", "SNIIn"), ("SN IIb", "SNIIb"), ("SN Ibc", "SNIbc"), ("Ic-BL", "SNIbc"),
    ("SN Ib/c", "SNIbc"), ("SN Ibn", "SNIbc"), ("SLSN-I", "SLSN"), ("SLSN-II", "SLSN"),
    ("TDE", "other"), ("CV", "other"), ("nova", "other"), ("SN Ia?", "other"), ("SN", "other"),
    ("-", None), ("", None), (None, None), (float("nan"), None),
])
def test_real_bts_spellings_map_with_and_without_the_sn_prefix(spelling, label):
    assert map_type(spelling) == label


def _catalogue(**per_type) -> str:
    labels = pick(shared_labels(), per_type or {"SN Ia": 3, "SN II": 2, "TDE": 1})
    return to_csv(catalogue_rows(labels, untyped=["ZTF21aaaaaaa"])).decode()


def test_the_csv_export_is_parsed_typed_entries_kept_untyped_counted():
    text = _catalogue()
    cat = parse_catalogue(text)
    assert cat.rows_in == 7 and cat.untyped == 1 and not cat.dropped
    assert list(cat.rows["oid"]) == sorted(cat.rows["oid"])
    assert cat.rows["label"].value_counts().to_dict() == {"SNIa": 3, "SNII": 2, "other": 1}
    assert {"oid", "bts_type", "label", "IAUID", "peakmag", "redshift"} <= set(cat.rows.columns)


def test_a_body_cut_inside_a_row_is_truncated_and_retried():
    text = _catalogue()
    with pytest.raises(TruncatedBody):
        parse_catalogue(text[: text.index("\n", len(text) // 2) + 6])
    # Cut exactly at a row boundary the rest parses (nothing marks it): only whole rows are missing.
    assert parse_catalogue(text[: text.index("\n", len(text) // 2) + 1]).rows_in < 7


def test_bad_rows_are_dropped_and_named_the_rest_kept():
    lines = _catalogue().splitlines()
    lines.insert(2, "not-an-oid," + ",".join(["x"] * 14))
    lines.insert(3, "ZTF20abcdefg,too,few")
    lines.append(lines[1])  # the same object twice
    cat = parse_catalogue("\n".join(lines) + "\n")
    reasons = {r.oid: r.reason for r in cat.dropped}
    assert "not a ZTF object id" in reasons["not-an-oid"]
    assert "fields" in reasons["ZTF20abcdefg"]
    assert any("second row" in r for r in reasons.values())
    assert len(cat.rows) == 6


@pytest.mark.parametrize("body, words", [
    ("<html><body>Warning: mysqli_connect()</body></html>", "HTML page"),
    ("ZTFID,IAUID,RA\nZTF20abcdefg,SN 2020a,1.0\n", "type"),
    ("", "empty"),
])
def test_a_download_that_is_not_the_catalogue_is_a_clear_error(body, words):
    with pytest.raises(BtsFormatError, match=words):
        parse_catalogue(body)


def test_the_watermark_diff_finds_new_and_retyped_entries_and_skips_the_rest():
    rows = pd.DataFrame({"oid": ["ZTF20aaaaaaa", "ZTF20aaaaaab", "ZTF20aaaaaac", "ZTF20aaaaaad"],
                         "bts_type": ["SN Ia", "SN II", "SN Ic", "SN Ia"], "label": ["SNIa", "SNII", "SNIbc", "SNIa"]})
    types = {"ZTF20aaaaaaa": "SN Ia", "ZTF20aaaaaab": "SN Ia"}
    diff = diff_catalogue(rows, types, unavailable={"ZTF20aaaaaad": "SN Ia"})
    assert list(diff.new["oid"]) == ["ZTF20aaaaaac"]
    assert list(diff.retyped["oid"]) == ["ZTF20aaaaaab"]
    assert diff.unchanged == 1 and diff.unavailable == 1
    assert list(diff.todo["change"]) == ["retyped", "new"]
    # An object that failed for good is asked again once it is re-typed.
    again = diff_catalogue(rows.assign(bts_type=["SN Ia", "SN II", "SN Ic", "SN Ia-91T"]), types,
                           unavailable={"ZTF20aaaaaad": "SN Ia"})
    assert "ZTF20aaaaaad" in set(again.new["oid"])


def test_supernovae_labelled_by_a_classifier_are_left_out_of_scoring_when_spectroscopic_ones_exist():
    import numpy as np

    from deeprubin.evaluation.sets import classifier_supernovae

    objects = pd.DataFrame({"oid": ["a", "b", "c", "d", "e"], "label": ["SNIa", "SNII", "SNIa", "QSO", "SNII"],
                            "label_source": ["bts:spectroscopic", "alerce:lc_classifier", "simulated",
                                             "alerce:lc_classifier", "alerce:lc_classifier"]})
    oids, labels = objects["oid"].to_numpy(), objects["label"].to_numpy()
    assert classifier_supernovae(objects, oids, labels).tolist() == [False, True, False, False, True]
    # Without any spectroscopic supernova the classifier's are the only ones: kept (and the default store, simulated
    # plus the shipped BTS files, loses nothing).
    alerce_only = objects.loc[objects["label_source"] != "bts:spectroscopic"]
    assert not classifier_supernovae(alerce_only, alerce_only["oid"].to_numpy(),
                                     alerce_only["label"].to_numpy()).any()
    default = objects.assign(label_source=["bts:spectroscopic", "simulated", "simulated", "simulated", "simulated"])
    assert not np.any(classifier_supernovae(default, oids, labels))
