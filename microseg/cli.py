"""The `microseg` command line.

Errors are one line on stderr and a non-zero exit: 1 for a failed operation,
2 for a usage error, 3 for missing privileges. Output to a closed pipe exits
quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from . import __version__

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PRIVILEGES = 3


class CommandError(Exception):
    """A failed operation: its message is the one line the user sees."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def cmd_version(args: argparse.Namespace) -> int:
    print(f"microseg {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="microseg",
        description="Event-driven, observability-first microsegmentation firewall "
                    "(TC eBPF).")
    ap.add_argument("--version", action="version", version=f"microseg {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CommandError as e:
        print(f"microseg: {e}", file=sys.stderr)
        return e.code
    except PermissionError as e:
        print(f"microseg: {e.strerror or e}: run as root", file=sys.stderr)
        return EXIT_PRIVILEGES
    except BrokenPipeError:
        # `microseg ... | head`: the reader left; exit quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
