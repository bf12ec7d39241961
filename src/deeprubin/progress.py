"""The progress callback every long step accepts: ``progress(message, completed=None, total=None)``, a step name
optionally with a count of units done (the CLI draws it as a rich progress bar; flows and tests pass nothing)."""

from __future__ import annotations

from typing import Callable

Progress = Callable[..., None]


def silent(*_args, **_kwargs) -> None:
    """A progress callback that reports nothing."""


def or_silent(progress: Progress | None) -> Progress:
    return progress or silent
