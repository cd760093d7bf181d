"""Training configuration: one flat dataclass, read from YAML, a Python call or the command line.

Flat on purpose: every setting is one line in the saved config.yaml and one `--option` of `sam-peft train`,
whose options and help are generated from these fields (`HfArgumentParser`, training/cli.py).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from transformers.hf_argparser import HfArg

from ..evaluation.options import EVAL_BEHAVIOURS
from ..models.options import HEADS, PRESETS
from ..names import did_you_mean
from ..prompts.options import BEHAVIOURS, MIN_PIXELS
from ..pruning.policy import BUDGETS, MAX_WEIGHT, ORGAN_FLOOR, STRATEGIES

LORA_PRESETS = tuple(PRESETS)


@dataclass
class TrainConfig:
    """Every training setting. Checked when made (types, ranges, combinations), so a bad value fails with
    its name before any work starts, whether it came from Python, a YAML file or the command line."""

    # `sam-peft train --help` lists the fields under this heading (HfArgumentParser's convention)
    _argument_group_name = "training settings (also read from the --config YAML; the command line wins)"

    # base model and adapter
    model: str = HfArg(default="litemedsam",
                       help="base model: litemedsam, a Hub id (facebook/sam-vit-base), an HF directory or a .pth file")
    lora_preset: Literal[LORA_PRESETS] = HfArg(default="decoder", help="which layers get LoRA adapters")
    lora_r: int = HfArg(default=8, help="LoRA rank")
    lora_alpha: float | None = HfArg(default=None, help="LoRA scaling alpha (none: 2 x lora_r)")
    lora_dropout: float = HfArg(default=0.0, help="dropout on the LoRA path, in [0, 1)")
    train_heads: list[str] = HfArg(default_factory=lambda: ["iou", "hypernetworks"],
                                   help=f"decoder heads trained in full besides LoRA: any of {', '.join(HEADS)}")
    frozen_encoder: bool = HfArg(default=True, help="cache image embeddings once and train the decoder on them "
                                 "(needs lora_preset decoder)")
    # data
    data: str | None = HfArg(default=None, help="prepared dataset folder (sam-peft prepare), Hub dataset id, "
                             "or none for the built-in CT phantom")
    phantom_cases: int = HfArg(default=8, help="phantom CT cases generated when data is none")
    train_split: str = HfArg(default="train", help="dataset split to train on")
    val_split: str = HfArg(default="validation", help="dataset split to validate on")
    # PHPG
    behaviours: dict[str, float] | None = HfArg(
        default=None, help="simulated-user prompt mixture as a YAML mapping {name: weight}, e.g. '{tight_box: 1, "
        f"center_click: 1}}' (none: all equally); names: {', '.join(BEHAVIOURS)}")
    rounds: int = HfArg(default=3, help="PHPG rounds per step: the first prompt, then error-guided clicks")
    max_regions: int | None = HfArg(default=None, help="organs decoded per slice, sampled (none: all)")
    min_pixels: int = HfArg(default=MIN_PIXELS, help="pixels an organ needs on a slice to be prompted (raised to "
                            "the dataset's prepare threshold when that is higher)")
    # distillation from the frozen base (training/distill.py)
    distill_weight: float = HfArg(default=0.0, help="weight of the loss that keeps the base's masks for random "
                                  "boxes (the base, adapters off, is the teacher; 0: off)")
    distill_boxes: int = HfArg(default=4, help="random boxes per slice for distill_weight")
    # CBDP
    pruning: Literal[STRATEGIES] = HfArg(default="cbdp", help="data pruning: cbdp (class-balanced), infobatch, "
                                         "random or none")
    prune_ratio: float = HfArg(default=0.5, help="share pruned per epoch, in [0, 1)")
    prune_budget: Literal[BUDGETS] = HfArg(default="pool", help="prune_ratio of the well-learned slices (pool) or "
                                           "of all slices (dataset, the paper's budget)")
    anneal: float = HfArg(default=0.875, help="fraction of the epochs that prune; the rest see all data")
    prune_ema: float = HfArg(default=0.5, help="cbdp: weight of the old value in the EMA of region scores and "
                             "organ losses, in [0, 1) (0: the latest epoch only)")
    prune_warm_start: bool = HfArg(default=True, help="score every slice once (no gradients, one round) before "
                                   "epoch 0, so epoch 0 prunes too (cbdp, infobatch)")
    prune_organ_floor: float = HfArg(default=ORGAN_FLOOR, help="cbdp: least organ factor (an organ's loss over "
                                     "the mean organ's) in a slice's keep probability, in (0, 1]")
    prune_max_weight: float = HfArg(default=MAX_WEIGHT, help="largest loss weight of a kept slice (1 / its keep "
                                    "probability), > 1")
    # optimisation
    epochs: int = HfArg(default=10, help="passes over the training data")
    max_steps: int | None = HfArg(default=None, help="stop after this many optimizer steps (none: run all epochs)")
    batch_size: int = HfArg(default=8, help="slices per micro-batch on each process")
    grad_accum: int = HfArg(default=1, help="micro-batches per optimizer step")
    lr: float = HfArg(default=5e-4, help="peak learning rate (AdamW)")
    weight_decay: float = HfArg(default=0.01, help="AdamW weight decay")
    warmup_ratio: float = HfArg(default=0.05, help="fraction of training with a linear warmup, in [0, 1)")
    schedule: Literal["cosine", "poly", "constant"] = HfArg(default="cosine", help="learning-rate decay after warmup")
    max_grad_norm: float = HfArg(default=1.0, help="gradient clipping norm (0: no clipping)")
    mixed_precision: Literal["no", "fp16", "bf16"] = HfArg(default="no", help="autocast precision (bf16 on GPUs)")
    seed: int = HfArg(default=0, help="seed for data order, prompts and initialisation")
    num_workers: int = HfArg(default=0, help="DataLoader worker processes")
    # validation, checkpoints, logging
    eval_behaviours: list[str] = HfArg(default_factory=lambda: ["tight_box", "jitter_box", "center_click"],
                                       help="behaviours scored at validation (see sam-peft evaluate --behaviours)")
    eval_every: int = HfArg(default=1, help="validate every this many epochs (and after the last)")
    checkpoint_every: int = HfArg(default=0, help="checkpoint every this many optimizer steps (0: once per epoch)")
    keep_checkpoints: int = HfArg(default=2, help="newest checkpoints kept on disk")
    log_with: str | None = HfArg(default="tensorboard", help="accelerate tracker (tensorboard, wandb, ...; none: off)")
    output_dir: str = HfArg(default="runs/sam_peft", help="run folder: config, checkpoints, adapters, metrics")
    cache_dir: str | None = HfArg(default=None, help="embedding cache folder (none: .embedding_cache beside "
                                  "output_dir; delete it to free the space)")

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, values: Mapping) -> "TrainConfig":
        """Settings from a mapping (YAML, JSON); unknown keys get a did-you-mean hint."""
        return cls(**cls.check_settings(values))

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: Mapping | None = None) -> "TrainConfig":
        """Settings from a YAML file, with `overrides` winning."""
        values = read_yaml(path) if path is not None else {}
        return cls.from_dict({**values, **(overrides or {})})

    @classmethod
    def check_settings(cls, values: Mapping, source: str | None = None) -> dict:
        """`values` with each setting's type checked (numbers written as strings converted), before merging
        them with settings from elsewhere; errors name the setting and `source` (e.g. the config file)."""
        prefix = f"{source}: " if source else ""
        hints = _type_hints(cls)
        unknown = [key for key in values if key not in hints]
        if unknown:
            named = ", ".join(f"{key!r}{did_you_mean(str(key), hints)}" for key in unknown)
            raise ValueError(f"{prefix}unknown settings: {named}")
        try:
            return {key: _typed(key, value, hints[key]) for key, value in values.items()}
        except ValueError as err:
            raise ValueError(f"{prefix}{err}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Reject wrong types and inconsistent settings before any work starts, naming the setting.

        Also converts numbers written as strings (YAML 1.1 reads `1e-4` as one), so a config edited after
        construction is checked again when `train` starts."""
        for key, value in self.check_settings(self.to_dict()).items():
            setattr(self, key, value)
        checks = [
            (self.lora_r >= 1, f"lora_r must be >= 1, got {self.lora_r}"),
            (self.lora_alpha is None or self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}"),
            (all(h in HEADS for h in self.train_heads),
             f"train_heads must be names from {sorted(HEADS)}, got {self.train_heads}"),
            (not self.frozen_encoder or self.lora_preset == "decoder",
             f"frozen_encoder caches image embeddings, so it needs lora_preset 'decoder' (got {self.lora_preset!r}); "
             "set frozen_encoder: false to train encoder adapters"),
            (self.phantom_cases >= 2, f"phantom_cases must be >= 2 (one validates), got {self.phantom_cases}"),
            (self.behaviours is None or (self.behaviours and all(b in BEHAVIOURS for b in self.behaviours)),
             f"behaviours must be a mapping of names from {BEHAVIOURS}, got {self.behaviours}"),
            (self.behaviours is None or (self.behaviours and min(self.behaviours.values()) >= 0
                                         and sum(self.behaviours.values()) > 0),
             f"behaviours weights must be >= 0 with a positive sum, got {self.behaviours}"),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.distill_weight >= 0, f"distill_weight must be >= 0 (0: off), got {self.distill_weight}"),
            (self.distill_boxes >= 1, f"distill_boxes must be >= 1, got {self.distill_boxes}"),
            (self.max_regions is None or self.max_regions >= 1, f"max_regions must be >= 1, got {self.max_regions}"),
            (self.min_pixels >= 1, f"min_pixels must be >= 1, got {self.min_pixels}"),
            (0 <= self.prune_ratio < 1, f"prune_ratio must be in [0, 1), got {self.prune_ratio}"),
            (0 <= self.anneal <= 1, f"anneal must be in [0, 1], got {self.anneal}"),
            (0 <= self.prune_ema < 1, f"prune_ema must be in [0, 1), got {self.prune_ema}"),
            (0 < self.prune_organ_floor <= 1, f"prune_organ_floor must be in (0, 1], got {self.prune_organ_floor}"),
            (self.prune_max_weight > 1, f"prune_max_weight must be > 1, got {self.prune_max_weight}"),
            (self.pruning != "infobatch" or self.prune_budget == "pool",
             "prune_budget 'dataset' does not apply to pruning infobatch (it drops prune_ratio of its below-mean "
             "pool); use prune_budget: pool"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1,
             f"max_steps must be >= 1 (or none to run all epochs), got {self.max_steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.eval_behaviours and all(b in EVAL_BEHAVIOURS for b in self.eval_behaviours),
             f"eval_behaviours must be one or more of {EVAL_BEHAVIOURS}, got {self.eval_behaviours}"),
            (self.eval_every >= 1, f"eval_every must be >= 1 (epochs), got {self.eval_every}"),
            (self.checkpoint_every >= 0,
             f"checkpoint_every must be >= 0 (0: once per epoch), got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (bool(self.output_dir), "output_dir must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        pruned_epochs = math.ceil(self.anneal * self.epochs)  # epochs e < anneal * epochs prune
        scored_first = self.prune_warm_start or self.pruning == "random"
        if self.pruning != "none" and self.prune_ratio > 0 and pruned_epochs < (1 if scored_first else 2):
            raise ValueError(
                f"pruning={self.pruning!r} with epochs={self.epochs} and anneal={self.anneal} leaves "
                f"{pruned_epochs} epoch(s) before annealing"
                + ("" if scored_first else " and without prune_warm_start the first epoch only scores samples")
                + ", so nothing would be pruned. Raise epochs or anneal, or set pruning: none"
            )


def read_yaml(path: str | Path) -> dict:
    """The settings mapping of a YAML config file, keys and types checked; errors name the file."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"config file {path}: cannot be read ({err})") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ValueError(f"config file {path}: not valid YAML ({where}{getattr(err, 'problem', None) or err})") from err
    if not isinstance(values, dict):
        raise ValueError(f"config file {path}: expected a mapping of settings, got {type(values).__name__}")
    return TrainConfig.check_settings(values, source=f"config file {path}")


@functools.cache
def _type_hints(cls: type) -> dict[str, typing.Any]:
    """Field name -> resolved annotation (read from the class, which HfArgumentParser leaves intact)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _typed(name: str, value, hint):
    """`value` as annotation `hint` asks, or a ValueError naming `name`. Numbers written as strings are
    converted (YAML 1.1 reads `1e-4` as a string), and paths become strings."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        return None if value is None else _typed(name, value, next(a for a in args if a is not type(None)))
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{name} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return [_typed(name, item, args[0]) for item in value]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} must be a mapping such as {{tight_box: 1, center_click: 1}}, got {value!r}")
        return {_typed(name, k, args[0]): _typed(name, v, args[1]) for k, v in value.items()}
    if hint is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if hint in (int, float) and isinstance(value, str):
        try:
            value = hint(value)  # then checked as a number below
        except ValueError:
            pass
    number = numbers.Integral if hint is int else numbers.Real
    if hint in (int, float) and isinstance(value, number) and not isinstance(value, bool):
        return _finite(name, hint(value))
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise ValueError(f"{name} must be {_KINDS[hint]}, got {value!r}")
    return value


def _finite(name: str, value):
    """inf and nan pass every range check (`inf > 0`) and then train NaN weights: refused by name."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value
