"""The served model: the one wrapper every consumer of a trained network uses, and the one way to log and load it.

- :class:`ProbabilityTCN`: what training logs to MLflow, ``x (N, C, T) float32 -> probabilities (N, K)``.
- :func:`log_and_register`: log a network as training does (pt2, signature, input example, pinned requirements,
  its classes and preprocessing settings), register it and point an alias at it.
- :class:`ServingModel`: a loaded model with its classes, version and :class:`~deeprubin.processed.Preprocessing`;
  :func:`load_model` reads it from the registry (``models:/name@alias``, ``models:/name/3``) or a local MLflow model
  directory, :func:`load_checkpoint` from the train stage's Lightning checkpoint (evaluation, before registering),
  :func:`load_exported` the bare network from a local copy (classification worker processes, no MLflow import).
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deeprubin.config import TrainParams
from deeprubin.lightcurves.tensorize import CHANNELS
from deeprubin.models.calibration import AgeTemperature
from deeprubin.outputs import LOGGED_MODEL
from deeprubin.processed import Preprocessing
from deeprubin.schema import CLASSES

CLASSES_TAG = "classes"  # the model's output columns, in order
METADATA_KEY = "deeprubin"  # MLmodel metadata: {"classes": [...], "preprocessing": {...}, "calibration": {...}}


class ProbabilityTCN(nn.Module):
    """The logged model: ``x (N, C, T) float32 -> probabilities (N, n_classes)``, rows summing to 1.

    ``calibration`` (:class:`~deeprubin.models.calibration.AgeTemperature`, fitted by ``train``): the logits are
    divided by the temperature of each object's age, read from ``x``, before the softmax; None: the plain softmax."""

    def __init__(self, tcn: nn.Module, calibration: AgeTemperature | None = None):
        super().__init__()
        self.tcn = tcn
        self.calibration = calibration

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.tcn(x)
        if self.calibration is not None:
            logits = self.calibration(x, logits)
        return torch.softmax(logits, dim=1)


def untrained_served_model(params: TrainParams | None = None, seed: int = 0, n_classes: int = 4) -> ProbabilityTCN:
    """A freshly initialised network of the configured shape, in the served form: benchmarks of speed (which does
    not depend on the weights) and tests that need a real model in a registry, not a good one."""
    from deeprubin.models.tcn import TCN

    p = params or TrainParams()
    torch.manual_seed(seed)
    return ProbabilityTCN(TCN(n_channels=len(CHANNELS), n_classes=n_classes, hidden=p.hidden,
                              kernel_size=p.kernel_size, levels=p.levels, dropout=p.dropout, readout=p.readout,
                              flux_scale=p.flux_compression, shape=p.shape_features)).eval()


def pip_requirements() -> list[str]:
    """Pinned, explicit requirements of the logged model (MLflow infers nothing)."""
    import pytorch_lightning as pl

    def pin(name: str, version: str) -> str:
        return f"{name}=={version.split('+')[0]}"

    return [pin("torch", torch.__version__), pin("pytorch-lightning", pl.__version__), pin("numpy", np.__version__)]


def model_tags(classes: Sequence[str], preprocessing: Preprocessing) -> dict[str, str]:
    """The tags that make a version self-describing: its output classes and how its input was made."""
    return {CLASSES_TAG: ",".join(classes), **preprocessing.as_tags()}


