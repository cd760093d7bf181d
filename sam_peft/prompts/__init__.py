"""PHPG prompts: simulated human behaviours, error-guided clicks and the multi-region collator."""
from .behaviours import BEHAVIOURS, BehaviourMixture, make_prompt
from .clicks import distance_transform, next_clicks
from .collator import PHPGCollator

__all__ = ["BEHAVIOURS", "BehaviourMixture", "PHPGCollator", "distance_transform", "make_prompt", "next_clicks"]
