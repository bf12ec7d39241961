"""Lines meant to be copied (the export line of `deeprubin up`, URLs and log paths of `deeprubin servers`) are printed
whole on one line when stdout is a pipe, where rich would otherwise wrap or cut them at 80 columns."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

BIN = Path(sys.executable).parent


def _long_dir(tmp_path: Path) -> Path:
    path = tmp_path.joinpath(*[f"a-rather-long-folder-name-{i}" for i in range(4)], "state")
    assert len(str(path)) > 120
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")}
    return {**env, "DO_NOT_TRACK": "1"}


def test_the_export_line_of_up_is_one_line_on_a_pipe(tmp_path):
    state = _long_dir(tmp_path)
    records = {name: {"name": name, "pid": 4242, "reused": False, "url": url, "ui_url": url.removesuffix("/api"),
                      "log": str(state / "logs" / f"{name}.log")}
               for name, url in (("prefect", "http://127.0.0.1:42000/api"), ("mlflow", "http://127.0.0.1:50000"))}
    script = textwrap.dedent(f"""
        from deeprubin import servers
        servers.up = lambda *args, **kwargs: {records!r}
        from deeprubin.cli import app
        app(["up", "--state-dir", {str(state)!r}])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "  export PREFECT_API_URL=http://127.0.0.1:42000/api MLFLOW_TRACKING_URI=http://127.0.0.1:50000" in lines
    for name in ("prefect", "mlflow"):
        assert any(str(state / "logs" / f"{name}.log") in line and line.startswith(name) for line in lines), lines


def test_servers_prints_urls_and_log_paths_whole_on_a_pipe(tmp_path):
    state = _long_dir(tmp_path)
    done = subprocess.run([str(BIN / "deeprubin"), "servers", "--state-dir", str(state)], capture_output=True,
                          text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("prefect", "mlflow"):
        row = [line for line in done.stdout.splitlines() if f" {name} " in line]
        assert len(row) == 1 and str(state / "logs" / f"{name}.log") in row[0], done.stdout


def test_promote_and_rollback_sentences_are_one_line_on_a_pipe(tmp_path):
    """The decision and its reason (and a failure naming a long tracking URI) on a pipe: one line each, not broken
    at 80 columns mid-sentence (issue 17)."""
    uri = f"sqlite:///{_long_dir(tmp_path)}/mlflow.db"
    script = textwrap.dedent(f"""
        from deeprubin import registry
        from deeprubin.registry import Decision, RegistryError, Scores, decide
        from deeprubin.stages import promote as stage

        ok, reason, drops = decide(Scores(0.9, {{"SNII": 0.8}}, 500), Scores(0.8, {{"SNII": 0.79}}, 500),
                                   "macro_f1", 0.0, 0.05)
        stage.run = lambda *args, **kwargs: Decision(
            registered_model="deeprubin-tcn-with-a-long-name", version="12", promoted=ok, reason=reason,
            champion_before="11", champion_after="12", metric="macro_f1", recall_drops=drops)

        class Registry:
            def __init__(self, tracking_uri, name):
                self.tracking_uri, self.name = tracking_uri, name

        def rollback(reg, lock_timeout_s):
            raise RegistryError(f"{{reg.name}} has no champion at {{reg.tracking_uri}}: nothing to roll back")

        registry.Registry, registry.rollback = Registry, rollback
        from deeprubin.cli import app
        for args in (["promote"], ["rollback"]):
            app([*args, "--set", "train.tracking_uri={uri}", "--set", "base.model_name=deeprubin-tcn-long"],
                standalone_mode=False)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=120,
                          cwd=tmp_path)
    out, err = done.stdout.splitlines(), done.stderr.splitlines()
    promoted = [line for line in out if line.startswith("promote ")]
    assert len(promoted) == 1, done.stdout + done.stderr
    assert len(promoted[0]) > 100 and "(> 0); no class's recall drops by more than 0.05); champion is now 12" in \
        promoted[0], done.stdout
    failed = [line for line in err if line.startswith("rollback failed:")]
    assert failed == [f"rollback failed: deeprubin-tcn-long has no champion at {uri}: nothing to roll back"], \
        done.stderr


def test_the_ingest_summary_is_whole_on_a_pipe(tmp_path):
    """The summary panel of `ingest` (reasons, the manifest and rejections paths) at its natural width on a pipe:
    rich cut each line of it at 80 columns (issue 17's walkthrough: `duplicate key ('oid', 'mjd', ` and a
    rejections path lost in a CI log)."""
    out = _long_dir(tmp_path) / "raw"
    done = subprocess.run([str(BIN / "deeprubin"), "ingest", "--source", "simulator", "--out", str(out),
                           "--set", "ingest.simulator.n_per_class=3", "--set", "ingest.mix_files=false"],
                          capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = [line for line in done.stdout.splitlines() if "manifest:" in line]
    assert len(manifest) == 1 and str(out / "rejections.csv") in manifest[0], done.stdout
