"""Evaluation with simulated users, interactive prediction, and volume inference.

Names import their module on first use (`sam-peft evaluate --help` needs no torch to start)."""
from __future__ import annotations

import typing

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "evaluate": ".evaluate",
    **dict.fromkeys(["clicks_to_reach", "dice_counts", "dice_from_counts", "surface_dice"], ".metrics"),
    "EVAL_BEHAVIOURS": ".options",
    **dict.fromkeys(["MultiOrganPredictor", "Prediction"], ".predictor"),
    "predict_volume": ".volume",
})

if typing.TYPE_CHECKING:
    from .evaluate import evaluate
    from .metrics import clicks_to_reach, dice_counts, dice_from_counts, surface_dice
    from .options import EVAL_BEHAVIOURS
    from .predictor import MultiOrganPredictor, Prediction
    from .volume import predict_volume
