"""`dvc metrics show` prints a readable table (issue 17): the metrics file dvc.yaml declares holds the headline
numbers (a dozen, two levels: set, then number), not every number of the evaluation (about 400, nested five deep,
which DVC printed as one line of ~15,000-20,000 characters). Every number is still in evaluate.json, a plain output
that `deeprubin register` and the tests read.

The metrics here are made by the evaluate stage's own scoring on synthetic predictions, in the shape a real
evaluation has (two models; the test split, the held-out BTS and the two OGLE sets; early curves), and written as the
stage writes them; `dvc metrics show` runs on the repository's own dvc.yaml in a scratch git+dvc project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DVC = Path(sys.executable).parent / "dvc"
CLASSES = ("QSO", "CEP", "SNIa", "SNII")
DAYS = (5, 10, 20, 30, 50, 100)
#: (set, scored classes, restricted prediction), as evaluate scores them.
SETS = (("test", list(CLASSES), False), ("bts", ["SNIa", "SNII"], True),
        ("ogle_alert_stream", ["QSO", "CEP"], False), ("ogle_apparent", ["QSO", "CEP"], False))


def run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert done.returncode == 0, f"{cmd}: {done.stdout}\n{done.stderr}"
    return done


def evaluation_metrics(seed: int = 0) -> dict:
    """``evaluate.json``'s content for two models on the four sets, scored by deeprubin.evaluation.scoring."""
    from deeprubin.evaluation.scoring import early_rows, score

    rng = np.random.default_rng(seed)
    metrics: dict = {"tcn": {}, "forest": {}}
    for k, (name, scored, restrict) in enumerate(SETS):
        n = 40
        labels = np.asarray([scored[i % len(scored)] for i in range(n)])
        oids = np.asarray([f"{name}-{i}" for i in range(n)])
        label_of = dict(zip(oids, labels))
        for model in metrics:
            proba = rng.dirichlet(np.ones(len(CLASSES)), size=n)
            proba[np.arange(n), [CLASSES.index(c) for c in labels]] += rng.random(n)
            proba /= proba.sum(axis=1, keepdims=True)
            early = pd.concat([early_rows(oids, proba, d, label_of, CLASSES) for d in DAYS], ignore_index=True)
            m, _ = score(labels, proba, oids, early, CLASSES, scored, restrict, 10, 5, k)
            metrics[model][name] = m
    return metrics


def test_headline_numbers_are_the_evaluations_own():
    from deeprubin.stages.evaluate import HEADLINE_EARLY, headline_metrics

    metrics = evaluation_metrics()
    metrics["tcn"]["test"]["macro_f1"] = float("nan")
    head = headline_metrics(metrics, real_set="bts")
    assert list(head) == [name for name, *_ in SETS]
    for name, *_ in SETS:
        assert head[name]["forest_macro_f1"] == round(metrics["forest"][name]["macro_f1"], 4)
    assert head["test"]["tcn_macro_f1"] is None  # not a number: null, as in evaluate.json
    bts = metrics["tcn"]["bts"]
    assert head["bts"] == {"forest_macro_f1": round(metrics["forest"]["bts"]["macro_f1"], 4),
                           "tcn_macro_f1": round(bts["macro_f1"], 4),
                           "tcn_recall_SNIa": round(bts["per_class"]["SNIa"]["recall"], 4),
                           "tcn_recall_SNII": round(bts["per_class"]["SNII"]["recall"], 4),
                           f"tcn_macro_f1_{HEADLINE_EARLY}": round(bts["early"][HEADLINE_EARLY]["macro_f1"], 4)}
    assert headline_metrics({"tcn": {"test": metrics["tcn"]["test"]}}, "bts") == {"test": {"tcn_macro_f1": None}}


def test_dvc_metrics_show_is_a_readable_table(tmp_path):
    from deeprubin.evaluation.metrics import write_metrics_json
    from deeprubin.outputs import HEADLINE, METRICS
    from deeprubin.stages.evaluate import headline_metrics

    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["evaluate"]
    assert declared["metrics"] == [f"metrics/{HEADLINE}"]
    assert f"metrics/{METRICS}" in declared["outs"]  # every number, a plain output

    work = tmp_path / "project"
    work.mkdir()
    run(["git", "init", "-q"], work)
    run([DVC, "init", "-q"], work)
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    metrics = evaluation_metrics()
    write_metrics_json(work / "metrics" / METRICS, metrics)  # as the evaluate stage writes both
    write_metrics_json(work / "metrics" / HEADLINE, headline_metrics(metrics, "bts"))

    shown = json.loads(run([DVC, "metrics", "show", "--json"], work).stdout)
    (workspace,) = shown.values()
    files = workspace["data"]
    assert list(files) == [f"metrics/{HEADLINE}"]
    data = files[f"metrics/{HEADLINE}"]["data"]
    numbers = [v for row in data.values() for v in row.values()]
    assert 8 <= len(numbers) <= 16 and all(isinstance(v, float) for v in numbers)

    table = run([DVC, "metrics", "show"], work).stdout.splitlines()
    header, row = table[0].split(), table[1].split()
    assert header[0] == "Path" and row[0] == f"metrics/{HEADLINE}" and len(header) == len(row) == 1 + len(numbers)
    assert "bts.tcn_macro_f1" in header and "bts.tcn_recall_SNII" in header and "test.forest_macro_f1" in header
    assert max(map(len, table)) < 400, max(map(len, table))  # was ~20,000 characters on one line
    assert row[header.index("bts.tcn_macro_f1")] == f"{data['bts']['tcn_macro_f1']:g}"

    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "first evaluation"], work)
    write_metrics_json(work / "metrics" / HEADLINE, headline_metrics(evaluation_metrics(seed=1), "bts"))
    diff = run([DVC, "metrics", "diff", "--all"], work).stdout.splitlines()
    assert diff[0].split()[:2] == ["Path", "Metric"] and len(diff) == 1 + len(numbers)
    assert max(map(len, diff)) < 120
