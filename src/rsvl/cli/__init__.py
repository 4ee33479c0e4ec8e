"""The ``rsvl`` command line: thin wrappers that parse, call a task, and report.

Conventions every command keeps:

* ``--json`` prints exactly one JSON document on stdout; progress bars, warnings and
  notices go to stderr.
* A user error (``RsvlError``) prints one line ``error: ...`` on stderr and exits non-zero;
  the traceback appears only with ``rsvl --debug``.
* ``rsvl --quiet`` silences progress bars and notices.
* Exit codes: 0 done, 2 user error or usage mistake, 130 interrupted (Ctrl-C), 1 a bug.
* Inputs and outputs are checked before a model loads (:mod:`rsvl.cli.preflight`).

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

import errno
import sys
from typing import Any

import typer
import typer.main

from rsvl import __version__
from rsvl.cli import (
    chat,
    classify,
    data,
    index,
    info,
    instances,
    models,
    refer,
    run,
    segment,
    serve,
    train,
)
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
for _module in (info, classify, segment, index, instances, refer, chat, run, serve, models, evaluate, train, data):
    _module.register(app)


def _leaf_command(args: list[str]) -> Any:
    """The command ``args`` invoke (``rsvl train clip ...`` -> the ``clip`` command), or None."""
    cmd: Any = typer.main.get_command(app)
    for arg in args:
        if arg.startswith("-"):
            continue
        sub = getattr(cmd, "commands", {}).get(arg)
        if sub is None:
            break
        cmd = sub
    return cmd


def interrupted_message(args: list[str]) -> str:
    """What to tell a user who pressed Ctrl-C: the way back in for commands with --resume."""
    try:
        cmd = _leaf_command(args)
        resumable = any("--resume" in getattr(p, "opts", ()) for p in getattr(cmd, "params", ()))
    except Exception:  # never let the message hide the interruption
        resumable = False
    return "interrupted; rerun with --resume to continue" if resumable else "interrupted"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script. Returns the process exit code.

    0: success; 1: an unexpected error (a bug: rerun with --debug); 2: a user error
    (``RsvlError``: one line saying what to do) or a usage mistake (Click's usage line and
    message); 130: interrupted (Ctrl-C).
    """
    args = sys.argv[1:] if argv is None else argv
    state.debug = "--debug" in args
    try:
        # Outside standalone mode Typer returns the exit code of a `typer.Exit` and turns
        # KeyboardInterrupt into a returned 130 (typer 0.29: see pyproject's pin).
        code = app(args=args, prog_name="rsvl", standalone_mode=False)
    except RsvlError as exc:
        if state.debug:
            raise
        state.error(str(exc))
        return exc.exit_code
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        state.error("aborted")
        return 130
    except KeyboardInterrupt:
        code = 130
    except SystemExit as exc:
        # Lightning answers Ctrl-C with a graceful shutdown and sys.exit(1)
        if not isinstance(exc.__context__, KeyboardInterrupt):
            raise
        code = 130
    except typer.TyperException as exc:  # usage mistakes: usage line, Click's message, exit 2
        exc.show()
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or state.debug:
            if state.debug:
                raise
            state.error(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
            return 1
        where = f" writing {exc.filename}" if exc.filename else ""
        state.error(
            f"the disk is full{where}: free some space or write elsewhere (-o); no output was "
            "left half-written, and a run with --resume continues from its last saved row"
        )
        return 2
    except Exception as exc:
        if state.debug:
            raise
        state.error(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        return 1
    if code == 130:
        state.error(interrupted_message(args))
        return 130
    return code if isinstance(code, int) else 0
