"""On-demand classification of stored objects (all, or the given oids) with the serving model."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from prefect import flow

from flows import artifacts, tasks
from flows.common import configured, load


@flow(name="classify", log_prints=True)
def classify(params_path: str = "params.yaml", overrides: list[str] | None = None, oids: list[str] | None = None,
             output: str | None = None) -> dict[str, Any]:
    params = load(params_path, overrides)
    night = dt.datetime.now(dt.timezone.utc).date().isoformat()
    output = output or str(Path(params.classify.output_dir) / f"{night}.parquet")
    done = configured(tasks.classify, params)(params, oids, output)
    artifacts.classifications(done, night)
    return done


if __name__ == "__main__":
    classify()
