"""Choices of the 3D segmenter, kept free of heavy imports so that building the command line stays fast."""
from __future__ import annotations

from typing import Literal

Propagation = Literal["box", "box+mask", "box+point", "box+mask+point"]
PROPAGATION: tuple[str, ...] = ("box", "box+mask", "box+point", "box+mask+point")
DEFAULT_PROPAGATION: Propagation = "box+mask+point"
