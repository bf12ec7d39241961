"""Orchestration: the nightly flow, serving the flows' schedules, and the local Prefect and MLflow servers.

What is meant to be copied (the export line, URLs, log and output paths) is printed whole on one line whatever the
width of the output: rich wraps at 80 columns when stdout is not a terminal, which would put half a path, or a variable
without its ``export``, on the next line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.panel import Panel
from rich.table import Table

from deeprubin.cli.common import ParamsOption, SetOption, _load, _print_line, _print_whole, app, console, err_console


def _embedded_prefect() -> None:
    """Without PREFECT_API_URL (embedded), keep the ephemeral Prefect API's database in this project (.prefect/),
    before Prefect is imported: two checkouts running at once then never share, and lock, ~/.prefect/prefect.db."""
    from deeprubin import servers

    servers.use_embedded_prefect(Path.cwd())


def nightly_lines(out: dict[str, Any]) -> list[str]:
    """The nightly summary: what the pull did, the retraining decision, the promotion, what was classified now and
    what the night's file holds (a rerun of the night classifies only what changed since, and keeps the rest)."""
    from deeprubin_flows.artifacts import pull_counts

    pulled = out["pulled"]
    counts = out.get("objects") or {"new": out["changed_objects"], "changed": 0}
    lines = [f"night {out['night']}: pulled from {pulled['source']}: "
             f"{pull_counts({'source': pulled['source'], 'counts': counts})}",
             f"retraining: {out['retrain']['reason']}"]
    promotion = out.get("promotion")
    if promotion:
        lines.append(f"promotion: version {promotion['version']} {promotion['outcome']} ({promotion['reason']})")
    c = out["classify"]
    now = c.get("classified_now", c["n_classified"])
    what = "the new or changed ones" if out["changed_objects"] else "none new or changed"
    if c.get("n_rejected"):
        what += f"; {c['n_rejected']} rejected, reasons in {c.get('rejections')}"
    lines.append(f"classified {now} objects ({what}) with {c['model_uri']}")
    lines.append(f"the night's file {c['output']} holds {c.get('objects_in_file', c['n_classified'])} objects")
    return lines


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
    _load(params_path, overrides)  # a bad configuration fails here, with every bad key named
    _embedded_prefect()
    from deeprubin_flows.nightly import nightly as nightly_flow

    out = nightly_flow(params_path=str(params_path), overrides=list(overrides or []), force_retrain=force_retrain,
                       night=night)
    _print_whole(Panel("\n".join(nightly_lines(out)), title="nightly", expand=False))


@app.command("serve-flows")
def serve_flows(
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    work_pool: Annotated[Optional[str], typer.Option(help="Register the deployments on this work pool (for a "
                                                          "Prefect worker) instead of serving them here.")] = None,
) -> None:
    """Serve the flows' deployments with their cron schedules (flows.nightly, flows.train) until interrupted."""
    params = _load(params_path, overrides)
    _embedded_prefect()
    from deeprubin_flows.serve import deploy_to_pool, serve_flows as serve

    if work_pool:
        ids = deploy_to_pool(work_pool, str(params_path), list(overrides or []))
        _print_line(f"registered {len(ids)} deployments on work pool {work_pool}", markup=False)
        return
    _print_line(f"serving nightly at '{params.flows.nightly.cron}' ({params.flows.nightly.timezone}); "
                "Ctrl-C stops serving, the schedules stay active", markup=False)
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
        err_console.print(f"[bold red]up failed:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    for name, r in records.items():
        verb = "already running" if r.get("reused") else "started"
        _print_line(f"{name} {verb} (pid {r['pid']}): UI {r['ui_url']}, log {r['log']}", markup=False)
    exports = " ".join(f"{k}={v}" for k, v in servers.client_env(records).items())
    _print_line("point the flows and the CLI at them:")
    _print_line(f"  export {exports}", markup=False)  # one line: pasted, every variable is exported


@app.command()
def down(state_dir: StateDirOption = Path(".deeprubin")) -> None:
    """Stop the servers `deeprubin up` started."""
    from deeprubin import servers

    for name, was_running in servers.down(state_dir).items():
        _print_line(f"{name} {'stopped' if was_running else 'was not running'}", markup=False)


@app.command("servers")
def servers_status(state_dir: StateDirOption = Path(".deeprubin")) -> None:
    """Show whether the local servers are running and healthy."""
    from deeprubin import servers

    table = Table(title="local servers")
    for column in ("server", "pid", "alive", "healthy", "url", "log"):
        table.add_column(column, no_wrap=True)
    for r in servers.status(state_dir):
        table.add_row(r["name"], str(r.get("pid") or "-"), str(r.get("alive")), str(r.get("healthy")),
                      str(r.get("url") or "-"), str(r.get("log") or "-"))
    _print_whole(table)  # URLs and log paths whole, however narrow the output
