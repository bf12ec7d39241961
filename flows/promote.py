"""On-demand promotion (a registered version against the champion) and rollback."""

from __future__ import annotations

from typing import Any

from prefect import flow

from deeprubin_flows import artifacts, tasks
from deeprubin_flows.common import Chain, load


@flow(name="promote", log_prints=True)
def promote(params_path: str = "params.yaml", overrides: list[str] | None = None,
            version: str | None = None, force: bool = False) -> dict[str, Any]:
    """Promote ``version`` (default: the last one `deeprubin register` wrote) if it beats the champion, or anyway
    with ``force``."""
    params = load(params_path, overrides)
    return tasks.promote_version(params, version, force)


@flow(name="rollback", log_prints=True)
def rollback(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Make the previous champion the champion again."""
    params = load(params_path, overrides)
    done = Chain(params)(tasks.rollback)
    artifacts.rollback(done)
    return done


if __name__ == "__main__":
    promote()
