"""`python -m sam_peft.cvpr25 challenge | challenge-cases | evaluate`: the challenge commands on their own (the
container's entry point, and usable before `sam-peft` registers them)."""
from __future__ import annotations

import argparse
import sys

from .cli import (
    add_cases_parser,
    add_challenge_parser,
    add_protocol_arguments,
    run_cases,
    run_challenge,
    run_protocol,
)


def _add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    from ..evaluation.cli import add_model_arguments

    parser = subparsers.add_parser("evaluate", help="score a model under the CVPR 2025 protocol")
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="folder of challenge .npz cases")
    parser.add_argument("--output", required=True, help="folder for metrics.csv, metrics.json and the plot")
    add_protocol_arguments(parser)
    parser.set_defaults(protocol="cvpr25")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sam_peft.cvpr25", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add, run in ((add_challenge_parser, run_challenge), (add_cases_parser, run_cases),
                     (_add_evaluate_parser, run_protocol)):
        add(sub).set_defaults(run=run)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print(f"sam-peft {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        print(f"sam-peft {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
