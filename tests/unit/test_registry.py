"""The promotion rule (pure) and the aliases on a real MLflow registry (sqlite store, no server)."""

from __future__ import annotations

import pytest

from deeprubin.registry import (
    DESCRIPTION_MAX,
    Decision,
    Registry,
    RegistryError,
    Scores,
    decide,
    promote,
    rollback,
    split_description,
    with_decision,
)


def s(metric: float, **recall: float) -> Scores:
    return Scores(metric=metric, recall=recall or {"SNIa": metric, "SNII": metric}, n_objects=100)


def test_first_model_is_promoted():
    assert decide(s(0.1), None, "macro_f1", 0.0, 0.05)[0]


def test_challenger_must_beat_the_champion_by_more_than_the_margin():
    ok, reason, _ = decide(s(0.80), s(0.79), "macro_f1", 0.02, 0.05)
    assert not ok and "does not beat" in reason and "0.02" in reason
    assert decide(s(0.82), s(0.79), "macro_f1", 0.02, 0.05)[0]
    assert not decide(s(0.79), s(0.79), "macro_f1", 0.0, 0.05)[0]  # a tie keeps the champion


def test_no_class_recall_may_drop_more_than_the_bound():
    ok, reason, drops = decide(s(0.90, SNIa=0.99, SNII=0.70), s(0.85, SNIa=0.80, SNII=0.80), "macro_f1", 0.0, 0.05)
    assert not ok and "SNII" in reason and drops["SNII"] == pytest.approx(0.10)
    assert decide(s(0.90, SNIa=0.99, SNII=0.76), s(0.85, SNIa=0.80, SNII=0.80), "macro_f1", 0.0, 0.05)[0]


def test_a_nan_challenger_is_rejected():
    assert not decide(s(float("nan")), s(0.5), "macro_f1", 0.0, 0.05)[0]


@pytest.fixture
def registry(tmp_path):
    import mlflow
    import torch

    from deeprubin.tracking import using

    uri = f"sqlite:///{tmp_path}/m.db"
    with using(uri):
        with mlflow.start_run():
            info = mlflow.pytorch.log_model(torch.nn.Linear(2, 2), name="model", pip_requirements=["torch"],
                                            input_example=torch.zeros(2, 2).numpy())
        for _ in range(3):
            mlflow.register_model(info.model_uri, "m")
    return Registry(uri, "m")


def test_promotion_rollback_and_tags(registry):
    table = {"1": 0.5, "2": 0.7, "3": 0.6}

    def score(uri):
        return s(table[uri.rsplit("/", 1)[1]])

    assert promote(registry, "1", score).promoted
    second = promote(registry, "2", score)
    assert isinstance(second, Decision) and second.promoted and second.champion_before == "1"
    third = promote(registry, "3", score)
    assert not third.promoted and third.champion_after == "2"
    assert registry.aliases() == {"champion": "2", "challenger": "3", "previous": "1"}
    rejected = registry.version("3")
    assert rejected.tags == {"promotion/decision": "rejected"}  # the numbers are in the description, not tags
    assert rejected.description.startswith("Promotion: rejected (") and third.reason in rejected.description
    assert "this version 0.6000, champion (version 2) 0.7000 macro_f1" in rejected.description
    replaced = registry.version("1")
    assert replaced.tags == {"promotion/decision": "promoted", "promotion/replaced_by": "2"}
    first, second_paragraph = replaced.description.split("\n\n")
    assert first.startswith("Promotion: promoted (") and "no champion yet" in first
    assert second_paragraph.startswith("Promotion: replaced as champion by version 2 (")
    assert promote(registry, "2", score).reason == "version 2 is already the champion"
    assert registry.history() == ["1", "2"]
    done = rollback(registry)
    assert done["champion_after"] == "1" and registry.alias("previous") is None
    demoted = registry.version("2")
    assert demoted.tags["promotion/decision"] == "rolled_back"
    assert demoted.description.split("\n\n")[-1].startswith("Promotion: rolled back (")
    restored = registry.version("1")
    assert "promotion/replaced_by" not in restored.tags  # champion again: no longer replaced
    assert restored.description.split("\n\n")[-1].startswith("Promotion: champion again (")
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(registry)
    with pytest.raises(RegistryError, match="no version 9"):
        promote(registry, "9", score)


def test_promotion_paragraphs_stay_on_top_of_the_description():
    body = "Evaluation of the TCN:\n- bts: macro-F1 0.700\n\nTrained: run r."
    first = with_decision(body, ["Promotion: promoted (t1): because."])
    assert first == "Promotion: promoted (t1): because.\n\n" + body
    assert split_description(first) == (["Promotion: promoted (t1): because."], body)
    later = with_decision(first, ["Promotion: replaced as champion by version 2 (t2)."])
    assert split_description(later)[0] == ["Promotion: promoted (t1): because.",
                                            "Promotion: replaced as champion by version 2 (t2)."]
    assert split_description(with_decision(later, ["Promotion: rejected (t3): no."], replace=True)) == \
        (["Promotion: rejected (t3): no."], body)
    assert with_decision(None, []) == "" and split_description(None) == ([], "")
    # MLflow keeps 5000 characters: the oldest promotion paragraphs go first, then the end of the rest.
    crowded = with_decision("x" * 4000, [f"Promotion: event {i}." + "y" * 300 for i in range(8)])
    assert len(crowded) <= DESCRIPTION_MAX and split_description(crowded)[0][-1].startswith("Promotion: event 7.")
    assert len(with_decision("z" * 9000, ["Promotion: promoted (t): ok."])) == DESCRIPTION_MAX


