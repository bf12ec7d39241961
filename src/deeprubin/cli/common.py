"""What every ``deeprubin`` command shares: the Typer app and its callback, the consoles, the --params/--set option
types, loading the configuration and running a stage under a progress bar.

The commands live in the modules beside this one (pipeline, promotion, serving, ops, inspection); they register
themselves on :data:`app` when :mod:`deeprubin.cli` imports them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from deeprubin import __version__
from deeprubin.config import ConfigError, Params, load_project_params

app = typer.Typer(
    name="deeprubin",
    help="DeepRubin-Explorer: classify ZTF/Rubin alerts (QSO, CEP, SNIa, SNII) from their g and r light curves.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console()
err_console = Console(stderr=True)


def wrap_only_on_a_terminal(*consoles: Console) -> None:
    """Messages are word-wrapped at a terminal's width, and printed one line each anywhere else (a pipe, a file, a
    CI log): rich would otherwise break them at 80 columns, mid-sentence. Decided per command (the callback), on
    the stream itself: FORCE_COLOR makes rich take a pipe for a terminal of 80 columns."""
    for c in consoles:
        try:
            tty = c.file.isatty()
        except (AttributeError, ValueError, OSError):  # a closed or file-like stream without isatty
            tty = False
        c.soft_wrap = not tty


def _print_line(text: str, markup: bool = True) -> None:
    """One line, never wrapped nor cut (a terminal may still fold it on screen; copied, it is one line)."""
    console.print(text, soft_wrap=True, markup=markup, highlight=False)


def _print_whole(renderable: Any) -> None:
    """A table or panel at its natural width when the console is narrower, so that no cell is wrapped or cut."""
    needed = Measurement.get(console, console.options.update_width(100_000), renderable).maximum
    if needed <= console.width:
        console.print(renderable)
        return
    Console(file=console.file, width=needed, force_terminal=console.is_terminal,
            color_system=console.color_system or None, highlight=False).print(renderable, crop=False)


ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="Configuration file.", show_default=True, envvar="DEEPRUBIN_PARAMS")
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-S", help="Override a key, e.g. --set ingest.simulator.n_per_class=100 (repeatable)."),
]


def _load(params_path: Path, overrides: list[str] | None) -> Params:
    try:
        return load_project_params(params_path, overrides)
    except ConfigError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None


def _run_with_progress(stage: str, work, unit: str = ""):
    """Run ``work(report)`` under a transient rich progress bar; a stage's FileNotFoundError or ValueError (bad input
    named by the stage) becomes a clear one-line error and exit code 1."""
    with Progress(SpinnerColumn(), TextColumn(f"[bold]{stage}[/] {{task.description}}"), BarColumn(),
                  TextColumn("{task.fields[count]}"), TimeElapsedColumn(), console=err_console,
                  transient=True) as bar:
        task = bar.add_task("starting", total=None, count="")

        def report(message: str, completed: int | None = None, total: int | None = None) -> None:
            if completed is None:
                bar.update(task, description=message, total=None, completed=0, count="")
            else:
                bar.update(task, description=message, total=total, completed=completed,
                           count=f"{completed}/{total}{unit}")

        try:
            return work(report)
        except (FileNotFoundError, ValueError) as exc:
            err_console.print(f"[bold red]{stage} failed:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
            raise typer.Exit(1) from None


def _version(value: bool) -> None:
    if value:
        console.print(f"deeprubin {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """DeepRubin-Explorer command line. Every command reads params.yaml (or --params) and accepts --set overrides;
    environment variables DEEPRUBIN_<SECTION>__<KEY> override the file too."""
    from deeprubin.tracking import quiet_third_party

    quiet_third_party()  # the pipeline's own progress and summary, not MLflow's and Lightning's chatter
    wrap_only_on_a_terminal(console, err_console)
