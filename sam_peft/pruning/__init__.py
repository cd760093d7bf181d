"""Dynamic data pruning for training: the CBDP sampler and its baselines."""
from .cbdp import BUDGETS, STRATEGIES, CBDPSampler

__all__ = ["BUDGETS", "STRATEGIES", "CBDPSampler"]
