"""Training on a tiny simulated processed set: the data module, fast_dev_run, best checkpoint, determinism and an
overfit-one-batch test (the model can learn)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from deeprubin.config import IngestParams, Params, PreprocessParams, SimulatorParams
from deeprubin.data import ProcessedDataModule
from deeprubin.models.lit import MONITOR, LitTCN, default_callbacks
from deeprubin.models.tcn import age_days
from deeprubin.processed import load_processed
from deeprubin.schema import CLASSES
from deeprubin.stages import ingest, preprocess


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    ingest.run(Params(ingest=IngestParams(raw_dir=root / "raw", simulator=SimulatorParams(n_per_class=20),
                                                  mix_files=False)),
               ingest.IngestPaths(raw_dir=root / "raw"))
    preprocess.run(Params(preprocess=PreprocessParams(processed_dir=root / "processed", workers=1)),
                   preprocess.PreprocessPaths(raw_dir=root / "raw", processed_dir=root / "processed"))
    return root / "processed"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*but have no `val_dataloader`.*")
        yield


def trainer(**kwargs) -> pl.Trainer:
    defaults = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False, "deterministic": True}
    return pl.Trainer(**{**defaults, **kwargs})


def test_datamodule_splits_by_object(processed):
    dm = ProcessedDataModule(processed, batch_size=8, seed=3)
    dm.setup("fit")
    _, index = load_processed(processed)
    sets = {k: set(v) for k, v in dm.splits.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert set().union(*sets.values()) == set(index["oid"])
    for name in ("train", "val", "test"):
        rows = dm.index[dm.index["split"] == name]
        assert set(rows["oid"]) == sets[name]
        assert set(rows["label"]) == set(CLASSES)
        assert len(dm.dataset(name)) == len(rows)
    assert (dm.index["target"] == dm.index["label"].map(CLASSES.index)).all()
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.dtype == torch.float32 and xb.shape == (8, 6, 100) and yb.dtype == torch.int64
    assert dm.class_weights is not None and dm.class_weights.shape == (4,)
    other = ProcessedDataModule(processed, classes=("SNIa", "SNII"), seed=3, imbalance="sampler")
    other.setup("fit")
    assert set(other.index["label"]) == {"SNIa", "SNII"} and set(other.index["target"]) == {0, 1}
    assert other.class_weights is None


def test_fast_dev_run_fit_test_predict(processed):
    pl.seed_everything(0, workers=True)
    dm = ProcessedDataModule(processed, batch_size=16, seed=0)
    dm.setup("fit")
    model = LitTCN(class_weights=dm.class_weights.tolist())
    t = trainer(fast_dev_run=True)
    t.fit(model, datamodule=dm)
    assert {"train/loss", "val/loss", "val/macro_f1"} <= set(t.callback_metrics)
    t.test(model, datamodule=dm)
    assert "test/macro_f1" in t.callback_metrics
    batches = t.predict(model, datamodule=dm)
    p = torch.cat(batches)
    assert p.shape[1] == 4
    torch.testing.assert_close(p.sum(dim=1), torch.ones(len(p)))


def test_best_checkpoint_and_determinism(processed, tmp_path):
    def fit(dirpath):
        pl.seed_everything(11, workers=True)
        dm = ProcessedDataModule(processed, batch_size=16, seed=11, imbalance="both")
        model = LitTCN(hidden=16, levels=5, kernel_size=3)
        t = trainer(max_epochs=2, enable_checkpointing=True, callbacks=default_callbacks(patience=5, dirpath=dirpath))
        t.fit(model, datamodule=dm)
        return t, model

    t1, m1 = fit(tmp_path / "a")
    _, m2 = fit(tmp_path / "b")
    best = Path(t1.checkpoint_callback.best_model_path)
    assert best == tmp_path / "a" / "best.ckpt" and best.exists()
    assert t1.checkpoint_callback.monitor == MONITOR
    restored = LitTCN.load_from_checkpoint(best)
    assert restored.classes == tuple(CLASSES) and restored.hparams.hidden == 16
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_overfit_one_batch(processed):
    pl.seed_everything(0, workers=True)
    x, index = load_processed(processed)
    rows = np.concatenate([np.flatnonzero((index["label"] == c).to_numpy())[:4] for c in CLASSES])
    xb = torch.from_numpy(np.asarray(x[rows], dtype=np.float32))
    yb = torch.as_tensor(index["label"].iloc[rows].map(CLASSES.index).to_numpy().copy(), dtype=torch.int64)
    assert len(yb) == 16
    loader = DataLoader(TensorDataset(xb, yb), batch_size=16)
    model = LitTCN(dropout=0.0)  # the paper's Adam, lr 1e-3
    with torch.no_grad():
        before = model.loss(model(xb), yb).item()
    trainer(max_steps=120, limit_val_batches=0).fit(model, train_dataloaders=loader)
    model.eval()
    with torch.no_grad():
        after = model.loss(model(xb), yb).item()
    assert before > 1.0
    assert after < 0.1, (before, after)


def test_source_sampler_draws_each_source_and_class_equally(processed, tmp_path):
    """Half the SNe relabelled as a second, real source with few SN II: every (source, class) group is drawn about
    equally often, so the scarce real SN II are not outweighed."""
    import shutil

    from deeprubin.store import RawStore

    raw = tmp_path / "raw"
    shutil.copytree(processed.parent / "raw", raw)
    store = RawStore(raw)
    lcs = store.read()
    objects = lcs.objects.copy()
    sne = objects.index[objects["label"].isin(["SNIa", "SNII"])]
    real = [i for i in sne if objects.at[i, "label"] == "SNIa" or i % 4 == 0]  # real: all SNIa-half, few SNII
    objects.loc[real[: len(real) // 2], "label_source"] = "bts:spectroscopic"
    lcs.objects = objects
    store.commit(lcs, store.read_manifest() or {})
    dm = ProcessedDataModule(processed, batch_size=8, seed=3, imbalance="source_sampler", raw_dir=raw)
    dm.setup("fit")
    source = objects.set_index("oid")["label_source"]
    train = dm.index[dm.index["split"] == "train"].reset_index(drop=True)
    groups = (train["oid"].map(source) + "/" + train["label"]).to_numpy()
    counts: dict[str, int] = {}
    sampler = dm.train_dataloader().sampler
    for _ in range(100):
        for i in iter(sampler):
            counts[groups[i]] = counts.get(groups[i], 0) + 1
    assert len(counts) == len(set(groups)) >= 5
    share = np.array(list(counts.values())) / sum(counts.values())
    assert np.allclose(share, 1 / len(counts), rtol=0.15), counts
    with pytest.raises(ValueError, match="raw_dir"):
        ProcessedDataModule(processed, imbalance="source_sampler")


def test_redshifted_views_of_real_supernovae_join_their_owner(tmp_path, shared_data):
    """Simulated objects plus 40 real BTS supernovae: only the real ones, which have a redshift, get redshifted
    copies, each drawn as one more view of its owner; validation and test objects get none."""
    import pandas as pd

    from deeprubin.config import FilesParams
    from deeprubin.data import redshifts_of

    labels = pd.read_csv(shared_data / "bts" / "labels.csv")
    labels = pd.concat([labels[labels["label"] == c].head(20) for c in ("SNIa", "SNII")])
    det = pd.read_parquet(shared_data / "bts" / "detections.parquet")
    labels.to_csv(tmp_path / "labels.csv", index=False)
    det[det["oid"].isin(labels["oid"])].to_parquet(tmp_path / "detections.parquet")
    files = FilesParams(detections=tmp_path / "detections.parquet", labels=tmp_path / "labels.csv",
                        label_source="bts:spectroscopic")
    ingest.run(Params(ingest=IngestParams(raw_dir=tmp_path / "raw", simulator=SimulatorParams(n_per_class=8),
                                          files=files, mix_files=True)), ingest.IngestPaths(raw_dir=tmp_path / "raw"))
    preprocess.run(Params(preprocess=PreprocessParams(processed_dir=tmp_path / "processed", workers=1)),
                   preprocess.PreprocessPaths(raw_dir=tmp_path / "raw", processed_dir=tmp_path / "processed"))
    redshifts = redshifts_of(tmp_path / "labels.csv")
    dm = ProcessedDataModule(tmp_path / "processed", batch_size=8, seed=3, raw_dir=tmp_path / "raw",
                             redshift_views=2, redshifts=redshifts)
    dm.setup("fit")
    views = dm.train_views
    train = set(dm.splits["train"])
    assert len(views) > 0 and set(views["oid"]) <= train & set(redshifts)
    assert views.groupby("oid").size().max() <= 2 and views["days"].isna().all()
    x, _ = dm.dataset("train").tensors
    assert len(x) == len(train) + len(views) and torch.isfinite(x).all()
    assert len(dm.dataset("val")) == len(dm.splits["val"]) and len(dm.dataset("test")) == len(dm.splits["test"])


def test_simulated_classes_leaves_other_simulated_objects_out_of_training(processed, tmp_path):
    """simulated_classes=[QSO, CEP]: no simulated supernova is trained on; validation and test keep every class."""
    dm = ProcessedDataModule(processed, batch_size=8, seed=3, raw_dir=processed.parent / "raw",
                             simulated_classes=["QSO", "CEP"])
    dm.setup("fit")
    train = dm.index[dm.index["split"] == "train"]
    assert set(train["label"]) == {"QSO", "CEP"}
    assert len(dm.dataset("train")) == len(train) == len(dm.splits["train"])
    for name in ("val", "test"):
        assert set(dm.index.loc[dm.index["split"] == name, "label"]) == set(CLASSES)
    full = ProcessedDataModule(processed, batch_size=8, seed=3)
    full.setup("fit")
    assert set(full.splits["val"]) == set(dm.splits["val"]) and set(full.splits["test"]) == set(dm.splits["test"])


def test_gp_draws_move_training_means_within_their_uncertainty(processed):
    """gp_draws: training batches' GP means differ from the stored ones by about scale x std, smoothly; the std and
    time channels, the labels and the validation batches are untouched."""
    plain = ProcessedDataModule(processed, batch_size=64, seed=3)
    drawn = ProcessedDataModule(processed, batch_size=64, seed=3, gp_draws=0.5)
    for dm in (plain, drawn):
        dm.setup("fit")
    (x0, y0), (x1, y1) = next(iter(plain.train_dataloader())), next(iter(drawn.train_dataloader()))
    assert torch.equal(y0, y1) and torch.equal(x0[:, 2:], x1[:, 2:])
    z = (x1[:, :2] - x0[:, :2]) / (0.5 * x0[:, 2:4])
    assert 0.8 < float(z.std()) < 1.2 and abs(float(z.mean())) < 0.1
    lag1 = float((z[..., 1:] * z[..., :-1]).mean() / z.pow(2).mean())
    assert lag1 > 0.8  # smooth over days, not white noise
    assert torch.equal(next(iter(plain.val_dataloader()))[0], next(iter(drawn.val_dataloader()))[0])


def test_selection_views_add_cuts_of_validation_objects_to_the_validation_loader_only(processed):
    """selection_views: the validation loader (what early stopping and the checkpoint read) holds every whole
    validation curve then cuts of them with their owners' labels; ``dataset("val")`` keeps one row per object
    (calibration and reports), and the training set is unchanged."""
    plain = ProcessedDataModule(processed, batch_size=8, seed=3)
    cut = ProcessedDataModule(processed, batch_size=8, seed=3, raw_dir=processed.parent / "raw", selection_views=3)
    for dm in (plain, cut):
        dm.setup("fit")
    whole_x, whole_y = plain.dataset("val").tensors
    assert torch.equal(cut.dataset("val").tensors[0], whole_x) and len(cut.dataset("train")) == len(plain.dataset("train"))
    xs, ys = zip(*cut.val_dataloader())
    x, y = torch.cat(xs), torch.cat(ys)
    n = len(whole_y)
    assert n < len(y) <= 4 * n
    assert torch.equal(x[:n], whole_x) and torch.equal(y[:n], whole_y)
    assert set(y[n:].tolist()) <= set(whole_y.tolist())
    # A cut ends earlier than its whole curve: the age read from the input is smaller.
    assert float(age_days(x[n:]).mean()) < float(age_days(whole_x).mean())
    with pytest.raises(ValueError, match="raw_dir"):
        ProcessedDataModule(processed, selection_views=2)


def test_selection_objects_real_keeps_the_real_validation_objects_and_their_cuts(tmp_path, shared_data, processed):
    """selection_objects=real: the validation loader (early stopping, the best checkpoint) holds the real
    validation objects only, with their cuts when selection_views is set; ``dataset("val")`` keeps every object.
    Simulated data alone: every validation object, as with ``all``."""
    import pandas as pd

    from deeprubin.config import FilesParams

    labels = pd.read_csv(shared_data / "bts" / "labels.csv")
    labels = pd.concat([labels[labels["label"] == c].head(30) for c in ("SNIa", "SNII")])
    det = pd.read_parquet(shared_data / "bts" / "detections.parquet")
    labels.to_csv(tmp_path / "labels.csv", index=False)
    det[det["oid"].isin(labels["oid"])].to_parquet(tmp_path / "detections.parquet")
    files = FilesParams(detections=tmp_path / "detections.parquet", labels=tmp_path / "labels.csv",
                        label_source="bts:spectroscopic")
    ingest.run(Params(ingest=IngestParams(raw_dir=tmp_path / "raw", simulator=SimulatorParams(n_per_class=10),
                                          files=files, mix_files=True)), ingest.IngestPaths(raw_dir=tmp_path / "raw"))
    preprocess.run(Params(preprocess=PreprocessParams(processed_dir=tmp_path / "processed", workers=1)),
                   preprocess.PreprocessPaths(raw_dir=tmp_path / "raw", processed_dir=tmp_path / "processed"))
    real_oids = set(labels["oid"].astype(str))
    for views in (0, 2):
        dm = ProcessedDataModule(tmp_path / "processed", batch_size=8, seed=3, raw_dir=tmp_path / "raw",
                                 selection_objects="real", selection_views=views)
        dm.setup("fit")
        val = dm.index[dm.index["split"] == "val"]
        real = val["oid"].astype(str).isin(real_oids).to_numpy()
        assert 0 < real.sum() < len(val) and dm.selection_real
        whole_x, whole_y = dm.dataset("val").tensors
        assert len(whole_y) == len(val)  # calibration and reports see every validation object
        xs, ys = zip(*dm.val_dataloader())
        x, y = torch.cat(xs), torch.cat(ys)
        n = int(real.sum())
        assert torch.equal(x[:n], whole_x[torch.from_numpy(real)]) and torch.equal(y[:n], whole_y[torch.from_numpy(real)])
        assert len(y) == n if views == 0 else n < len(y) <= 3 * n
        assert set(y.tolist()) <= {CLASSES.index("SNIa"), CLASSES.index("SNII")}
    simulated = ProcessedDataModule(processed, batch_size=8, seed=3, raw_dir=processed.parent / "raw",
                                    selection_objects="real")
    simulated.setup("fit")
    assert not simulated.selection_real
    assert len(torch.cat([b[1] for b in simulated.val_dataloader()])) == len(simulated.dataset("val"))
    with pytest.raises(ValueError, match="raw_dir"):
        ProcessedDataModule(processed, selection_objects="real")
