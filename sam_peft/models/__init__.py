"""Base models (LiteMedSAM, HF SAM, MedSAM, original checkpoints), their preprocessing, and LoRA adapters."""
from .checkpoints import load_meta_checkpoint
from .loading import BUILTIN_MODELS, DEFAULT_MODEL, litemedsam_weights_path, load_base_model, processor_for
from .lora import (
    BUNDLED_ADAPTERS,
    DEFAULT_ADAPTER,
    HEADS,
    PRESETS,
    apply_lora,
    base_fingerprint,
    default_adapter_for,
    load_adapter,
    save_adapter,
)
from .processor import LITEMEDSAM_PROCESSOR, MEDSAM_PROCESSOR, SAM_PROCESSOR, SamInputProcessor
from .tinyvit import LiteMedSamModel

__all__ = [
    "BUILTIN_MODELS", "BUNDLED_ADAPTERS", "DEFAULT_ADAPTER", "DEFAULT_MODEL", "HEADS", "LITEMEDSAM_PROCESSOR",
    "LiteMedSamModel", "MEDSAM_PROCESSOR", "PRESETS", "SAM_PROCESSOR", "SamInputProcessor", "apply_lora",
    "base_fingerprint", "default_adapter_for", "load_adapter", "load_base_model", "litemedsam_weights_path",
    "load_meta_checkpoint", "processor_for", "save_adapter",
]
