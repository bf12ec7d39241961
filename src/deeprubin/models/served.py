"""The served model: the one wrapper every consumer of a trained network uses, and the one way to log and load it.

- :class:`ProbabilityTCN`: what training logs to MLflow, ``x (N, C, T) float32 -> probabilities (N, K)``.
- :func:`log_and_register`: log a network as training does (pt2, signature, input example, pinned requirements,
  its classes and preprocessing settings), register it and point an alias at it.
- :class:`ServingModel`: a loaded model with its classes, version and :class:`~deeprubin.processed.Preprocessing`;
  :func:`load_model` reads it from the registry (``models:/name@alias``, ``models:/name/3``) or a local MLflow model
  directory, :func:`load_checkpoint` from the train stage's Lightning checkpoint (evaluation, before registering),
  :func:`load_exported` the bare network from a local copy (classification worker processes, no MLflow import).

Loading trusts nothing in a model directory: only the pt2 export (``torch.export``) that the MLmodel's ``pytorch``
flavour names is read, after :mod:`deeprubin.models.trusted` has checked that it holds no pickle and no code;
anything else raises :class:`~deeprubin.models.trusted.ModelRejected`. MLflow's own loaders (which unpickle a
``model.pth``) are never called.
"""

from __future__ import annotations

import re
import shutil
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
from deeprubin.models.trusted import ModelRejected  # noqa: F401 (re-exported)
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
        if calibration is not None:
            calibration.grid_days = self.grid_days

    @property
    def grid_days(self) -> int | None:
        """The window of the network's input when it may be given only its first days (see :func:`predict`)."""
        return getattr(self.tcn, "grid_days", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.tcn(x)
        if self.calibration is not None:
            logits = self.calibration(x, logits)
        return torch.softmax(logits, dim=1)


def untrained_served_model(params: TrainParams | None = None, seed: int = 0, n_classes: int = 4,
                           grid_days: int | None = None) -> ProbabilityTCN:
    """A freshly initialised network of the configured shape, in the served form: benchmarks of speed (which does
    not depend on the weights) and tests that need a real model in a registry, not a good one. ``grid_days``: its
    window, as training gives it (then it takes fewer days: :func:`time_cut`); None: the input's length."""
    from deeprubin.models.tcn import TCN, TCNEnsemble

    p = params or TrainParams()
    torch.manual_seed(seed)
    nets = [TCN(n_channels=len(CHANNELS), n_classes=n_classes, hidden=p.hidden, kernel_size=p.kernel_size,
                levels=p.levels, dropout=p.dropout, readout=p.readout, flux_scale=p.flux_compression,
                shape=p.shape_features, age_input=p.age_input, grid_days=grid_days) for _ in range(p.members)]
    return ProbabilityTCN(nets[0] if p.members == 1 else TCNEnsemble(nets)).eval()


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
    if getattr(model, "grid_days", None) is not None:  # any number of days up to the window: a dynamic T in the export
        from mlflow.types.schema import Schema, TensorSpec

        signature.inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, example.shape[1], -1))])
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
    if getattr(model, "grid_days", None) not in (None, preprocessing.grid_days):
        raise ValueError(f"the network's window is {model.grid_days} days, its preprocessing's "
                         f"{preprocessing.grid_days}")
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
    (float64 for output files; float32 is the network's own precision).

    A network that takes a shorter window (:func:`time_cut`) gets each batch only up to its curves' last detection
    day: its causal features, pooled over the observed days, do not depend on the days after (young curves, most of
    an alert stream's, use a fraction of the 100 days). Rows are batched by that length (sorted), answered in their
    own order."""
    if not len(x):
        return np.zeros((0, n_classes), dtype=dtype)
    out: np.ndarray | None = None
    lengths = observed_lengths(x) if time_cut(module) else None
    order = np.argsort(lengths, kind="stable") if lengths is not None else None
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            if order is None:
                rows, part = slice(i, i + batch), x[i:i + batch]
            else:
                rows = order[i:i + batch]
                part = x[rows, :, :int(lengths[rows].max())]
            chunk = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32)).to(device)
            p = np.asarray(module(chunk).detach().cpu().numpy(), dtype=dtype)
            if out is None:
                out = np.empty((len(x), p.shape[1]), dtype=dtype)
            out[rows] = p
    return out


def time_cut(module) -> bool:
    """Whether ``module`` may be given fewer days than its window: an in-process network that knows its window
    (``grid_days``), or a loaded graph exported with a dynamic time dimension
    (:data:`deeprubin.models.trusted.TIME_CUT_ATTRIBUTE`)."""
    from deeprubin.models.trusted import TIME_CUT_ATTRIBUTE

    return bool(getattr(module, TIME_CUT_ATTRIBUTE, False)) or getattr(module, "grid_days", None) is not None


MIN_CUT_DAYS = 2  # torch.export specialises sizes 0 and 1: a dynamic dimension is at least 2


def observed_lengths(x: np.ndarray) -> np.ndarray:
    """(N,) days each row of ``x`` (N, C, T) needs: up to its last detection day, by the rule of
    :func:`deeprubin.models.tcn.observed_mask` (all T when it has none), at least :data:`MIN_CUT_DAYS`."""
    from deeprubin.models.tcn import SINCE_CHANNELS, detection_threshold

    t = x.shape[2]
    since = np.minimum(x[:, SINCE_CHANNELS[0]], x[:, SINCE_CHANNELS[1]]).astype(np.float32, copy=False)
    detected = since < np.float32(detection_threshold(t))  # float32, as the network compares
    last = np.where(detected.any(axis=1), t - 1 - np.argmax(detected[:, ::-1], axis=1), t - 1)
    return np.clip(last + 1, min(MIN_CUT_DAYS, t), t)


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


#: MLflow 3's URI of a logged (not registered) model, ``models:/m-<id>``: what training logs before registration.
LOGGED_MODEL_URI = re.compile(r"models:/m-[0-9a-f]{32}")
MODEL_SCRATCH = "deeprubin-model-"  # prefix of a registry model's local copy in the temporary directory


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(getattr(exc, "message", None) or exc).split())
    return text or type(exc).__name__


def _local_directory(uri: str) -> Path | None:
    """The local path that ``uri`` names (a path, or a ``file://`` URI); None for a remote artifact URI."""
    from urllib.parse import unquote, urlparse
    from urllib.request import url2pathname

    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            return None
        return Path(url2pathname(unquote(parsed.path)))
    if parsed.scheme and len(parsed.scheme) > 1:  # runs:/, models:/, mlflow-artifacts:/, s3://, http(s)://
        return None
    return Path(uri)


def load_model(uri: str, tracking_uri: str, default_classes: Iterable[str] = CLASSES) -> ServingModel:
    """Load ``uri`` (a registry URI ``models:/name@alias`` / ``models:/name/N``, a local MLflow model directory or
    ``file://`` URI, or another MLflow artifact URI) from ``tracking_uri``.

    Only a pt2 export is loaded, checked first (:mod:`deeprubin.models.trusted`): a pickled model, custom code or a
    graph that would run code raises :class:`~deeprubin.models.trusted.ModelRejected` (a ValueError), a missing
    directory FileNotFoundError, a registry URI that names no version (or a version or alias that does not exist)
    ValueError / LookupError: one line each, naming the URI. Classes and preprocessing come from the model's MLmodel
    metadata, else the version's tags; classes fall back to ``default_classes``. A download is kept in a
    ``deeprubin-model-<pid>-*`` folder of the temporary directory while the model lives, and removed when loading
    fails."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from deeprubin import scratch
    from deeprubin.models.trusted import load_checked
    from deeprubin.tracking import using

    parsed = parse_registry_uri(uri)
    if parsed is None and uri.startswith("models:/") and not LOGGED_MODEL_URI.fullmatch(uri):
        name = uri[len("models:/"):].split("/")[0] or "NAME"
        raise ValueError(f"{uri}: a registry model URI names a version or an alias: models:/{name}@champion or "
                         f"models:/{name}/3")
    name, version, run_id, tags = Path(uri).name or uri, "local", None, {}
    if parsed is not None:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        name, version_number, alias = parsed
        try:
            mv = (client.get_model_version_by_alias(name, alias) if alias
                  else client.get_model_version(name, version_number))
        except MlflowException as exc:
            what = f"alias @{alias}" if alias else f"version {version_number}"
            raise LookupError(f"{uri}: the registry at {tracking_uri} has no {what} of {name} ({_one_line(exc)})") \
                from None
        version, run_id, tags = str(mv.version), mv.run_id, dict(mv.tags)
        uri = f"models:/{name}/{version}"  # pin the version: an alias may move while we classify
    local_dir = None if parsed is not None else _local_directory(uri)
    scratch_dir = None
    try:
        if local_dir is not None:
            if not local_dir.is_dir():
                raise FileNotFoundError(f"{uri}: no such model directory" if not local_dir.exists()
                                        else f"{uri}: not a directory (an MLflow model is a directory)")
            local = str(local_dir)
            name = local_dir.name or name
        else:  # one download, kept while the model lives: GP worker processes load the network from it
            scratch_dir = scratch.make(MODEL_SCRATCH)
            try:
                with using(tracking_uri):
                    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(scratch_dir))
            except Exception as exc:  # noqa: BLE001 - MLflow's many ways of saying "not there": one line
                raise LookupError(f"{uri}: cannot download the model from {tracking_uri} ({_one_line(exc)})") \
                    from None
        module, spec = load_checked(local, uri)
        meta = spec.get("metadata") if isinstance(spec.get("metadata"), dict) else {}
        meta = meta.get(METADATA_KEY) if isinstance(meta.get(METADATA_KEY), dict) else {}
        try:
            if meta.get("classes"):
                classes = tuple(str(c) for c in meta["classes"])
            else:
                classes = tuple(tags[CLASSES_TAG].split(",")) if tags.get(CLASSES_TAG) else tuple(default_classes)
            preprocessing = (Preprocessing.from_dict(meta["preprocessing"]) if meta.get("preprocessing")
                             else Preprocessing.from_tags(tags))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{uri}: its MLmodel metadata ({METADATA_KEY}) is malformed: {_one_line(exc)}") \
                from None
        model = ServingModel(uri=uri, name=name, version=version, classes=classes, module=module, run_id=run_id,
                             local_path=str(local), preprocessing=preprocessing, calibration=meta.get("calibration"))
    except BaseException:  # a refused or broken model, Ctrl-C, SIGTERM: no copy left behind
        if scratch_dir is not None:
            shutil.rmtree(scratch_dir, ignore_errors=True)
        raise
    if scratch_dir is not None:
        weakref.finalize(model, shutil.rmtree, str(scratch_dir), True)
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
    """The bare network of a local MLflow model copy (classification worker processes): the pt2 file its MLmodel
    names, checked as :func:`load_model` checks it (a worker trusts nothing it reads from disk), through
    ``torch.export``; never MLflow's loader, never a pickle. Raises
    :class:`~deeprubin.models.trusted.ModelRejected`."""
    from deeprubin.models.trusted import load_checked

    return load_checked(model_path)[0]
