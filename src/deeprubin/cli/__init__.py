"""The ``deeprubin`` command line: one subcommand per stage, plus configuration tools.

:data:`app` and the shared helpers live in :mod:`deeprubin.cli.common`; each module below adds its commands to the
app when imported, so the order of these imports is the order of the commands in ``deeprubin --help``."""

from deeprubin.cli.common import app

# isort: off
from deeprubin.cli import pipeline  # noqa: F401 (registers) ingest, preprocess, train, baseline, evaluate, register
from deeprubin.cli import promotion  # noqa: F401 (registers) promote, rollback
from deeprubin.cli import serving  # noqa: F401 (registers) classify, consume, serve-api
from deeprubin.cli import ops  # noqa: F401 (registers) nightly, serve-flows, up, down, servers
from deeprubin.cli import inspection  # noqa: F401 (registers) plot, config show, config check
# isort: on

__all__ = ["app"]
