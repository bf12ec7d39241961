"""DVC versioning of stage outputs from a run that called the stages directly (the Prefect flows).

``dvc commit`` records the current deps and outs of the named stages in ``dvc.lock`` and puts the outs into the DVC
cache (so ``dvc.lock`` stays the record of what ran); ``dvc push`` sends them to the default remote when one is
configured. ``DVC_REMOTE_URL`` (and ``DVC_REMOTE_ENDPOINT_URL`` for an S3-compatible store such as MinIO) configure
a remote named ``nightly`` in ``.dvc/config.local`` (never committed) by environment alone, as in infra/.
The data version of a run is the md5 DVC recorded for ``data/raw`` and ``data/processed``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

ENV_REMOTE_URL = "DVC_REMOTE_URL"
ENV_REMOTE_ENDPOINT = "DVC_REMOTE_ENDPOINT_URL"
ENV_REMOTE_NAME = "nightly"


class VersioningError(RuntimeError):
    """A DVC command failed; the message carries its output."""


def _dvc() -> list[str]:
    beside = Path(sys.executable).parent / "dvc"
    return [str(beside)] if beside.exists() else [shutil.which("dvc") or "dvc"]


def _run(args: Sequence[str], cwd: Path, timeout_s: float = 3600) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([*_dvc(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if done.returncode != 0:
        raise VersioningError(f"`dvc {' '.join(args)}` failed in {cwd} (exit {done.returncode}):\n"
                              f"{(done.stdout + done.stderr).strip()[-3000:]}")
    return done.stdout


def is_dvc_project(cwd: Path = Path(".")) -> bool:
    return (Path(cwd) / ".dvc").is_dir() and (Path(cwd) / "dvc.yaml").exists()


def configure_remote_from_env(cwd: Path = Path(".")) -> str | None:
    """Make ``$DVC_REMOTE_URL`` the default remote (local config) when set; returns its name."""
    url = os.environ.get(ENV_REMOTE_URL)
    if not url:
        return None
    _run(["remote", "add", "--local", "--force", "--default", ENV_REMOTE_NAME, url], cwd)
    endpoint = os.environ.get(ENV_REMOTE_ENDPOINT)
    if endpoint:
        _run(["remote", "modify", "--local", ENV_REMOTE_NAME, "endpointurl", endpoint], cwd)
    return ENV_REMOTE_NAME


def default_remote(cwd: Path = Path(".")) -> str | None:
    try:
        name = _run(["remote", "default"], cwd).strip()
    except VersioningError:  # "No default remote set"
        return None
    return name or None


@dataclass
class Versioned:
    stages: list[str]
    outs: dict[str, str]                      # path -> md5 recorded in dvc.lock
    pushed_to: str | None = None
    skipped: list[str] = field(default_factory=list)

    def report(self) -> dict:
        return {"stages": self.stages, "outs": self.outs, "pushed_to": self.pushed_to, "skipped": self.skipped}


def lock_outs(cwd: Path = Path("."), stages: Sequence[str] | None = None) -> dict[str, str]:
    """``{out path: md5}`` of the (given) stages in dvc.lock."""
    path = Path(cwd) / "dvc.lock"
    if not path.exists():
        return {}
    lock = yaml.safe_load(path.read_text()) or {}
    out = {}
    for name, stage in (lock.get("stages") or {}).items():
        if stages is None or name in stages:
            for o in stage.get("outs") or []:
                out[str(o["path"])] = str(o.get("md5", ""))
    return out


def commit_and_push(stages: Sequence[str], cwd: Path = Path("."), push: bool = True) -> Versioned:
    """``dvc commit --force <stages>``, then ``dvc push <stages>`` to the default remote when there is one."""
    cwd = Path(cwd)
    if not is_dvc_project(cwd):
        return Versioned(stages=list(stages), outs={}, skipped=[f"{cwd.resolve()} is not a DVC project"])
    _run(["commit", "--force", *stages], cwd)
    result = Versioned(stages=list(stages), outs=lock_outs(cwd, stages))
    configure_remote_from_env(cwd)
    remote = default_remote(cwd)
    if push and remote:
        _run(["push", *stages], cwd)
        result.pushed_to = remote
    elif push:
        result.skipped.append("no DVC remote configured: data versioned in the local cache only")
    return result
