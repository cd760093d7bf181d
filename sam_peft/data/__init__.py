"""Data layer: read medical volumes, map labels to organ names, and prepare 2D slice datasets."""
from .label_maps import PRESETS, LabelMap, load_label_map, organ_key
from .layouts import Case, detect_layout, discover_cases
from .phantom import make_phantom, phantom_cases, phantom_dataset, write_phantom
from .prepare import (
    WINDOWS,
    PrepareOptions,
    VolumeCase,
    Window,
    load_prepared,
    prepare,
    prepare_volumes,
    read_metadata,
)
from .readers import Volume, read_volume, to_display

__all__ = [
    "PRESETS",
    "WINDOWS",
    "Case",
    "LabelMap",
    "PrepareOptions",
    "Volume",
    "VolumeCase",
    "Window",
    "detect_layout",
    "discover_cases",
    "load_label_map",
    "load_prepared",
    "make_phantom",
    "organ_key",
    "phantom_cases",
    "phantom_dataset",
    "prepare",
    "prepare_volumes",
    "read_metadata",
    "read_volume",
    "to_display",
    "write_phantom",
]
