"""Dynamic data pruning for training: the CBDP sampler and its baselines."""
from .cbdp import STRATEGIES, CBDPSampler

__all__ = ["STRATEGIES", "CBDPSampler"]
