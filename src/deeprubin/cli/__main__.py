"""``python -m deeprubin.cli``: the same command line as ``deeprubin``."""

from deeprubin.cli import app

app()
