"""sam_peft: LoRA fine-tuning of SAM for interactive multi-organ medical image segmentation.

Data path: `data.prepare` (volumes -> slice datasets) -> `PHPGCollator` (simulated-human prompts) ->
`CBDPSampler` (class-balanced dynamic pruning) -> `train` (accelerate, PHPG step) -> `evaluate` /
`MultiOrganPredictor` / `predict_volume`.
"""
from .data import load_prepared, phantom_dataset, prepare
from .evaluation import MultiOrganPredictor, evaluate, predict_volume
from .models import (
    DEFAULT_ADAPTER,
    PRESETS,
    apply_lora,
    default_adapter_for,
    load_adapter,
    load_base_model,
    processor_for,
    save_adapter,
)
from .prompts import BEHAVIOURS, PHPGCollator, next_clicks
from .pruning import CBDPSampler
from .training import PHPGStep, TrainConfig, phpg_forward, push_to_hub, train

__version__ = "0.1.0"
__all__ = [
    "BEHAVIOURS", "CBDPSampler", "DEFAULT_ADAPTER", "MultiOrganPredictor", "PHPGCollator", "PHPGStep", "PRESETS", "TrainConfig",
    "apply_lora", "default_adapter_for", "evaluate", "load_adapter", "load_base_model", "load_prepared", "next_clicks",
    "phantom_dataset", "phpg_forward", "predict_volume", "prepare", "processor_for", "push_to_hub", "save_adapter",
    "train",
]
