"""Headless Chromium for the browser tests: find it (or skip, saying why), run it offline but for 127.0.0.1, and tell
a blank screenshot from a rendered one."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium(what: str) -> str:
    """The first Chromium on PATH; skips the test (naming ``what`` it could not do) when there is none."""
    found = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if found is None:
        pytest.skip(f"no Chromium found on PATH (tried {', '.join(BROWSERS)}; apt-get install chromium): cannot "
                    f"render {what} in a browser")
    return found


def browse(chromium: str, url: str, profile: Path, *args: str, budget_ms: int = 5000,
           window: str = "1280,900") -> subprocess.CompletedProcess:
    """Headless Chromium on ``url``, offline but for 127.0.0.1: every other host name is unresolvable and no proxy
    is used, so a page that needs a CDN (or Google Fonts) stays blank here."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-proxy-server",
           f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
           f"--window-size={window}", f"--virtual-time-budget={budget_ms}", *args, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def ink(png: Path) -> tuple[float, int]:
    """(share of pixels that are not near-white, distinct colours) of a screenshot."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as image:
        rgb = np.asarray(image.convert("RGB")).reshape(-1, 3)
    return float((rgb.min(axis=1) < 235).mean()), len(np.unique(rgb, axis=0))
