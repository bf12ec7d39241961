"""One place that points MLflow's process-wide tracking and registry URIs somewhere, and puts them back exactly.

``mlflow.set_tracking_uri`` also sets (or, given None, unsets) ``$MLFLOW_TRACKING_URI``, and restoring the value
``get_tracking_uri()`` returned pins what used to be a default. In a long-lived process (``serve-flows``, the tests)
that leaks one run's server into the next; this context manager restores the globals and the variables as found.

:func:`quiet_third_party` keeps what MLflow, Lightning and their dependencies print on their own (progress bars, run
links, advertisements, known deprecation warnings) out of the pipeline's output; :func:`ui_urls` gives the one link
to a run and to the registered model that the CLI prints instead.
"""

from __future__ import annotations

import logging
import os
import secrets
import warnings
from contextlib import contextmanager
from typing import Iterator

_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


@contextmanager
def using(uri: str) -> Iterator[None]:
    """Make ``uri`` the tracking and registry URI for the block. The active experiment (``mlflow.set_experiment``
    inside the block) is restored too: its id belongs to that store, and a later run elsewhere would use it."""
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri, {k: os.environ.get(k) for k in _ENV},
             fluent._active_experiment_id)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved[0], saved[1]
        fluent._active_experiment_id = saved[3]
        for key, value in saved[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


#: Environment switches set (unless the user set them) by :func:`quiet_third_party`: MLflow's "Downloading artifacts"
#: progress bars (one per model download: promotion, classification) and the "🏃 View run ... / 🧪 View experiment"
#: lines it writes to stdout whenever a run against a tracking server ends (twice per training run: once when
#: Lightning's logger finalises the run, once when the train stage closes it after logging the model).
QUIET_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}

#: Known, harmless deprecation warnings raised inside third-party code (not ours, nothing a user can act on):
#: (message regex, category). Anything else, warnings from this package included, is still shown.
KNOWN_WARNINGS = (
    # pytorch_lightning/utilities/_pytree.py builds a torch LeafSpec, deprecated in torch 2.10+.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # MLflow's SQLAlchemy models use lazy="noload", deprecated in SQLAlchemy 2.1.
    (r"The ``noload`` loader strategy is deprecated", DeprecationWarning),
    (r"The :func:`_orm\.noload` option is deprecated", DeprecationWarning),
)

#: INFO lines of Lightning's rank-zero logger that are advertisements or say nothing about this machine's run.
LIGHTNING_NOISE = ("💡 Tip:", "TPU available:", "HPU available:")

#: INFO lines dropped, by logger: the message starts (prefixes). MLflow's registry client logs "Waiting up to 300
#: seconds for model version to finish creation" on every version registered against a tracking server (a REST
#: store), though the version is READY at once there; the wait itself still runs (a registry that creates versions
#: asynchronously is still waited for), and a version that fails or times out still raises.
QUIET_MESSAGES = {
    "pytorch_lightning.utilities.rank_zero": LIGHTNING_NOISE,
    "mlflow.store.model_registry.abstract_store": ("Waiting up to",),
}

#: Loggers whose INFO lines only narrate MLflow's own bookkeeping ("Creating initial MLflow database tables...");
#: their warnings and errors still show.
CHATTY_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration")


class _DropMessages(logging.Filter):
    """Drops INFO (and lower) records whose message starts with one of ``prefixes``; warnings and errors pass."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__("deeprubin-quiet")
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return not message.lstrip().startswith(self.prefixes)


def quiet_third_party() -> None:
    """Silence third-party output that is noise to a user of the pipeline, at its source; idempotent.

    - MLflow: no artifact download progress bars, no run/experiment links on stdout (:data:`QUIET_ENV`, set only
      where the user has not set them), no INFO narration of its database migrations (:data:`CHATTY_LOGGERS`);
    - Lightning: no "💡 Tip: ... litlogger" advertisement nor TPU/HPU availability lines (:data:`LIGHTNING_NOISE`,
      a filter on its rank-zero logger); MLflow: no "Waiting up to 300 seconds for model version to finish
      creation" when a version is registered against a server (:data:`QUIET_MESSAGES`: filters on those loggers);
    - warnings: the known third-party deprecations of :data:`KNOWN_WARNINGS`, matched by message and category.

    Errors, warnings of this package and any other warning are untouched."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)
    for name, prefixes in QUIET_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def run_name(prefix: str) -> str:
    """A run name that tells runs apart: ``train-20261207-164012-3fa2`` (UTC time, 4 random hex digits). MLflow's
    own names come from Python's ``random``, which training seeds first, so every run of one seed got the same
    name; ``secrets`` is not seeded."""
    from datetime import datetime, timezone

    return f"{prefix}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def ui_urls(tracking_uri: str | None, experiment_id: str | None = None, run_id: str | None = None,
            model_name: str | None = None) -> dict[str, str]:
    """Direct links into the MLflow UI of a tracking server (``http(s)://``): ``experiment``, ``run`` and ``model``
    (the registered model's page) for what is given. The home page (``/``) opens in MLflow's GenAI view; these go
    straight to the runs and the registry. Empty for a store without a UI (``sqlite:///``, a path)."""
    from urllib.parse import quote

    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return {}
    base = tracking_uri.rstrip("/")
    out = {}
    if experiment_id:
        out["experiment"] = f"{base}/#/experiments/{experiment_id}/runs"  # without /runs: the GenAI overview
        if run_id:
            out["run"] = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    if model_name:
        out["model"] = f"{base}/#/models/{quote(model_name, safe='')}"
    return out
