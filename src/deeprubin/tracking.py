"""One place that points MLflow's process-wide tracking and registry URIs somewhere, and puts them back exactly.

``mlflow.set_tracking_uri`` also sets (or, given None, unsets) ``$MLFLOW_TRACKING_URI``, and restoring the value
``get_tracking_uri()`` returned pins what used to be a default. In a long-lived process (``serve-flows``, the tests)
that leaks one run's server into the next; this context manager restores the globals and the variables as found.
"""

from __future__ import annotations

import os
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
