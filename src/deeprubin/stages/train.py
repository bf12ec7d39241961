"""Stage ``train``: ``data/processed`` -> a trained TCN, tracked in MLflow and registered as a model version.

- Data: :class:`deeprubin.data.ProcessedDataModule` (stratified split by object, class imbalance per
  ``train.imbalance``). Model: :class:`deeprubin.models.lit.LitTCN` (Adam at ``train.lr``).
- Trainer: ``accelerator=train.accelerator`` (``auto``), ``deterministic=True``, everything seeded with
  ``base.seed``; early stopping and the best checkpoint on validation macro-F1 (:func:`default_callbacks`).
- Tracking: Lightning's ``MLFlowLogger`` at ``train.tracking_uri`` (default ``sqlite:///mlflow.db``, no server):
  the parameters, each once (``train/*`` as configured, ``base/seed``, ``base/classes``, ``data/*`` as the split made
  them), per-epoch ``train/loss``, ``train/macro_f1``, ``val/loss``, ``val/macro_f1`` at step = epoch. The run is tagged
  ``git_commit`` (``git rev-parse HEAD``, ``unknown`` outside git), ``data_hash`` (see :func:`data_hash`),
  ``data_hash_source`` and ``params_hash`` (sha256 of the ``train`` section as JSON plus ``base.seed`` and
  ``base.classes``).
- The best checkpoint is reloaded and logged (:func:`deeprubin.models.served.log_model`) as :class:`~deeprubin.models.served.ProbabilityTCN` (softmax
  over the classes, in ``classes`` order) in MLflow's ``pt2`` format (``torch.export``: loading it needs neither
  this package nor pickle), with a signature inferred from an input example of two validation objects (float32
  ``(2, C, 100)``: batch size 1 would freeze the batch dimension of the exported graph) and explicit
  ``pip_requirements`` (no requirement inference: it is slow and reaches for the network). Registration as a
  version of ``base.model_name`` comes after evaluation (:mod:`deeprubin.stages.register`).
- Calibration (``train.calibration``: ``per_age``, ``global`` or ``none``): after training, temperatures are fitted
  to the best network's logits on the validation objects (``train.calibration_objects``: the real ones only, or
  all when there is none; or all of them), each as its whole curve and ``train.calibration_views`` cuts (GP refitted on the detections before the
  cut, as at inference): one temperature per bin of days since first detection
  (:func:`deeprubin.models.calibration.fit_age_temperatures`). They go inside the logged model
  (:class:`~deeprubin.models.served.ProbabilityTCN`) and into ``tcn.ckpt``, so every path serves the same
  calibrated probabilities. The MLflow run and ``train.json`` (``calibration``) get the temperatures and the
  validation NLL and expected calibration error (ECE) before and after, per age bin, and cross-fitted (fitted on one
  half of the validation objects, scored on the other) for each mode and fit set, on all and on real objects.
- DVC outputs in ``train.model_dir``: ``tcn.ckpt`` (the best Lightning checkpoint, for evaluation) and
  ``train.json`` (run id, model version, best validation macro-F1, split sizes, hashes, ``trained_at``: the UTC
  ISO time training started, from which the retraining policy counts label changes). MLflow's own files
  (``mlflow.db``, artifacts) are never DVC outputs.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from deeprubin import __version__, scratch
from deeprubin.config import BaseParams, Params, TrainParams
from deeprubin.data import ProcessedDataModule, holdout_by_hash, redshifts_of, truncated_views
from deeprubin.evaluation.metrics import expected_calibration_error
from deeprubin.evaluation.sets import holdout_oids
from deeprubin.models.calibration import (
    AGE_EDGES,
    AgeTemperature,
    age_bin,
    bin_labels,
    fit_age_temperatures,
    nll,
    row_temperatures,
    softmax,
)
from deeprubin.models.served import ProbabilityTCN, log_model, model_tags
from deeprubin.outputs import CHECKPOINT, TRAIN_REPORT
from deeprubin.processed import INDEX, MANIFEST, preprocessing_of
from deeprubin.progress import Progress, or_silent
from deeprubin.store import RawStore

#: Earliest calibration cut, days after the first detection: the youngest alerts get a temperature too.
CALIBRATION_MIN_DAYS = 0.5
#: The simulator's objects (``objects.source``); every other source is real.
SIMULATED_SOURCE = "simulator"

@dataclass(frozen=True)
class TrainPaths:
    processed_dir: Path
    model_dir: Path
    dvc_lock: Path = Path("dvc.lock")
    raw_dir: Path | None = None  # needed for truncation augmentation (the GP is refitted on cut light curves)
    holdout: tuple[str, ...] = ()  # objects never trained on
    redshift_labels: Path | None = None  # a labels table with a redshift column (redshift augmentation)

    @classmethod
    def from_params(cls, params: Params) -> "TrainPaths":
        """The configured directories; the held-out objects of the real evaluation set are never trained on."""
        return cls(processed_dir=Path(params.preprocess.processed_dir), model_dir=Path(params.train.model_dir),
                   raw_dir=Path(params.ingest.raw_dir),
                   holdout=tuple(map(str, holdout_oids(params.evaluate.real, params.base))),
                   redshift_labels=params.ingest.files.labels if params.ingest.mix_files or
                   params.ingest.source == "files" else None)


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
    trained_at: str = ""  # UTC ISO time the stage started training (read the data): retraining counts from it
    calibration: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        out = asdict(self)
        out["checkpoint"] = str(self.checkpoint)
        out["deeprubin_version"] = __version__
        return out


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
    for name in (INDEX, MANIFEST):
        path = processed_dir / name
        if path.exists():
            digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest(), INDEX


def params_hash(params: TrainParams, base: BaseParams) -> str:
    payload = {"train": params.model_dump(mode="json"), "seed": base.seed, "classes": list(base.classes)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def ensure_experiment(tracking_uri: str | None, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name`` at ``tracking_uri``, created (with ``artifact_location``) when missing: Lightning's
    logger then finds it instead of warning that it is "not found. Creating it." on every first run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created by a concurrent run in between
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _progress_callback(step: Progress, max_epochs: int, label: str = ""):
    import pytorch_lightning as pl

    class _EpochProgress(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            f1 = trainer.callback_metrics.get("val/macro_f1")
            text = f"{label}epoch {trainer.current_epoch + 1}" + (
                f", val macro-F1 {float(f1):.3f}" if f1 is not None else "")
            step(text, completed=trainer.current_epoch + 1, total=max_epochs)

    return _EpochProgress()


def member_seeds(cfg: TrainParams, base: BaseParams) -> list[int]:
    """The seed of each of the ``train.members`` networks (initialisation and batch order): ``train.seed`` (or
    ``base.seed``), then the next integers. The first is a single network's seed, so members=1 is unchanged."""
    first = base.seed if cfg.seed is None else cfg.seed
    return [first + i for i in range(cfg.members)]


