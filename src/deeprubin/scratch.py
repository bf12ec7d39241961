"""Scratch folders that name the process that made them, so that a run killed outright (kill -9, the OOM killer)
leaves nothing the next run cannot recognise as stale and remove.

A folder is ``<prefix><pid>-<random>``. :func:`remove_stale` removes those of the current user whose process is no
longer alive, and never a folder of a live process (nor one in the old, pid-less naming, whose owner is unknown).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie waiting to be reaped counts as exited)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True  # no /proc: the signal said it exists


def _owner_pid(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    pid, sep, _ = name[len(prefix):].partition("-")
    return int(pid) if sep and pid.isdigit() else None


def remove_stale(prefix: str, directory: Path | str | None = None) -> list[Path]:
    """Remove the folders ``<prefix><pid>-*`` in ``directory`` (default: the temporary directory) that this user
    owns and whose process is dead. Returns the folders removed."""
    root = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    uid = os.getuid() if hasattr(os, "getuid") else None
    removed = []
    for entry in entries:
        pid = _owner_pid(entry.name, prefix)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or (uid is not None and st.st_uid != uid):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def make(prefix: str, directory: Path | str | None = None) -> Path:
    """A new folder ``<prefix><this pid>-<random>`` in ``directory`` (default: the temporary directory), after
    removing the stale ones of dead processes."""
    remove_stale(prefix, directory)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=directory))


@contextlib.contextmanager
def folder(prefix: str, directory: Path | str | None = None) -> Iterator[Path]:
    """:func:`make`, removed again on the way out (an exception, Ctrl-C or SIGTERM turned into one included)."""
    path = make(prefix, directory)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
