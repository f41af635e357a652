"""The ``setsens`` command line: one subcommand per experiment; each lives in its own module."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="setsens")
def main():
    """Set-valued sensitivity analysis of neural networks."""


def _register():
    """Import subcommands lazily so ``setsens --help`` stays fast and one broken extra stays local."""
    from .experiments import commands

    for command in commands():
        main.add_command(command)


_register()