def log_model(model: nn.Module, example: np.ndarray, classes: Sequence[str], preprocessing: Preprocessing,
              tags: dict[str, str] | None = None):
    """Log ``model`` into the active MLflow run (pt2, signature from ``example``, pinned requirements, classes and
    preprocessing settings in the MLmodel metadata). Returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import infer_signature

    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    calibration = getattr(model, "calibration", None)
    metadata = {METADATA_KEY: {"classes": list(classes), "preprocessing": preprocessing.as_dict(),
                               "calibration": calibration.as_dict() if calibration is not None else None}}
    return mlflow.pytorch.log_model(model, name=LOGGED_MODEL, signature=signature, input_example=example,
                                    pip_requirements=pip_requirements(), serialization_format="pt2",
                                    metadata=metadata, tags=tags)


def log_and_register(model: nn.Module, tracking_uri: str, name: str, classes: Sequence[str],
                     alias: str | None = None, experiment: str = "served-models",
                     artifact_location: str | None = None, preprocessing: Preprocessing | None = None) -> str:
    """Log ``model`` as training does, register it as a version of ``name`` tagged with its ``classes`` and
    ``preprocessing`` (default: the default settings), and point ``alias`` at it. Returns the version."""
    import mlflow

    from deeprubin.tracking import using

    preprocessing = preprocessing or Preprocessing(channels=CHANNELS)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=artifact_location)
    example = np.random.default_rng(0).normal(size=(2, len(CHANNELS), preprocessing.grid_days)).astype(np.float32)
    with using(tracking_uri):
        with mlflow.start_run(experiment_id=experiment_id):
            info = log_model(model, example, classes, preprocessing)
        version = str(mlflow.register_model(info.model_uri, name).version)
    for key, value in model_tags(classes, preprocessing).items():
        client.set_model_version_tag(name, version, key, value)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version


# ----------------------------------------------------------------------------------------------------------------
# Loading.

@dataclass
class ServingModel:
    """A loaded model: ``x (N, C, T) float32 -> probabilities (N, len(classes))``, with the preprocessing settings
    it was trained with (None only for a model logged before they were recorded)."""

    uri: str
    name: str
    version: str
    classes: tuple[str, ...]
    module: Any
    run_id: str | None = None
    device: str = "cpu"
    local_path: str | None = None  # a local copy of the MLflow model: worker processes load it from there
    preprocessing: Preprocessing | None = None
    calibration: dict[str, Any] | None = None  # the temperatures inside the network (AgeTemperature.as_dict)

    def settings(self, fallback: Preprocessing) -> Preprocessing:
        """The model's own preprocessing settings; ``fallback`` (the configured ones) for an older model."""
        if self.preprocessing is None:
            warnings.warn(f"{self.uri} records no preprocessing settings: using the configured grid "
                          f"({fallback.grid_days} d, context {fallback.fit_context_days:g} d)", stacklevel=2)
            return fallback
        return self.preprocessing

    def to(self, device: str = "auto") -> "ServingModel":
        """Move the network to ``device`` (``auto``: cuda when available). A model that cannot move falls back to
        the CPU under ``auto`` and fails under an explicit ``cuda``."""
        want = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if want == "cuda" and not torch.cuda.is_available():
            raise ValueError("classify.device is 'cuda' but torch sees no CUDA device")
        if want != self.device:
            try:
                self.module = self.module.to(want)
                self.device = want
            except Exception as exc:  # noqa: BLE001 - an exported graph with device-bound constants
                if device != "auto":
                    raise ValueError(f"{self.uri}: cannot move the model to {want}: {exc}") from exc
                warnings.warn(f"{self.uri}: stays on the CPU ({type(exc).__name__}: {exc})", stacklevel=2)
        return self

    def predict_proba(self, x: np.ndarray, batch: int = 1024, dtype: type = np.float64) -> np.ndarray:
        return predict(self.module, x, batch, self.device, len(self.classes), dtype)


def predict(module, x: np.ndarray, batch: int, device: str, n_classes: int, dtype: type = np.float64) -> np.ndarray:
    """Probabilities of ``module`` (a probability network) on ``x``, ``batch`` rows at a time, as ``dtype``
    (float64 for output files; float32 is the network's own precision)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            chunk = torch.from_numpy(np.ascontiguousarray(x[i:i + batch], dtype=np.float32)).to(device)
            out.append(np.asarray(module(chunk).detach().cpu().numpy(), dtype=dtype))
    return np.concatenate(out) if out else np.zeros((0, n_classes), dtype=dtype)


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None); else None."""
    if not uri.startswith("models:/"):
        return None
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    name, _, version = rest.partition("/")
    return (name, version, None) if version.isdigit() else None


