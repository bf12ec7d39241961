"""One typed configuration: ``params.yaml`` loaded into pydantic models.

Nothing else in the project reads YAML. Each stage receives its own section. Unknown keys and wrong types are
errors that name the key (``ingest.simulator.n_per_class: ...``). Overrides, applied in this order:
``params.yaml`` < environment ``DEEPRUBIN_<SECTION>__<KEY>[__<SUBKEY>]`` < ``--set section.key=value`` on the CLI.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deeprubin.schema import CLASSES

ENV_PREFIX = "DEEPRUBIN_"
DEFAULT_PARAMS = Path("params.yaml")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class ConfigError(ValueError):
    """params.yaml (or an override) is not a valid configuration; the message names each bad key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseParams(Section):
    seed: int = Field(42, description="Seed for everything random (simulation, splits, training).")
    classes: list[str] = Field(default_factory=lambda: list(CLASSES), description="Target classes, in label order.")
    data_dir: Path = Field(Path("data"), description="Root of DVC-tracked data.")
    model_name: str = Field("deeprubin-tcn", description="The registered model: training versions it under this "
                                                         "name, promotion manages its aliases, serving loads it.")

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, value: list[str]) -> list[str]:
        unknown = [c for c in value if c not in CLASSES]
        if unknown:
            raise ValueError(f"unknown class(es) {unknown}; known: {list(CLASSES)}")
        if len(set(value)) != len(value):
            raise ValueError(f"classes repeat: {value}")
        return value


class SimulatorParams(Section):
    """The ZTF-like simulator (sources/simulate.py documents the physics behind each number)."""

    n_per_class: int = Field(250, ge=1, description="Objects simulated per class.")
    seed: int | None = Field(None, description="Overrides base.seed for the simulator when set.")
    survey_start_mjd: float = Field(58288.0, description="Start of the simulated survey (ZTF public alerts: 2018-06).")
    survey_days: float = Field(730.0, gt=100, description="Length of the simulated survey, days.")
    phase: Literal["I", "II"] = Field("I", description="ZTF phase: I = 3-night cadence per band, II = 2-night.")
    oid_prefix: str = Field("SIM", min_length=1, description="Prefix of simulated object ids.")
    min_detections_per_band: int = Field(
        6, ge=1, description="Keep objects with this many detections in g or r (ALeRCE lc_classifier's minimum).")


class FilesParams(Section):
    """Light curves read from Parquet or CSV files in any contract-mapped format."""

    detections: Path | None = Field(Path("data/bts/detections.parquet"),
                                    description="Detections table (Parquet or CSV); default: the embedded BTS set.")
    labels: Path | None = Field(Path("data/bts/labels.csv"), description="Labels table: oid + label (optional).")
    non_detections: Path | None = Field(None, description="Upper limits table (optional).")
    label_source: str = Field("bts:spectroscopic", description="Recorded in objects.label_source.")
    keep_unlabelled: bool = Field(False, description="Keep objects whose label is missing or not a target class.")


