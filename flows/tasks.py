"""Prefect tasks: each calls one stage's ``run()`` and returns a small JSON-able summary.

A task shares its name with its stage (and DVC stage). Retries, backoff, the retry condition and the timeout are
applied per run from ``params.flows`` (:func:`deeprubin_flows.common.configured`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from deeprubin.config import Params
from deeprubin.processed import fingerprints
from deeprubin.store import RawStore
from deeprubin_flows import artifacts
from deeprubin_flows.common import ClientError, TransientError, configured


def _changed_oids(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(o for o, h in after.items() if before.get(o) != h)


def _fingerprints(raw_dir: Path) -> dict[str, str]:
    det = RawStore(raw_dir).read().detections
    return fingerprints(det) if len(det) else {}


@task(name="ingest")
def ingest(params: Params) -> dict[str, Any]:
    """Pull (or simulate) into data/raw; returns per-class counts and the objects whose detections changed.

    An incomplete pull publishes what is missing (the ``nightly-pull`` artifact) and raises: a class whose listing
    failed raises TransientError for a server error (the task is retried and the pull resumes from its watermarks,
    upserting, so nothing is duplicated), ClientError otherwise; objects that failed for a transient reason raise
    TransientError. Objects that failed for good (404) are reported, never fatal."""
    from deeprubin.stages import ingest as stage

    raw_dir = Path(params.ingest.raw_dir)
    before = _fingerprints(raw_dir)
    result = stage.run(params, stage.IngestPaths.from_params(params))
    per_class = result.per_class or {}
    if not result.complete:
        artifacts.incomplete_pull(result.source, result.missing or [])
    broken = {c: pc["failures"] for c, pc in per_class.items() if not pc.get("listing_complete", True)}
    if broken:
        reasons = "; ".join(f"{c}: {f[0]['reason'] if f else 'listing incomplete'}" for c, f in broken.items())
        failures = [f for fs in broken.values() for f in fs]
        # A page the server answered with a 4xx is a client error; the listing's own "stopped after N pages" is a
        # consequence of the page failures, not a cause.
        pages = [f for f in failures if str(f.get("what", "")).startswith("objects page")] or failures
        transient = not pages or any(f.get("transient", True) for f in pages)
        raise (TransientError if transient else ClientError)(
            f"the {result.source} listing is incomplete for {sorted(broken)} ({reasons}); what was fetched is stored")
    if not result.complete:
        missing = result.missing or []
        raise TransientError(f"the {result.source} pull is incomplete, {len(missing)} missing ("
                             + "; ".join(f"{m['what']}: {m['reason']}" for m in missing[:5])
                             + (" ..." if len(missing) > 5 else "") + "); what was fetched is stored")
    changed = _changed_oids(before, _fingerprints(raw_dir))
    rows = []
    for c in params.base.classes:
        pc = per_class.get(c, {})
        rows.append({"class": c, "stored": result.objects_per_class.get(c, 0), "listed": pc.get("listed", ""),
                     "fetched": pc.get("fetched", ""), "new": pc.get("objects_new", ""),
                     "updated": pc.get("objects_updated", ""), "detections_added": pc.get("detections_added", ""),
                     "failures": len(pc.get("failures", []))})
    get_run_logger().info("ingest (%s): %d objects changed", result.source, len(changed))
    return {"source": result.source, "per_class": rows, "changed_oids": changed, "detections": result.detections,
            "objects_dropped": len(result.objects_dropped),
            "label_changes": list(result.extra.get("changed_labels", []))}


@task(name="preprocess")
def preprocess(params: Params) -> dict[str, Any]:
    from deeprubin.stages import preprocess as stage

    result = stage.run(params, stage.PreprocessPaths.from_params(params))
    return result.report()


@task(name="version-data")
def version_data(params: Params, stages: list[str]) -> dict[str, Any]:
    """Record the stages' outputs in dvc.lock and the DVC cache; push them to the remote when configured."""
    from deeprubin.versioning import commit_and_push

    done = commit_and_push(stages, Path("."), push=params.flows.dvc_push)
    for note in done.skipped:
        get_run_logger().warning(note)
    return done.report()


@task(name="train")
def train(params: Params) -> dict[str, Any]:
    from deeprubin.stages import train as stage

    result = stage.run(params, stage.TrainPaths.from_params(params))
    return {"run_id": result.run_id, "model_uri": result.model_uri, "best_val_macro_f1": result.best_val_macro_f1,
            "epochs": result.epochs, "split_sizes": result.split_sizes, "data_hash": result.data_hash}


