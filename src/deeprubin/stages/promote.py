"""``deeprubin promote``: the registered version becomes ``challenger``, and ``champion`` if it beats the champion.

Both versions are loaded from the registry and scored now on one frozen evaluation set (``promote.evaluation_set``:
``test``, the test split of the current data, or the real held-out set, e.g. ``bts``): the same objects and labels
for both, fingerprinted with :func:`deeprubin.stages.evaluate.objects_hash`. The rules and the aliases are in
:mod:`deeprubin.registry`. Writes ``<train.model_dir>/promotion.json`` (the decision, its reason and both scores).

Not a DVC stage: it changes the model registry, not files DVC could reproduce.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from deeprubin.config import Params
from deeprubin.registry import Decision, Registry, Scores, promote

REPORT = "promotion.json"
Progress = Callable[..., None]


def frozen_set(params: Params):
    """The evaluation set of ``promote.evaluation_set`` (:class:`deeprubin.stages.evaluate.EvalSet`)."""
    from deeprubin.realset import holdout_oids
    from deeprubin.stages.evaluate import EvaluatePaths, _real_set, _test_split

    paths = EvaluatePaths.from_params(params)
    wanted = params.promote.evaluation_set
    if wanted == "test":
        return _test_split(params, paths, holdout_oids(params.evaluate.real, params.base))
    if wanted != params.evaluate.real.name:
        raise ValueError(f"promote.evaluation_set is {wanted!r}: use `test` or the real set's name "
                         f"{params.evaluate.real.name!r} (evaluate.real.name)")
    manifest = json.loads((paths.processed_dir / "manifest.json").read_text())
    real = _real_set(params, int(manifest["config"]["grid_days"]), float(manifest["config"]["fit_context_days"]))
    if isinstance(real, str):
        raise FileNotFoundError(f"promotion set {wanted} is unavailable: {real}")
    return real


def scorer(eval_set, params: Params) -> Callable[[str], Scores]:
    """``model_uri -> Scores`` on ``eval_set`` (a model is loaded once per URI)."""
    from deeprubin.classify import load_model
    from deeprubin.evaluate import classification_metrics

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


def run(params: Params, version: str | None = None, progress: Progress | None = None) -> Decision:
    """Promote ``version`` (default: the one in ``registered.json``, written by ``deeprubin register``)."""
    from deeprubin.stages.evaluate import objects_hash
    from deeprubin.stages.register import REPORT as REGISTERED

    step = progress or (lambda *_a, **_k: None)
    model_dir = Path(params.train.model_dir)
    name = params.promote.registered_model
    if version is None:
        path = model_dir / REGISTERED
        if not path.exists():
            raise FileNotFoundError(f"no registered version in {path}: run `deeprubin register` or pass --version")
        registered = json.loads(path.read_text())
        if registered.get("registered_model") != name:
            raise ValueError(f"{path} names {registered.get('registered_model')!r}, promote.registered_model is "
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
                       lock_timeout_s=params.promote.lock_timeout_s)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / REPORT).write_text(json.dumps(decision.report(), indent=2, sort_keys=True) + "\n")
    return decision


def summary(decision: Decision) -> dict[str, Any]:
    return {"version": decision.version, "outcome": decision.outcome, "reason": decision.reason,
            "champion_before": decision.champion_before, "champion_after": decision.champion_after}