class AlerceParams(Section):
    """Nightly incremental pulls from the ALeRCE ZTF API with the `alerce` client."""

    base_url: str = Field("https://api.alerce.online", description="ALeRCE API base URL (ZTF_API_URL).")
    classifier: str = Field("lc_classifier", description="ALeRCE classifier whose classes label the objects.")
    classifier_version: str | None = Field(None, description="Classifier version; null: the server's default.")
    min_probability: float = Field(0.7, ge=0, le=1, description="Minimum probability of the top class.")
    class_min_probability: dict[str, float] = Field(
        default_factory=dict, description="Per-class threshold overrides for scarce classes, e.g. {SNII: 0.5}.")
    max_objects_per_class: int = Field(500, ge=1, description="Cap on objects listed per class in one pull.")
    page_size: int = Field(100, ge=1, le=1000, description="Objects per page of /objects.")
    since_mjd: float | None = Field(None, description="First pull: only objects with lastmjd >= this (null: all).")
    overlap_days: float = Field(1.0, ge=0, description="Re-list this many days before the watermark (late alerts).")
    concurrency: int = Field(4, ge=1, le=64, description="Light curves fetched at once.")
    requests_per_second: float = Field(10.0, gt=0, description="Request rate limit, all threads together.")
    timeout_s: float = Field(20.0, gt=0, description="Per-request timeout (connect and read).")
    max_attempts: int = Field(5, ge=1, description="Attempts per request (retries on 5xx, 429, timeouts, resets).")
    backoff_base_s: float = Field(0.5, ge=0, description="Exponential backoff base; full jitter.")
    backoff_max_s: float = Field(30.0, ge=0, description="Backoff cap (and cap on a 429's Retry-After).")
    commit_every: int = Field(200, ge=1, description="Commit to the store after this many fetched objects.")

    @field_validator("class_min_probability")
    @classmethod
    def _known_threshold_classes(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = [c for c in value if c not in CLASSES]
        if unknown:
            raise ValueError(f"unknown class(es) {unknown}; known: {list(CLASSES)}")
        bad = {c: p for c, p in value.items() if not 0 <= p <= 1}
        if bad:
            raise ValueError(f"probabilities must lie in [0, 1]: {bad}")
        return value

    def threshold(self, class_name: str) -> float:
        return self.class_min_probability.get(class_name, self.min_probability)


class BtsParams(Section):
    """The ZTF Bright Transient Survey catalogue (spectroscopic types); light curves come from ingest.alerce."""

    enabled: bool = Field(False, description="The nightly flow also pulls BTS after ingest.source (which must "
                                             "upsert: alerce, or mode upsert).")
    url: str = Field("https://sites.astro.caltech.edu/ztf/bts/explorer.php",
                     description="The BTS sample explorer (its CSV export).")
    query: dict[str, str] = Field(
        default_factory=lambda: {"f": "s", "format": "csv", "subsample": "trans", "classstring": "",
                                 "quality": "y", "purity": "y"},
        description="Query string of the explorer's CSV export (f=s, format=csv, sample cuts); configurable, as "
                    "the explorer's parameters may change.")
    timeout_s: float = Field(60.0, gt=0, description="Timeout of the catalogue download (connect and read).")
    max_attempts: int = Field(5, ge=1, description="Attempts of the catalogue download (5xx, 429, timeouts, "
                                                   "truncated bodies are retried).")
    max_objects_per_pull: int = Field(5000, ge=1, description="Light curves fetched in one pull at most; the "
                                                              "next pull continues.")

    @field_validator("query")
    @classmethod
    def _csv_export(cls, value: dict[str, str]) -> dict[str, str]:
        if str(value.get("format", "csv")).lower() != "csv":
            raise ValueError(f"the BTS source reads the CSV export: format must be csv, not {value['format']!r}")
        return value


class IngestParams(Section):
    source: Literal["simulator", "files", "alerce", "bts"] = Field(
        "simulator", description="Where light curves come from (bts: spectroscopic types from the BTS catalogue, "
                                 "light curves from ingest.alerce).")
    mode: Literal["auto", "replace", "upsert"] = Field(
        "auto", description="replace: data/raw becomes this ingest's output; upsert: merge into it by key; "
                            "auto: upsert for alerce and bts (incremental), replace otherwise.")
    raw_dir: Path = Field(Path("data/raw"), description="Where the contract Parquet tables are written.")
    on_unsorted: Literal["sort", "reject"] = Field("sort", description="Objects whose times run backwards.")
    min_detections: int = Field(3, ge=1, description="Objects with fewer detections (after validation) are dropped.")
    simulator: SimulatorParams = Field(default_factory=SimulatorParams)
    files: FilesParams = Field(default_factory=FilesParams)
    alerce: AlerceParams = Field(default_factory=AlerceParams)
    bts: BtsParams = Field(default_factory=BtsParams)
    mix_files: bool = Field(
        True, description="Also ingest the labelled `files` beside `source` (the simulator plus the real BTS "
                          "supernovae), so training mixes both; evaluate.real's held-out objects never train. "
                          "Ignored when source is files.")

    @property
    def upsert(self) -> bool:
        return self.mode == "upsert" or (self.mode == "auto" and self.source in ("alerce", "bts"))

    @model_validator(mode="after")
    def _files_need_detections(self) -> "IngestParams":
        if (self.source == "files" or self.mix_files) and self.files.detections is None:
            raise ValueError("source 'files' (or mix_files) needs files.detections")
        if self.source == "bts" and self.mode == "replace":
            raise ValueError("source 'bts' is an incremental pull: mode must be auto or upsert, not replace")
        if self.bts.enabled and self.source != "bts" and not self.upsert:
            raise ValueError(f"bts.enabled pulls BTS into the store after source {self.source!r}, which replaces "
                             "it: use source alerce (or mode upsert)")
        return self

    @property
    def mixes_files(self) -> bool:
        """The files are ingested beside another source (with source 'files' they are the source: read once)."""
        return self.mix_files and self.source != "files"


class PreprocessParams(Section):
    """GP interpolation of every light curve onto the daily grid (stages/preprocess.py, lightcurves/)."""

    processed_dir: Path = Field(Path("data/processed"), description="Where model-ready tensors are written.")
    grid_days: int = Field(100, ge=10, description="Length of the daily grid, days.")
    kernel: Literal["matern32"] = Field("matern32", description="GP kernel.")
    fit_context_days: float = Field(
        100.0, ge=0, description="Detections up to this many days before the window start are fitted too.")
    partitions: int = Field(
        16, ge=1, le=100000, description="Objects are split into this many partitions by a hash of their oid; "
                                         "one output shard per partition (fixed, so output never depends on workers).")
    executor: Literal["processes", "dask"] = Field(
        "processes", description="processes: a local process pool; dask: the same partitions on a Dask cluster.")
    workers: int | None = Field(
        None, ge=1, description="Processes (or LocalCluster workers); null: the CPU count; 1: in this process.")
    dask_address: str | None = Field(
        None, description="Dask scheduler address (tcp://host:8786); null: start a LocalCluster.")
    incremental: bool = Field(
        True, description="Reuse stored tensors of objects whose detections did not change.")


class TrainParams(Section):
    """Training of the TCN (stages/train.py): the paper's defaults (Adam, lr 1e-3, batch 32; 100 epochs where the paper had 50), early
    stopping and the best checkpoint on validation macro-F1, tracked in MLflow and registered as a model version."""

    max_epochs: int = Field(100, ge=1, description="Upper bound on epochs (early stopping may end sooner).")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (`dvc exp run -S train.lr=1e-4`).")
    accelerator: Literal["auto", "cpu", "gpu"] = Field("auto", description="Lightning accelerator.")
    hidden: int = Field(32, ge=1, description="TCN channels per block.")
    kernel_size: int = Field(3, ge=2, description="TCN convolution kernel, days.")
    levels: int = Field(5, ge=1, description="TCN residual blocks (dilations 1, 2, ..., 2**(levels-1)).")
    dropout: float = Field(0.1, ge=0, lt=1)
    seed: int | None = Field(
        None, description="Seed of the network's initialisation and batch order (null: base.seed). The object "
                          "splits and held-out sets stay on base.seed, so runs with different seeds compare.")
    simulated_classes: list[str] | None = Field(
        None, description="Classes whose simulated objects are trained on (null: all); e.g. [QSO, CEP] trains the "
                          "supernova classes on the real (BTS) objects alone. Validation and test keep them all.")
    gp_draws: float = Field(
        0.0, ge=0, description="Augmentation: each training batch's GP means are redrawn as mean + gp_draws * std * "
                               "smoothed unit noise (0: off).")
    flux_compression: float | None = Field(
        None, gt=0, description="k: the network sees asinh(k x) of the GP means x (peak = 1; log-like below the "
                                "peak, so a decline of a few magnitudes stays visible); null: linear flux.")
    readout: Literal["mean", "last", "mean_last"] = Field(
        "mean", description="Per-day features -> one vector: mean over observed days (the paper), the causal "
                              "feature at the last observed day, or both.")
    shape_features: bool = Field(
        True, description="The read-out also sees the curve's shape measured on the GP means at the last observed "
                           "day (models/tcn.py SHAPE_FEATURES: age, days since peak, decline and rise in "
                           "magnitudes, decline rate, colours), through a hidden layer. Measured better than the plain average at "
                           "every age from 20 days (docs/model.md); false: the paper's linear head.")
    age_input: Literal["none", "channel", "film"] = Field(
        "none", description="How the convolutions know the object's age (days from the first detection to the last "
                            "observed day, read from the input): not at all (the paper), as a constant input "
                            "channel, or film: every block's features scaled and shifted by a small network of it.")
    imbalance: Literal["weights", "sampler", "both", "none", "source_sampler"] = Field(
        "weights", description="Class imbalance: class-weighted loss, balanced sampler, both, none, or "
                               "source_sampler: batches balanced over (label source, class), e.g. real SN II as "
                               "often as simulated SN II and as real SN Ia.")
    val_fraction: float = Field(0.15, ge=0, lt=1, description="Objects held out for validation (stratified).")
    test_fraction: float = Field(0.15, ge=0, lt=1, description="Objects held out for the test set (stratified).")
    patience: int = Field(20, ge=1, description="Early stopping: epochs without a better validation macro-F1.")
    lr_plateau_patience: int = Field(
        0, ge=0, description="Halve the learning rate after this many epochs without a better validation macro-F1; "
                             "0: constant, as the paper.")
    tracking_uri: str = Field(
        None, validate_default=True,
        description="MLflow tracking (and registry) URI; null: $MLFLOW_TRACKING_URI when set (a tracking server, "
                    "`deeprubin up`), else sqlite:///mlflow.db (embedded, no server).")
    experiment: str = Field("deeprubin", description="MLflow experiment name.")
    artifact_location: str | None = Field(
        None, description="Artifact root of a new experiment; null: MLflow's default (local, beside the cwd).")
    model_dir: Path = Field(Path("models"), description="DVC-tracked outputs: tcn.ckpt, train.json, forest.joblib.")
    truncations: int = Field(
        4, ge=0, description="Early-classification augmentation: copies of each training object cut at random times "
                             "(GP refitted on the detections before the cut); each epoch draws one view per object.")
    truncation_min_days: float = Field(
        3.0, gt=0, description="Earliest cut, days after the first detection (cuts are log-uniform up to the span).")
    truncation_max_days: float | None = Field(
        None, gt=0, description="Latest cut, days after the first detection (null: the object's span); a cap puts "
                                "the cuts where classification is hard instead of on near-whole curves.")
    full_view_probability: float = Field(
        0.5, ge=0, le=1, description="With augmentation, the chance that an epoch shows an object's whole curve "
                                     "rather than one of its cuts.")
    redshift_views: int = Field(
        0, ge=0, description="Redshift augmentation (deeprubin/augment.py): copies of each real training supernova "
                             "with a known redshift (the `redshift` column of ingest.files.labels) moved farther "
                             "away, dimmer and time-dilated, with ZTF noise; drawn like the cuts.")
    redshift_max_peak_mag: float = Field(
        20.0, gt=0, description="Redshifted copies peak at most this faint (uniform from the observed peak).")
    calibration: Literal["per_age", "global", "none"] = Field(
        "per_age", description="Temperature scaling fitted on the validation objects after training, applied inside "
                               "the served model: a temperature per age bin (days since first detection, read from "
                               "the input), one for all ages, or none (the network's own softmax).")
    calibration_objects: Literal["all", "real"] = Field(
        "real", description="Validation objects the temperatures are fitted on: the real ones only (not simulated; "
                            "all of them when the split has no real object), or all. Real-only calibrates the "
                            "held-out real objects better (docs/calibration.md).")
    calibration_views: int = Field(
        8, ge=0, description="Cuts of each validation object (GP refitted, as at inference) beside its whole curve "
                             "for the calibration fit: early ages get their own temperatures.")
    members: int = Field(
        1, ge=1, description="Networks trained independently (seeds train.seed, +1, ...: own initialisation, batch "
                             "order, early stop and MLflow child run); the model is their mean probability (one "
                             "exported graph). Costs members x the training and the TCN's inference time.")
    finetune_epochs: int = Field(
        0, ge=0, description="After training, each network continues from its best checkpoint on the real objects "
                             "(and the simulated ones of finetune_simulated_classes) for up to this many epochs at "
                             "finetune_lr, early-stopped on the same validation objects; the fine-tuned weights are "
                             "kept only when they score higher there. 0: no fine-tuning.")
    finetune_lr: float = Field(2e-4, gt=0, description="Adam's learning rate while fine-tuning.")
    finetune_simulated_classes: list[str] = Field(
        ["QSO", "CEP"], description="Simulated objects of these classes stay in the fine-tuning set (classes with "
                                    "no real labelled objects would otherwise be forgotten).")
    selection_objects: Literal["all", "real"] = Field(
        "all", description="Validation objects early stopping and the best checkpoint are chosen on: all of them, or "
                           "the real ones only (label source not the simulator; all when the split has none).")
    selection_views: int = Field(
        0, ge=0, description="Cuts of each validation object (GP refitted, as at inference) added beside its whole "
                             "curve to the set early stopping and the best checkpoint are chosen on (val/macro_f1): "
                             "the chosen epoch is then good early as well as on whole curves. 0: whole curves only.")

    @field_validator("tracking_uri", mode="before")
    @classmethod
    def _tracking_uri_from_environment(cls, value: str | None) -> str:
        # Servers are chosen by configuration alone: the standard MLflow variable, as every MLflow tool reads it.
        return value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class RealSetParams(Section):
    """A real labelled set evaluated held out (default: the BTS supernovae shipped in data/bts, when present)."""

    name: str = Field("bts", description="Name in the metrics and plots.")
    detections: Path | None = Field(Path("data/bts/detections.parquet"),
                                    description="Detections table; null or missing file: no real-data evaluation.")
    labels: Path | None = Field(Path("data/bts/labels.csv"), description="Labels table (oid, label).")
    classes: list[str] = Field(["SNIa", "SNII"], description="Classes of the set that are scored.")
    test_fraction: float = Field(
        0.3, gt=0, lt=1, description="Objects held out per class (by a seeded hash of the oid): never trained on, "
                                     "even when ingest.mix_files puts the set into training.")

    @property
    def available(self) -> bool:
        return self.detections is not None and self.labels is not None and Path(self.detections).exists() \
            and Path(self.labels).exists()


class CrossValParams(Section):
    """Repeated stratified k-fold on the real set (`deeprubin evaluate --cv`, evaluation/crossval.py): each fold's TCN
    (the train stage's recipe) and forest train on the simulator plus the other folds' real objects."""

    folds: int = Field(5, ge=2, description="Folds, stratified by object and class.")
    repeats: int = Field(1, ge=1, description="Repeats of the k-fold split, seeded base.seed + repeat.")
    days: list[float] = Field([5, 10, 20, 30, 50], description="Ages scored beside whole curves: curves cut this "
                                                               "many days after the first detection.")
    experiment: str = Field("deeprubin-cv", description="MLflow experiment of the cross-validation run and of its "
                                                        "folds' training runs (its children).")


class OgleSetParams(Section):
    """Real quasars and Cepheids of OGLE-II (I band) presented as a ZTF alert stream (evaluation/ogle.py); scored
    every evaluation, skipped when the file is absent."""

    name: str = Field("ogle", description="Prefix of the sets: <name>_alert_stream and <name>_apparent.")
    path: Path | None = Field(Path("../shared/data/other_surveys/ogle2_lmc_qso_cep_iband.csv"),
                              description="OGLE-II light curves (oid, label, time, mag, mag_err); null or missing "
                                          "file: not evaluated.")
    classes: list[str] = Field(["QSO", "CEP"], description="Classes scored (recall = fraction called that class, "
                                                           "predictions over all of base.classes).")
    alert_days: float = Field(
        200.0, gt=0, description="The alert stream carries the detections of the last this many days of each curve "
                                 "(the reference is the median of the whole curve, as a deep reference image).")
    apparent: bool = Field(True, description="Also score the same points as plain apparent magnitudes, no "
                                             "subtraction (<name>_apparent): a diagnostic row.")

    @property
    def available(self) -> bool:
        return self.path is not None and Path(self.path).exists()


class EvaluateParams(Section):
    """Evaluation of the TCN and the random-forest baseline (stages/evaluate.py, stages/baseline.py)."""

    metrics_dir: Path = Field(Path("metrics"), description="DVC metrics (*.json), plot data (plots/) and figures/.")
    early_days: list[float] = Field([5, 10, 20, 30, 50, 100],
                                    description="Early classification: curves cut this many days after first detection.")
    n_bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples (by object) for the 95% intervals.")
    calibration_bins: int = Field(10, ge=2, description="Confidence bins for ECE and the reliability plot.")
    real: RealSetParams = Field(default_factory=RealSetParams)
    baseline: bool = Field(True, description="Train and evaluate the balanced random forest beside the TCN.")
    forest_trees: int = Field(300, ge=1, description="Trees of the balanced random forest.")
    forest_truncations: list[float] = Field(
        [10, 20, 30, 50], description="The forest also trains on copies cut this many days after first detection.")
    ogle: OgleSetParams = Field(default_factory=OgleSetParams)
    cv: CrossValParams = Field(default_factory=CrossValParams)


class PromoteParams(Section):
    """Champion/challenger promotion in the MLflow registry (registry.py, stages/promote.py)."""

    metric: Literal["macro_f1", "balanced_accuracy"] = Field(
        "macro_f1", description="Metric the challenger must beat the champion on.")
    evaluation_set: str = Field(
        "test", description="The frozen set both models are scored on: `test` (the test split, all classes) or the "
                            "name of the real held-out set (evaluate.real.name, e.g. bts).")
    min_improvement: float = Field(
        0.0, ge=0, description="The challenger's metric must exceed the champion's by more than this margin.")
    max_recall_drop: float = Field(
        0.05, ge=0, le=1, description="No class's recall may fall by more than this against the champion.")
    lock_timeout_s: float = Field(
        600.0, gt=0, description="Wait this long for another promotion on the same registry to finish.")


class ClassifyParams(Section):
    """Classification of new objects with the serving model (deeprubin.serving.classify)."""

    model_uri: str | None = Field(
        None, description="Model URI (models:/name@alias, models:/name/3) or a local MLflow model path; null: the "
                          "champion of base.model_name.")
    batch_size: int = Field(1024, ge=1, description="Objects per batch (GP, TCN, write).")
    output_dir: Path = Field(Path("data/classifications"),
                             description="Nightly results: one Parquet file per night, replaced when rerun.")
    workers: int = Field(0, ge=0, description="GP processes beside the TCN (0: one per core; 1: all in this "
                                              "process).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the TCN runs (auto: cuda when "
                                                                       "available).")
    gp_device: Literal["cpu", "auto", "cuda", "torch-cpu"] = Field(
        "cpu", description="Where the GP runs. cpu: the numpy GP on the `workers` processes (the default); cuda: the "
                           "torch GP (lightcurves/gp_torch.py, equal to the numpy one to 1e-6) batched on the GPU in "
                           "the main process, the TCN on the same GPU unless `device` says cpu, the workers doing the "
                           "per-curve window and input preparation; auto: cuda when torch sees one, else cpu; "
                           "torch-cpu: the torch GP on the CPU (the cuda path's code, to check it without a GPU).")
    device_batch_size: int = Field(
        32768, ge=1, description="Objects per GP + TCN call on the device when the GP runs in torch (gp_device not "
                                 "cpu): the workers' batches of `batch_size` are merged up to this many.")
    photometry: Literal["auto", "difference", "apparent"] = Field(
        "auto", description="What input brightness is when its rows do not say (a `photometry` column): difference "
                            "flux, as the model learned; apparent magnitudes, turned into difference flux first; "
                            "auto: recognised per object (lightcurves/presentation.py). Not for alert streams.")


class KafkaParams(Section):
    """A Kafka topic of alert packets (confluent-kafka); unset means read packets from a directory."""

    bootstrap_servers: str | None = Field(None, description="host:port[,host:port]; null: no Kafka.")
    topic: str | None = Field(None, description="Topic of alert packets.")
    group_id: str = Field("deeprubin", description="Consumer group (offsets are committed after each batch).")
    auto_offset_reset: Literal["earliest", "latest"] = Field("earliest", description="Where a new group starts.")
    poll_timeout_s: float = Field(1.0, gt=0, description="Wait for a message at most this long per poll.")
    connect_timeout_s: float = Field(
        30.0, gt=0, description="Give up (deeprubin consume exits with an error naming the brokers) when no broker of "
                                "bootstrap_servers has answered for this long: at start, or after losing them all.")
    config: dict[str, str] = Field(default_factory=dict,
                                   description="Extra librdkafka settings (security.protocol, sasl.*, ...).")


class AlertsParams(Section):
    """Alert-stream consumer (deeprubin.serving.alerts): ZTF Avro alerts or LSST alert packets, from a directory or Kafka."""

    format: Literal["auto", "ztf", "lsst"] = Field("auto", description="Packet format (auto: from its fields).")
    lsst_schema_version: str | None = Field(None, description="lsst-alert-packet schema, e.g. '7.4' (null: the "
                                                              "package's latest) for packets without a schema.")
    batch_alerts: int = Field(1024, ge=1, description="Alerts classified together (one GP/TCN batch).")
    max_objects: int = Field(1_000_000, ge=1, description="Light curves kept in memory; the least recently "
                                                          "updated are dropped past this.")
    output_dir: Path = Field(Path("data/alerts"), description="Classifications of the stream, one Parquet part "
                                                              "per batch.")
    kafka: KafkaParams = Field(default_factory=KafkaParams)


class ServeParams(Section):
    """The HTTP classification service (deeprubin serve-api)."""

    host: str = Field("127.0.0.1", description="Bind address (loopback by default: put a proxy in front).")
    port: int = Field(8000, ge=0, le=65535, description="Port (0: a free one).")
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    max_curves_per_request: int = Field(1000, ge=1, description="Light curves in one POST /classify at most.")
    max_detections_per_curve: int = Field(10_000, ge=1, description="Detections in one light curve at most.")
    reload_interval_s: float = Field(30.0, gt=0, description="How often the registry alias is checked for a new "
                                                             "champion.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection that has not sent a whole request head (request line and headers) "
                                "this many seconds after it opened, or after the first byte of its next request, is "
                                "closed (with a 408 when it had sent part of one).")
    body_timeout_s: float = Field(
        30.0, gt=0, description="A request whose body has not wholly arrived this many seconds after its head gets "
                                "408 and its connection is closed.")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="An idle kept-alive connection is closed after this "
                                                               "many seconds (uvicorn's timeout_keep_alive).")
    max_concurrency: int = Field(
        100, ge=1, description="Open connections (and requests in progress) at most: past it a new request gets 503 "
                               "at once (uvicorn's limit_concurrency). Bounds the memory held by bodies being read "
                               "to about max_concurrency x max_request_bytes.")


