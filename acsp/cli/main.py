"""The ``acsp`` command: one argparse parser with a subcommand group per module.

Each module among :data:`COMMAND_MODULES` that exists provides ``register(subparsers)``, which
adds its subcommands and sets ``func`` on each. A ``func`` takes the parsed arguments and
returns an exit status, or a coroutine that ``asyncio.run`` turns into one.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Sequence
from typing import Final

import grpc

from acsp.cli._common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_NO_MESH,
    EXIT_USAGE,
    UNREACHABLE_HINT,
    CommandError,
    describe_rpc_error,
    exit_code_for_rpc_error,
    print_error,
    unreachable_hint,
)
from acsp.mesh.endpoints import MeshFileError, MeshNotFoundError

COMMAND_MODULES: Final = (
    "mesh",
    "grants",
    "jobs",
    "fleet",
    "usage",
    "agent",
    "simulate",
    "demo",
)


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser that rejects arguments it does not know with its own usage.

    argparse parses a subcommand with ``parse_known_args`` and hands what is left to the
    top-level parser, whose error would show ``usage: acsp [-h] ...`` instead of the usage of
    the subcommand that the user typed. Nested subcommands inherit this class.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acsp",
        description="Academic compute support plan: grants, jobs, fleet and usage.",
        epilog=(
            "exit status: 0 success, 1 a call or check failed, 2 invalid usage or input, "
            "3 no running mesh found or it is unreachable, 130 interrupted"
        ),
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more: -v for INFO, -vv for DEBUG",
    )
    subparsers = parser.add_subparsers(
        title="commands", metavar="COMMAND", parser_class=SubcommandParser
    )
    for name in COMMAND_MODULES:
        module_name = f"acsp.cli.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Skip a group that is not written yet, but not one whose own import fails.
            if exc.name == module_name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        result = func(args)
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away, e.g. `acsp jobs list | head`. Point stdout at
        # /dev/null so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except grpc.RpcError as error:
        print_error(_with_data_dir(describe_rpc_error(error), args))
        return exit_code_for_rpc_error(error)
    except (MeshNotFoundError, MeshFileError) as error:
        print_error(str(error))
        return EXIT_NO_MESH
    except CommandError as error:
        print_error(_with_data_dir(str(error), args))
        return error.exit_code
    return int(result or 0)


def _with_data_dir(message: str, args: argparse.Namespace) -> str:
    """Replace the generic hint for an unreachable service with one for the mesh in use."""
    data_dir = getattr(args, "data_dir", None)
    return message.replace(UNREACHABLE_HINT, unreachable_hint(data_dir))


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING
    if verbosity == 1:
        level = logging.INFO
    elif verbosity >= 2:
        level = logging.DEBUG
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


if __name__ == "__main__":
    sys.exit(main())
