"""Champion/challenger in the model registry: promote and rollback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from deeprubin.cli.common import ParamsOption, SetOption, _load, _run_with_progress, app, console, err_console


@app.command()
def promote(
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    version: Annotated[Optional[str], typer.Option(help="Version to promote (default: models/registered.json).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Make it champion even if the gate rejects it (outcome 'forced'; the gate's verdict is kept "
                        "in the reason). The replaced champion becomes 'previous', for rollback.")] = False,
) -> None:
    """Make a registered version the challenger, and the champion if it beats the champion on the frozen set.

    Both versions are scored now on promote.evaluation_set; the rule (margin, recall bound) and the decision's
    reason are written on the version (tag promotion/decision, the reason atop its description) and to
    models/promotion.json. A retrained model that only ties the champion is rejected; --force promotes it anyway.
    """
    from deeprubin.registry import RegistryError
    from deeprubin.stages import promote as stage

    params = _load(params_path, overrides)
    try:
        decision = _run_with_progress("promote", lambda r: stage.run(params, stage.PromotePaths.from_params(params), r,
                                                                          version=version, force=force))
    except (RegistryError, LookupError) as exc:
        err_console.print(f"[bold red]promote failed:[/] {exc}")
        raise typer.Exit(1) from None
    colour = "green" if decision.promoted else "yellow"
    console.print(f"[bold]promote[/] {decision.registered_model} version {decision.version}: "
                  f"[{colour}]{decision.outcome}[/] ({decision.reason}); champion is now "
                  f"{decision.champion_after or 'none'}")


@app.command()
def rollback(
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Make the previous champion the champion again (alias `previous` -> `champion`).

    `previous` is set only when a promotion replaces a champion (a rejected candidate leaves it unset). Without it
    nothing changes, the reason and what to do are printed, and the exit status is 1.
    """
    from deeprubin.registry import Registry, RegistryError, rollback as roll_back

    params = _load(params_path, overrides)
    try:
        done = roll_back(Registry(params.train.tracking_uri, params.base.model_name),
                         params.promote.lock_timeout_s)
    except RegistryError as exc:
        err_console.print(f"[bold red]rollback failed:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"[bold]rollback[/] {done['reason']}")
