"""The LightningModule around :class:`~deeprubin.models.tcn.TCN`: loss, optimiser, metrics, prediction.

- Loss: cross-entropy, with optional per-class weights (:func:`deeprubin.data.class_weights`) for class imbalance.
- Optimiser: Adam at ``lr`` (the paper's 1e-3 by default).
- Logged per epoch: ``train/loss``, ``train/macro_f1``, ``val/loss``, ``val/macro_f1``, ``test/loss``,
  ``test/macro_f1`` (torchmetrics ``MulticlassF1Score(average="macro")``), each at MLflow step = the epoch (0, 1,
  ...; a ``step`` value logged beside them is what Lightning passes to the logger as the step), so the run's
  training curves are drawn against epochs, not optimiser steps.
- The hyperparameters are saved in the checkpoint but not sent to the logger: the train stage logs its whole
  configuration once (``train/*``), and ``lr`` beside ``train/lr`` would only repeat it.
- :data:`MONITOR` (``val/macro_f1``, maximised) drives early stopping and the best checkpoint
  (:func:`default_callbacks`).
- ``predict_step`` returns class probabilities (N, n_classes) in ``classes`` order.
- ``calibration``: the temperatures ``train`` fits after training (:mod:`deeprubin.models.calibration`,
  ``AgeTemperature.as_dict``), saved in the checkpoint under :data:`CALIBRATION_KEY` (:func:`store_calibration`) so
  that :func:`deeprubin.models.served.load_checkpoint` serves what the logged model serves; None: no calibration.

Batches are ``(x, y)`` (what :class:`deeprubin.data.ProcessedDataModule` yields); ``predict_step`` also accepts ``x``
alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torchmetrics.classification import MulticlassF1Score

from deeprubin.models.tcn import TCN, TCNEnsemble
from deeprubin.schema import CLASSES

MONITOR = "val/macro_f1"
MONITOR_MODE = "max"
CALIBRATION_KEY = "deeprubin_calibration"  # checkpoint entry: AgeTemperature.as_dict(), or absent


class LitTCN(pl.LightningModule):
    def __init__(self, n_channels: int = 6, classes: Sequence[str] = CLASSES, hidden: int = 32,
                 kernel_size: int = 3, levels: int = 5, dropout: float = 0.1, lr: float = 1e-3,
                 class_weights: Sequence[float] | None = None, lr_plateau_patience: int = 0, readout: str = "mean",
                 flux_scale: float | None = None, shape: bool = False, members: int = 1,
                 age_input: str = "none", grid_days: int | None = None):
        super().__init__()
        classes = [str(c) for c in classes]
        if class_weights is not None:
            class_weights = [float(w) for w in class_weights]
            if len(class_weights) != len(classes):
                raise ValueError(f"{len(class_weights)} class weights for {len(classes)} classes")
        self.save_hyperparameters({"n_channels": n_channels, "classes": classes, "hidden": hidden,
                                   "kernel_size": kernel_size, "levels": levels, "dropout": dropout, "lr": lr,
                                   "class_weights": class_weights, "lr_plateau_patience": lr_plateau_patience,
                                   "readout": readout, "flux_scale": flux_scale, "shape": shape,
                                   "members": members, "age_input": age_input,
                                   "grid_days": grid_days}, logger=False)
        self.classes = tuple(classes)
        self.lr = lr
        self.lr_plateau_patience = lr_plateau_patience
        self.calibration: dict | None = None  # fitted after training (store_calibration), restored on load
        if members < 1:
            raise ValueError(f"members must be at least 1; got {members}")
        nets = [TCN(n_channels, len(classes), hidden, kernel_size, levels, dropout, readout=readout,
                    flux_scale=flux_scale, shape=shape, age_input=age_input, grid_days=grid_days)
                for _ in range(members)]
        self.model = nets[0] if members == 1 else TCNEnsemble(nets)
        self.register_buffer("class_weights",
                             None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32))
        k = len(classes)
        self.train_f1 = MulticlassF1Score(num_classes=k, average="macro")
        self.val_f1 = MulticlassF1Score(num_classes=k, average="macro")
        self.test_f1 = MulticlassF1Score(num_classes=k, average="macro")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, mask)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, weight=self.class_weights)

    def _step(self, batch, stage: str, metric: MulticlassF1Score) -> torch.Tensor:
        x, y = batch[0], batch[1]
        if isinstance(self.model, TCNEnsemble):  # each member learns on its own loss; the metric is the ensemble's
            member_logits = self.model.member_logits(x)
            loss = torch.stack([self.loss(m, y) for m in member_logits]).mean()
            logits = torch.logsumexp(torch.log_softmax(member_logits, dim=2), dim=0)
        else:
            logits = self(x)
            loss = self.loss(logits, y)
        metric(logits.argmax(dim=1), y)
        # The step of the epoch-end values in the logger is the epoch (see the module docstring).
        self.log("step", float(self.current_epoch), on_step=False, on_epoch=True, batch_size=len(y))
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log(f"{stage}/macro_f1", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_f1)

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val", self.val_f1)

    def test_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test", self.test_f1)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return torch.softmax(self(x), dim=1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.calibration:
            checkpoint[CALIBRATION_KEY] = self.calibration

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.calibration = checkpoint.get(CALIBRATION_KEY) or None

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.lr_plateau_patience <= 0:
            return optimizer
        # Halve the rate when validation macro-F1 stalls: late epochs refine instead of jumping between minima.
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=MONITOR_MODE, factor=0.5,
                                                               patience=self.lr_plateau_patience)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": MONITOR}}


def store_calibration(checkpoint: Path | str, calibration: dict | None) -> None:
    """Write ``calibration`` (``AgeTemperature.as_dict()``; None removes it) into a saved checkpoint, in place."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state.pop(CALIBRATION_KEY, None)
    if calibration:
        state[CALIBRATION_KEY] = dict(calibration)
    torch.save(state, checkpoint)


def default_callbacks(patience: int = 10, dirpath: Path | str | None = None) -> list[Callback]:
    """Early stopping and the best checkpoint (``best.ckpt``), both on :data:`MONITOR`."""
    return [EarlyStopping(monitor=MONITOR, mode=MONITOR_MODE, patience=patience),
            ModelCheckpoint(dirpath=dirpath, filename="best", monitor=MONITOR, mode=MONITOR_MODE, save_top_k=1,
                            auto_insert_metric_name=False)]
