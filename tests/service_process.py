"""A `deeprubin serve-api` subprocess for tests: started on a free loopback port, waited for until /healthz answers,
stopped after (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx


def start_service(params: Path, cwd: Path, log: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "deeprubin.cli", "serve-api", "--params", str(params),
                                 "--port", str(port)], cwd=cwd, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, env=env)


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 180.0) -> None:
    """Return once ``url``/healthz answers 200; fail with the log's tail if the service exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"serve-api exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/healthz", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"serve-api not healthy within {timeout_s:g} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