def child_run(tracking_uri: str | None, experiment_id: str, parent_run_id: str, name: str,
              tags: dict[str, str]) -> str:
    """A new MLflow run nested under ``parent_run_id`` (the UI shows it inside the parent); returns its id."""
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    return client.create_run(experiment_id, tags={**tags, MLFLOW_PARENT_RUN_ID: parent_run_id,
                                                  MLFLOW_RUN_NAME: name}).info.run_id


@dataclass
class MemberResult:
    """One independently trained network: its best checkpoint (in the scratch folder), validation macro-F1 there,
    the epochs it ran and its MLflow run."""

    checkpoint: Path
    best_score: float
    epochs: int
    run_id: str
    seed: int
    accelerator: str
    finetune: dict[str, Any] | None = None  # the fine-tuning phase (train.finetune_epochs): scores, kept or not

    def report(self) -> dict[str, Any]:
        return {"seed": self.seed, "run_id": self.run_id, "best_val_macro_f1": self.best_score,
                "epochs": self.epochs, "finetune": self.finetune}


def _fit_member(model, dm: ProcessedDataModule, cfg: TrainParams, logger, checkpoints: Path, step: Progress,
                label: str, max_epochs: int | None = None, phase: str = "training") -> MemberResult:
    """Train ``model`` with early stopping on validation macro-F1; its best checkpoint goes to ``checkpoints``
    (a fresh folder: Lightning warns about, and may pick up, files already in its checkpoint folder)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from deeprubin.models.lit import default_callbacks

    max_epochs = cfg.max_epochs if max_epochs is None else max_epochs
    callbacks = default_callbacks(cfg.patience, dirpath=checkpoints)
    trainer = pl.Trainer(accelerator=cfg.accelerator, devices=1 if cfg.accelerator != "auto" else "auto",
                         deterministic=True, max_epochs=max_epochs, logger=logger,
                         callbacks=[*callbacks, _progress_callback(step, max_epochs, label)],
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    step(f"{phase} {label}".rstrip(", "), completed=0, total=max_epochs)
    trainer.fit(model, datamodule=dm)
    checkpoint = next(c for c in callbacks if isinstance(c, ModelCheckpoint))
    if not checkpoint.best_model_path:
        raise ValueError("training ended without a checkpoint (no validation macro-F1 was logged)")
    return MemberResult(checkpoint=Path(checkpoint.best_model_path), best_score=float(checkpoint.best_model_score),
                        epochs=trainer.current_epoch, run_id=logger.run_id, seed=dm.shuffle_seed,
                        accelerator=str(trainer.accelerator.__class__.__name__))


def _finetune(member: MemberResult, dm: ProcessedDataModule, cfg: TrainParams, logger, checkpoints: Path,
              step: Progress, label: str) -> MemberResult:
    """Continue ``member`` from its best checkpoint on ``dm`` (the same validation objects; in training, the
    simulated objects of ``train.finetune_simulated_classes`` only, beside the real ones) at ``train.finetune_lr``
    with its class weights, for up to ``train.finetune_epochs``. The fine-tuned weights are kept only when their
    best validation macro-F1 beats the member's: the same objects score both. Metrics go to the member's run with
    the prefix ``finetune``."""
    from pytorch_lightning.loggers import MLFlowLogger

    from deeprubin.models.lit import LitTCN

    model = LitTCN.load_from_checkpoint(member.checkpoint, map_location="cpu")
    model.lr = cfg.finetune_lr
    if dm.class_weights is not None:
        model.class_weights = dm.class_weights.clone()
    tuned_logger = MLFlowLogger(experiment_name=cfg.experiment, tracking_uri=cfg.tracking_uri, log_model=False,
                                run_id=logger.run_id, prefix="finetune")
    tuned = _fit_member(model, dm, cfg, tuned_logger, checkpoints, step, label, max_epochs=cfg.finetune_epochs,
                        phase="fine-tuning on real objects")
    kept = tuned.best_score > member.best_score
    report = {"best_val_macro_f1": tuned.best_score, "epochs": tuned.epochs, "kept": kept,
              "before": member.best_score}
    best = tuned if kept else member
    return replace(best, finetune=report, run_id=member.run_id, seed=member.seed)


def assemble(new_model, checkpoints: list[Path], target: Path):
    """The trained model, saved as one Lightning checkpoint at ``target`` and returned (on the CPU): the single
    network's best checkpoint as it is, or a :class:`~deeprubin.models.tcn.TCNEnsemble` of the members' best
    weights (``new_model(members)``: the same architecture) in member 0's checkpoint (its optimiser and loop states
    dropped: they belong to one member)."""
    import torch

    from deeprubin.models.lit import LitTCN

    if len(checkpoints) == 1:
        Path(checkpoints[0]).replace(target)
        return LitTCN.load_from_checkpoint(target, map_location="cpu")
    ensemble = new_model(len(checkpoints))
    for net, path in zip(ensemble.model.members, checkpoints):
        net.load_state_dict(LitTCN.load_from_checkpoint(path, map_location="cpu").model.state_dict())
    state = torch.load(checkpoints[0], map_location="cpu", weights_only=False)
    for key in ("optimizer_states", "lr_schedulers", "loops", "callbacks"):
        state.pop(key, None)
    state["state_dict"] = ensemble.state_dict()
    state["hyper_parameters"] = dict(state["hyper_parameters"], members=len(checkpoints))
    tmp = target.with_name(f".{target.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(target)
    return LitTCN.load_from_checkpoint(target, map_location="cpu")


def validation_macro_f1(model, dm: ProcessedDataModule) -> float:
    """Macro-F1 of ``model`` on the validation loader, as the checkpoint callback's ``val/macro_f1`` measures it
    (torchmetrics, accumulated over the batches)."""
    import torch
    from torchmetrics.classification import MulticlassF1Score

    metric = MulticlassF1Score(num_classes=len(model.classes), average="macro")
    model.eval()
    with torch.inference_mode():
        for batch in dm.val_dataloader():
            metric.update(model(batch[0]).argmax(dim=1), batch[1])
    return float(metric.compute())


def run(params: Params, paths: TrainPaths, progress: Progress | None = None) -> TrainResult:
    """Train, track and log the TCN; write ``paths.model_dir``; see the module docstring.

    ``paths.holdout``: oids never trained on (by default the real evaluation set's held-out objects,
    :func:`deeprubin.evaluation.sets.holdout_oids`)."""
    import mlflow
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import MLFlowLogger

    from deeprubin.models.lit import LitTCN, store_calibration
    from deeprubin.tracking import run_name

    base, holdout = params.base, paths.holdout
    cfg = params.train  # the stage reads its own section from here on
    step = or_silent(progress)
    started = time.perf_counter()
    trained_at = datetime.now(timezone.utc).isoformat()
    if not (paths.processed_dir / INDEX).exists():
        raise FileNotFoundError(f"no processed tensors in {paths.processed_dir}: run `deeprubin preprocess` first")

    step(f"reading {paths.processed_dir}")
    pl.seed_everything(base.seed if cfg.seed is None else cfg.seed, workers=True, verbose=False)
    def new_datamodule(simulated_classes) -> ProcessedDataModule:
        return ProcessedDataModule(
            paths.processed_dir, classes=base.classes, batch_size=cfg.batch_size, val_fraction=cfg.val_fraction,
            test_fraction=cfg.test_fraction, seed=base.seed, imbalance=cfg.imbalance, holdout=holdout,
            raw_dir=paths.raw_dir if cfg.truncations or cfg.redshift_views or cfg.imbalance == "source_sampler"
            or simulated_classes is not None or cfg.selection_views or cfg.selection_objects == "real" else None,
            truncations=cfg.truncations if paths.raw_dir is not None else 0,
            truncation_min_days=cfg.truncation_min_days, truncation_max_days=cfg.truncation_max_days,
            full_view_probability=cfg.full_view_probability,
            redshift_views=cfg.redshift_views if paths.raw_dir is not None else 0,
            redshifts=redshifts_of(paths.redshift_labels) if cfg.redshift_views else None,
            redshift_max_peak_mag=cfg.redshift_max_peak_mag, shuffle_seed=cfg.seed,
            simulated_classes=simulated_classes, gp_draws=cfg.gp_draws,
            selection_views=cfg.selection_views if paths.raw_dir is not None else 0,
            selection_objects=cfg.selection_objects if paths.raw_dir is not None else "all")

    dm = new_datamodule(cfg.simulated_classes)
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
    phash = params_hash(cfg, base)
    preprocessing = preprocessing_of(paths.processed_dir)
    tags = {"git_commit": commit, "data_hash": dhash, "data_hash_source": dsource, "params_hash": phash,
            "deeprubin_version": __version__, "stage": "train",
            # The output columns in order and the preprocessing settings: serving reads them from the version.
            **model_tags(base.classes, preprocessing), "n_labelled_objects": str(int(sum(split_sizes.values())))}

    model_dir = Path(paths.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(model_dir.glob("best*.ckpt")) + [model_dir / CHECKPOINT, model_dir / TRAIN_REPORT]:
        stale.unlink(missing_ok=True)

    def new_model(members: int = 1) -> LitTCN:
        return LitTCN(n_channels=dm.n_channels, classes=base.classes, hidden=cfg.hidden,
                      kernel_size=cfg.kernel_size, levels=cfg.levels, dropout=cfg.dropout, readout=cfg.readout,
                      flux_scale=cfg.flux_compression, shape=cfg.shape_features, members=members,
                      age_input=cfg.age_input, grid_days=preprocessing.grid_days,
                      lr=cfg.lr, lr_plateau_patience=cfg.lr_plateau_patience,
                      class_weights=None if dm.class_weights is None else dm.class_weights.tolist())

    experiment_id = ensure_experiment(cfg.tracking_uri, cfg.experiment, cfg.artifact_location)
    logger = MLFlowLogger(experiment_name=cfg.experiment, tracking_uri=cfg.tracking_uri, tags=tags,
                          artifact_location=cfg.artifact_location, log_model=False, run_name=run_name("train"))
    # Every parameter once: the train section as configured (LitTCN does not log its hyperparameters again), and
    # what the data made of it.
    weights = None if dm.class_weights is None else ",".join(f"{w:.4g}" for w in dm.class_weights.tolist())
    logger.log_hyperparams({"train": cfg.model_dump(mode="json"),
                            "base": {"seed": base.seed, "classes": ",".join(base.classes)},
                            "data": {**{"n_" + k: v for k, v in split_sizes.items()}, "n_train_views": n_views,
                                     "n_holdout": len(holdout), "n_channels": dm.n_channels,
                                     "class_weights": weights}})
    seeds = member_seeds(cfg, base)
    members: list[MemberResult] = []
    finetune_dm: ProcessedDataModule | None = None
    with scratch.folder(".lightning-", model_dir) as checkpoints:
        for i, seed in enumerate(seeds):
            if i > 0:  # member 0 keeps the seeding of a single network: members=1 trains exactly what it did
                pl.seed_everything(seed, workers=True, verbose=False)
            dm.shuffle_seed = seed
            label = f"member {i + 1}/{len(seeds)}, " if len(seeds) > 1 else ""
            member_logger = logger if len(seeds) == 1 else MLFlowLogger(
                experiment_name=cfg.experiment, tracking_uri=cfg.tracking_uri, log_model=False,
                run_id=child_run(cfg.tracking_uri, experiment_id, logger.run_id, f"member-{i + 1}",
                                 {**tags, "member_seed": str(seed)}))
            member = _fit_member(new_model(), dm, cfg, member_logger, checkpoints / f"member-{i + 1}", step, label)
            if cfg.finetune_epochs > 0 and paths.raw_dir is not None:
                if finetune_dm is None:
                    step("preparing the fine-tuning set (real objects)")
                    finetune_dm = new_datamodule(cfg.finetune_simulated_classes)
                    finetune_dm.setup("fit")
                if finetune_dm.real_objects("train"):
                    finetune_dm.shuffle_seed = seed
                    member = _finetune(member, finetune_dm, cfg, member_logger, checkpoints / f"finetune-{i + 1}",
                                       step, label)
                else:  # nothing real to adapt to: the simulated supernovae would only be dropped
                    member = replace(member, finetune={"skipped": "no real object in the training split"})
            members.append(member)
        best = assemble(new_model, [m.checkpoint for m in members], target := model_dir / CHECKPOINT)
    best_f1 = members[0].best_score if len(members) == 1 else validation_macro_f1(best, dm)
    best.eval()
    calibration, calibration_report = None, {"mode": "none"}
    if cfg.calibration != "none":
        step("calibrating the probabilities on the validation objects")
        calibration, calibration_report = calibrate(best.model, dm, cfg, base, paths.raw_dir, preprocessing)
    store_calibration(target, None if calibration is None else calibration.as_dict())

    step("logging the model to MLflow")
    served = ProbabilityTCN(best.model, calibration).eval()
    example = dm.dataset("val").tensors[0][:2].numpy().astype(np.float32)

    from deeprubin.tracking import using

    with using(cfg.tracking_uri), mlflow.start_run(run_id=logger.run_id):
        mlflow.log_metric("best_val_macro_f1", best_f1)
        if len(members) > 1:
            for i, m in enumerate(members, start=1):
                mlflow.log_metrics({f"member_{i}/best_val_macro_f1": m.best_score, f"member_{i}/epochs": m.epochs})
        mlflow.log_metrics(calibration_metrics(calibration_report))
        mlflow.log_dict(calibration_report, "calibration.json")
        info = log_model(served, example, base.classes, preprocessing, tags=tags)

    result = TrainResult(
        run_id=logger.run_id, experiment_id=logger.experiment_id, tracking_uri=cfg.tracking_uri,
        model_uri=info.model_uri, registered_model=base.model_name, best_val_macro_f1=best_f1,
        epochs=max(m.epochs for m in members), checkpoint=target,
        split_sizes=split_sizes, class_counts=class_counts, git_commit=commit, data_hash=dhash,
        data_hash_source=dsource, params_hash=phash, accelerator=members[0].accelerator,
        seconds=time.perf_counter() - started, trained_at=trained_at, calibration=calibration_report, extra={"logged_model_uri": info.model_uri, "tags": tags,
                                                           "members": [m.report() for m in members]})
    (model_dir / TRAIN_REPORT).write_text(json.dumps(result.report(), indent=2, sort_keys=True) + "\n")
    return result


# ----------------------------------------------------------------------------------------------------------------
# Calibration (temperature scaling by age, :mod:`deeprubin.models.calibration`).

def _logits(net, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            out.append(net(torch.from_numpy(np.ascontiguousarray(x[i:i + batch], dtype=np.float32))).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def calibration_views(dm: ProcessedDataModule, raw_dir: Path | None, n_views: int, seed: int, grid_days: int,
                      fit_context_days: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x, y, oid, real)`` of the validation objects: each whole curve, then up to ``n_views`` cuts of it (from
    :data:`CALIBRATION_MIN_DAYS` days on, GP refitted: :func:`deeprubin.data.truncated_views`). ``real``: the
    object is not simulated (``objects.source`` in ``raw_dir``; all False without ``raw_dir``)."""
    rows = dm.index.loc[dm.index["split"] == "val"]
    oids = rows["oid"].astype(str).to_numpy()
    x_full, y_full = (t.numpy() for t in dm.dataset("val").tensors)
    xs, ys, owners = [x_full], [y_full], [oids]
    real_oids: set[str] = set()
    if raw_dir is not None and RawStore(raw_dir).exists():
        raw = RawStore(raw_dir).read()
        objects = raw.objects
        real_oids = set(objects.loc[objects["source"] != SIMULATED_SOURCE, "oid"].astype(str))
        if n_views > 0:
            xv, owner, _ = truncated_views(raw.detections, oids, n_views, CALIBRATION_MIN_DAYS, seed, grid_days,
                                           fit_context_days)
            target = dict(zip(oids, y_full))
            xs.append(xv)
            ys.append(np.array([target[o] for o in owner], dtype=np.int64))
            owners.append(owner)
    owner = np.concatenate(owners)
    return (np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64), owner,
            np.isin(owner, list(real_oids)))


