"""Data layer: read medical volumes, map labels to organ names, and prepare 2D slice datasets.

Names import their module on first use (`sam-peft prepare --help` needs no `datasets` to start)."""
from __future__ import annotations

import typing

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    **dict.fromkeys(["PRESETS", "LabelMap", "load_label_map", "organ_key"], ".label_maps"),
    **dict.fromkeys(["Case", "detect_layout", "discover_cases"], ".layouts"),
    **dict.fromkeys(["WINDOWS", "Window"], ".options"),
    **dict.fromkeys(["make_phantom", "phantom_cases", "phantom_dataset", "write_phantom"], ".phantom"),
    **dict.fromkeys(["PrepareOptions", "VolumeCase", "load_prepared", "prepare", "prepare_volumes", "read_metadata"],
                    ".prepare"),
    **dict.fromkeys(["Volume", "read_volume", "to_display"], ".readers"),
})

if typing.TYPE_CHECKING:
    from .label_maps import PRESETS, LabelMap, load_label_map, organ_key
    from .layouts import Case, detect_layout, discover_cases
    from .options import WINDOWS, Window
    from .phantom import make_phantom, phantom_cases, phantom_dataset, write_phantom
    from .prepare import PrepareOptions, VolumeCase, load_prepared, prepare, prepare_volumes, read_metadata
    from .readers import Volume, read_volume, to_display