@task(name="baseline")
def baseline(params: Params) -> dict[str, Any]:
    from deeprubin.stages import baseline as stage

    return stage.run(params, stage.BaselinePaths.from_params(params))


@task(name="evaluate")
def evaluate(params: Params) -> dict[str, Any]:
    from deeprubin.stages import evaluate as stage

    result = stage.run(params, stage.EvaluatePaths.from_params(params))
    return {"metrics": result.metrics, "skipped": result.skipped, "run_id": result.run_id}


@task(name="register")
def register(params: Params) -> dict[str, Any]:
    from deeprubin.stages import register as stage

    return stage.run(params, stage.RegisterPaths.from_params(params))


@task(name="promote")
def promote(params: Params, version: str | None = None) -> dict[str, Any]:
    from deeprubin.stages import promote as stage

    return stage.run(params, stage.PromotePaths.from_params(params), version=version).report()


@task(name="rollback")
def rollback(params: Params) -> dict[str, Any]:
    from deeprubin.registry import Registry, rollback as roll_back

    return roll_back(Registry(params.train.tracking_uri, params.base.model_name),
                     params.promote.lock_timeout_s)


@task(name="classify")
def classify(params: Params, oids: list[str] | None, output: str) -> dict[str, Any]:
    """Classify ``oids`` (all stored objects when None) from data/raw with the serving model; the night's file is
    upserted by oid, so a rerun of the night replaces its rows and never duplicates them."""
    from deeprubin.serving import classify as clf
    from deeprubin.store import RawStore

    det = RawStore(Path(params.ingest.raw_dir)).read().detections
    if oids is not None:
        det = det.loc[det["oid"].astype(str).isin(set(oids))]
    # The raw store holds difference flux (the contract's, what training saw): nothing to recognise.
    return clf.run(params, det.reset_index(drop=True), Path(output), upsert=True, photometry="difference").report()


# ----------------------------------------------------------------------------------------------------------------
# Sequences of tasks that more than one flow runs.

def train_and_evaluate(params: Params) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """train -> baseline (when enabled) -> evaluate, publishing the evaluation artifact.

    Returns (training summary, evaluation, the DVC stages that produced outputs)."""
    trained = configured(train, params)(params)
    stages = ["train"]
    if params.evaluate.baseline:
        configured(baseline, params)(params)
        stages.append("baseline")
    evaluated = configured(evaluate, params)(params)
    stages.append("evaluate")
    artifacts.evaluation(evaluated, trained)
    return trained, evaluated, stages


def pull_sources(params: Params) -> dict[str, Any]:
    """ingest from ``ingest.source``, then from the BTS catalogue when ``ingest.bts.enabled`` (into the same store:
    its spectroscopic labels win over the classifier's). One summary: per-class rows of each source (with a
    ``source`` column when there are two), the objects whose detections changed, the labels that changed."""
    pulled = configured(ingest, params)(params)
    if not params.ingest.bts.enabled or params.ingest.source == "bts":
        return pulled
    bts_params = params.model_copy(update={"ingest": params.ingest.model_copy(update={"source": "bts"})})
    spectro = configured(ingest, bts_params).with_options(task_run_name="ingest-bts")(bts_params)
    rows = [{"source": pulled["source"], **r} for r in pulled["per_class"]]
    rows += [{"source": "bts", **r} for r in spectro["per_class"] if r["class"] in ("SNIa", "SNII")]
    return {"source": f"{pulled['source']}+bts", "per_class": rows,
            "changed_oids": sorted(set(pulled["changed_oids"]) | set(spectro["changed_oids"])),
            "detections": spectro["detections"],
            "objects_dropped": pulled["objects_dropped"] + spectro["objects_dropped"],
            "label_changes": sorted(set(pulled["label_changes"]) | set(spectro["label_changes"]))}


def promote_version(params: Params, version: str | None) -> dict[str, Any]:
    """promote ``version`` and publish the decision."""
    decision = configured(promote, params)(params, version)
    artifacts.promotion(decision)
    return decision


def classify_night(params: Params, oids: list[str] | None, night: str, output: str | None = None) -> dict[str, Any]:
    """classify into ``classify.output_dir/<night>.parquet`` (or ``output``) and publish the counts."""
    output = output or str(Path(params.classify.output_dir) / f"{night}.parquet")
    done = configured(classify, params)(params, oids, output)
    artifacts.classifications(done, night)
    return done
