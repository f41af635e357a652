"""The ``setsens`` command line: one subcommand per experiment; each lives in its own module.

This is the edge where global state may be set: the plotting backend (Agg, no display needed),
errors, which reach the user as one line (``--debug`` shows the traceback), and ``--quiet`` (no progress:
every subcommand renders the library's progress through :class:`setsens.experiments.bars.Bars`).
"""

from __future__ import annotations

import warnings

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

        cmd = command(name)
        if cmd is not None and not any(p.name == "debug" for p in cmd.params):
            cmd.params.append(_debug_option())  # also after the subcommand: ``setsens audit --debug``
        return cmd

    def invoke(self, ctx):
        with warnings.catch_warnings():  # the caller's warning state comes back when the command ends
            warnings.showwarning = _one_line_warnings()
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


def _set_debug(ctx, param, value):
    if value:
        ctx.meta["setsens.debug"] = True  # ``meta`` is shared by the group's and the subcommand's contexts


def _debug_option() -> click.Option:
    return click.Option(["--debug"], is_flag=True, expose_value=False, callback=_set_debug,
                        help="Show the full traceback of an error (also accepted before the subcommand).")


def _one_line_warnings():
    """``warnings.showwarning`` for a command: each warning class once, as one line on stderr (its first line,
    without the source line that Python prints under it)."""
    seen = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if category in seen:
            return
        seen.add(category)
        from .experiments.options import first_line

        click.echo(f"warning: {category.__name__}: {first_line(message)}", err=True)

    return show


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="setsens")
@click.option("--debug", is_flag=True, expose_value=False, callback=_set_debug,
              help="Show the full traceback of an error (also accepted after the subcommand).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or progress lines (results and reports as usual).")
@click.pass_context
def main(ctx, quiet):
    """Set-valued sensitivity analysis of neural networks."""
    import matplotlib

    matplotlib.use("Agg")
    ctx.meta["setsens.quiet"] = quiet
