"""The ``deeprubin`` command line: one subcommand per stage, plus configuration tools.

:data:`app` and the shared helpers live in :mod:`deeprubin.cli.common`; each module below adds its commands to the
app when imported, so the order of these imports is the order of the commands in ``deeprubin --help``."""

from deeprubin.cli.common import (
    ParamsOption,
    SetOption,
    _load,
    _run_with_progress,
    _version,
    app,
    console,
    err_console,
    main,
)

# isort: off
from deeprubin.cli import pipeline  # ingest, preprocess, train, baseline, evaluate, register
from deeprubin.cli import promotion  # promote, rollback
from deeprubin.cli import serving  # classify, consume, serve-api
from deeprubin.cli import ops  # nightly, serve-flows, up, down, servers
from deeprubin.cli import inspection  # plot, config show, config check
# isort: on

__all__ = ["ParamsOption", "SetOption", "_load", "_run_with_progress", "_version", "app", "console", "err_console",
           "inspection", "main", "ops", "pipeline", "promotion", "serving"]
