"""Commands that look without changing anything: plot an object, show or check the configuration."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.markup import escape

from deeprubin.cli.common import ParamsOption, SetOption, _load, app, console, err_console
from deeprubin.config import Params, dump_params

config_app = typer.Typer(help="Show or check the configuration (params.yaml with overrides).", no_args_is_help=True)
app.add_typer(config_app, name="config")


@app.command()
def plot(
    oid: Annotated[str, typer.Argument(help="Object id.")],
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    out: Annotated[Optional[Path], typer.Option(help="PNG to write (default: OID.png in the current directory, the "
                                                     "oid made a safe file name).")] = None,
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

    def fail(message: str) -> NoReturn:
        err_console.print(f"[bold red]plot failed:[/] {escape(message)}", soft_wrap=True, highlight=False)
        raise typer.Exit(1)

    target = out if out is not None else Path(f"{safe_file_stem(oid)}.png")  # never where an oid like ../x points
    if target.is_dir():
        fail(f"--out {target} is a directory; name a PNG file (e.g. {target / (safe_file_stem(oid) + '.png')})")
    store = RawStore(params.ingest.raw_dir)  # read only: opening it changes nothing
    if not store.exists():
        fail(f"no light curves in {params.ingest.raw_dir}")
    try:
        written = plot_object(store.read(), oid, target, grid_days=params.preprocess.grid_days,
                              fit_context_days=params.preprocess.fit_context_days, until_mjd=until_mjd)
    except KeyError as exc:
        fail(str(exc.args[0]))
    except OSError as exc:
        fail(f"cannot write {target}: {exc.strerror or exc}")
    console.print(f"wrote {written}", highlight=False)


SAFE_STEM_CHARS = 100  # the longest default file name (before .png), well under any file system's limit


def safe_file_stem(oid: str, limit: int = SAFE_STEM_CHARS) -> str:
    """A file name for ``oid`` that stays in the directory it is written in: letters, digits, ``._+-`` only (other
    runs of characters, path separators among them, become ``_``), no leading dot or dash, at most ``limit``
    characters. A name that had to change gets a short hash of the oid, so two oids never share a file."""
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "_", oid).lstrip("._-")
    if stem == oid and 0 < len(stem) <= limit:
        return stem
    digest = hashlib.blake2b(oid.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
    return f"{stem[:limit - len(digest) - 1].rstrip('._-') or 'object'}-{digest}"


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
