"""Training: the PHPG recipe and step, the accelerate trainer, its config, the embedding cache and Hub sharing.

Names import their module on first use (`sam-peft train --help` and `push` need no torch to start)."""
from __future__ import annotations

import typing

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "TrainConfig": ".config", "push_to_hub": ".hub", "write_model_card": ".hub", "export_adapter": ".hub",
    "PHPGRecipe": ".recipe", "PHPGStep": ".step", "StepOutput": ".step", "phpg_forward": ".step",
    "train": ".trainer", "PHPGTrainer": ".hf_trainer", "score_before_training": ".warm_start",
})

if typing.TYPE_CHECKING:
    from .config import TrainConfig
    from .hf_trainer import PHPGTrainer
    from .hub import export_adapter, push_to_hub, write_model_card
    from .recipe import PHPGRecipe
    from .step import PHPGStep, StepOutput, phpg_forward
    from .trainer import train
    from .warm_start import score_before_training
