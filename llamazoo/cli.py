"""The `llamazoo` command: one entry point; each subcommand parses its arguments and calls one app.

Errors a user can fix (bad paths, keys, shapes) are raised as `UserError` or ValueError/FileNotFoundError/
KeyError and printed as one line; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

# name -> (module, help). Each module defines `add_arguments(parser)` and `run(args) -> int | None`.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("llamazoo.commands.models", "list the named model configs with parameter counts"),
    "convert": ("llamazoo.commands.convert", "convert a GGUF file (or a HF folder) into a HF checkpoint folder"),
    "generate": ("llamazoo.commands.generate", "generate text from prompts (streamed; latency report in output_dir/summary.txt)"),
    "chat": ("llamazoo.commands.chat", "interactive chat with the chat template, history and streaming"),
    "serve": ("llamazoo.commands.serve", "OpenAI-compatible HTTP server with continuous batching and a chat page"),
    "prepare": ("llamazoo.commands.prepare", "jsonl/txt -> packed, split, balanced HDF5 dataset (generative_data_prep's pipeline)"),
    "data_prep": ("llamazoo.commands.prepare", "one jsonl/txt file -> one packed .hdf5 file (generative_data_prep's data_prep)"),
    "inspect-data": ("llamazoo.commands.inspect_data", "show a packed HDF5 dataset: shapes, token types, decoded rows"),
    "train": ("llamazoo.commands.train", "fine-tune or pre-train on a prepared HDF5 dataset (the original's training app)"),
    "plan": ("llamazoo.commands.plan", "per-device memory of a training/generation layout, and the smallest that fits"),
    "merge": ("llamazoo.commands.merge", "merge a LoRA adapter (PEFT format) into its base model: a full HF folder"),
    "eval": ("llamazoo.commands.eval", "perplexity of text or prepared data; lm-evaluation-harness tasks"),
}


class UserError(Exception):
    """An error in the user's input: printed as one line, no traceback."""


USER_ERRORS = (UserError, ValueError, FileNotFoundError, KeyError, FileExistsError, NotADirectoryError,
               PermissionError, IsADirectoryError)


def add_config_arguments(parser: argparse.ArgumentParser, schema, sections: str, example: str) -> None:
    """The arguments of every config-driven app: `--config FILE` and `section.key=value` overrides,
    with the schema's keys listed in --help."""
    from llamazoo.config import allowed_keys

    parser.epilog = "keys: " + ", ".join(allowed_keys(schema))
    parser.add_argument("--config", metavar="FILE", help=f"YAML file with {sections} sections")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help=f"e.g. {example}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Only the chosen subcommand's module is imported: startup stays fast and one app's import
    problem cannot break the others."""
    import importlib

    parser = argparse.ArgumentParser(prog="llamazoo", description="An open, PyTorch-native Llama model zoo.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks")
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    run: Callable = importlib.import_module(args._module).run
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if args.debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"llamazoo {args.command}: error: {msg}", file=sys.stderr)
        return 1


def entry() -> None:
    """The console script and `python -m llamazoo`: a torchrun rank ends through the distributed exit path
    (see llamazoo.distributed.mesh.exit_process); anything else exits normally. torch is not imported here.
    A torchrun rank also ends with its torchrun (a killed launcher must not leave ranks running)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        from llamazoo.io.lifetime import end_with_parent

        end_with_parent(os.getppid(), kernel=False)  # torchrun's starting thread may end before it does
    code = main()
    if "llamazoo.distributed.mesh" in sys.modules:
        from llamazoo.distributed.mesh import exit_process

        exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