class ScheduleParams(Section):
    cron: str = Field(..., description="Cron expression.")
    timezone: str = Field("UTC", description="IANA time zone of the cron expression.")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from datetime import datetime

        from cronsim import CronSim, CronSimError  # Prefect's own cron parser

        try:
            CronSim(value, datetime(2026, 1, 1))
        except CronSimError as exc:
            raise ValueError(f"not a cron expression: {value!r} ({exc})") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (IANA names, e.g. America/Los_Angeles)") from None
        return value


class FlowsParams(Section):
    """Prefect orchestration (flows/): retries, timeouts, concurrency, the retraining threshold and schedules."""

    retrain_min_new_labelled: int = Field(
        100, ge=0, description="Nightly: retrain when this many labelled objects arrived since the last training "
                               "(always when no model was trained yet).")
    retries: int = Field(3, ge=0, description="Retries of a task that failed with a transient (server) error.")
    retry_delay_s: float = Field(10.0, ge=0, description="First retry delay; doubles each retry (with jitter).")
    task_timeout_s: float = Field(4 * 3600.0, gt=0, description="A task running longer than this fails.")
    concurrency_limit: str = Field(
        "deeprubin-data", description="Prefect global concurrency limit (1 slot) held by a run that writes data, so "
                                      "two nightly runs never overlap on the same data.")
    dvc_push: bool = Field(True, description="Push the versioned data to the DVC remote when one is configured.")
    nightly: ScheduleParams = Field(
        default_factory=lambda: ScheduleParams(cron="0 9 * * *", timezone="America/Los_Angeles"),
        description="After the ZTF night at Palomar and ALeRCE's processing of it.")
    train: ScheduleParams | None = Field(None, description="Optional schedule of a forced retraining.")


