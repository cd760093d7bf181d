"""sam_peft: LoRA fine-tuning of SAM for interactive multi-organ medical image segmentation.

Data path: `data.prepare` (volumes -> slice datasets) -> `PHPGCollator` (simulated-human prompts) ->
`CBDPSampler` (class-balanced dynamic pruning) -> `train` (accelerate over a `PHPGRecipe`; `PHPGTrainer` for
transformers.Trainer users) -> `evaluate` /
`MultiOrganPredictor` / `predict_volume`.

`import sam_peft` is light: each public name imports its module (torch, transformers, peft...) on first use
(PEP 562), so a host project or `sam-peft --help` pays only for what it touches.
"""
from __future__ import annotations

import typing

from ._lazy import lazy_exports

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    **dict.fromkeys(["load_prepared", "phantom_dataset", "prepare"], ".data"),
    **dict.fromkeys(["MultiOrganPredictor", "evaluate", "predict_volume"], ".evaluation"),
    **dict.fromkeys(["DEFAULT_ADAPTER", "PRESETS", "apply_lora", "default_adapter_for", "load_adapter",
                     "load_base_model", "processor_for", "save_adapter"], ".models"),
    **dict.fromkeys(["BEHAVIOURS", "PHPGCollator", "next_clicks"], ".prompts"),
    "CBDPSampler": ".pruning",
    **dict.fromkeys(["PHPGRecipe", "PHPGStep", "PHPGTrainer", "TrainConfig", "export_adapter", "phpg_forward",
                     "push_to_hub", "train"], ".training"),
})

if typing.TYPE_CHECKING:  # static analysers and IDEs see the real objects
    from .data import load_prepared, phantom_dataset, prepare
    from .evaluation import MultiOrganPredictor, evaluate, predict_volume
    from .models import (DEFAULT_ADAPTER, PRESETS, apply_lora, default_adapter_for, load_adapter, load_base_model,
                         processor_for, save_adapter)
    from .prompts import BEHAVIOURS, PHPGCollator, next_clicks
    from .pruning import CBDPSampler
    from .training import (PHPGRecipe, PHPGStep, PHPGTrainer, TrainConfig, export_adapter, phpg_forward, push_to_hub,
                           train)
