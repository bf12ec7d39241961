"""The network (:mod:`deeprubin.models.tcn`) and its LightningModule (:mod:`deeprubin.models.lit`)."""

from deeprubin.models.tcn import TCN, observed_mask, receptive_field

__all__ = ["TCN", "observed_mask", "receptive_field"]
