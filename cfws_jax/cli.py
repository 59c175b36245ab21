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
    "cfws_jax.commands.export",
    "cfws_jax.commands.scenes",
)


def build_parser() -> argparse.ArgumentParser:
    import cfws_jax

    parser = argparse.ArgumentParser(
        prog="cfws-jax",
        description="INT8 post-training quantization of re-parameterized CNNs with "
        "Coarse & Fine Weight Splitting (CFWS).",
    )
    parser.add_argument("--version", action="version", version=f"cfws-jax {cfws_jax.__version__}",
                        help="print the cfws-jax version and exit (`cfws-jax version` adds jax/flax/backend)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


MAX_MESSAGE = 2000  # characters of one error line; longer messages are cut, saying how much was cut


def error_line(e: BaseException) -> str:
    """One line describing a user-facing error: the message (which names the file, key or
    layer), newlines folded, cut to :data:`MAX_MESSAGE` characters."""
    if isinstance(e, MemoryError):
        text = "out of memory" + (f": {e}" if str(e) else " (the input declares more data than fits in memory)")
    elif isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    elif isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        text = e.args[0]
    else:
        text = str(e) or type(e).__name__
    if isinstance(e, OverflowError):
        text = f"number too large: {text}"
    text = " ".join(text.split())
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE] + f" ... ({len(text) - MAX_MESSAGE} more characters)"
    return text


# The documented user-facing errors (printed as one line, exit 1): ValueError and its library
# subclasses (cfws_jax.io.OutputError, cfws_jax.data.DataError, converters' CheckpointError),
# OSError (file system: not found, permission, not a directory, ...), KeyError (unknown names),
# MemoryError and OverflowError (inputs declaring impossible sizes). Anything else is a bug and
# keeps its traceback.
USER_ERRORS = (ValueError, OSError, KeyError, MemoryError, OverflowError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:  # user-facing errors: one line, no traceback
        print(f"cfws-jax {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
