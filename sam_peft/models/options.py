"""Names and choices of the models layer (default base and adapter, LoRA presets, trainable heads), kept free
of heavy imports so that building the command line stays fast."""
from __future__ import annotations

DEFAULT_MODEL = "litemedsam"
DEFAULT_ADAPTER = "litemedsam-phpg"
# Module-name regexes (peft matches a string target_modules with re.fullmatch on the full name).
_DECODER = r"mask_decoder\.transformer\..*(q_proj|k_proj|v_proj|out_proj)"
_ENCODER = r"vision_encoder\..*attn\.qkv"  # ViT blocks and TinyViT attention alike
PRESETS = {
    "decoder": _DECODER,
    "encoder": _ENCODER,
    "encoder+decoder": f"({_ENCODER})|({_DECODER})",
}
# Small heads trainable in full. Never `prompt_encoder`: wrapping it unties the shared positional embedding.
HEADS = {
    "iou": ["iou_prediction_head"],
    "hypernetworks": [f"output_hypernetworks_mlps.{i}" for i in range(4)],
}
