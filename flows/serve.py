"""Deployments of the flows with their schedules from params.yaml.

``deeprubin serve-flows`` (or ``python -m deeprubin_flows.serve``) serves them from this process: Prefect runs each scheduled
or UI-triggered run here; stopping the process leaves the schedules active (``pause_on_shutdown=False``), so a
restarted server picks up where it left. ``--work-pool NAME`` instead registers them on a work pool, for the
Prefect worker of infra/docker-compose.yml. ``prefect deployment ls`` lists them either way.

Every deployment allows one run at a time (``concurrency_limit=1``): each writes the data, the registry or the night's
classification file. (Different flows that write the same data wait for each other on the data lock,
``flows.concurrency_limit``: nightly, train and classify.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deeprubin.config import Params, ScheduleParams
from deeprubin_flows.common import load

TAGS = ["deeprubin"]


def _schedules(schedule: ScheduleParams | None) -> list[Any] | None:
    from prefect.schedules import Cron

    return None if schedule is None else [Cron(schedule.cron, timezone=schedule.timezone)]


def _specs(params: Params, params_path: str) -> list[dict[str, Any]]:
    """(flow, deployment options) for every deployment; one run at a time of each."""
    from deeprubin_flows.classify import classify
    from deeprubin_flows.nightly import nightly
    from deeprubin_flows.promote import promote, rollback
    from deeprubin_flows.train import train

    common = {"parameters": {"params_path": params_path}, "tags": TAGS, "concurrency_limit": 1}
    return [
        {"flow": nightly, "entrypoint": "flows/nightly.py:nightly", "name": "nightly",
         "schedules": _schedules(params.flows.nightly),
         "description": "Pull, preprocess, version, retrain when enough new labels, promote, classify.", **common},
        {"flow": train, "entrypoint": "flows/train.py:train", "name": "train",
         "schedules": _schedules(params.flows.train),
         "description": "Retrain, evaluate, register and promote on demand.", **common},
        {"flow": promote, "entrypoint": "flows/promote.py:promote", "name": "promote",
         "description": "Promote a registered version if it beats the champion.", **common},
        {"flow": rollback, "entrypoint": "flows/promote.py:rollback", "name": "rollback",
         "description": "Make the previous champion the champion again.", **common},
        {"flow": classify, "entrypoint": "flows/classify.py:classify", "name": "classify",
         "description": "Classify stored objects with the champion into the day's file.", **common},
    ]


def deployments(params: Params, params_path: str = "params.yaml") -> list[Any]:
    out = []
    for spec in _specs(params, params_path):
        spec = dict(spec)
        flow, _ = spec.pop("flow"), spec.pop("entrypoint")
        out.append(flow.to_deployment(**{k: v for k, v in spec.items() if v is not None}))
    return out


def serve_flows(params_path: str = "params.yaml", overrides: list[str] | None = None, limit: int | None = None) -> None:
    """Serve every deployment until interrupted."""
    from prefect import serve

    params = load(params_path, overrides)
    serve(*deployments(params, params_path), pause_on_shutdown=False, limit=limit)


def deploy_to_pool(work_pool: str, params_path: str = "params.yaml", overrides: list[str] | None = None,
                   source: str | None = None) -> list[str]:
    """Register every deployment on ``work_pool`` (a process pool is created when missing); returns their ids."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    params = load(params_path, overrides)
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=work_pool, type="process"))
        except ObjectAlreadyExists:
            pass
    root = source or str(Path(__file__).resolve().parent.parent)
    ids = []
    for spec in _specs(params, params_path):
        spec = dict(spec)
        flow, entrypoint = spec.pop("flow"), spec.pop("entrypoint")
        remote = flow.from_source(source=root, entrypoint=entrypoint)
        ids.append(str(remote.deploy(work_pool_name=work_pool, build=False, push=False, print_next_steps=False,
                                     **{k: v for k, v in spec.items() if v is not None})))
    return ids


if __name__ == "__main__":
    import sys

    serve_flows(sys.argv[1] if len(sys.argv) > 1 else "params.yaml")
