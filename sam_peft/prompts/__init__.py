"""PHPG prompts: simulated human behaviours, error-guided clicks and the multi-region collator.

Names import their module on first use."""
from __future__ import annotations

import typing

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    **dict.fromkeys(["BehaviourMixture", "make_prompt"], ".behaviours"),
    **dict.fromkeys(["distance_transform", "next_clicks"], ".clicks"),
    "PHPGCollator": ".collator",
    "BEHAVIOURS": ".options",
})

if typing.TYPE_CHECKING:
    from .behaviours import BehaviourMixture, make_prompt
    from .clicks import distance_transform, next_clicks
    from .collator import PHPGCollator
    from .options import BEHAVIOURS
