"""The ``cfws-jax`` command line.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds an
argparse sub-parser and sets ``func(args) -> int`` on it. Heavy imports (jax, torch readers,
datasets) happen inside ``func`` so ``cfws-jax --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules providing subcommands, in the order shown by --help.
COMMAND_MODULES = (
    "cfws_jax.commands.version",
    "cfws_jax.commands.convert",
    "cfws_jax.commands.ptq",
    "cfws_jax.commands.eval",
    "cfws_jax.commands.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cfws-jax",
        description="INT8 post-training quantization of re-parameterized CNNs with "
        "Coarse & Fine Weight Splitting (CFWS).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:  # user-facing errors: no traceback
        print(f"cfws-jax {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
