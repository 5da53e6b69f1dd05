"""The `glide-hf` command: parses the subcommand and hands the rest of the command line to the module that owns it.

Each subcommand's module exposes `run_cli(argv: list[str], prog: str) -> int`, parses its own flags and imports its
heavy dependencies itself, so `glide-hf --help` stays fast. A `GlideError` is printed as one line and exits 1;
other errors keep their traceback.
"""

import argparse
import importlib
import sys

from .errors import GlideError

# subcommand -> (module that runs it, one-line help)
COMMANDS = {
    "train": ("glide_hf.trainer", "train a GLIDE draft for a target (Trainer, LongSpec recipe)"),
    "distill-data": ("glide_hf.distill", "regenerate training responses with the target (self-distillation)"),
    "convert-longspec": ("glide_hf.convert", "convert a LongSpec draft checkpoint to a glide-hf draft"),
    "bench": ("glide_hf.bench", "measure acceptance and speed of a (target, draft) pair on a prompts file"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="glide-hf",
        description="GLIDE speculative decoding for Hugging Face Transformers.",
        epilog="Run `glide-hf COMMAND --help` for the flags of a command.",
    )
    parser.add_argument(
        "command", choices=sorted(COMMANDS), metavar="COMMAND",
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


if __name__ == "__main__":
    raise SystemExit(main())
