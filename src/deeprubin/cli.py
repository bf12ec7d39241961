"""The ``deeprubin`` command line: one subcommand per stage, plus configuration tools."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from deeprubin import __version__
from deeprubin.config import ConfigError, Params, dump_params, load_project_params

app = typer.Typer(
    name="deeprubin",
    help="DeepRubin-Explorer: classify ZTF/Rubin alerts (QSO, CEP, SNIa, SNII) from their g and r light curves.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show or check the configuration (params.yaml with overrides).", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console()
err_console = Console(stderr=True)

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
            err_console.print(f"[bold red]{stage} failed:[/] {exc}")
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


@app.command()
def ingest(
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    source: Annotated[Optional[str], typer.Option(help="simulator, files or alerce (default: ingest.source).")] = None,
    detections: Annotated[
        Optional[Path], typer.Option(help="Detections file (Parquet/CSV) for --source files.")
    ] = None,
    labels: Annotated[Optional[Path], typer.Option(help="Labels file (oid, label) for --source files.")] = None,
    non_detections: Annotated[Optional[Path], typer.Option(help="Upper-limits file for --source files.")] = None,
    label_source: Annotated[Optional[str], typer.Option(help="Label provenance, e.g. bts:spectroscopic.")] = None,
    n_per_class: Annotated[Optional[int], typer.Option(help="Objects per class for the simulator.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default: ingest.raw_dir).")] = None,
    mode: Annotated[Optional[str], typer.Option(help="auto, replace or upsert (default: ingest.mode).")] = None,
    alerce_url: Annotated[
        Optional[str], typer.Option(help="ALeRCE API base URL for --source alerce (default: ingest.alerce.base_url).")
    ] = None,
) -> None:
    """Ingest light curves (simulator, files or the ALeRCE API) into validated contract tables under data/raw.

    Bad rows are dropped with a reason naming the object; the summary counts them. --source alerce pulls
    incrementally: only objects new or changed since the last pull, retried on server errors, committed as it goes.
    Examples:

      deeprubin ingest

      deeprubin ingest --source alerce --set ingest.alerce.since_mjd=60600

      deeprubin ingest --source files --detections ../shared/data/bts/detections.parquet
      --labels ../shared/data/bts/labels.csv --label-source bts:spectroscopic --out data/bts
    """
    from deeprubin.stages import ingest as stage

    extra = list(overrides or [])
    for key, value in (("source", source), ("files.detections", detections), ("files.labels", labels),
                       ("files.non_detections", non_detections), ("files.label_source", label_source),
                       ("simulator.n_per_class", n_per_class), ("raw_dir", out), ("mode", mode),
                       ("alerce.base_url", alerce_url)):
        if value is not None:
            extra.append(f"ingest.{key}={value}")
    params = _load(params_path, extra)
    paths = stage.IngestPaths.from_params(params)

    result = _run_with_progress("ingest", lambda report: stage.run(params, paths, report))
    _print_ingest_summary(result)


def _print_ingest_summary(result) -> None:
    console.print(f"[bold]ingest[/] from {result.source} -> {result.raw_dir} in {result.seconds:.1f} s")
    table = Table(title="stored")
    table.add_column("class")
    table.add_column("objects", justify="right")
    for label, n in result.objects_per_class.items():
        table.add_row(label, str(n))
    table.add_row("[bold]total", f"[bold]{sum(result.objects_per_class.values())}")
    console.print(table)
    if result.per_class is not None:
        pulled = Table(title="ALeRCE pull" + ("" if result.complete else " (incomplete)"),
                       caption="same: listed but unchanged since the last pull; upd: updated objects; "
                               "+det: detections added")
        for col in ("class", "p≥", "listed", "same", "fetched", "new", "upd", "+det", "fail", "watermark"):
            pulled.add_column(col, justify="left" if col == "class" else "right", no_wrap=True)
        for name, c in result.per_class.items():
            mark = c["watermark_after"]
            pulled.add_row(name, f"{c['threshold']:.2f}", str(c["listed"]), str(c["skipped_unchanged"]),
                           str(c["fetched"]), str(c["objects_new"]), str(c["objects_updated"]),
                           str(c["detections_added"]), str(len(c["failures"])),
                           "-" if mark is None else f"{mark:.2f}")
        console.print(pulled)
        failures = [f for c in result.per_class.values() for f in c["failures"]]
        if failures:
            console.print("failures (also in manifest.json): " + "; ".join(
                f"{f['what']}: {f['reason']}" for f in failures[:5]) + (" ..." if len(failures) > 5 else ""))
    lines = [f"detections kept: {result.detections}   non-detections kept: {result.non_detections}"]
    lines += [r.summary() for r in result.reports]
    if result.objects_dropped:
        reasons: dict[str, int] = {}
        for r in result.objects_dropped:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
        lines.append("objects dropped: " + ", ".join(f"{k} ({v})" for k, v in sorted(reasons.items())))
        examples = [str(r) for r in result.objects_dropped[:3]]
        lines.append("  e.g. " + "; ".join(examples))
    row_rejections = [r for rep in result.reports for r in rep.rejections if r.rows]
    if row_rejections:
        lines.append("  e.g. " + "; ".join(str(r) for r in row_rejections[:3]))
    if result.counts:
        c = result.counts
        lines.append(f"upsert: {c.objects_new} new objects, {c.objects_updated} updated, "
                     f"{c.detections_added} detections added, {c.detections_replaced} replaced")
    lines.append(f"manifest: {result.raw_dir / 'manifest.json'}   every dropped object and row, with its reason: "
                 f"{result.raw_dir / 'rejections.csv'}")
    console.print(Panel("\n".join(lines), title="summary", expand=False))


@app.command()
def preprocess(
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    executor: Annotated[
        Optional[str], typer.Option(help="processes or dask (default: preprocess.executor).")
    ] = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes; 1: no pool (default: CPU count).")] = None,
    dask_address: Annotated[
        Optional[str], typer.Option(help="Dask scheduler address; implies --executor dask.")
    ] = None,
    raw: Annotated[Optional[Path], typer.Option(help="Raw store to read (default: ingest.raw_dir).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default: preprocess.processed_dir).")] = None,
    full: Annotated[bool, typer.Option("--full", help="Recompute every object (ignore the stored tensors).")] = False,
) -> None:
    """GP-interpolate every light curve onto the daily grid: model input tensors under data/processed.

    Objects run in oid-hash partitions on a process pool or a Dask cluster (same output either way); only objects
    whose detections changed since the last run are recomputed. Objects that cannot be interpolated are skipped
    and counted with their reason. Examples:

      deeprubin preprocess

      deeprubin preprocess --dask-address tcp://scheduler:8786
    """
    from deeprubin.stages import preprocess as stage

    extra = list(overrides or [])
    if dask_address is not None:
        executor = executor or "dask"
    for key, value in (("preprocess.executor", executor), ("preprocess.workers", workers),
                       ("preprocess.dask_address", dask_address), ("ingest.raw_dir", raw),
                       ("preprocess.processed_dir", out)):
        if value is not None:
            extra.append(f"{key}={value}")
    if full:
        extra.append("preprocess.incremental=false")
    params = _load(params_path, extra)
    paths = stage.PreprocessPaths.from_params(params)

    result = _run_with_progress("preprocess", lambda report: stage.run(params, paths, report), unit=" partitions")
    _print_preprocess_summary(result)


def _print_preprocess_summary(result) -> None:
    console.print(f"[bold]preprocess[/] -> {result.processed_dir} in {result.seconds:.1f} s "
                  f"({result.executor}, {result.workers} worker(s))")
    table = Table(title="objects")
    table.add_column("", no_wrap=True)
    table.add_column("count", justify="right")
    table.add_row("in", str(result.objects_in))
    table.add_row("written: GP ok", str(result.ok))
    table.add_row("written: GP fallback", str(result.fallback_objects))
    for reason, n in sorted(result.fallback.items()):
        table.add_row(f"  fallback: {reason}", str(n))
    for reason, n in sorted(result.skipped.items()):
        table.add_row(f"skipped: {reason}", str(n))
    table.add_row("recomputed / reused", f"{result.recomputed} / {result.reused}")
    console.print(table)
    console.print(f"tensor {tuple(result.shape)} float32 in {result.shards} shard(s); "
                  f"index: {result.processed_dir / 'index.parquet'}, skipped objects with reasons: "
                  f"{result.processed_dir / 'skipped.parquet'}")


@app.command()
def train(
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    max_epochs: Annotated[Optional[int], typer.Option(help="Epochs at most (default: train.max_epochs).")] = None,
    accelerator: Annotated[Optional[str], typer.Option(help="auto, cpu or gpu (default: train.accelerator).")] = None,
    tracking_uri: Annotated[
        Optional[str], typer.Option(help="MLflow tracking URI (default: train.tracking_uri, sqlite:///mlflow.db).")
    ] = None,
    processed: Annotated[
        Optional[Path], typer.Option(help="Processed tensors to train on (default: preprocess.processed_dir).")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default: train.model_dir).")] = None,
) -> None:
    """Train the TCN on data/processed and log it to MLflow (`deeprubin register` versions it after evaluation).

    Early stopping and the best checkpoint on validation macro-F1; writes tcn.ckpt and train.json under
    train.model_dir. Examples:

      deeprubin train

      deeprubin train --max-epochs 5 --tracking-uri http://mlflow:5000
    """
    from deeprubin.outputs import TRAIN_REPORT
    from deeprubin.stages import train as stage

    extra = list(overrides or [])
    for key, value in (("train.max_epochs", max_epochs), ("train.accelerator", accelerator),
                       ("train.tracking_uri", tracking_uri), ("preprocess.processed_dir", processed),
                       ("train.model_dir", out)):
        if value is not None:
            extra.append(f"{key}={value}")
    params = _load(params_path, extra)
    paths = stage.TrainPaths.from_params(params)  # the real set's held-out objects are never trained on
    result = _run_with_progress("train", lambda report: stage.run(params, paths, report), unit=" epochs")
    console.print(f"[bold]train[/] {result.epochs} epoch(s) on {result.accelerator} in {result.seconds:.1f} s; "
                  f"best val macro-F1 {result.best_val_macro_f1:.3f}")
    console.print(f"objects train/val/test: {result.split_sizes['train']}/{result.split_sizes['val']}/"
                  f"{result.split_sizes['test']}")
    console.print(f"MLflow run {result.run_id} at {result.tracking_uri}; model {result.model_uri} "
                  "(`deeprubin register` registers it after `deeprubin evaluate`)")
    console.print(f"data {result.data_hash} ({result.data_hash_source}), commit {result.git_commit}")
    console.print(f"checkpoint: {result.checkpoint}   report: {result.checkpoint.parent / TRAIN_REPORT}")


@app.command()
def baseline(
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Train the balanced random forest (light-curve features) on the TCN's training split.

    Writes forest.joblib and forest.json under train.model_dir; `deeprubin evaluate` scores it beside the TCN.
    """
    from deeprubin.stages import baseline as stage

    params = _load(params_path, overrides)
    report = _run_with_progress("baseline", lambda r: stage.run(params, stage.BaselinePaths.from_params(params), r))
    counts = ", ".join(f"{k} {v}" for k, v in report["objects_per_class"].items())
    console.print(f"[bold]baseline[/] {report['trees']} trees on {counts} (+ cuts at {report['truncations']} d) "
                  f"in {report['seconds']:.1f} s -> {report['model']}")


