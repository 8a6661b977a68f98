"""The `kvmdirty` command.

Subcommands are registered in COMMANDS: each entry adds its parser and
returns the function that runs it (``args -> exit status``), so new ones
(e.g. ``bench``) are one function and one line.

    kvmdirty compare   every dirty-tracking design on one workload (the main job)
    kvmdirty info      what this machine's /dev/kvm offers (kvmdirty.info)

Exit status: 0 ok, 1 a run lost writes or broke the protocol, 2 bad usage
(always exactly one line on stderr, never a traceback), 130 interrupted,
141 stdout closed early (e.g. ``| head``: quietly, as a tool killed by
SIGPIPE).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, NoReturn, Optional

from . import argtypes
from .bench import add_parser as _add_bench
from .comparecmd import add_parser as _add_compare
from .host.command import add_dirtyrate as add_dirtyrate_parser
from .host.command import add_record as add_record_parser
from .migrate.command import add_calibrate_parser, add_migrate_parser
from .sweep.command import add_parser as _add_sweep

Handler = Callable[[argparse.Namespace], int]

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``kvmdirty compare: error: ...`` and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# The argument converters live in kvmdirty.argtypes (parse_size is kept here for callers).
parse_size = argtypes.parse_size


# -- info -------------------------------------------------------------------
def _add_info(sub) -> Handler:
    sub.add_parser("info", help="what this machine's /dev/kvm offers for dirty tracking")
    return _info


def _info(args: argparse.Namespace) -> int:
    from .info import format_info, kvm_info
    print(format_info(kvm_info()))
    return 0


#: (name, register): register(subparsers) adds the parser and returns its handler.
COMMANDS = [
    ("compare", _add_compare),
    ("info", _add_info),
    ("bench", _add_bench),
    ("migrate", add_migrate_parser),
    ("calibrate", add_calibrate_parser),
    ("record", add_record_parser),
    ("dirtyrate", add_dirtyrate_parser),
    ("sweep", _add_sweep),
]


def build_parser() -> "tuple[argparse.ArgumentParser, Dict[str, Handler]]":
    parser = _Parser(
        prog="kvmdirty", description="Linux KVM dirty-page tracking, simulated and real.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"kvmdirty {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers = {name: register(sub) for name, register in COMMANDS}
    return parser, handlers


#: Exit status when stdout was closed under us (128 + SIGPIPE, as a shell reports it).
EXIT_BROKEN_PIPE = 141


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; bad input of any kind ends in one stderr line and exit 2."""
    try:
        parser, handlers = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            sys.stdout.flush()
            return 2
        try:
            status = handlers[args.command](args)
            sys.stdout.flush()
            return status
        except BrokenPipeError:
            raise
        # Bad input reaches here as these (a huge size may surface as MemoryError
        # or OverflowError from numpy): one line, never a traceback.
        except (ValueError, OSError, OverflowError, MemoryError) as e:
            print(f"kvmdirty {args.command}: error: {_one_line(e) or type(e).__name__}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"kvmdirty {args.command}: interrupted", file=sys.stderr)
            return 130
    except BrokenPipeError:
        # The reader went away (``| head``). As the Python docs advise: point
        # stdout at /dev/null so the interpreter's final flush cannot fail
        # again, and exit quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
