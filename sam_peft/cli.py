"""The `sam-peft` command: a thin layer over the Python API (one subcommand per job).

Every failure a user can cause (bad input, an unreadable file, Ctrl-C) ends in one line on stderr: exit
status 2 for errors, 130 for an interrupt. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys

from .app.cli import add_app_parser, run_app
from .data.cli import add_phantom_parser, add_prepare_parser, run_phantom, run_prepare
from .evaluation.cli import add_evaluate_parser, add_predict_parser, run_evaluate, run_predict
from .io import UNREADABLE, UNREADABLE_FIX
from .memory import return_large_blocks
from .training.cli import add_push_parser, add_train_parser, run_push, run_train


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="offline demo: zero-shot vs fine-tuned LiteMedSAM on phantom CT (~5 min CPU)",
        description="Generate 3 synthetic CT cases, evaluate LiteMedSAM zero-shot, fine-tune decoder LoRA with "
        "PHPG prompts for 3 epochs, and print Dice per simulated user behaviour before and after. Needs no "
        "download and no GPU.",
    )
    parser.add_argument("--output", default="runs/demo", help="folder for the phantom dataset, the embedding "
                        "cache and the run (adapter in OUTPUT/run/adapter); a previous demo there is replaced "
                        "(default: runs/demo)")
    return parser


def run_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo as demo

    demo(args.output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam-peft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add, run in ((add_demo_parser, run_demo), (add_prepare_parser, run_prepare),
                     (add_phantom_parser, run_phantom), (add_train_parser, run_train),
                     (add_evaluate_parser, run_evaluate), (add_predict_parser, run_predict),
                     (add_push_parser, run_push), (add_app_parser, run_app)):
        add(sub).set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    return_large_blocks()  # freed activations go back to the OS instead of fragmenting the heap
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    prefix = f"sam-peft {args.command}"
    try:
        args.run(rest if args.command == "train" else args)  # train's option defaults come from its --config
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except UNREADABLE as err:  # before ValueError: some of these are ValueErrors without the file's name
        print(f"{prefix}: error: a file cannot be read ({type(err).__name__}: {err}); {UNREADABLE_FIX}",
              file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        print(f"{prefix}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
