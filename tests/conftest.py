"""Shared fixtures: where the real data lives, and a clean working directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """../shared/data beside the repository, or DEEPRUBIN_SHARED_DATA."""
    env = os.environ.get("DEEPRUBIN_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "bts" / "detections.parquet").exists():
        pytest.skip(f"real data not found at {path} (set DEEPRUBIN_SHARED_DATA to its location)")
    return path


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch):
    """A developer's DEEPRUBIN_* variables must not leak into tests."""
    for name in list(os.environ):
        if name.startswith("DEEPRUBIN_") and name != "DEEPRUBIN_SHARED_DATA":
            monkeypatch.delenv(name)
