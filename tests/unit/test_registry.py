"""The promotion rule (pure) and the aliases on a real MLflow registry (sqlite store, no server)."""

from __future__ import annotations

import pytest

from deeprubin.registry import Decision, Registry, RegistryError, Scores, decide, promote, rollback


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
    tags = registry.version("3").tags
    assert tags["promotion/decision"] == "rejected" and tags["promotion/champion_macro_f1"] == "0.7000"
    assert promote(registry, "2", score).reason == "version 2 is already the champion"
    assert registry.history() == ["1", "2"]
    done = rollback(registry)
    assert done["champion_after"] == "1" and registry.alias("previous") is None
    assert registry.version("2").tags["promotion/decision"] == "rolled_back"
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(registry)
    with pytest.raises(RegistryError, match="no version 9"):
        promote(registry, "9", score)
