"""``python -m dataprune``: the command line."""

from .cli import main

main()
