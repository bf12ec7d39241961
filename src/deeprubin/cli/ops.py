"""Orchestration: the nightly flow, serving the flows' schedules, and the local Prefect and MLflow servers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.panel import Panel
from rich.table import Table

from deeprubin.cli.common import ParamsOption, SetOption, _load, app, console, err_console


@app.command()
def nightly(
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    force_retrain: Annotated[bool, typer.Option(help="Retrain even below flows.retrain_min_new_labelled.")] = False,
    night: Annotated[Optional[str], typer.Option(help="Night (YYYY-MM-DD) naming the classification file.")] = None,
) -> None:
    """Run the nightly Prefect flow now: pull, preprocess, version with DVC, retrain when enough new labels arrived,
    evaluate, register, promote, classify. Embedded by default; set PREFECT_API_URL and MLFLOW_TRACKING_URI to use
    servers (`deeprubin up`)."""
    from deeprubin_flows.nightly import nightly as nightly_flow

    _load(params_path, overrides)  # a bad configuration fails here, with every bad key named
    out = nightly_flow(params_path=str(params_path), overrides=list(overrides or []), force_retrain=force_retrain,
                       night=night)
    promotion = out.get("promotion")
    lines = [f"night {out['night']}: {out['changed_objects']} objects new or changed",
             f"retraining: {out['retrain']['reason']}"]
    if promotion:
        lines.append(f"promotion: version {promotion['version']} {promotion['outcome']} ({promotion['reason']})")
    c = out["classify"]
    lines.append(f"classified {c['n_classified']} objects with {c['model_uri']} -> {c['output']}")
    console.print(Panel("\n".join(lines), title="nightly", expand=False))


@app.command("serve-flows")
def serve_flows(
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    work_pool: Annotated[Optional[str], typer.Option(help="Register the deployments on this work pool (for a "
                                                          "Prefect worker) instead of serving them here.")] = None,
) -> None:
    """Serve the flows' deployments with their cron schedules (flows.nightly, flows.train) until interrupted."""
    from deeprubin_flows.serve import deploy_to_pool, serve_flows as serve

    params = _load(params_path, overrides)
    if work_pool:
        ids = deploy_to_pool(work_pool, str(params_path), list(overrides or []))
        console.print(f"registered {len(ids)} deployments on work pool {work_pool}")
        return
    console.print(f"serving nightly at '{params.flows.nightly.cron}' ({params.flows.nightly.timezone}); "
                  "Ctrl-C stops serving, the schedules stay active")
    serve(str(params_path), list(overrides or []))


StateDirOption = Annotated[Path, typer.Option("--state-dir", help="Where the servers keep their databases, "
                                                                  "artifacts, pid files and logs.")]


@app.command()
def up(
    state_dir: StateDirOption = Path(".deeprubin"),
    prefect_port: Annotated[int, typer.Option(help="Prefect server (API and UI) port.")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow tracking server port.")] = 5000,
    only: Annotated[Optional[list[str]], typer.Option(help="Start only this server: prefect or mlflow.")] = None,
) -> None:
    """Start a Prefect server and an MLflow tracking server (sqlite, local artifacts, one worker) on 127.0.0.1 as
    background processes; waits until both answer their health checks."""
    from deeprubin import servers

    which = tuple(only or servers.NAMES)
    bad = [w for w in which if w not in servers.NAMES]
    if bad:
        err_console.print(f"[bold red]up failed:[/] unknown server {bad}; choose from {list(servers.NAMES)}")
        raise typer.Exit(2)
    try:
        records = servers.up(state_dir, prefect_port=prefect_port, mlflow_port=mlflow_port, which=which)
    except servers.ServerError as exc:
        err_console.print(f"[bold red]up failed:[/] {exc}")
        raise typer.Exit(1) from None
    for name, r in records.items():
        verb = "already running" if r.get("reused") else "started"
        console.print(f"[bold]{name}[/] {verb} (pid {r['pid']}): UI {r['ui_url']}, log {r['log']}")
    exports = " ".join(f"{k}={v}" for k, v in servers.client_env(records).items())
    console.print(f"point the flows and the CLI at them:\n  export {exports}")


@app.command()
def down(state_dir: StateDirOption = Path(".deeprubin")) -> None:
    """Stop the servers `deeprubin up` started."""
    from deeprubin import servers

    for name, was_running in servers.down(state_dir).items():
        console.print(f"[bold]{name}[/] {'stopped' if was_running else 'was not running'}")


@app.command("servers")
def servers_status(state_dir: StateDirOption = Path(".deeprubin")) -> None:
    """Show whether the local servers are running and healthy."""
    from deeprubin import servers

    table = Table(title="local servers")
    for column in ("server", "pid", "alive", "healthy", "url", "log"):
        table.add_column(column)
    for r in servers.status(state_dir):
        table.add_row(r["name"], str(r.get("pid") or "-"), str(r.get("alive")), str(r.get("healthy")),
                      str(r.get("url") or "-"), str(r.get("log") or "-"))
    console.print(table)
