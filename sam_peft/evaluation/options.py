"""Choices of the evaluation (its simulated users, the smallest instance scored), kept free of heavy imports so
that building the command line stays fast."""
from __future__ import annotations

EVAL_BEHAVIOURS = ("tight_box", "jitter_box", "loose_box", "center_click", "random_click", "clicks_3", "clicks_5")
EVAL_MIN_PIXELS = 100  # an organ instance is evaluated on a slice from this many pixels