class Params(Section):
    base: BaseParams = Field(default_factory=BaseParams)
    ingest: IngestParams = Field(default_factory=IngestParams)
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    promote: PromoteParams = Field(default_factory=PromoteParams)
    classify: ClassifyParams = Field(default_factory=ClassifyParams)
    alerts: AlertsParams = Field(default_factory=AlertsParams)
    serve: ServeParams = Field(default_factory=ServeParams)
    flows: FlowsParams = Field(default_factory=FlowsParams)

    def model_uri(self) -> str:
        """The model that classifies: ``classify.model_uri``, else ``models:/<base.model_name>@champion``."""
        return self.classify.model_uri or f"models:/{self.base.model_name}@champion"


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key (not in the configuration)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" else ""))
    return f"invalid configuration in {origin}:\n" + "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        raise ConfigError(f"{origin}: empty key")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(parts)}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` -> (dotted key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {exc}") from None
    return key.strip(), value


def env_overrides(environ: Mapping[str, str] | None = None) -> list[tuple[str, Any]]:
    """``DEEPRUBIN_INGEST__SOURCE=files`` -> ("ingest.source", "files")."""
    environ = os.environ if environ is None else environ
    out = []
    for name, raw in sorted(environ.items()):
        if name.startswith(ENV_PREFIX) and "__" in name:
            dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
            out.append(parse_override(f"{dotted}={raw}"))
    return out


def load_params(path: Path | str | None = DEFAULT_PARAMS, overrides: list[str] | None = None,
                environ: Mapping[str, str] | None = None) -> Params:
    """Load params.yaml (or the defaults when ``path`` is None), apply env and CLI overrides, validate."""
    tree: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"configuration file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, not {type(loaded).__name__}")
        tree, origin = loaded, str(path)
    applied = []
    for key, value in env_overrides(environ):
        _set_dotted(tree, key, value, f"environment {ENV_PREFIX}{key.upper().replace('.', '__')}")
        applied.append(key)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, f"--set {text}")
        applied.append(key)
    if applied:
        origin += " with overrides " + ", ".join(applied)
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def load_project_params(path: Path | str | None = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    """:func:`load_params`, except that a missing *default* ``params.yaml`` means the defaults (a command run
    outside a checkout); any other missing file is an error."""
    if path is not None and Path(path) == DEFAULT_PARAMS and not Path(path).exists():
        path = None
    return load_params(path, overrides)


def dump_params(params: BaseModel) -> str:
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
