"""``deeprubin promote``: the registered version becomes ``challenger``, and ``champion`` if it beats the champion.

Both versions are loaded from the registry and scored now on one frozen evaluation set (``promote.evaluation_set``:
``test``, the test split of the current data, or the real held-out set, e.g. ``bts``): the same objects and labels
for both, fingerprinted with :func:`deeprubin.evaluation.sets.objects_hash`. The rules and the aliases are in
:mod:`deeprubin.registry`. Writes ``<train.model_dir>/promotion.json`` (the decision, its reason and both scores).

Not a DVC stage: it changes the model registry, not files DVC could reproduce.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from deeprubin.config import Params
from deeprubin.evaluation.metrics import classification_metrics
from deeprubin.evaluation.sets import EvalSet, frozen_set, objects_hash
from deeprubin.models.served import load_model
from deeprubin.outputs import PROMOTION_REPORT, REGISTERED_REPORT
from deeprubin.progress import Progress, or_silent
from deeprubin.registry import Decision, Registry, Scores, promote


def scorer(eval_set: EvalSet, params: Params) -> Callable[[str], Scores]:
    """``model_uri -> Scores`` on ``eval_set`` (a model is loaded once per URI)."""
    if len(eval_set.oids) == 0:
        raise ValueError(f"the promotion set {eval_set.name} has no objects")

    def score(uri: str) -> Scores:
        model = load_model(uri, params.train.tracking_uri, params.base.classes)
        proba = model.predict_proba(eval_set.x)
        m = classification_metrics(eval_set.labels, proba, model.classes, labels=eval_set.scored_classes,
                                   restrict_predictions=eval_set.restrict)
        recall = {c: float(pc["recall"]) for c, pc in m["per_class"].items()
                  if pc.get("recall") is not None and np.isfinite(pc["recall"])}
        return Scores(metric=float(m[params.promote.metric]), recall=recall, n_objects=int(len(eval_set.oids)))

    return score


@dataclass(frozen=True)
class PromotePaths:
    model_dir: Path

    @classmethod
    def from_params(cls, params: Params) -> "PromotePaths":
        return cls(model_dir=Path(params.train.model_dir))


def run(params: Params, paths: PromotePaths, progress: Progress | None = None, version: str | None = None,
        force: bool = False) -> Decision:
    """Promote ``version`` (default: the one in ``registered.json``, written by ``deeprubin register``); with
    ``force``, even when the gate rejects it (:func:`deeprubin.registry.promote`)."""
    step = or_silent(progress)
    model_dir = paths.model_dir
    name = params.base.model_name
    if version is None:
        path = model_dir / REGISTERED_REPORT
        if not path.exists():
            raise FileNotFoundError(f"no registered version in {path}: run `deeprubin register` or pass --version")
        registered = json.loads(path.read_text())
        if registered.get("registered_model") != name:
            raise ValueError(f"{path} names {registered.get('registered_model')!r}, base.model_name is "
                             f"{name!r}")
        version = str(registered["version"])
    step(f"reading the promotion set {params.promote.evaluation_set}")
    eval_set = frozen_set(params)
    registry = Registry(params.train.tracking_uri, name)
    step(f"scoring version {version} and the champion")
    decision = promote(registry, version, scorer(eval_set, params), metric=params.promote.metric,
                       min_improvement=params.promote.min_improvement,
                       max_recall_drop=params.promote.max_recall_drop, evaluation_set=eval_set.name,
                       set_hash=objects_hash(eval_set.oids, eval_set.labels),
                       lock_timeout_s=params.promote.lock_timeout_s, force=force)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / PROMOTION_REPORT).write_text(json.dumps(decision.report(), indent=2, sort_keys=True) + "\n")
    return decision


def summary(decision: Decision) -> dict[str, Any]:
    return {"version": decision.version, "outcome": decision.outcome, "reason": decision.reason,
            "champion_before": decision.champion_before, "champion_after": decision.champion_after}
