"""``deeprubin register``: the trained and evaluated model becomes a version of ``base.model_name``.

Reads ``train.json`` (the run and its logged model) and, when present, ``metrics/evaluate.json``; registers the
logged model with the training tags (git commit, data hash, params hash, run id) and the headline evaluation numbers
as version tags. Idempotent: a version of this run that already exists is reused and re-tagged, never duplicated.
Writes ``<train.model_dir>/registered.json`` (name, version, run id, model URI) for the promotion step.

Not a DVC stage: it writes to the model registry, which is not a file DVC could reproduce; `make run` and the
Prefect flows call it after `deeprubin evaluate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deeprubin.config import Params
from deeprubin.outputs import EVALUATION_REPORT, METRICS, REGISTERED_REPORT, TRAIN_REPORT
from deeprubin.progress import Progress, or_silent


def headline_tags(metrics: dict[str, Any]) -> dict[str, str]:
    """``eval/<model>/<set>/<metric>`` -> value, for the numbers a reviewer of a version looks at first."""
    tags: dict[str, str] = {}
    for model, per_set in metrics.items():
        if not isinstance(per_set, dict) or model == "skipped":
            continue
        for name, m in per_set.items():
            if not isinstance(m, dict) or "macro_f1" not in m:
                continue
            for key in ("macro_f1", "macro_f1_low", "macro_f1_high", "ece"):
                if m.get(key) is not None:
                    tags[f"eval/{model}/{name}/{key}"] = f"{m[key]:.4f}"
            for c, pc in m.get("per_class", {}).items():
                if pc.get("recall") is not None:
                    tags[f"eval/{model}/{name}/recall_{c}"] = f"{pc['recall']:.4f}"
            e20 = m.get("early", {}).get("20d", {}).get("macro_f1")
            if e20 is not None:
                tags[f"eval/{model}/{name}/macro_f1_at_20d"] = f"{e20:.4f}"
    return tags


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

    step = or_silent(progress)
    model_dir = paths.model_dir
    train_path = model_dir / TRAIN_REPORT
    if not train_path.exists():
        raise FileNotFoundError(f"no training report at {train_path}: run `deeprubin train` first")
    trained = json.loads(train_path.read_text())
    metrics_path = paths.metrics_dir / METRICS
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    report_path = paths.metrics_dir / EVALUATION_REPORT
    report = json.loads(report_path.read_text()) if metrics and report_path.exists() else {}
    name, run_id = params.base.model_name, trained["run_id"]
    tags = {**{k: str(v) for k, v in trained.get("extra", {}).get("tags", {}).items()}, "run_id": run_id,
            "best_val_macro_f1": f"{trained['best_val_macro_f1']:.6f}",
            "evaluated": "true" if metrics else "false", **headline_tags(metrics),
            # Which objects the numbers were measured on: promotion compares versions on the same set only.
            **{f"eval/set/{name}": r["objects_hash"] for name, r in report.get("tcn", {}).items()
               if isinstance(r, dict) and "objects_hash" in r}}

    step(f"registering run {run_id} as {name}")
    client = mlflow.MlflowClient(tracking_uri=params.train.tracking_uri)
    existing = []
    if client.search_registered_models(filter_string=f"name='{name}'"):
        existing = [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get("run_id") == run_id]
    if existing:
        version = str(min(int(v.version) for v in existing))
    else:
        from deeprubin.tracking import using

        with using(params.train.tracking_uri):
            version = str(mlflow.register_model(trained["model_uri"], name, tags=tags).version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    out = {"registered_model": name, "version": version, "run_id": run_id, "model_uri": f"models:/{name}/{version}",
           "logged_model_uri": trained["model_uri"], "new": not existing, "evaluated": bool(metrics)}
    (model_dir / REGISTERED_REPORT).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return out
