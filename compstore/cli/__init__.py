"""Command-line front end: `compstore ...` and `python -m compstore ...`."""

from .main import cli, main

__all__ = ["cli", "main"]