@app.command()
def evaluate(
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="Do not log to the training run.")] = False,
) -> None:
    """Score the TCN and the forest on the test split and the held-out real set (evaluate.real).

    Macro-F1 and per-class recall with bootstrap 95% intervals, calibration, and macro-F1 against days since
    first detection; writes metrics/evaluate.json, metrics/plots/*.csv and metrics/figures/*.png and logs them to
    the training run in MLflow.
    """
    from rich.table import Table

    from deeprubin.stages import evaluate as stage

    params = _load(params_path, overrides)
    result = _run_with_progress("evaluate", lambda r: stage.run(params, stage.EvaluatePaths.from_params(params), r,
                                                                log_to_mlflow=not no_mlflow))
    table = Table(title="evaluation: macro-F1 [95% bootstrap interval]")
    for column in ("model", "data", "n", "macro-F1", "ECE", "F1@20d"):
        table.add_column(column, no_wrap=True)
    lines = []
    for model, per_set in result.metrics.items():
        for name, m in per_set.items():
            if not isinstance(m, dict) or "macro_f1" not in m:
                continue
            early = m.get("early", {})
            table.add_row(model, name, str(m["n"]),
                          f"{m['macro_f1']:.3f} [{m['macro_f1_low']:.2f}, {m['macro_f1_high']:.2f}]",
                          f"{m['ece']:.3f}", f"{early.get('20d', {}).get('macro_f1', float('nan')):.3f}")
            recalls = ", ".join(f"{c} {pc['recall']:.2f}" for c, pc in m["per_class"].items())
            curve = ", ".join(f"{d} {e['macro_f1']:.2f}" for d, e in early.items())
            lines.append(f"{model} on {name}: recall {recalls}; macro-F1 by days since first detection: {curve}")
    console.print(table)
    for line in lines:
        console.print(line)
    for name, why in result.skipped.items():
        console.print(f"[yellow]not evaluated:[/] {name}: {why}")
    console.print(f"metrics: {result.metrics_path}   report: {result.report_path}   figures: "
                  f"{result.metrics_path.parent / 'figures'}" + (f"   MLflow run {result.run_id}" if result.run_id
                                                                 else ""))


