"""Evaluation with simulated users, interactive prediction, and volume inference."""
from .evaluate import EVAL_BEHAVIOURS, evaluate
from .metrics import clicks_to_reach, dice_counts, dice_from_counts, surface_dice
from .predictor import MultiOrganPredictor, Prediction
from .volume import predict_volume

__all__ = [
    "EVAL_BEHAVIOURS", "MultiOrganPredictor", "Prediction", "clicks_to_reach", "dice_counts", "dice_from_counts",
    "evaluate", "predict_volume", "surface_dice",
]