def test_register_describes_a_version_with_the_real_numbers_first():
    from deeprubin.stages.register import describe, version_tags

    def m(f1, n, **recall):
        return {"n": n, "macro_f1": f1, "macro_f1_low": f1 - 0.1, "macro_f1_high": f1 + 0.1, "ece": 0.05,
                "per_class": {c: {"recall": r} for c, r in recall.items()}, "early": {"20d": {"macro_f1": f1 / 2}}}

    metrics = {"tcn": {"test": m(0.9, 48, QSO=1.0, CEP=0.9, SNIa=0.8, SNII=0.7),
                       "bts": m(0.71, 120, SNIa=0.8, SNII=0.55)},
               "forest": {"bts": m(0.66, 120, SNIa=0.9, SNII=0.4)}, "skipped": {"ogle": "file absent"}}
    trained = {"run_id": "abc", "epochs": 12, "best_val_macro_f1": 0.8, "data_hash": "md5.dir", "git_commit": "c0ffee",
               "extra": {"tags": {"classes": "QSO,CEP,SNIa,SNII", "preprocessing/grid_days": "100", "stage": "train"}}}
    text = describe(metrics, trained, real_set="bts")
    lines = text.splitlines()
    assert lines[1] == ("- bts (real, held out, 120 objects): macro-F1 0.710 [0.610, 0.810]; recall SNIa 0.800, "
                        "SNII 0.550; macro-F1 at 20 d 0.355; ECE 0.050 (forest baseline: macro-F1 0.660)")
    assert "recall QSO 1.000, CEP 0.900, SNIa 0.800, SNII 0.700" in lines[2]  # the classes in base.classes order
    assert lines[2].startswith("- test (simulated test split, 48 objects): macro-F1 0.900")
    assert "- not evaluated: ogle: file absent" in lines
    assert text.endswith("Trained: run abc, 12 epochs, best validation macro-F1 0.800; data md5.dir; commit c0ffee. "
                         "Every parameter and number is on the run.")
    assert describe({}, trained).startswith("Not evaluated yet")
    assert version_tags(trained) == {"git_commit": "c0ffee", "data_hash": "md5.dir", "classes": "QSO,CEP,SNIa,SNII"}


def test_a_tie_is_rejected_rollback_says_why_and_force_makes_a_rollback_possible(registry):
    """The README's walkthrough: a retrained model that only ties the champion is rejected, so there is no
    `previous` and `rollback` refuses, saying why and what to do; `promote --force` replaces the champion (recorded
    as forced, with the gate's verdict), and then `rollback` restores the old champion."""
    tie = lambda uri: s(0.8)  # noqa: E731: every version scores the same, like a rerun on the same data

    assert promote(registry, "1", tie).promoted
    rejected = promote(registry, "2", tie)
    assert not rejected.promoted and "(difference +0.0000)" in rejected.reason
    with pytest.raises(RegistryError) as refused:
        rollback(registry)
    message = str(refused.value)
    assert "no previous champion to roll back to: version 1 is champion" in message
    assert "the last candidate, version 2, was rejected by the promotion gate" in message
    assert "Nothing was changed" in message and "deeprubin promote --version N" in message and "--force" in message
    assert registry.aliases() == {"champion": "1", "challenger": "2"}

    forced = promote(registry, "2", tie, force=True)
    assert forced.promoted and forced.forced and forced.outcome == "forced" and forced.champion_after == "2"
    assert forced.reason.startswith("--force overrides the promotion gate, which rejects it: macro_f1 0.8000")
    assert forced.report()["outcome"] == "forced"
    assert registry.aliases() == {"champion": "2", "challenger": "2", "previous": "1"}
    version = registry.version("2")
    assert version.tags == {"promotion/decision": "forced"}
    assert version.description.startswith("Promotion: forced (") and forced.reason in version.description
    # force changes nothing when the gate passes anyway, or when the version already serves
    assert promote(registry, "2", tie, force=True).reason == "version 2 is already the champion"
    done = rollback(registry)
    assert done["champion_after"] == "1" and registry.aliases() == {"champion": "1", "challenger": "2"}
    with pytest.raises(RegistryError, match="no older champion is recorded") as again:
        rollback(registry)
    assert "rejected" not in str(again.value)  # version 2 was rolled back, not rejected: the message does not say so
    better = promote(registry, "3", lambda uri: s(0.9 if uri.endswith("/3") else 0.8), force=True)
    assert better.promoted and not better.forced and better.outcome == "promoted"