@app.command()
def register(
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Register the trained, evaluated model as a version of base.model_name (idempotent).

    The version is tagged with the run, commit, data and params hashes and the headline evaluation numbers.
    """
    from deeprubin.stages import register as stage

    params = _load(params_path, overrides)
    out = _run_with_progress("register", lambda r: stage.run(params, stage.RegisterPaths.from_params(params), r))
    verb = "registered" if out["new"] else "already registered"
    console.print(f"[bold]register[/] {verb} {out['model_uri']} (run {out['run_id']})"
                  + ("" if out["evaluated"] else "  [yellow]not evaluated: run `deeprubin evaluate` first[/]"))


@app.command()
def promote(
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    version: Annotated[Optional[str], typer.Option(help="Version to promote (default: models/registered.json).")] = None,
) -> None:
    """Make a registered version the challenger, and the champion if it beats the champion on the frozen set.

    Both versions are scored now on promote.evaluation_set; the rule (margin, recall bound) and the decision's
    reason are written as tags on the version and to models/promotion.json.
    """
    from deeprubin.registry import RegistryError
    from deeprubin.stages import promote as stage

    params = _load(params_path, overrides)
    try:
        decision = _run_with_progress("promote", lambda r: stage.run(params, stage.PromotePaths.from_params(params), r,
                                                                          version=version))
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
    """Make the previous champion the champion again (alias `previous` -> `champion`)."""
    from deeprubin.registry import Registry, RegistryError, rollback as roll_back

    params = _load(params_path, overrides)
    try:
        done = roll_back(Registry(params.train.tracking_uri, params.base.model_name),
                         params.promote.lock_timeout_s)
    except RegistryError as exc:
        err_console.print(f"[bold red]rollback failed:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"[bold]rollback[/] {done['reason']}")


@app.command()
def classify(
    input_path: Annotated[Path, typer.Option("--input", "-i", help="Detections: Parquet or CSV, contract or "
                                                                     "ALeRCE/ANTARES columns.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Classifications (Parquet).")],
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    model: Annotated[Optional[str], typer.Option(help="Model URI or local MLflow model path "
                                                      "(default: classify.model_uri, the champion).")] = None,
) -> None:
    """Classify every object of a detections file with the serving model; rejected objects go to
    OUTPUT.rejected.csv with their reasons."""
    from deeprubin.serving import classify as clf
    from deeprubin.schema import SchemaError

    params = _load(params_path, [*(overrides or []), *([f"classify.model_uri={model}"] if model else [])])
    try:
        result = _run_with_progress("classify", lambda r: clf.run_file(params, input_path, output, progress=r),
                                    unit=" rows")
    except (SchemaError, LookupError) as exc:
        err_console.print(f"[bold red]classify failed:[/] {exc}")
        raise typer.Exit(1) from None
    table = Table(title=f"{result.n_classified} objects classified with {result.model_uri} "
                        f"in {result.seconds:.1f} s ({result.n_classified / max(result.seconds, 1e-9):.0f}/s)")
    table.add_column("predicted class")
    table.add_column("objects", justify="right")
    for c, n in sorted(result.per_class.items()):
        table.add_row(c, str(n))
    console.print(table)
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
    OUTPUT/rejections; a rerun (or Kafka re-delivery) never duplicates a row."""
    from deeprubin.serving import alerts

    params = _load(params_path, [*(overrides or []), *([f"classify.model_uri={model}"] if model else [])])

    def show(r) -> None:
        err_console.print(f"\r{r.alerts_read} alerts, {r.classified} classified, {r.rejected} rejected, "
                          f"{r.malformed} malformed, {r.objects_tracked} objects, {r.alerts_per_s:.0f} alerts/s",
                          end="")

    try:
        result = alerts.run(params, directory=directory, output_dir=output, max_alerts=max_alerts,
                            idle_timeout_s=idle_timeout, progress=show)
    except (FileNotFoundError, ValueError, LookupError) as exc:
        err_console.print(f"[bold red]consume failed:[/] {exc}")
        raise typer.Exit(1) from None
    err_console.print()
    r = result.report()
    table = Table(title=f"{r['alerts_read']} alerts in {r['seconds']:.1f} s with {r['model_uri']}")
    table.add_column("")
    table.add_column("", justify="right")
    for key in ("classified", "rejected", "malformed", "duplicates", "objects_tracked", "objects_evicted",
                "parts_written", "alerts_per_s"):
        table.add_row(key.replace("_", " "), str(r[key]))
    console.print(table)
    console.print(f"wrote {r['output_dir']}" + (" (interrupted: the batch in hand was written)"
                                               if r["interrupted"] else ""))


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


if __name__ == "__main__":
    app()
