"""On-demand retraining: preprocess what changed -> train -> baseline -> evaluate -> version -> register -> promote."""

from __future__ import annotations

from typing import Any

from prefect import flow

from deeprubin_flows import tasks
from deeprubin_flows.common import Chain, data_lock, load


@flow(name="train", log_prints=True)
def train(params_path: str = "params.yaml", overrides: list[str] | None = None,
          promote: bool = True) -> dict[str, Any]:
    params = load(params_path, overrides)
    chain = Chain(params)
    out: dict[str, Any] = {}
    with data_lock(params):
        out["preprocess"] = chain(tasks.preprocess)
        out["train"], evaluated, stages = tasks.train_and_evaluate(chain)
        out["evaluate"] = evaluated["metrics"]
        out["data_version"] = chain(tasks.version_data, ["preprocess", *stages])
        out["registered"] = chain(tasks.register)
    if promote:
        out["promotion"] = tasks.promote_version(chain, out["registered"]["version"])
    return out


if __name__ == "__main__":
    train()
