"""Dynamic data pruning for training: the CBDP sampler and its baselines.

Names import their module on first use."""
from __future__ import annotations

import typing

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "CBDPSampler": ".cbdp",
    **dict.fromkeys(["BUDGETS", "MAX_WEIGHT", "ORGAN_FLOOR", "STRATEGIES"], ".policy"),
})

if typing.TYPE_CHECKING:
    from .cbdp import CBDPSampler
    from .policy import BUDGETS, MAX_WEIGHT, ORGAN_FLOOR, STRATEGIES
