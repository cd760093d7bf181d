"""Base models (LiteMedSAM, HF SAM, MedSAM, original checkpoints), their preprocessing, and LoRA adapters.

Names import their module on first use."""
from __future__ import annotations

import typing

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "load_meta_checkpoint": ".checkpoints",
    **dict.fromkeys(["BUILTIN_MODELS", "litemedsam_weights_path", "load_base_model", "processor_for"], ".loading"),
    **dict.fromkeys(["BUNDLED_ADAPTERS", "apply_lora", "base_fingerprint", "default_adapter_for", "load_adapter",
                     "save_adapter"], ".lora"),
    **dict.fromkeys(["DEFAULT_ADAPTER", "DEFAULT_MODEL", "HEADS", "PRESETS"], ".options"),
    **dict.fromkeys(["LITEMEDSAM_PROCESSOR", "MEDSAM_PROCESSOR", "SAM_PROCESSOR", "SamInputProcessor"], ".processor"),
    "LiteMedSamModel": ".tinyvit",
})

if typing.TYPE_CHECKING:
    from .checkpoints import load_meta_checkpoint
    from .loading import BUILTIN_MODELS, litemedsam_weights_path, load_base_model, processor_for
    from .lora import (BUNDLED_ADAPTERS, apply_lora, base_fingerprint, default_adapter_for, load_adapter,
                       save_adapter)
    from .options import DEFAULT_ADAPTER, DEFAULT_MODEL, HEADS, PRESETS
    from .processor import LITEMEDSAM_PROCESSOR, MEDSAM_PROCESSOR, SAM_PROCESSOR, SamInputProcessor
    from .tinyvit import LiteMedSamModel
