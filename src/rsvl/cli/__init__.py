"""The ``rsvl`` command line: thin wrappers that parse, call a task, and report.

Conventions every command keeps:

* ``--json`` prints exactly one JSON document on stdout; progress bars, warnings and
  notices go to stderr.
* A user error (``RsvlError``) prints one line ``error: ...`` on stderr and exits non-zero;
  the traceback appears only with ``rsvl --debug``.
* ``rsvl --quiet`` silences progress bars and notices.

Command groups live in ``rsvl.cli.*``; each module exposes ``register(app)``.

Start-up time: the command modules import only Typer, Rich and the torch-free foundation at
module level; each command imports its workflow (``rsvl.tasks``, ``rsvl.eval``,
``rsvl.train``, ``rsvl.models``) inside its body, marked ``# lazy: see rsvl.cli``. Those pull
in torch, torchvision, open_clip and every model family: 3-9 s to import on the 2-core
machine (``python -c "import rsvl.tasks.segment"``), against about 1 s for ``rsvl.cli``
itself; ``rsvl --help``,
``rsvl info`` and a mistyped option must not pay.
"""

from __future__ import annotations

import sys

import click
import typer

from rsvl import __version__
from rsvl.cli import classify, data, index, info, instances, models, refer, segment, train
from rsvl.cli import eval as evaluate
from rsvl.console import state
from rsvl.errors import RsvlError

app = typer.Typer(
    name="rsvl",
    help="Remote-sensing vision-language models on georeferenced rasters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)



def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"rsvl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or notices."),
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    state.debug = debug
    state.quiet = quiet


# Order here is the order in `rsvl --help`.
for _module in (info, classify, segment, index, instances, refer, models, evaluate, train, data):
    _module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script. Returns the process exit code."""
    args = sys.argv[1:] if argv is None else argv
    state.debug = "--debug" in args
    try:
        app(args=args, prog_name="rsvl", standalone_mode=False)
    except RsvlError as exc:
        if state.debug:
            raise
        state.error(str(exc))
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        state.error("aborted")
        return 130
    except KeyboardInterrupt:
        state.error("interrupted; rerun with --resume to continue where the run stopped")
        return 130
    except Exception as exc:  # click usage errors and anything unexpected

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        if state.debug:
            raise
        state.error(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        return 1
    return 0

