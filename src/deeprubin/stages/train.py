"""Stage ``train``: ``data/processed`` -> a trained TCN, tracked in MLflow and registered as a model version.

- Data: :class:`deeprubin.data.ProcessedDataModule` (stratified split by object, class imbalance per
  ``train.imbalance``). Model: :class:`deeprubin.models.lit.LitTCN` (Adam at ``train.lr``).
- Trainer: ``accelerator=train.accelerator`` (``auto``), ``deterministic=True``, everything seeded with
  ``base.seed``; early stopping and the best checkpoint on validation macro-F1 (:func:`default_callbacks`).
- Tracking: Lightning's ``MLFlowLogger`` at ``train.tracking_uri`` (default ``sqlite:///mlflow.db``, no server):
  the parameters, per-epoch ``train/loss``, ``train/macro_f1``, ``val/loss``, ``val/macro_f1``. The run is tagged
  ``git_commit`` (``git rev-parse HEAD``, ``unknown`` outside git), ``data_hash`` (see :func:`data_hash`),
  ``data_hash_source`` and ``params_hash`` (sha256 of the ``train`` section as JSON plus ``base.seed`` and
  ``base.classes``).
- The best checkpoint is reloaded and logged with ``mlflow.pytorch.log_model`` as :class:`ProbabilityTCN` (softmax
  over the classes, in ``classes`` order) in MLflow's ``pt2`` format (``torch.export``: loading it needs neither
  this package nor pickle), with a signature inferred from an input example of two validation objects (float32
  ``(2, C, 100)``: batch size 1 would freeze the batch dimension of the exported graph) and explicit
  ``pip_requirements`` (no requirement inference: it is slow and reaches for the network). Registration as a
  version of ``train.registered_model`` comes after evaluation (:mod:`deeprubin.stages.register`).
- DVC outputs in ``train.model_dir``: ``tcn.ckpt`` (the best Lightning checkpoint, for evaluation) and
  ``train.json`` (run id, model version, best validation macro-F1, split sizes, hashes). MLflow's own files
  (``mlflow.db``, artifacts) are never DVC outputs.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import yaml
from torch import nn

from deeprubin import __version__
from deeprubin.config import BaseParams, Params, TrainParams

# progress(message, completed=None, total=None): a step name, optionally with a count of units done.
Progress = Callable[..., None]

CHECKPOINT = "tcn.ckpt"
REPORT = "train.json"
MODEL_NAME = "model"  # the logged model's name within the run


@dataclass(frozen=True)
class TrainPaths:
    processed_dir: Path
    model_dir: Path
    dvc_lock: Path = Path("dvc.lock")
    raw_dir: Path | None = None  # needed for truncation augmentation (the GP is refitted on cut light curves)

    @classmethod
    def from_params(cls, params: Params) -> "TrainPaths":
        return cls(processed_dir=Path(params.preprocess.processed_dir), model_dir=Path(params.train.model_dir),
                   raw_dir=Path(params.ingest.raw_dir))


@dataclass
class TrainResult:
    run_id: str
    experiment_id: str
    tracking_uri: str
    model_uri: str  # the logged model (models:/m-...), registered later by `deeprubin register`
    registered_model: str
    best_val_macro_f1: float
    epochs: int
    checkpoint: Path
    split_sizes: dict[str, int]
    class_counts: dict[str, dict[str, int]]
    git_commit: str
    data_hash: str
    data_hash_source: str
    params_hash: str
    accelerator: str
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        out = asdict(self)
        out["checkpoint"] = str(self.checkpoint)
        out["deeprubin_version"] = __version__
        return out


class ProbabilityTCN(nn.Module):
    """The logged model: ``x (N, C, T) float32 -> probabilities (N, n_classes)``, rows summing to 1."""

    def __init__(self, tcn: nn.Module):
        super().__init__()
        self.tcn = tcn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.tcn(x), dim=1)


def untrained_served_model(params: TrainParams | None = None, seed: int = 0, n_classes: int = 4) -> ProbabilityTCN:
    """A freshly initialised network of the configured shape, in the served form: benchmarks of speed (which does
    not depend on the weights) and tests that need a real model in a registry, not a good one."""
    from deeprubin.models.tcn import TCN
    from deeprubin.stages.preprocess import CHANNELS

    p = params or TrainParams()
    torch.manual_seed(seed)
    return ProbabilityTCN(TCN(n_channels=len(CHANNELS), n_classes=n_classes, hidden=p.hidden,
                              kernel_size=p.kernel_size, levels=p.levels, dropout=p.dropout)).eval()


def log_and_register(model: nn.Module, tracking_uri: str, name: str, classes: Sequence[str],
                     alias: str | None = None, experiment: str = "served-models",
                     artifact_location: str | None = None) -> str:
    """Log ``model`` as training does (pt2, signature, input example, pinned requirements), register it as a
    version of ``name`` with its ``classes`` tag, and point ``alias`` at it. Returns the version."""
    import mlflow
    from mlflow.models import infer_signature

    from deeprubin.stages.preprocess import CHANNELS
    from deeprubin.tracking import using

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=artifact_location)
    example = np.random.default_rng(0).normal(size=(2, len(CHANNELS), 100)).astype(np.float32)
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    with using(tracking_uri):
        with mlflow.start_run(experiment_id=experiment_id):
            info = mlflow.pytorch.log_model(model, name=MODEL_NAME, signature=signature, input_example=example,
                                            pip_requirements=pip_requirements(), serialization_format="pt2")
        version = str(mlflow.register_model(info.model_uri, name).version)
    client.set_model_version_tag(name, version, "classes", ",".join(classes))
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version


def git_commit(cwd: Path | None = None) -> str:
    """``git rev-parse HEAD`` (with ``-dirty`` when tracked files changed), or ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=30)
        return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _dir_stats(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def data_hash(processed_dir: Path, dvc_lock: Path = Path("dvc.lock")) -> tuple[str, str]:
    """``(hash, source)`` of the training data.

    ``source == "dvc.lock"``: the md5 DVC recorded for ``processed_dir`` (an out of a stage in ``dvc_lock``), used
    only when the directory still has the recorded number of files and bytes (else the lock is stale). Otherwise
    ``source == "index.parquet"``: ``sha256:`` of the bytes of ``processed_dir/index.parquet`` together with the
    manifest (not a DVC hash; the index names every object, its label and its shard)."""
    processed_dir = Path(processed_dir)
    try:
        lock = yaml.safe_load(Path(dvc_lock).read_text()) or {}
        for stage in (lock.get("stages") or {}).values():
            for out in stage.get("outs") or []:
                if Path(out.get("path", "")) == processed_dir or Path(out.get("path", "")).resolve() == \
                        processed_dir.resolve():
                    if (out.get("nfiles"), out.get("size")) == _dir_stats(processed_dir) and out.get("md5"):
                        return str(out["md5"]), "dvc.lock"
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        pass
    digest = hashlib.sha256()
    for name in ("index.parquet", "manifest.json"):
        path = processed_dir / name
        if path.exists():
            digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest(), "index.parquet"


def params_hash(params: TrainParams, base: BaseParams) -> str:
    payload = {"train": params.model_dump(mode="json"), "seed": base.seed, "classes": list(base.classes)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def pip_requirements() -> list[str]:
    """Pinned, explicit requirements of the logged model (MLflow infers nothing)."""
    import pytorch_lightning as pl

    def pin(name: str, version: str) -> str:
        return f"{name}=={version.split('+')[0]}"

    return [pin("torch", torch.__version__), pin("pytorch-lightning", pl.__version__), pin("numpy", np.__version__)]


def _progress_callback(step: Progress, max_epochs: int):
    import pytorch_lightning as pl

    class _EpochProgress(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            f1 = trainer.callback_metrics.get("val/macro_f1")
            text = f"epoch {trainer.current_epoch + 1}" + (f", val macro-F1 {float(f1):.3f}" if f1 is not None else "")
            step(text, completed=trainer.current_epoch + 1, total=max_epochs)

    return _EpochProgress()


def run(params: TrainParams, paths: TrainPaths, base: BaseParams | None = None,
        progress: Progress | None = None, holdout: Sequence[str] = ()) -> TrainResult:
    """Train, track and log the TCN; write ``paths.model_dir``; see the module docstring.

    ``holdout``: oids never trained on (the real evaluation set's held-out objects, :mod:`deeprubin.realset`)."""
    import mlflow
    import pytorch_lightning as pl
    from mlflow.models import infer_signature
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import MLFlowLogger

    from deeprubin.data import ProcessedDataModule
    from deeprubin.models.lit import LitTCN, default_callbacks

    base = base or BaseParams()
    step = progress or (lambda *_a, **_k: None)
    started = time.perf_counter()
    if not (paths.processed_dir / "index.parquet").exists():
        raise FileNotFoundError(f"no processed tensors in {paths.processed_dir}: run `deeprubin preprocess` first")

    step(f"reading {paths.processed_dir}")
    pl.seed_everything(base.seed, workers=True, verbose=False)
    dm = ProcessedDataModule(paths.processed_dir, classes=base.classes, batch_size=params.batch_size,
                             val_fraction=params.val_fraction, test_fraction=params.test_fraction, seed=base.seed,
                             imbalance=params.imbalance, holdout=holdout,
                             raw_dir=paths.raw_dir if params.truncations else None,
                             truncations=params.truncations if paths.raw_dir is not None else 0,
                             truncation_min_days=params.truncation_min_days,
                             full_view_probability=params.full_view_probability)
    step("cutting training light curves (augmentation)" if dm.truncations else "splitting objects")
    dm.setup("fit")
    if len(dm.dataset("val")) == 0:
        raise ValueError("train.val_fraction is 0: early stopping and the best checkpoint need a validation set")
    split_sizes = {name: len(dm.targets(name)) for name in ("train", "val", "test")}
    n_views = 0 if dm.train_views is None else len(dm.train_views)
    class_counts = {name: {c: int(n) for c, n in zip(base.classes, np.bincount(dm.targets(name),
                                                                               minlength=len(base.classes)))}
                    for name in ("train", "val", "test")}

    commit = git_commit()
    dhash, dsource = data_hash(paths.processed_dir, paths.dvc_lock)
    phash = params_hash(params, base)
    tags = {"git_commit": commit, "data_hash": dhash, "data_hash_source": dsource, "params_hash": phash,
            "deeprubin_version": __version__, "stage": "train",
            # The logged model's output columns, in order: classification reads them from the version.
            "classes": ",".join(base.classes), "n_labelled_objects": str(int(sum(split_sizes.values())))}

    model_dir = Path(paths.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(model_dir.glob("best*.ckpt")) + [model_dir / CHECKPOINT, model_dir / REPORT]:
        stale.unlink(missing_ok=True)

    model = LitTCN(n_channels=dm.n_channels, classes=base.classes, hidden=params.hidden,
                   kernel_size=params.kernel_size, levels=params.levels, dropout=params.dropout,
                   lr=params.lr, lr_plateau_patience=params.lr_plateau_patience,
                   class_weights=None if dm.class_weights is None else dm.class_weights.tolist())
    logger = MLFlowLogger(experiment_name=params.experiment, tracking_uri=params.tracking_uri, tags=tags,
                          artifact_location=params.artifact_location, log_model=False)
    logger.log_hyperparams({"train": params.model_dump(mode="json"), "base": {"seed": base.seed},
                            "data": {**{"n_" + k: v for k, v in split_sizes.items()}, "n_train_views": n_views,
                                     "n_holdout": len(holdout)}})
    callbacks = default_callbacks(params.patience, dirpath=model_dir)
    trainer = pl.Trainer(accelerator=params.accelerator, devices=1 if params.accelerator != "auto" else "auto",
                         deterministic=True, max_epochs=params.max_epochs, logger=logger,
                         callbacks=[*callbacks, _progress_callback(step, params.max_epochs)],
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    step("training", completed=0, total=params.max_epochs)
    trainer.fit(model, datamodule=dm)

    checkpoint = next(c for c in callbacks if isinstance(c, ModelCheckpoint))
    if not checkpoint.best_model_path:
        raise ValueError("training ended without a checkpoint (no validation macro-F1 was logged)")
    best_f1 = float(checkpoint.best_model_score)
    target = model_dir / CHECKPOINT
    Path(checkpoint.best_model_path).replace(target)

    step("logging the model to MLflow")
    best = LitTCN.load_from_checkpoint(target, map_location="cpu")
    served = ProbabilityTCN(best.model).eval()
    example = dm.dataset("val").tensors[0][:2].numpy().astype(np.float32)
    with torch.no_grad():
        output = served(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)

    from deeprubin.tracking import using

    with using(params.tracking_uri), mlflow.start_run(run_id=logger.run_id):
        mlflow.log_metric("best_val_macro_f1", best_f1)
        info = mlflow.pytorch.log_model(served, name=MODEL_NAME, signature=signature, input_example=example,
                                        pip_requirements=pip_requirements(), serialization_format="pt2", tags=tags)

    result = TrainResult(
        run_id=logger.run_id, experiment_id=logger.experiment_id, tracking_uri=params.tracking_uri,
        model_uri=info.model_uri, registered_model=params.registered_model, best_val_macro_f1=best_f1, epochs=trainer.current_epoch, checkpoint=target,
        split_sizes=split_sizes, class_counts=class_counts, git_commit=commit, data_hash=dhash,
        data_hash_source=dsource, params_hash=phash, accelerator=str(trainer.accelerator.__class__.__name__),
        seconds=time.perf_counter() - started, extra={"logged_model_uri": info.model_uri, "tags": tags})
    (model_dir / REPORT).write_text(json.dumps(result.report(), indent=2, sort_keys=True) + "\n")
    return result


def main() -> None:  # `python -m deeprubin.stages.train`
    from deeprubin.config import load_params

    params = load_params()
    result = run(params.train, TrainPaths.from_params(params), base=params.base)
    print(json.dumps(result.report(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
