"""A real, untrained TCN logged and registered the way training does it (pt2, softmax head, ``classes`` tag), for
tests of classification, the alert consumer and the HTTP service that need a model in a registry, not a good one."""

from __future__ import annotations

from pathlib import Path

from deeprubin.schema import CLASSES


def served_tcn(seed: int = 0, hidden: int = 8, levels: int = 3):
    """A small network (fast in tests) in the served form."""
    from deeprubin.config import TrainParams
    from deeprubin.models.served import untrained_served_model

    return untrained_served_model(TrainParams(hidden=hidden, levels=levels, dropout=0.0), seed, len(CLASSES))


def register_tcn(tracking_uri: str, name: str = "deeprubin-tcn", seed: int = 0, alias: str | None = "champion",
                 classes: tuple[str, ...] = CLASSES) -> str:
    """Log an untrained TCN to ``tracking_uri``, register it as a version of ``name``, point ``alias`` at it;
    returns the version."""
    from deeprubin.models.served import log_and_register

    return log_and_register(served_tcn(seed), tracking_uri, name, classes, alias=alias, experiment="test-models")


def sqlite_uri(directory: Path) -> str:
    return f"sqlite:///{Path(directory) / 'mlflow.db'}"
