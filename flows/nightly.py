"""The nightly flow: pull -> preprocess -> version the data -> (retrain -> evaluate -> register -> promote) -> classify.

The pull is ``ingest.source`` and then, when ``ingest.bts.enabled``, the BTS catalogue's spectroscopic types into the
same store.

Runs embedded (ephemeral Prefect, sqlite MLflow) or against servers chosen by PREFECT_API_URL and
MLFLOW_TRACKING_URI. The whole run holds the data lock (``flows.concurrency_limit``), so two nightly runs never
overlap on the same data. The tasks run one after the other (:class:`~deeprubin_flows.common.Chain`), which is also
what the flow-run graph shows: ingest -> preprocess -> version-data -> [train -> baseline -> evaluate -> version-data
-> register -> promote ->] classify. Artifacts (stable keys): ``nightly-pull``, ``nightly-evaluation``,
``promotion-decision``, ``nightly-classifications``.

The result counts what the pull did (``objects``: new, changed, removed; ``changed_objects``: new or changed, what
is classified) and what the classification did (``classify.classified_now``; ``classify.objects_in_file``: the
night's file, which a rerun of the night keeps).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow, get_run_logger

from deeprubin.retraining import should_retrain
from deeprubin_flows import artifacts, tasks
from deeprubin_flows.common import Chain, data_lock, load


@flow(name="nightly", log_prints=True)
def nightly(params_path: str = "params.yaml", overrides: list[str] | None = None, force_retrain: bool = False,
            night: str | None = None) -> dict[str, Any]:
    """One night of the platform; ``night`` (YYYY-MM-DD, default today in UTC) names the classification file."""
    params = load(params_path, overrides)
    logger = get_run_logger()
    night = night or dt.datetime.now(dt.timezone.utc).date().isoformat()
    out: dict[str, Any] = {"night": night}
    chain = Chain(params)
    with data_lock(params):
        pulled = tasks.pull_sources(chain)  # ingest.source, then BTS when ingest.bts.enabled
        artifacts.pull_table(pulled, night)
        out["pulled"] = {k: pulled[k] for k in ("source", "per_class", "detections")}
        out["objects"] = dict(pulled["counts"])
        out["changed_objects"] = len(pulled["changed_oids"])
        out["label_changes"] = len(pulled["label_changes"])
        out["preprocess"] = chain(tasks.preprocess)
        out["data_version"] = chain(tasks.version_data, ["ingest", "preprocess"])

        retrain, why = should_retrain(params, force_retrain)
        logger.info("retraining: %s (%s)", retrain, why)
        out["retrain"] = {"retrain": retrain, "reason": why}
        if retrain:
            out["train"], evaluated, stages = tasks.train_and_evaluate(chain)
            out["evaluate"] = evaluated["metrics"]
            out["model_version"] = chain(tasks.version_data, stages)
            registered = chain(tasks.register)
            out["promotion"] = tasks.promote_version(chain, registered["version"])
        else:
            artifacts.no_retraining(why)
        out["classify"] = tasks.classify_night(chain, pulled["changed_oids"], night)
    return out


if __name__ == "__main__":
    nightly()
