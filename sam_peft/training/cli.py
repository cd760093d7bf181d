"""`sam-peft train` and `sam-peft push`: argument parsers and runners, wired in by sam_peft/cli.py.

`train`'s options are generated from the `TrainConfig` fields by transformers' `HfArgumentParser` (each
setting as `--name` or `--name-with-dashes`, its help from the field). Settings from a `--config` YAML file
become the defaults, so the command line wins over the file, which wins over the built-in defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

import yaml

from ..names import did_you_mean

if typing.TYPE_CHECKING:
    from transformers import HfArgumentParser

    from .config import TrainConfig

TRAIN_DESCRIPTION = (
    "Fine-tune LoRA adapters with PHPG prompts and CBDP pruning. Settings come from --config (YAML), then "
    "the options below; lists as --eval-behaviours tight_box center_click, mappings in YAML as --behaviours "
    "'{tight_box: 1, center_click: 1}', none for an empty optional setting. Runs under `accelerate launch -m "
    "sam_peft.cli train ...` as is."
)
NONE_WORDS = ("none", "null")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """The `train` entry of `sam-peft`: it only routes; `parse_train_args` reads the settings, because
    their defaults depend on the --config file."""
    return subparsers.add_parser("train", add_help=False)


def train_parser(prog: str = "sam-peft train") -> HfArgumentParser:
    """One option per `TrainConfig` field (an `HfArgumentParser`), plus --config, --resume and --overwrite."""
    from transformers import HfArgumentParser

    from .config import TrainConfig

    parser = HfArgumentParser(TrainConfig, prog=prog, description=TRAIN_DESCRIPTION, allow_abbrev=False,
                              usage=f"{prog} [--config YAML] [--resume] [--overwrite] [--SETTING VALUE ...]")
    parser.add_argument("--config", metavar="YAML", help="YAML file of settings (e.g. examples/flare22.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous run in output_dir")
    # HfArgumentParser gives these types to the optional and mapping settings: argparse converts with these
    parser.register("type", int, _or_none(int))
    parser.register("type", float, _or_none(float))
    parser.register("type", dict[str, float], _yaml_mapping)
    return parser


def parse_train_args(argv: list[str], prog: str = "sam-peft train") -> tuple[TrainConfig, argparse.Namespace]:
    """Command line -> (TrainConfig, namespace with config / resume / overwrite). Bad settings raise
    ValueError naming the setting (and the file); bad options end as argparse errors (exit 2)."""
    from .config import TrainConfig, read_yaml

    pre = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    config_file = pre.parse_known_args(argv)[0].config
    parser = train_parser(prog)
    if config_file is not None:
        parser.set_defaults(**read_yaml(config_file))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(_unknown_message(unknown))
    hints = typing.get_type_hints(TrainConfig)
    settings = {f.name: vars(args).pop(f.name) for f in dataclasses.fields(TrainConfig)}
    for name, value in settings.items():  # optional text settings: `--log-with none` turns logging off
        if hints[name] == str | None and isinstance(value, str) and value.lower() in NONE_WORDS:
            settings[name] = None
    return TrainConfig(**settings), args


def _unknown_message(unknown: list[str]) -> str:
    """'unrecognized argument --batchsize (did you mean --batch-size?)'."""
    from .config import TrainConfig

    token = unknown[0]
    if not token.startswith("--"):
        return f"unexpected argument {token!r}: settings are --name value (see --help)"
    option = "--" + token[2:].split("=")[0].replace("_", "-")
    names = [f.name for f in dataclasses.fields(TrainConfig)] + ["config", "resume", "overwrite"]
    hint = did_you_mean(option, ["--" + name.replace("_", "-") for name in names]) or " (see --help for the settings)"
    return f"unrecognized argument {token}{hint}"


def _or_none(kind: type):
    """An int/float option that also takes `none` (an optional setting left unset)."""
    def convert(text: str):
        return None if text.lower() in NONE_WORDS else kind(text)
    convert.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return convert


def _yaml_mapping(text: str) -> dict | None:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if value is not None and not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{tight_box: 1, center_click: 1}}', "
                                         f"got {text!r}")
    return value


def run_train(argv: list[str]) -> None:
    config, args = parse_train_args(argv)  # before the heavy imports: --help and bad options answer at once
    from accelerate.utils import is_tensorboard_available

    from .trainer import train

    if config.log_with == "tensorboard" and not is_tensorboard_available():  # accelerate would drop it silently
        print("sam-peft train: warning: tensorboard is not installed, so this run logs no training curves; "
              "pip install 'sam_peft[tensorboard]', or --log-with none to run without them", file=sys.stderr)
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    if result:
        print(f"best validation Dice {result['best_val_dice']:.4f}; adapter in {config.output_dir}/adapter")


def add_push_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "push", description="Upload RUN_DIR/adapter (LoRA weights, sam_peft.json, a model card naming --repo-id, "
        "preprocessor_config.json for SAM-style preprocessing) to a Hub model repository, creating it if needed. "
        "With --to-folder, write exactly those files to a new folder instead, with no network (upload it later "
        "with `hf upload REPO_ID DIR`). The run's own files are never changed.",
    )
    parser.add_argument("run_dir", help="run folder from `sam-peft train` (its output_dir, holding adapter/)")
    parser.add_argument("--repo-id", help="Hub repository to create or update, as owner/name (required unless "
                        "--to-folder; with it, the repository the card's usage lines load from)")
    parser.add_argument("--to-folder", metavar="DIR", help="write what would be uploaded to the new folder DIR "
                        "instead of uploading (offline)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", help="Hub token (default: the logged-in user's)")
    return parser


def run_push(args: argparse.Namespace) -> None:
    if not (args.repo_id or args.to_folder):
        raise ValueError("--repo-id is required to upload (or write the files to a folder with --to-folder DIR)")
    from .hub import export_adapter, push_to_hub

    if args.to_folder:
        folder = export_adapter(args.run_dir, args.to_folder, repo_id=args.repo_id)
        print(f"wrote the files to upload to {folder}" + (f"; upload them with `hf upload {args.repo_id} {folder}`"
                                                           if args.repo_id else ""))
    else:
        print(push_to_hub(args.run_dir, args.repo_id, token=args.token, private=args.private))
