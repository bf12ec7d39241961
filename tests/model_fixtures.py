"""A real, untrained TCN logged and registered the way training does it (pt2, softmax head, ``classes`` tag), for
tests of classification, the alert consumer and the HTTP service that need a model in a registry, not a good one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deeprubin.schema import CLASSES


def served_tcn(seed: int = 0, hidden: int = 8, levels: int = 3):
    import torch

    from deeprubin.models.tcn import TCN
    from deeprubin.stages.preprocess import CHANNELS
    from deeprubin.stages.train import ProbabilityTCN

    torch.manual_seed(seed)
    return ProbabilityTCN(TCN(n_channels=len(CHANNELS), n_classes=len(CLASSES), hidden=hidden, levels=levels,
                              dropout=0.0)).eval()


def register_tcn(tracking_uri: str, name: str = "deeprubin-tcn", seed: int = 0, alias: str | None = "champion",
                 classes: tuple[str, ...] = CLASSES) -> str:
    """Log an untrained TCN to ``tracking_uri``, register it as a version of ``name``, point ``alias`` at it;
    returns the version."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from deeprubin.stages.preprocess import CHANNELS
    from deeprubin.stages.train import pip_requirements
    from deeprubin.tracking import using

    model = served_tcn(seed)
    example = np.random.default_rng(seed).normal(size=(2, len(CHANNELS), 100)).astype(np.float32)
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    with using(tracking_uri):
        mlflow.set_experiment("test-models")
        with mlflow.start_run():
            info = mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example,
                                            pip_requirements=pip_requirements(), serialization_format="pt2")
        version = str(mlflow.register_model(info.model_uri, name).version)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.set_model_version_tag(name, version, "classes", ",".join(classes))
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version


def sqlite_uri(directory: Path) -> str:
    return f"sqlite:///{Path(directory) / 'mlflow.db'}"
