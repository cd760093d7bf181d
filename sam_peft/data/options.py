"""Choices of the data layer (CT windows, planes, modalities, phantom layouts), kept free of heavy imports so
that building the command line stays fast."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

PLANES = ("axial", "coronal", "sagittal")
MODALITIES = ("auto", "ct", "mr")
PHANTOM_LAYOUTS = ("nnunet", "synapse")


class Window(NamedTuple):
    """A CT display window in Hounsfield units."""

    level: float
    width: float
    name: str = "custom"


WINDOWS = {
    "abdomen": Window(40, 400, "abdomen"),
    "soft_tissue": Window(50, 350, "soft_tissue"),
    "liver": Window(60, 160, "liver"),
    "bone": Window(400, 1800, "bone"),
    "lung": Window(-600, 1500, "lung"),
    "brain": Window(40, 80, "brain"),
}


def parse_window(spec: str | Sequence[float] | Window) -> Window:
    """A preset name (`WINDOWS`), `"level,width"`, or a (level, width) pair."""
    if isinstance(spec, Window):
        return spec
    if isinstance(spec, str):
        if spec.lower() in WINDOWS:
            return WINDOWS[spec.lower()]
        try:
            spec = [float(part) for part in spec.split(",")]
        except ValueError:
            spec = []
    if len(spec) != 2 or not (math.isfinite(spec[0]) and 0 < spec[1] < math.inf):
        raise ValueError(f"window must be one of {', '.join(WINDOWS)} or 'level,width' with width > 0, got {spec!r}")
    return Window(float(spec[0]), float(spec[1]))
