"""``python -m setsens``: the command line without an installed entry point."""

from .cli import main

main()
