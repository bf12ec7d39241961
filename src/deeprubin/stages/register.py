"""``deeprubin register``: the trained and evaluated model becomes a version of ``base.model_name``.

Reads ``train.json`` (the run and its logged model) and, when present, ``metrics/evaluate.json``; registers the
logged model as a version of its run with a few tags and a description a person reads on the registry page:

- tags (:data:`VERSION_TAGS`): ``git_commit``, ``data_hash`` and ``classes`` (the output columns in order; serving
  reads them from the MLmodel metadata first, the tag is the fallback). The run id is the version's own ``run_id``.
  Everything else (parameters, per-epoch curves, every evaluation number) stays on the run, as params and metrics.
- description (:func:`describe`): the headline evaluation numbers, real data first (macro-F1 of whole light curves
  with its 95% interval and each class's recall on the held-out real set, e.g. SN II recall on the BTS), then the
  other sets, and what it was trained on. ``deeprubin promote`` puts its decision and reason above them.

Idempotent: a version of this run that already exists is reused (its tags set again, the evaluation part of its
description rewritten, the promotion paragraphs kept), never duplicated. Writes ``<train.model_dir>/registered.json``
(name, version, run id, model URI) for the promotion step.

Not a DVC stage: it writes to the model registry, which is not a file DVC could reproduce; `make run` and the
Prefect flows call it after `deeprubin evaluate`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deeprubin.config import Params
from deeprubin.models.served import CLASSES_TAG, LOGGED_MODEL_URI
from deeprubin.outputs import METRICS, REGISTERED_REPORT, TRAIN_REPORT
from deeprubin.progress import Progress, or_silent
from deeprubin.registry import split_description, with_decision
from deeprubin.schema import CLASSES

#: The tags a registered version carries (from the training run's tags).
VERSION_TAGS = ("git_commit", "data_hash", CLASSES_TAG)


def version_tags(trained: dict[str, Any]) -> dict[str, str]:
    """:data:`VERSION_TAGS` of a ``train.json`` report."""
    run_tags = trained.get("extra", {}).get("tags", {})
    tags = {"git_commit": trained.get("git_commit") or run_tags.get("git_commit"),
            "data_hash": trained.get("data_hash") or run_tags.get("data_hash"),
            CLASSES_TAG: run_tags.get(CLASSES_TAG)}
    return {k: str(v) for k, v in tags.items() if v}


def _number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _set_line(name: str, m: dict[str, Any], what: str, forest: dict[str, Any] | None, classes: list[str]) -> str:
    line = (f"- {name} ({what}, {m.get('n', '?')} objects): macro-F1 {_number(m.get('macro_f1'))} "
            f"[{_number(m.get('macro_f1_low'))}, {_number(m.get('macro_f1_high'))}]")
    per_class = m.get("per_class") or {}
    order = [c for c in classes if c in per_class] + sorted(set(per_class) - set(classes))
    if order:  # on the BTS: SN Ia and SN II recall, the numbers a reviewer of the real results looks for
        line += "; recall " + ", ".join(f"{c} {_number(per_class[c].get('recall'))}" for c in order)
    e20 = (m.get("early") or {}).get("20d", {}).get("macro_f1")
    if e20 is not None:
        line += f"; macro-F1 at 20 d {_number(e20)}"
    if m.get("ece") is not None:
        line += f"; ECE {_number(m['ece'])}"
    if forest and forest.get("macro_f1") is not None:
        line += f" (forest baseline: macro-F1 {_number(forest['macro_f1'])})"
    return line


def describe(metrics: dict[str, Any], trained: dict[str, Any], real_set: str = "bts",
             classes: Sequence[str] = CLASSES) -> str:
    """The version description ``deeprubin register`` writes: the TCN's headline numbers per evaluation set (the
    real held-out set ``real_set`` first, whole light curves, 95% bootstrap intervals; the forest baseline beside),
    then the run it came from; classes in ``classes`` order. Plain text in a few paragraphs (the registry page
    renders it as Markdown)."""
    tcn = metrics.get("tcn") if isinstance(metrics.get("tcn"), dict) else {}
    forest = metrics.get("forest") if isinstance(metrics.get("forest"), dict) else {}
    sets = [n for n, m in tcn.items() if isinstance(m, dict) and "macro_f1" in m]
    sets.sort(key=lambda n: (n != real_set, n != "test", n))
    parts = []
    if sets:
        lines = ["Evaluation of the TCN (whole light curves; 95% bootstrap intervals):"]
        for name in sets:
            what = ("real, held out" if name == real_set else "simulated test split" if name == "test"
                    else "real, alert stream" if name.endswith("alert_stream") else "real")
            lines.append(_set_line(name, tcn[name], what, forest.get(name), list(classes)))
        skipped = metrics.get("skipped") or {}
        if skipped:
            lines.append("- not evaluated: " + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
        parts.append("\n".join(lines))
    else:
        parts.append("Not evaluated yet: run `deeprubin evaluate`, then `deeprubin register` again.")
    best = trained.get("best_val_macro_f1")
    parts.append(f"Trained: run {trained.get('run_id')}, {trained.get('epochs', '?')} epochs, best validation "
                 f"macro-F1 {_number(best)}; data {trained.get('data_hash', '?')}; commit "
                 f"{trained.get('git_commit', '?')}. Every parameter and number is on the run.")
    return "\n\n".join(parts)


@dataclass(frozen=True)
class RegisterPaths:
    model_dir: Path
    metrics_dir: Path

    @classmethod
    def from_params(cls, params: Params) -> "RegisterPaths":
        return cls(model_dir=Path(params.train.model_dir), metrics_dir=Path(params.evaluate.metrics_dir))


def run(params: Params, paths: RegisterPaths, progress: Progress | None = None) -> dict[str, Any]:
    """Register (or find) the version of the latest training run; returns what it writes to registered.json."""
    import mlflow

    from deeprubin.tracking import using

    step = or_silent(progress)
    model_dir = paths.model_dir
    train_path = model_dir / TRAIN_REPORT
    if not train_path.exists():
        raise FileNotFoundError(f"no training report at {train_path}: run `deeprubin train` first")
    trained = json.loads(train_path.read_text())
    metrics_path = paths.metrics_dir / METRICS
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    name, run_id, model_uri = params.base.model_name, trained["run_id"], trained["model_uri"]
    tags = version_tags(trained)
    body = describe(metrics, trained, params.evaluate.real.name, params.base.classes)

    step(f"registering run {run_id} as {name}")
    uri = params.train.tracking_uri
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    existing = []
    if client.search_registered_models(filter_string=f"name='{name}'"):
        existing = [v for v in client.search_model_versions(f"name='{name}'")
                    if v.run_id == run_id or (v.tags or {}).get("run_id") == run_id]
    else:
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(name)
        except MlflowException as exc:  # a concurrent register created it in between
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    if existing:
        mv = min(existing, key=lambda v: int(v.version))
        version = str(mv.version)
        decision, _ = split_description(mv.description)  # what promote wrote stays on top
        client.update_model_version(name, version, description=with_decision(body, decision, replace=True))
    else:
        # The client, not mlflow.register_model: the same version, without the "Successfully registered model" and
        # "Created version" lines MLflow prints on stderr.
        model_id = model_uri[len("models:/"):] if LOGGED_MODEL_URI.fullmatch(model_uri) else None
        with using(uri):  # the store resolves a models:/m-... source through the process-wide tracking URI
            version = str(client.create_model_version(name, model_uri, run_id=run_id, tags=tags,
                                                      description=with_decision(body, []),
                                                      model_id=model_id).version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    out = {"registered_model": name, "version": version, "run_id": run_id, "model_uri": f"models:/{name}/{version}",
           "logged_model_uri": model_uri, "new": not existing, "evaluated": bool(metrics)}
    (model_dir / REGISTERED_REPORT).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return out
