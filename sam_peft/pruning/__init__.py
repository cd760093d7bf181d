"""Dynamic data pruning for training: the CBDP sampler and its baselines."""
from .cbdp import BUDGETS, STRATEGIES, CBDPSampler
from .policy import MAX_WEIGHT, ORGAN_FLOOR

__all__ = ["BUDGETS", "MAX_WEIGHT", "ORGAN_FLOOR", "STRATEGIES", "CBDPSampler"]
