"""The pipeline's stages, one command each: ingest, preprocess, train, baseline, evaluate, register."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.panel import Panel
from rich.table import Table

from deeprubin.cli.common import (
    ParamsOption,
    SetOption,
    _load,
    _print_whole,
    _run_with_progress,
    app,
    console,
    err_console,
)


@app.command()
def ingest(
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    source: Annotated[Optional[str], typer.Option(
        help="simulator, files, alerce or bts (default: ingest.source).")] = None,
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
        Optional[str], typer.Option(help="ALeRCE API base URL for --source alerce and bts (default: "
                                         "ingest.alerce.base_url).")
    ] = None,
    bts_url: Annotated[
        Optional[str], typer.Option(help="BTS explorer URL for --source bts (default: ingest.bts.url).")
    ] = None,
) -> None:
    """Ingest light curves (simulator, files, the ALeRCE API or the BTS catalogue) into validated contract tables
    under data/raw.

    Bad rows are dropped with a reason naming the object; the summary counts them. --source alerce pulls
    incrementally: only objects new or changed since the last pull, retried on server errors, committed as it goes.
    --source bts downloads the Bright Transient Survey catalogue, keeps the entries new or re-typed since the last
    pull, labels them with their spectroscopic type (bts:spectroscopic) and fetches their light curves from the
    ALeRCE API the same way.
    Exit status: 0 done (a pull complete); 1 failed, nothing written (bad input, an API or catalogue that cannot be
    reached or refuses the request); 2 bad configuration; 3 a pull stored what it could but is incomplete
    (manifest.json lists what is missing; a rerun picks it up).
    Examples:

      deeprubin ingest

      deeprubin ingest --source alerce --set ingest.alerce.since_mjd=60600

      deeprubin ingest --source bts

      deeprubin ingest --source files --detections data/bts/detections.parquet
      --labels data/bts/labels.csv --label-source bts:spectroscopic --out data/bts_raw
    """
    from deeprubin.stages import ingest as stage

    extra = list(overrides or [])
    for key, value in (("source", source), ("files.detections", detections), ("files.labels", labels),
                       ("files.non_detections", non_detections), ("files.label_source", label_source),
                       ("simulator.n_per_class", n_per_class), ("raw_dir", out), ("mode", mode),
                       ("alerce.base_url", alerce_url), ("bts.url", bts_url)):
        if value is not None:
            extra.append(f"ingest.{key}={value}")
    params = _load(params_path, extra)
    paths = stage.IngestPaths.from_params(params)

    try:
        result = _run_with_progress("ingest", lambda report: stage.run(params, paths, report))
    except ConnectionError as exc:  # the ALeRCE API (or the BTS catalogue) could not be reached at all
        err_console.print(f"[bold red]ingest failed:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    _print_ingest_summary(result)
    if not result.complete:
        missing = result.missing or []
        objects = [m for m in missing if not str(m["what"]).startswith("objects ")]
        listing = [m for m in missing if str(m["what"]).startswith("objects ")]
        examples = "; ".join(f"{m['what']}: {m['reason']}" for m in (listing + objects)[:3])
        err_console.print(f"[bold yellow]ingest incomplete:[/] {len(objects)} object(s) and {len(listing)} listing "
                          f"page(s) or cap(s) missing (e.g. {examples}); what was fetched is stored, rerun to finish "
                          f"(all of it in {result.raw_dir / 'manifest.json'})", soft_wrap=True)
        raise typer.Exit(3)


def _print_ingest_summary(result) -> None:
    console.print(f"[bold]ingest[/] from {result.source} -> {result.raw_dir} in {result.seconds:.1f} s")
    table = Table(title="stored")
    table.add_column("class")
    table.add_column("objects", justify="right")
    for label, n in result.objects_per_class.items():
        table.add_row(label, str(n))
    table.add_row("[bold]total", f"[bold]{sum(result.objects_per_class.values())}")
    console.print(table)
    if result.source == "bts":
        _print_bts_pull(result)
    elif result.per_class is not None:
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
    _print_whole(Panel("\n".join(lines), title="summary", expand=False))  # reasons whole, never cut at 80 columns


def _print_bts_pull(result) -> None:
    x = result.extra
    pulled = Table(title="BTS pull" + ("" if result.complete else " (incomplete)"),
                   caption=f"catalogue: {x['catalogue_rows']} rows, {x['typed']} typed ({x['untyped']} untyped), "
                           f"{x['unchanged']} unchanged since the last pull; label_source bts:spectroscopic; "
                           "chg: stored objects whose label changed")
    for col in ("label", "typed", "new", "re-typed", "fetched", "stored new", "upd", "chg", "fail"):
        pulled.add_column(col, justify="left" if col == "label" else "right", no_wrap=True)
    for name, c in result.per_class.items():
        pulled.add_row(name, str(c["listed"]), str(c["new"]), str(c["retyped"]), str(c["fetched"]),
                       str(c["objects_new"]), str(c["objects_updated"]), str(c["label_changes"]),
                       str(len(c["failures"])))
    console.print(pulled)
    failures = [f for c in result.per_class.values() for f in c["failures"]]
    if failures:
        console.print("failures (also in manifest.json): " + "; ".join(
            f"{f['what']}: {f['reason']}" for f in failures[:5]) + (" ..." if len(failures) > 5 else ""))


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
    from deeprubin.processed import INDEX, SKIPPED  # pyarrow: deferred, like every heavy import of the CLI

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
                  f"index: {result.processed_dir / INDEX}, skipped objects with reasons: "
                  f"{result.processed_dir / SKIPPED}")


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
    from deeprubin.tracking import ui_urls  # MLflow's own run links are silenced: one link, printed whole

    link = ui_urls(result.tracking_uri, result.experiment_id, result.run_id).get("run")
    if link:
        console.print(f"run in the MLflow UI: {link}", soft_wrap=True, markup=False, highlight=False)
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
    cv: Annotated[bool, typer.Option("--cv", help="Cross-validate instead: the TCN and the forest retrained on "
                                                  "identical folds of the real set (evaluate.cv).")] = False,
    folds: Annotated[Optional[int], typer.Option(help="With --cv: folds (default: evaluate.cv.folds).")] = None,
    repeats: Annotated[Optional[int], typer.Option(help="With --cv: repeats (default: evaluate.cv.repeats).")] = None,
) -> None:
    """Score the TCN and the forest on the test split, the held-out real set (evaluate.real) and the OGLE quasars
    and Cepheids presented as an alert stream (evaluate.ogle).

    Macro-F1 and per-class recall with bootstrap 95% intervals, calibration, and macro-F1 against days since
    first detection; writes metrics/headline.json (the DVC metrics: a dozen headline numbers), metrics/evaluate.json
    (every number), metrics/plots/*.csv and metrics/figures/*.png and logs them to the training run in MLflow.

    --cv: repeated stratified k-fold on the real set (evaluation/crossval.py): per fold the train stage's recipe
    (the TCN) and the forest train on the simulator plus the other folds' real objects and are scored on the fold,
    whole curves and evaluate.cv.days; needs data/raw and data/processed with the real set mixed in
    (ingest.mix_files). Writes metrics/real_cv.json, real_cv.md and real_cv_predictions.parquet and an MLflow run
    in evaluate.cv.experiment. Compare recipes with --set, e.g.:

      deeprubin evaluate --cv --set train.max_epochs=30 --set train.hidden=64
    """
    from rich.table import Table

    if cv:
        extra = list(overrides or [])
        extra += [f"evaluate.cv.{k}={v}" for k, v in (("folds", folds), ("repeats", repeats)) if v is not None]
        _crossvalidate(_load(params_path, extra), log_to_mlflow=not no_mlflow)
        return

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
    console.print(f"headline (DVC metrics): {result.headline_path}   all numbers: {result.metrics_path}   report: "
                  f"{result.report_path}   figures: {result.metrics_path.parent / 'figures'}"
                  + (f"   MLflow run {result.run_id}" if result.run_id else ""))


def _crossvalidate(params, log_to_mlflow: bool) -> None:
    from deeprubin.evaluation import crossval
    from deeprubin.stages import train as train_stage

    def fold_done(f: dict) -> None:
        s = f["seconds"]
        err_console.print(f"fold {f['fold'] + 1} of repeat {f['repeat'] + 1}: {s['total']:.0f} s (TCN {s['tcn']:.0f} s, "
                          f"{f['tcn_epochs']} epochs; forest {s['forest']:.0f} s; scoring {s['scoring']:.0f} s)")

    result = _run_with_progress("evaluate --cv", lambda r: crossval.run(params, train_stage, r, log_to_mlflow,
                                                                         on_fold=fold_done), unit=" folds")
    console.print(result.table, soft_wrap=True, markup=False, highlight=False)  # Markdown, lines unbroken
    timings = Table(title="seconds per fold")
    for column in ("repeat", "fold", "TCN", "epochs", "forest", "scoring", "total"):
        timings.add_column(column, justify="right")
    for f in result.folds:
        s = f["seconds"]
        timings.add_row(str(f["repeat"] + 1), str(f["fold"] + 1), f"{s['tcn']:.0f}", str(f["tcn_epochs"]),
                        f"{s['forest']:.0f}", f"{s['scoring']:.0f}", f"{s['total']:.0f}")
    console.print(timings)
    console.print(f"inputs (GP of every object and age, forest features) {result.results['seconds']['inputs']:.0f} s; "
                  f"total {result.seconds:.0f} s")
    console.print("   ".join(f"{k}: {p}" for k, p in result.paths.items())
                  + (f"   MLflow run {result.run_id} ({params.evaluate.cv.experiment})" if result.run_id else ""))


@app.command()
def register(
    params_path: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Register the trained, evaluated model as a version of base.model_name (idempotent).

    The version is tagged with the git commit, the data hash and its classes; its description holds the headline
    evaluation numbers (the real held-out set first).
    """
    from deeprubin.stages import register as stage

    params = _load(params_path, overrides)
    out = _run_with_progress("register", lambda r: stage.run(params, stage.RegisterPaths.from_params(params), r))
    done = "new version" if out["new"] else "already registered, unchanged"
    console.print(f"[bold]register[/]: {out['model_uri']} {done} (run {out['run_id']})"
                  + ("" if out["evaluated"] else "  [yellow]not evaluated: run `deeprubin evaluate` first[/]"))
    from deeprubin.tracking import ui_urls

    link = ui_urls(params.train.tracking_uri, model_name=out["registered_model"]).get("model")
    if link:
        console.print(f"versions in the MLflow UI: {link}", soft_wrap=True, markup=False, highlight=False)
