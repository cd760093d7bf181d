"""Names of the PHPG prompting behaviours and the training prompt threshold, kept free of heavy imports so
that building the command line stays fast (the behaviours themselves: behaviours.py)."""
from __future__ import annotations

BEHAVIOURS: tuple[str, ...] = ("tight_box", "jitter_box", "loose_box", "shifted_box", "center_click", "random_click",
                               "boundary_click", "multi_click")
MIN_PIXELS = 10  # pixels an organ needs on a slice to be prompted in training (evaluation: EVAL_MIN_PIXELS)
