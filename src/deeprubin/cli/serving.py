"""Classification with the serving model: classify (a file), consume (an alert stream), serve-api (HTTP)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from deeprubin.cli.common import ParamsOption, SetOption, _load, _run_with_progress, app, console, err_console


class Photometry(str, Enum):  # classify.photometry
    auto = "auto"
    difference = "difference"
    apparent = "apparent"


@app.command()
def classify(
    input_path: Annotated[Path, typer.Option("--input", "-i", help="Detections: Parquet or CSV, contract or "
                                                                     "ALeRCE/ANTARES columns.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Classifications: a Parquet file (*.parquet), never "
                                                                 "the input file.")],
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    model: Annotated[Optional[str], typer.Option(help="Model URI or local MLflow model path "
                                                      "(default: classify.model_uri, the champion).")] = None,
    photometry: Annotated[Optional[Photometry], typer.Option(
        help="What the brightness is where the rows do not say (a `photometry` column): difference flux, apparent "
             "magnitudes (turned into difference flux), or auto: recognised per object (default: "
             "classify.photometry).")] = None,
) -> None:
    """Classify every object of a detections file with the serving model; rejected objects go to
    OUTPUT.rejected.csv with their reasons. The output's `photometry` column says which path each object took."""
    from deeprubin.serving import classify as clf
    from deeprubin.schema import SchemaError

    params = _load(params_path, [*(overrides or []), *([f"classify.model_uri={model}"] if model else []),
                                 *([f"classify.photometry={photometry.value}"] if photometry else [])])
    try:
        result = _run_with_progress("classify", lambda r: clf.run_file(params, input_path, output, progress=r),
                                    unit=" rows")
    except (SchemaError, LookupError, OSError) as exc:  # bad input, a bad output path, a full disk: one line
        err_console.print(f"[bold red]classify failed:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    table = Table(title=f"{result.n_classified} objects classified with {result.model_uri} "
                        f"in {result.seconds:.1f} s ({result.n_classified / max(result.seconds, 1e-9):.0f}/s)")
    table.add_column("predicted class")
    table.add_column("objects", justify="right")
    for c, n in sorted(result.per_class.items()):
        table.add_row(c, str(n))
    console.print(table)
    for path, n in sorted((result.per_photometry or {}).items()):
        console.print(f"photometry {path}: {n} object(s)")
    for reason, n in sorted((result.n_points_dropped or {}).items()):
        console.print(f"dropped {n} detection(s): {reason}")
    if not result.input_grouped:
        console.print("the input was not grouped by object: it was partitioned on disk first (sort it by oid to "
                      "stream it in one pass)")
    console.print(f"wrote {result.output}" + (f"; {result.n_rejected} rejected objects in {result.rejections}"
                                               if result.rejections else ""))


@app.command()
def consume(
    directory: Annotated[Optional[Path], typer.Option("--dir", help="A directory of alert packets (*.avro: ZTF "
                                                                      "alerts or LSST alert packets). Without "
                                                                      "it: the Kafka topic of alerts.kafka.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output directory (default "
                                                                           "alerts.output_dir).")] = None,
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    model: Annotated[Optional[str], typer.Option(help="Model URI or local MLflow model path "
                                                      "(default: classify.model_uri, the champion).")] = None,
    max_alerts: Annotated[Optional[int], typer.Option(help="Stop after this many alerts.")] = None,
    idle_timeout: Annotated[Optional[float], typer.Option(help="Kafka: stop after this many seconds without a "
                                                               "message (default: run until Ctrl-C).")] = None,
) -> None:
    """Classify an alert stream, alert by alert: each packet updates its object's light curve, which is classified
    as of that alert. One Parquet part per batch in OUTPUT/classifications; rejected alerts and malformed packets in
    OUTPUT/rejections; a rerun (or Kafka re-delivery) never duplicates a row. No Kafka broker answering for
    alerts.kafka.connect_timeout_s (at start, or later): exit status 1, with a line naming the brokers."""
    from deeprubin.serving import alerts

    params = _load(params_path, [*(overrides or []), *([f"classify.model_uri={model}"] if model else [])])

    shown = []  # a progress line is on screen (no newline yet)

    def show(r) -> None:
        shown.append(True)
        err_console.print(f"\r{r.alerts_read} alerts, {r.classified} classified, {r.rejected} rejected, "
                          f"{r.malformed} malformed, {r.objects_tracked} objects, {r.alerts_per_s:.0f} alerts/s",
                          end="")

    try:
        result = alerts.run(params, directory=directory, output_dir=output, max_alerts=max_alerts,
                            idle_timeout_s=idle_timeout, progress=show)
    except (FileNotFoundError, ValueError, LookupError, alerts.BrokerUnreachable) as exc:
        if shown:  # e.g. every broker lost while consuming: the error on a line of its own
            err_console.print()
        err_console.print(f"[bold red]consume failed:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    err_console.print()
    r = result.report()
    table = Table(title=f"{r['alerts_read']} alerts in {r['seconds']:.1f} s with {r['model_uri']}",
                  show_header=False)  # a two-column summary: no empty header row
    table.add_column()
    table.add_column(justify="right")
    for key in ("classified", "rejected", "malformed", "duplicates", "objects_tracked", "objects_evicted",
                "parts_written"):
        table.add_row(key.replace("_", " "), str(r[key]))
    rate = r["alerts_per_s"]
    table.add_row("alerts per s", "-" if rate is None else f"{rate:.0f}")  # as the progress line rounds it
    console.print(table)
    if r["parts_written"]:
        console.print(f"wrote {r['output_dir']}" + (" (interrupted: the batch in hand was written)"
                                                   if r["interrupted"] else ""))
    else:
        console.print(f"nothing new to write: {r['output_dir']} unchanged")


@app.command("serve-api")
def serve_api(
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address (default serve.host, 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default serve.port; 0: a free one).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model URI or local MLflow model path "
                                                      "(default: classify.model_uri, the champion).")] = None,
) -> None:
    """The HTTP classification API: POST /classify (light curves as JSON -> probabilities), GET /healthz,
    GET /model, OpenAPI at /docs. Follows the champion alias: a new champion is served without a restart."""
    from deeprubin.serving import service

    params = _load(params_path, [*(overrides or []), *([f"classify.model_uri={model}"] if model else [])])
    try:
        service.serve(params, host=host, port=port)
    except service.ServiceError as exc:
        err_console.print(f"[bold red]serve-api failed:[/] {exc}")
        raise typer.Exit(1) from None
