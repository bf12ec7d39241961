"""Commands that look without changing anything: plot an object, show or check the configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from deeprubin.cli.common import ParamsOption, SetOption, _load, app, console, err_console
from deeprubin.config import Params, dump_params

config_app = typer.Typer(help="Show or check the configuration (params.yaml with overrides).", no_args_is_help=True)
app.add_typer(config_app, name="config")


@app.command()
def plot(
    oid: Annotated[str, typer.Argument(help="Object id.")],
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    out: Annotated[Optional[Path], typer.Option(help="PNG to write (default: OID.png).")] = None,
    raw: Annotated[Optional[Path], typer.Option(help="Raw store to read (default: ingest.raw_dir).")] = None,
    until_mjd: Annotated[
        Optional[float], typer.Option(help="Use only detections up to this MJD (an early light curve).")
    ] = None,
) -> None:
    """Plot an object's detections, upper limits, and GP mean with its ±1σ band over the model's window (PNG)."""
    from deeprubin.evaluation.figures import plot_object
    from deeprubin.store import RawStore

    extra = list(overrides or [])
    if raw is not None:
        extra.append(f"ingest.raw_dir={raw}")
    params = _load(params_path, extra)
    store = RawStore(params.ingest.raw_dir)
    if not store.exists():
        err_console.print(f"[bold red]plot failed:[/] no light curves in {params.ingest.raw_dir}")
        raise typer.Exit(1)
    target = out or Path(f"{oid}.png")
    try:
        written = plot_object(store.read(), oid, target, grid_days=params.preprocess.grid_days,
                              fit_context_days=params.preprocess.fit_context_days, until_mjd=until_mjd)
    except KeyError as exc:
        err_console.print(f"[bold red]plot failed:[/] {exc.args[0]}")
        raise typer.Exit(1) from None
    console.print(f"wrote {written}")


@config_app.command("show")
def config_show(params_path: ParamsOption = Path("params.yaml"), overrides: SetOption = None,
                section: Annotated[Optional[str], typer.Argument(help="Only this section.")] = None) -> None:
    """Print the resolved configuration (file + environment + --set) as YAML."""
    params = _load(params_path, overrides)
    if section is not None:
        if section not in Params.model_fields:
            err_console.print(f"[bold red]error:[/] no section {section!r}; sections: {list(Params.model_fields)}")
            raise typer.Exit(2)
        params = getattr(params, section)
    text = dump_params(params)  # type: ignore[arg-type]
    typer.echo(text, nl=False)


@config_app.command("check")
def config_check(params_path: ParamsOption = Path("params.yaml"), overrides: SetOption = None) -> None:
    """Validate the configuration; exit 2 with every bad key named when it is invalid."""
    _load(params_path, overrides)
    console.print(f"[green]ok[/]: {params_path} is a valid configuration")
