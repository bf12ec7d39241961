"""On-demand classification of stored objects (all, or the given oids) with the serving model.

It holds the data lock (``flows.concurrency_limit``) like ``nightly`` and ``train``: it reads data/raw and upserts the
night's file, which a nightly run writes too."""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow

from deeprubin_flows import tasks
from deeprubin_flows.common import data_lock, load


@flow(name="classify", log_prints=True)
def classify(params_path: str = "params.yaml", overrides: list[str] | None = None, oids: list[str] | None = None,
             output: str | None = None) -> dict[str, Any]:
    params = load(params_path, overrides)
    with data_lock(params):
        return tasks.classify_night(params, oids, dt.datetime.now(dt.timezone.utc).date().isoformat(), output)


if __name__ == "__main__":
    classify()
