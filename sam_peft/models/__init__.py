"""Base models (LiteMedSAM, HF SAM, original checkpoints), their processors, and LoRA adapters."""
from .checkpoints import load_meta_checkpoint
from .loading import BUILTIN_MODELS, DEFAULT_MODEL, litemedsam_weights_path, load_base_model, processor_for
from .lora import HEADS, PRESETS, apply_lora, base_fingerprint, load_adapter, save_adapter
from .processor import LITEMEDSAM_PROCESSOR, SAM_PROCESSOR, SamInputProcessor
from .tinyvit import LiteMedSamModel

__all__ = [
    "BUILTIN_MODELS", "DEFAULT_MODEL", "HEADS", "LITEMEDSAM_PROCESSOR", "LiteMedSamModel", "PRESETS",
    "SAM_PROCESSOR", "SamInputProcessor", "apply_lora", "base_fingerprint", "load_adapter", "load_base_model",
    "litemedsam_weights_path", "load_meta_checkpoint", "processor_for", "save_adapter",
]
