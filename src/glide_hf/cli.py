"""The `glide-hf` command: parses the subcommand and hands the rest of the command line to the module that owns it.

Each subcommand's module exposes `run_cli(argv: list[str], prog: str) -> int`, parses its own flags and imports its
heavy dependencies itself, so `glide-hf --help` stays fast. A `GlideError` is printed as one line and exits 1;
other errors keep their traceback. `cli_logging` is the one way a subcommand shows glide_hf's logs while it runs.
"""

import argparse
import importlib
import logging as pylogging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import GlideError

PACKAGE_LOGGER_NAME = "glide_hf"

# subcommand -> (module that runs it, one-line help)
COMMANDS = {
    "train": ("glide_hf.trainer", "train a GLIDE draft for a target (Trainer, LongSpec recipe)"),
    "distill-data": ("glide_hf.distill", "regenerate training responses with the target (self-distillation)"),
    "convert-longspec": ("glide_hf.convert", "convert a LongSpec draft checkpoint to a glide-hf draft"),
    "draft-vocab": ("glide_hf.draft_vocab", "choose the token ids the engine drafts over from your data"),
    "bench": ("glide_hf.bench", "measure acceptance and speed of a (target, draft) pair on a prompts file"),
}


@contextmanager
def cli_logging(level: int = pylogging.INFO) -> Iterator[None]:
    """Show glide_hf's logs on stderr at `level` while a command runs, then restore the package logger as it was.

    Only the `glide_hf` logger changes: Transformers and other libraries keep their own verbosity.

    Args:
        level (`int`, *optional*, defaults to `logging.INFO`):
            Level of the `glide_hf` logger for the duration (`glide-hf train` passes the Trainer's level of this
            process).
    """
    package_logger = pylogging.getLogger(PACKAGE_LOGGER_NAME)
    handler = pylogging.StreamHandler(sys.stderr)
    handler.setFormatter(pylogging.Formatter("[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S"))
    previous = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(level)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="glide-hf",
        description="GLIDE speculative decoding for Hugging Face Transformers.",
        epilog="Run `glide-hf COMMAND --help` for the flags of a command.",
    )
    parser.add_argument(
        "command",
        choices=sorted(COMMANDS),
        metavar="COMMAND",
        help="; ".join(f"{name}: {text}" for name, (_, text) in COMMANDS.items()),
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    namespace = parser.parse_args(argv)
    module_name, _ = COMMANDS[namespace.command]
    module = importlib.import_module(module_name)
    prog = f"glide-hf {namespace.command}"
    try:
        return module.run_cli(namespace.args, prog=prog)
    except GlideError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a path that does not exist or cannot be written, a model or tokenizer not found
        print(f"{prog}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


__all__ = ["cli_logging", "main"]


if __name__ == "__main__":
    raise SystemExit(main())