def ece_by_age(y: np.ndarray, proba: np.ndarray, ages: np.ndarray, classes, edges=AGE_EDGES) -> dict[str, Any]:
    """Top-label ECE of all rows pooled (``all``), of each age bin (None for an empty bin), and their mean weighted by
    the rows of each bin (``by_age``: what "calibrated in every age bin" asks; errors of opposite sign in two bins
    cancel in ``all``, not here)."""
    k = age_bin(ages, edges)
    out: dict[str, Any] = {"all": expected_calibration_error(y, proba, classes=classes) if len(y) else None}
    weighted = 0.0
    for b, name in enumerate(bin_labels(edges)):
        inside = k == b
        out[name] = expected_calibration_error(y[inside], proba[inside], classes=classes) if inside.any() else None
        weighted += 0.0 if out[name] is None else out[name] * inside.sum()
    out["by_age"] = weighted / len(y) if len(y) else None
    return out


def _fit_classes(y: np.ndarray, n_classes: int) -> np.ndarray | None:
    """The classes the temperatures' likelihood is taken over: those of the fitting rows when they are fewer than all
    (real validation objects are supernovae: SN Ia vs SN II confidence is what is calibrated), else all (None)."""
    present = np.unique(y)
    return present if 1 < len(present) < n_classes else None


