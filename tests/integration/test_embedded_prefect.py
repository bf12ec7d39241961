"""Embedded runs (no PREFECT_API_URL: Prefect's ephemeral API) in two projects at once: each keeps its Prefect
database in its own project (``.prefect/prefect.db``), so neither waits on, or fails with "database is locked" over,
the user-wide ``~/.prefect/prefect.db``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

# What `deeprubin nightly` does before Prefect is imported, then a flow with two tasks on the ephemeral API.
SCRIPT = textwrap.dedent("""
    from deeprubin.cli.ops import _embedded_prefect

    _embedded_prefect()

    from prefect import flow, task
    from prefect.settings import get_current_settings

    @task
    def one() -> int:
        return 1

    @flow
    def tiny() -> int:
        return one() + one()

    assert tiny() == 2
    print("database:", get_current_settings().server.database.connection_url.get_secret_value())
""")


def test_two_embedded_runs_in_two_projects_at_once_each_use_their_own_database(tmp_path):
    home = tmp_path / "user-prefect-home"  # the user-wide ~/.prefect both would share without the fix
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL",
                        "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_PROFILE")}
    env.update(PREFECT_HOME=str(home), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    projects = [tmp_path / "checkout-one", tmp_path / "checkout-two"]
    procs = []
    for project in projects:
        project.mkdir()
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=project, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for project, proc, output in zip(projects, procs, outputs):
        assert proc.returncode == 0, output
        database = project / ".prefect" / "prefect.db"
        assert f"database: sqlite+aiosqlite:///{database}" in output, output
        assert database.is_file() and database.stat().st_size > 0
    assert not (home / "prefect.db").exists()
