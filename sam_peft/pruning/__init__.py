"""Dynamic data pruning for training: the CBDP sampler and its baselines."""
from .cbdp import BUDGETS, ORGAN_CAPS, STRATEGIES, CBDPSampler

__all__ = ["BUDGETS", "ORGAN_CAPS", "STRATEGIES", "CBDPSampler"]