def _metadata(local: str) -> dict[str, Any]:
    from mlflow.models import Model

    try:
        return dict((Model.load(local).metadata or {}).get(METADATA_KEY) or {})
    except Exception:  # noqa: BLE001 - an MLmodel without metadata (older models): the tags decide
        return {}


def load_model(uri: str, tracking_uri: str, default_classes: Iterable[str] = CLASSES) -> ServingModel:
    """Load ``uri`` (a registry URI or a local MLflow model directory) from ``tracking_uri``.

    Classes and preprocessing come from the model's MLmodel metadata, else the version's tags; classes fall back
    to ``default_classes``. A registry alias that points nowhere gives a clear error."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from deeprubin.tracking import using

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    parsed = parse_registry_uri(uri)
    name, version, run_id, tags = Path(uri).name or uri, "local", None, {}
    if parsed is not None:
        name, version_number, alias = parsed
        try:
            mv = (client.get_model_version_by_alias(name, alias) if alias
                  else client.get_model_version(name, version_number))
        except MlflowException as exc:
            what = f"alias @{alias}" if alias else f"version {version_number}"
            raise LookupError(f"{uri}: the registry at {tracking_uri} has no {what} of {name} ({exc.message})") \
                from None
        version, run_id, tags = str(mv.version), mv.run_id, dict(mv.tags)
        uri = f"models:/{name}/{version}"  # pin the version: an alias may move while we classify
    with using(tracking_uri):
        if Path(uri).is_dir():
            local = uri
        else:  # one download, kept while the model lives: GP worker processes load the network from it
            scratch = tempfile.mkdtemp(prefix="deeprubin-model-")
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch)
        module = mlflow.pytorch.load_model(local)
    meta = _metadata(str(local))
    if meta.get("classes"):
        classes = tuple(meta["classes"])
    else:
        classes = tuple(tags[CLASSES_TAG].split(",")) if tags.get(CLASSES_TAG) else tuple(default_classes)
    preprocessing = (Preprocessing.from_dict(meta["preprocessing"]) if meta.get("preprocessing")
                     else Preprocessing.from_tags(tags))
    model = ServingModel(uri=uri, name=name, version=version, classes=classes, module=module, run_id=run_id,
                         local_path=str(local), preprocessing=preprocessing, calibration=meta.get("calibration"))
    if local != uri:
        weakref.finalize(model, shutil.rmtree, scratch, True)
    return model


def load_checkpoint(checkpoint: Path | str, preprocessing: Preprocessing | None = None) -> ServingModel:
    """The train stage's best checkpoint as a served model (softmax over the TCN, with the calibration that train
    fitted and stored in the checkpoint, as in the logged model), on the GPU when there is one."""
    from deeprubin.models.lit import LitTCN

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lit = LitTCN.load_from_checkpoint(checkpoint, map_location=device).eval()
    calibration = AgeTemperature.from_dict(lit.calibration)
    module = ProbabilityTCN(lit.model, None if calibration is None else calibration.to(device)).eval()
    return ServingModel(uri=str(checkpoint), name=Path(checkpoint).stem, version="checkpoint",
                        classes=tuple(lit.classes), module=module, device=device, preprocessing=preprocessing,
                        calibration=None if calibration is None else calibration.as_dict())


def load_exported(model_path: str) -> Any:
    """The bare network of a local MLflow model copy: the pt2 graph through ``torch.export`` when present (no
    MLflow import, no pickle: what a classification worker process needs), else MLflow's loader."""
    exported = sorted(Path(model_path).rglob("model.pt2"))
    if exported:
        return torch.export.load(str(exported[0])).module()
    import mlflow.pytorch

    return mlflow.pytorch.load_model(model_path)
