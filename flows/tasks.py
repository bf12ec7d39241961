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
from deeprubin_flows.common import Chain, ClientError, TransientError, chain_of

# Columns of the ``nightly-pull`` table that only a pull (alerce, bts) has, in this order: a source without them (the
# simulator, files) shows none of them rather than empty ones.
PULL_COLUMNS = ("listed", "fetched", "detections_added", "label_changes")


def _snapshot(raw_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(fingerprint of each stored object's detections, its label) of the raw store."""
    tables = RawStore(raw_dir).read()
    det = tables.detections
    prints = fingerprints(det) if len(det) else {}
    labels = dict(zip(tables.objects["oid"].astype(str), tables.objects["label"].fillna("(none)").astype(str)))
    return prints, labels


def compare(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str]]:
    """What a pull did to the stored objects, from their fingerprints before and after: ``new`` (stored now, not
    before), ``changed`` (stored before, other detections now), ``removed`` (stored before, not now) and
    ``unchanged``; each a sorted list of oids."""
    return {"new": sorted(o for o in after if o not in before),
            "changed": sorted(o for o, h in after.items() if o in before and before[o] != h),
            "removed": sorted(o for o in before if o not in after),
            "unchanged": sorted(o for o, h in after.items() if before.get(o) == h)}


def _changed_oids(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The objects to classify after a pull: new or with other detections."""
    diff = compare(before, after)
    return sorted(diff["new"] + diff["changed"])


def pull_rows(classes: list[str], stored: dict[str, int], diff: dict[str, list[str]], labels: dict[str, str],
              per_class: dict[str, dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The ``nightly-pull`` rows, one per class: objects stored, new, changed and removed (from the fingerprints), then
    the pull's own columns (:data:`PULL_COLUMNS`, those the source reports) and its failures, for a pull only."""
    counts = {k: {} for k in ("new", "changed", "removed")}
    for kind, oids in diff.items():
        if kind in counts:
            for o in oids:
                counts[kind][labels.get(o)] = counts[kind].get(labels.get(o), 0) + 1
    reported = [c for c in PULL_COLUMNS if per_class and any(c in pc for pc in per_class.values())]
    rows = []
    for c in classes:
        row = {"class": c, "stored": stored.get(c, 0), **{k: counts[k].get(c, 0) for k in counts}}
        if per_class is not None:
            pc = per_class.get(c, {})
            row.update({k: pc.get(k, 0) for k in reported})
            row["failures"] = len(pc.get("failures", []))
        rows.append(row)
    return rows


@task(name="ingest")
def ingest(params: Params) -> dict[str, Any]:
    """Pull (or simulate) into data/raw; returns per-class counts and the objects whose detections changed.

    An incomplete pull publishes what is missing (the ``nightly-pull`` artifact) and raises: a class whose listing
    failed raises TransientError for a server error (the task is retried and the pull resumes from its watermarks,
    upserting, so nothing is duplicated), ClientError otherwise; objects that failed for a transient reason raise
    TransientError. Objects that failed for good (404) are reported, never fatal."""
    from deeprubin.stages import ingest as stage

    raw_dir = Path(params.ingest.raw_dir)
    before, labels_before = _snapshot(raw_dir)
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
    after, labels = _snapshot(raw_dir)
    diff = compare(before, after)
    rows = pull_rows(list(params.base.classes), result.objects_per_class, diff, {**labels_before, **labels},
                     per_class if result.per_class is not None else None)
    changed = sorted(diff["new"] + diff["changed"])
    get_run_logger().info("ingest (%s): %d objects new, %d changed, %d removed, %d unchanged", result.source,
                          len(diff["new"]), len(diff["changed"]), len(diff["removed"]), len(diff["unchanged"]))
    return {"source": result.source, "per_class": rows, "changed_oids": changed, "new_oids": diff["new"],
            "counts": {k: len(diff[k]) for k in ("new", "changed", "removed")}, "detections": result.detections,
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
def promote(params: Params, version: str | None = None, force: bool = False) -> dict[str, Any]:
    from deeprubin.stages import promote as stage

    return stage.run(params, stage.PromotePaths.from_params(params), version=version, force=force).report()


@task(name="rollback")
def rollback(params: Params) -> dict[str, Any]:
    from deeprubin.registry import Registry, rollback as roll_back

    return roll_back(Registry(params.train.tracking_uri, params.base.model_name),
                     params.promote.lock_timeout_s)


@task(name="classify")
def classify(params: Params, oids: list[str] | None, output: str) -> dict[str, Any]:
    """Classify ``oids`` (all stored objects when None) from data/raw with the serving model; the night's file is
    upserted by oid, so a rerun of the night replaces its rows and never duplicates them.

    Besides the classifier's report (whose ``n_classified`` and ``per_class`` count the whole file): ``classified_now``,
    the objects this run classified, and ``objects_in_file``."""
    import pandas as pd

    from deeprubin.serving import classify as clf
    from deeprubin.store import RawStore

    det = RawStore(Path(params.ingest.raw_dir)).read().detections
    if oids is not None:
        det = det.loc[det["oid"].astype(str).isin(set(oids))]
    started = pd.Timestamp.now(tz="UTC")
    # The raw store holds difference flux (the contract's, what training saw): nothing to recognise.
    done = clf.run(params, det.reset_index(drop=True), Path(output), upsert=True, photometry="difference").report()
    asked = set(det["oid"].astype(str))
    now = 0
    if asked and Path(output).exists():
        written = pd.read_parquet(output, columns=["oid", "classified_at"])
        now = int((written["oid"].astype(str).isin(asked) & (written["classified_at"] >= started)).sum())
    return {**done, "classified_now": now, "objects_in_file": done["n_classified"]}


# ----------------------------------------------------------------------------------------------------------------
# Sequences of tasks that more than one flow runs. Each takes the flow's Chain (or the parameters, to start one), so
# its tasks follow the flow's previous task in the order Prefect records and draws.

def train_and_evaluate(chain: Chain | Params) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """train -> baseline (when enabled) -> evaluate, publishing the evaluation artifact.

    Returns (training summary, evaluation, the DVC stages that produced outputs)."""
    chain = chain_of(chain)
    trained = chain(train)
    stages = ["train"]
    if chain.params.evaluate.baseline:
        chain(baseline)
        stages.append("baseline")
    evaluated = chain(evaluate)
    stages.append("evaluate")
    artifacts.evaluation(evaluated, trained)
    return trained, evaluated, stages


def pull_sources(chain: Chain | Params) -> dict[str, Any]:
    """ingest from ``ingest.source``, then from the BTS catalogue when ``ingest.bts.enabled`` (into the same store:
    its spectroscopic labels win over the classifier's). One summary: per-class rows of each source (with a
    ``source`` column when there are two), the objects whose detections changed (``changed_oids``: new or changed;
    ``counts``: how many new, changed, removed), the labels that changed."""
    chain = chain_of(chain)
    params = chain.params
    pulled = chain(ingest)
    if not params.ingest.bts.enabled or params.ingest.source == "bts":
        return pulled
    bts_params = params.model_copy(update={"ingest": params.ingest.model_copy(update={"source": "bts"})})
    spectro = chain(ingest, params=bts_params, name="ingest-bts")
    rows = [{"source": pulled["source"], **r} for r in pulled["per_class"]]
    rows += [{"source": "bts", **r} for r in spectro["per_class"] if r["class"] in ("SNIa", "SNII")]
    new = sorted(set(pulled["new_oids"]) | set(spectro["new_oids"]))
    changed = sorted(set(pulled["changed_oids"]) | set(spectro["changed_oids"]))
    return {"source": f"{pulled['source']}+bts", "per_class": rows, "changed_oids": changed, "new_oids": new,
            "counts": {"new": len(new), "changed": len(changed) - len(new),
                       "removed": pulled["counts"]["removed"] + spectro["counts"]["removed"]},
            "detections": spectro["detections"],
            "objects_dropped": pulled["objects_dropped"] + spectro["objects_dropped"],
            "label_changes": sorted(set(pulled["label_changes"]) | set(spectro["label_changes"]))}


def promote_version(chain: Chain | Params, version: str | None, force: bool = False) -> dict[str, Any]:
    """promote ``version`` (with ``force``, even when the gate rejects it) and publish the decision."""
    decision = chain_of(chain)(promote, version, force)
    artifacts.promotion(decision)
    return decision


def classify_night(chain: Chain | Params, oids: list[str] | None, night: str,
                   output: str | None = None) -> dict[str, Any]:
    """classify into ``classify.output_dir/<night>.parquet`` (or ``output``) and publish the counts."""
    chain = chain_of(chain)
    output = output or str(Path(chain.params.classify.output_dir) / f"{night}.parquet")
    done = chain(classify, oids, output)
    artifacts.classifications(done, night)
    return done