def _crossfit(logits, y, ages, fold, fit_rows, mode) -> np.ndarray:
    """Per-row temperatures of each fold fitted on the other fold's ``fit_rows``."""
    temps = np.ones(len(y))
    for f in (False, True):
        train_rows = fit_rows & (fold != f)
        calibration = fit_age_temperatures(logits[train_rows], y[train_rows], ages[train_rows], mode,
                                           among=_fit_classes(y[train_rows], logits.shape[1]))
        temps[fold == f] = row_temperatures(calibration, ages[fold == f])
    return temps


def calibrate(net, dm: ProcessedDataModule, cfg: TrainParams, base: BaseParams, raw_dir: Path | None,
              preprocessing) -> tuple[AgeTemperature | None, dict[str, Any]]:
    """Fit ``cfg.calibration`` to ``net``'s logits on the validation objects (:func:`calibration_views`); returns
    the module and the report of ``train.json`` (temperatures, rows per age bin, NLL and ECE before and after, the
    cross-fitted ECE of every mode and fit set)."""
    import torch

    from deeprubin.models.tcn import age_days

    x, y, owner, real = calibration_views(dm, raw_dir, cfg.calibration_views, base.seed, preprocessing.grid_days,
                                          preprocessing.fit_context_days)
    logits = _logits(net, x)
    ages = age_days(torch.from_numpy(x)).double().numpy()
    fitted_on = "real" if cfg.calibration_objects == "real" and real.any() else "all"
    if fitted_on != cfg.calibration_objects:
        warnings.warn("train.calibration_objects is 'real' but the validation split has no real objects: the "
                      "temperatures are fitted on all validation objects", stacklevel=2)
    fit_rows = real if fitted_on == "real" else np.ones(len(y), dtype=bool)
    among = _fit_classes(y[fit_rows], logits.shape[1])
    calibration = fit_age_temperatures(logits[fit_rows], y[fit_rows], ages[fit_rows], cfg.calibration, among=among)
    temps = row_temperatures(calibration, ages)
    before, after = softmax(logits), softmax(logits, temps)
    classes = list(base.classes)

    def scores(rows: np.ndarray, proba: np.ndarray, t: np.ndarray | float) -> dict[str, Any]:
        return {"nll": nll(logits[rows], y[rows], t if np.ndim(t) == 0 else t[rows]),
                "ece": ece_by_age(y[rows], proba[rows], ages[rows], classes)}

    everyone = np.ones(len(y), dtype=bool)
    objects = {"all": everyone, "real": real}
    # Cross-fitted: fitted on one half of the validation objects (stratified by a seeded hash), scored on the other.
    labels = dm.index.set_index(dm.index["oid"].astype(str)).loc[np.unique(owner), "label"]
    fold = np.isin(owner, holdout_by_hash(labels.index, labels.to_numpy(), 0.5, base.seed))
    crossfit: dict[str, Any] = {}
    for mode in ("global", "per_age"):
        for fit_on, rows in objects.items():
            if not rows.any():
                continue
            t = _crossfit(logits, y, ages, fold, rows, mode)
            crossfit[f"{mode}/{fit_on}"] = {scored: scores(r, softmax(logits, t), t)
                                            for scored, r in objects.items() if r.any()}
    k = age_bin(ages, AGE_EDGES)
    report = {
        "mode": cfg.calibration, "objects": cfg.calibration_objects, "fitted_on": fitted_on,
        "fitted_among": None if among is None else [classes[int(c)] for c in among],
        **(calibration.as_dict() if calibration is not None else {}),
        "bins": bin_labels(AGE_EDGES),
        "rows": {name: {"all": int((k == b).sum()), "real": int((real & (k == b)).sum())}
                 for b, name in enumerate(bin_labels(AGE_EDGES))},
        "n_objects": {"all": len(np.unique(owner)), "real": len(np.unique(owner[real]))},
        "argmax_changed": float(np.mean(before.argmax(axis=1) != after.argmax(axis=1))) if len(y) else 0.0,
        "before": {name: scores(r, before, 1.0) for name, r in objects.items() if r.any()},
        "after": {name: scores(r, after, temps) for name, r in objects.items() if r.any()},
        "crossfit": crossfit,
    }
    return calibration, report


def calibration_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The numbers of a :func:`calibrate` report as flat MLflow metric names (``calibration/...``)."""
    def key(name: str) -> str:
        return name.replace("+", "_up").replace("-", "_to_")

    out: dict[str, float] = {}
    for name, t in zip(report.get("edges", []), report.get("temperatures", [])):
        out[f"calibration/temperature_from_{name:g}d"] = t
    for when in ("before", "after"):
        for objects, s in report.get(when, {}).items():
            out[f"calibration/{when}/{objects}/nll"] = s["nll"]
            for age, ece in s["ece"].items():
                if ece is not None:
                    out[f"calibration/{when}/{objects}/ece_{key(age)}"] = ece
    for fit, by_scored in report.get("crossfit", {}).items():
        for scored, s in by_scored.items():
            for summary in ("all", "by_age"):
                if s["ece"][summary] is not None:
                    out[f"calibration/crossfit/{fit.replace('/', '_fit_')}/{scored}/ece_{summary}"] = s["ece"][summary]
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}
