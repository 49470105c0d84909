"""The `dataprune` command line. Thin: parse options, call one library function, render the result.

Heavy libraries (torch, timm) are imported only inside the commands that need them, so `info`,
`select` and `export` start fast. Commands register in the order `--help` lists them.
"""

from . import score, select, data, curve, report  # noqa: F401,E402  (registration order = help order)
from .app import app, main

__all__ = ["app", "main"]
