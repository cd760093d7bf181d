"""The `sam-peft` command: a thin layer over the Python API (one subcommand per job)."""
from __future__ import annotations

import argparse
import sys

from .data.cli import add_phantom_parser, add_prepare_parser, run_phantom, run_prepare
from .evaluation.cli import add_evaluate_parser, add_predict_parser, run_evaluate, run_predict
from .training.cli import add_push_parser, add_train_parser, run_push, run_train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam-peft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline demo: zero-shot vs fine-tuned LiteMedSAM on phantom CT (~5 min CPU)")
    demo.add_argument("--output", default="runs/demo")
    add_prepare_parser(sub)
    add_phantom_parser(sub)
    add_train_parser(sub)
    add_evaluate_parser(sub)
    add_predict_parser(sub)
    add_push_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.output)
        elif args.command == "train":
            run_train(args, extra)
        else:
            {"prepare": run_prepare, "phantom": run_phantom, "evaluate": run_evaluate, "predict": run_predict,
             "push": run_push}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"sam-peft {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
