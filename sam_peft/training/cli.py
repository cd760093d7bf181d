"""`sam-peft train` and `sam-peft push`: argument parsers and runners, wired in by sam_peft/cli.py."""
from __future__ import annotations

import argparse

import yaml

from .config import TrainConfig
from .hub import push_to_hub
from .trainer import train


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="fine-tune LoRA adapters with PHPG prompts and CBDP pruning (accelerate)",
        description="Train from a YAML config; any setting can be overridden as --key value (e.g. --lr 1e-4 "
        "--behaviours '{tight_box: 1, center_click: 1}'). Runs under `accelerate launch` as is.",
    )
    parser.add_argument("--config", help="YAML file of TrainConfig settings")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous run in output_dir")
    return parser


def parse_overrides(extra: list[str]) -> dict:
    """['--lr', '1e-4', '--frozen-encoder', 'false'] -> {'lr': 0.0001, 'frozen_encoder': False} (YAML values)."""
    overrides, key = {}, None
    for token in extra:
        if token.startswith("--"):
            if key is not None:
                overrides[key] = True
            key = token[2:].replace("-", "_")
        elif key is None:
            raise ValueError(f"unexpected argument {token!r}: overrides are --key value pairs")
        else:
            overrides[key] = yaml.safe_load(token)
            key = None
    if key is not None:
        overrides[key] = True
    return overrides


def run_train(args: argparse.Namespace, extra: list[str]) -> None:
    config = TrainConfig.from_yaml(args.config, parse_overrides(extra))
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    if result:
        print(f"best validation Dice {result['best_val_dice']:.4f}; adapter in {config.output_dir}/adapter")


def add_push_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("push", help="upload a run's adapter and model card to the Hugging Face Hub")
    parser.add_argument("run_dir")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", help="Hub token (default: the logged-in user's)")
    return parser


def run_push(args: argparse.Namespace) -> None:
    print(push_to_hub(args.run_dir, args.repo_id, token=args.token, private=args.private))
