"""The `sam-peft` command: a thin layer over the Python API (one subcommand per job).

Every failure a user can cause (bad input, an unreadable file, Ctrl-C) ends in one line on stderr: exit
status 2 for errors, 130 for an interrupt. Anything else is a bug and keeps its traceback.

`sam-peft --help`, `--version` and a mistyped command answer at once: this module imports nothing heavy,
and a subcommand's module (torch, transformers...) is imported only once the command line names it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# name -> (module defining add_<name>_parser and run_<name>, one-line help for `sam-peft --help`)
COMMANDS = {
    "demo": ("sam_peft.cli", "offline demo on phantom CT: LiteMedSAM zero-shot, with the bundled adapter "
             "and fine-tuned (CPU, no download)"),
    "prepare": ("sam_peft.data.cli", "medical volumes -> a Hugging Face dataset of 2D slices"),
    "phantom": ("sam_peft.data.cli", "write synthetic abdominal CT phantoms (NIfTI, FLARE22 labels)"),
    "train": ("sam_peft.training.cli", "fine-tune LoRA adapters with PHPG prompts and CBDP pruning (accelerate); "
              "`sam-peft train --help` lists every setting"),
    "evaluate": ("sam_peft.evaluation.cli", "Dice / NSD / NoC with simulated users on a prepared "
                 "dataset"),
    "predict": ("sam_peft.evaluation.cli", "segment a NIfTI / DICOM volume from prompts into a label NIfTI"),
    "push": ("sam_peft.training.cli", "upload a run's adapter and model card to the Hugging Face Hub, or write "
             "them to a folder (--to-folder)"),
    "app": ("sam_peft.app.cli", "interactive web app: click organs on a CT, propagate, export labels (needs the "
            "app extra)"),
    "challenge": ("sam_peft.cvpr25.cli", "one step of the CVPR 2025 interactive 3D challenge (its predict.sh "
                  "contract: 3D boxes, then corrective clicks)"),
    "challenge-cases": ("sam_peft.cvpr25.cli", "write labelled volumes as CVPR 2025 challenge cases (.npz)"),
}


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", description="Generate 3 synthetic CT cases, evaluate LiteMedSAM zero-shot and with the bundled "
        "adapter, fine-tune decoder LoRA with PHPG prompts for 3 epochs, and print Dice per simulated user "
        "behaviour for each. Needs no download and no GPU.",
    )
    parser.add_argument("--output", default="runs/demo", help="folder for the phantom dataset, the embedding "
                        "cache and the run (adapter in OUTPUT/run/adapter); a previous demo there is replaced "
                        "(default: runs/demo)")
    return parser


def run_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo as demo

    demo(args.output)


def build_parser() -> argparse.ArgumentParser:
    """The top level: every command by name and help, without importing any command's module."""
    parser = argparse.ArgumentParser(prog="sam-peft", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)  # its own options: `command_parser`
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The full parser of one command (importing its module), prog `sam-peft NAME`."""
    parser = argparse.ArgumentParser(prog="sam-peft")
    add = getattr(importlib.import_module(COMMANDS[name][0]), f"add_{_python_name(name)}_parser")
    return add(parser.add_subparsers(dest="command"))


def _python_name(command: str) -> str:
    return command.replace("-", "_")


def _run(command: str, argv: list[str]) -> None:
    module = importlib.import_module(COMMANDS[command][0])
    run = getattr(module, f"run_{_python_name(command)}")
    if command == "train":
        run(argv)  # train's option defaults come from its --config: it parses its own options
    else:
        run(command_parser(command).parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    prefix = f"sam-peft {args.command}"
    try:
        from .io import UNREADABLE, UNREADABLE_FIX
        from .memory import return_large_blocks

        return_large_blocks()  # freed activations go back to the OS instead of fragmenting the heap
        try:
            _run(args.command, rest)
        except UNREADABLE as err:  # before ValueError: some of these are ValueErrors without the file's name
            print(f"{prefix}: error: a file cannot be read ({type(err).__name__}: {err}); {UNREADABLE_FIX}",
                  file=sys.stderr)
            return 2
    except KeyboardInterrupt:  # also while torch & co. are still importing
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        print(f"{prefix}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
