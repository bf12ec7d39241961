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
