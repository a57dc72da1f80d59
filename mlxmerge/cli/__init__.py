"""The ``mlxmerge`` command: one click group, one thin module per command group."""

from __future__ import annotations

import logging
import sys

import click

import mlxmerge  # noqa: F401  (loads the optimized BLAS before mlx.core)
from mlxmerge import __version__
from mlxmerge.errors import Interrupted, MlxmergeError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Group(click.Group):
    """Turns library errors into one-line ``Error: ...`` messages with exit status 1, and
    SIGTERM/SIGHUP into the same unwinding as Ctrl-C (exit status 128 + the signal number)."""

    def invoke(self, ctx):
        from mlxmerge.io.output import signals_interrupt

        try:
            with signals_interrupt():
                return super().invoke(ctx)
        except MlxmergeError as e:
            raise click.ClickException(str(e)) from None
        except Interrupted as e:
            err = click.ClickException(f"stopped by {e.name}; partial outputs were removed")
            err.exit_code = 128 + e.signum
            raise err from None


def _version(ctx, _param, value):
    if not value or ctx.resilient_parsing:
        return
    from mlxmerge.cli.system import backend_summary

    click.echo(f"mlxmerge {__version__} ({backend_summary()})")
    ctx.exit()


@click.group(cls=Group, context_settings=CONTEXT_SETTINGS)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="Show the version, MLX backend and BLAS, then exit.")  # fmt: skip
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or log output.")
@click.pass_context
def cli(ctx, verbose: int, quiet: bool):
    """Merge, abliterate and dissect open-weight LLMs with MLX, without training them."""
    level = (
        logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = {"quiet": quiet}


def _register() -> None:
    # Each command group lives in its own module and adds itself to ``cli``.
    import importlib

    for name in (
        "system",
        "models",
        "merge",
        "moe",
        "sae",
        "abliterate",
        "evaluate",
        "demo",
        "lora",
        "evolve",
    ):
        try:
            importlib.import_module(f"mlxmerge.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"mlxmerge.cli.{name}":
                raise


_register()


def main() -> None:
    cli(prog_name="mlxmerge")


if __name__ == "__main__":
    sys.exit(main())
