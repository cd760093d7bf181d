"""Training configuration: one flat dataclass, loaded from YAML with `--key value` overrides.

Flat on purpose: every setting is one `--key` on the command line and one line in the saved config.yaml.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..prompts.behaviours import BEHAVIOURS
from ..pruning import BUDGETS, STRATEGIES


@dataclass
class TrainConfig:
    # base model and adapter
    model: str = "litemedsam"
    lora_preset: str = "decoder"
    lora_r: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    train_heads: list[str] = field(default_factory=lambda: ["iou", "hypernetworks"])
    frozen_encoder: bool = True  # cache image embeddings once; only valid with the "decoder" preset
    # data: a prepared dataset directory, a Hub dataset id, or None for the built-in phantom
    data: str | None = None
    phantom_cases: int = 8
    train_split: str = "train"
    val_split: str = "validation"
    # PHPG
    behaviours: dict[str, float] | None = None  # None: every simulated behaviour, equal weights
    rounds: int = 3
    max_regions: int | None = None
    min_pixels: int = 10
    # CBDP
    pruning: str = "cbdp"
    prune_ratio: float = 0.5
    prune_budget: str = "pool"  # prune_ratio of the well-learned samples, or of the "dataset" (the paper's budget)
    anneal: float = 0.875
    # optimisation
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    num_workers: int = 0
    # validation, checkpoints, logging
    eval_behaviours: list[str] = field(default_factory=lambda: ["tight_box", "jitter_box", "center_click"])
    eval_every: int = 1  # epochs
    checkpoint_every: int = 0  # steps; 0 = once per epoch
    keep_checkpoints: int = 2
    log_with: str | None = "tensorboard"
    output_dir: str = "runs/sam_peft"
    cache_dir: str | None = None  # embedding cache; default <output_dir>/../.embedding_cache

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in known]
        if unknown:
            hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else "")
                     for k in unknown]
            raise ValueError(f"unknown config keys: {', '.join(hints)}")
        config = cls(**{key: _number(key, value, cls.__dataclass_fields__[key].type) for key, value in values.items()})
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: dict | None = None) -> "TrainConfig":
        values = {}
        if path is not None:
            try:
                values = yaml.safe_load(Path(path).read_text()) or {}
            except (OSError, yaml.YAMLError) as err:
                raise ValueError(f"config file {path}: cannot be read as YAML ({err})") from err
            if not isinstance(values, dict):
                raise ValueError(f"config file {path}: expected a mapping of settings, got {type(values).__name__}")
        return cls.from_dict({**values, **(overrides or {})})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Reject inconsistent settings before any work starts."""
        from ..models.lora import PRESETS

        checks = [
            (self.lora_preset in PRESETS, f"lora_preset must be one of {sorted(PRESETS)}, got {self.lora_preset!r}"),
            (not self.frozen_encoder or self.lora_preset == "decoder",
             f"frozen_encoder caches image embeddings, so it needs lora_preset 'decoder' (got {self.lora_preset!r}); "
             "set frozen_encoder: false to train encoder adapters"),
            (self.pruning in STRATEGIES, f"pruning must be one of {STRATEGIES}, got {self.pruning!r}"),
            (0 <= self.prune_ratio < 1, f"prune_ratio must be in [0, 1), got {self.prune_ratio}"),
            (self.prune_budget in BUDGETS, f"prune_budget must be one of {BUDGETS}, got {self.prune_budget!r}"),
            (0 <= self.anneal <= 1, f"anneal must be in [0, 1], got {self.anneal}"),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.schedule in ("cosine", "poly", "constant"), f"schedule must be cosine, poly or constant, got {self.schedule!r}"),
            (self.mixed_precision in ("no", "fp16", "bf16"), f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}"),
            (self.behaviours is None or all(b in BEHAVIOURS for b in self.behaviours),
             f"behaviours must be a mapping of names from {BEHAVIOURS}, got {self.behaviours}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        pruned_epochs = int(self.anneal * self.epochs)
        if self.pruning != "none" and self.prune_ratio > 0 and pruned_epochs < 2:
            raise ValueError(
                f"pruning={self.pruning!r} with epochs={self.epochs} and anneal={self.anneal} leaves "
                f"{pruned_epochs} epoch(s) before annealing: the first epoch only scores samples, so nothing "
                "would be pruned. Raise epochs or anneal, or set pruning: none"
            )


def _number(key: str, value, annotation: str):
    """YAML 1.1 reads `1e-4` as a string: coerce strings for numeric settings, with a clear error."""
    numeric = any(t in annotation for t in ("float", "int")) and "dict" not in annotation
    if numeric and isinstance(value, bool):  # a bare `--lr` on the command line
        raise ValueError(f"config key {key!r}: expected a number, got {value!r}")
    if not isinstance(value, str) or not numeric:
        return value
    try:
        return float(value) if "float" in annotation else int(value)
    except ValueError:
        raise ValueError(f"config key {key!r}: expected a number, got {value!r}") from None
