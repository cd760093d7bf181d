"""Training: the PHPG recipe and step, the accelerate trainer, its config, the embedding cache and Hub sharing."""
from .config import TrainConfig
from .hub import push_to_hub, write_model_card
from .recipe import PHPGRecipe
from .step import PHPGStep, StepOutput, phpg_forward
from .trainer import train

__all__ = ["PHPGRecipe", "PHPGStep", "StepOutput", "TrainConfig", "phpg_forward", "push_to_hub", "train",
           "write_model_card"]
