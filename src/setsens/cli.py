"""The ``setsens`` command line: one subcommand per experiment; each lives in its own module.

This is the edge where global state may be set: the plotting backend (Agg, no display needed),
errors, which reach the user as one line (``--debug`` shows the traceback), and ``--quiet`` (no progress:
every subcommand renders the library's progress through :class:`setsens.experiments.bars.Bars`).
"""

from __future__ import annotations

import click

from . import __version__


class _Group(click.Group):
    """Subcommands imported only when used (memory and start-up time stay those of the command run),
    failing with one line instead of a traceback."""

    def list_commands(self, ctx):
        from .experiments import NAMES

        return list(NAMES)

    def get_command(self, ctx, name):
        from .experiments import command

        return command(name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as err:
            if ctx.meta.get("setsens.debug"):
                raise
            from .experiments.options import first_line

            message = f"{type(err).__name__}: {first_line(err)} (--debug shows the traceback)"
            raise click.ClickException(message) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="setsens")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or progress lines (results and reports as usual).")
@click.pass_context
def main(ctx, debug, quiet):
    """Set-valued sensitivity analysis of neural networks."""
    import matplotlib

    matplotlib.use("Agg")
    ctx.meta["setsens.debug"] = debug
    ctx.meta["setsens.quiet"] = quiet
