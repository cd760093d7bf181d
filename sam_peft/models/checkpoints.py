"""Original Meta-format SAM / MedSAM / LiteMedSAM checkpoints -> Hugging Face `SamModel`.

The transformers wheel ships no converter, so the key mapping lives here. The ViT size (b/l/h) is
inferred from the weights; a TinyViT encoder (LiteMedSAM) is recognised by its key names.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import SamConfig, SamModel

from .tinyvit import LiteMedSamModel, litemedsam_config

# Ordered (pattern, replacement) rules; the first match wins per rule, all rules are applied in turn.
_KEY_RULES: list[tuple[str, str]] = [
    (r"^image_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
    (r"^image_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision_encoder.layers.\1.layer_norm\2."),
    (r"^image_encoder\.blocks\.", "vision_encoder.layers."),
    (r"^image_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
    (r"^image_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
    (r"^image_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
    (r"^image_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
    (r"^image_encoder\.pos_embed$", "vision_encoder.pos_embed"),
    (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"\.norm(\d)\.", r".layer_norm\1."),  # two-way transformer blocks
    (r"\.norm_final_attn\.", ".layer_norm_final_attn."),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    (r"\.layers\.0\.(weight|bias)$", r".proj_in.\1"),  # 3-layer MLP heads: first, middle, last
    (r"\.layers\.1\.(weight|bias)$", r".layers.0.\1"),
    (r"\.layers\.2\.(weight|bias)$", r".proj_out.\1"),
]
_MLP_HEADS = re.compile(r"^mask_decoder\.(iou_prediction_head|output_hypernetworks_mlps\.\d+)\.")
_POSITIONAL = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"

# hidden size -> (depth, heads, global attention blocks): the three published SAM ViTs.
_VIT_SIZES = {
    768: ("vit_b", 12, 12, [2, 5, 8, 11]),
    1024: ("vit_l", 24, 16, [5, 11, 17, 23]),
    1280: ("vit_h", 32, 16, [7, 15, 23, 31]),
}


def map_meta_key(key: str) -> str:
    """One Meta-format parameter name (ViT encoder, prompt encoder, mask decoder) -> its HF `SamModel` name."""
    for pattern, repl in _KEY_RULES:
        if pattern.startswith(r"\.layers") and not _MLP_HEADS.match(key):
            continue
        key = re.sub(pattern, repl, key)
    return key


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a `.pth` checkpoint, unwrapping the usual `model` / `state_dict` containers."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated or not a torch file
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({err}); if it is one, the file is "
                         "damaged or truncated: download or copy it again") from err
    for container in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(container), dict):
            state = state[container]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return state


def is_meta_checkpoint(state: dict[str, torch.Tensor]) -> bool:
    prefixes = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
    return all(any(k.startswith(p) for k in state) for p in prefixes)


def vit_config(state: dict[str, torch.Tensor], path: str | Path) -> SamConfig:
    """Infer the SamConfig (ViT b/l/h, input size) of a Meta-format ViT checkpoint from its tensors."""
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if weight is None:
        raise ValueError(f"{path}: no image_encoder.patch_embed.proj.weight: not a SAM ViT checkpoint")
    hidden = weight.shape[0]
    if hidden not in _VIT_SIZES:
        raise ValueError(
            f"{path}: unknown SAM image encoder of width {hidden}; expected one of "
            + ", ".join(f"{v[0]} ({k})" for k, v in _VIT_SIZES.items())
        )
    _, depth, heads, global_attn = _VIT_SIZES[hidden]
    found_depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k)))
    if found_depth != depth:
        raise ValueError(f"{path}: width {hidden} implies {depth} blocks but the checkpoint has {found_depth}")
    patch = weight.shape[-1]
    image_size = state["image_encoder.pos_embed"].shape[1] * patch
    return SamConfig(
        vision_config=dict(
            hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads, mlp_dim=4 * hidden,
            global_attn_indexes=global_attn, image_size=image_size, patch_size=patch,
        ),
        prompt_encoder_config=dict(image_size=image_size, patch_size=patch, image_embedding_size=image_size // patch),
        mask_decoder_config=dict(layer_norm_eps=1e-5),
    )


def convert_meta_state_dict(state: dict[str, torch.Tensor], tinyvit: bool) -> dict[str, torch.Tensor]:
    """Rename every tensor; the shared positional embedding goes to both places HF keeps it."""
    out = {}
    for key, value in state.items():
        if tinyvit and key.startswith("image_encoder."):
            out["vision_encoder.tinyvit." + key[len("image_encoder."):]] = value
        elif key == _POSITIONAL:
            out["shared_image_embedding.positional_embedding"] = value
            out["prompt_encoder.shared_embedding.positional_embedding"] = value
        else:
            out[map_meta_key(key)] = value
    return out


def load_meta_checkpoint(path: str | Path) -> SamModel:
    """A Meta / MedSAM / LiteMedSAM `.pth` -> HF model with exactly those weights (strict: no random init)."""
    state = read_state_dict(path)
    if not is_meta_checkpoint(state):
        raise ValueError(
            f"{path}: not a SAM checkpoint: expected keys starting with image_encoder., prompt_encoder. "
            f"and mask_decoder. (found e.g. {sorted(state)[:3]})"
        )
    tinyvit = "image_encoder.patch_embed.seq.0.c.weight" in state
    config = litemedsam_config() if tinyvit else vit_config(state, path)
    model = (LiteMedSamModel if tinyvit else SamModel)(config)
    converted = convert_meta_state_dict(state, tinyvit)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the {'LiteMedSAM' if tinyvit else 'SAM ViT'} architecture: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]})"
        )
    for key, value in converted.items():
        if model.state_dict()[key].shape != value.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(model.state_dict()[key].shape)}")
    model.load_state_dict(converted, strict=True)
    return model.eval()  # eval() also rebuilds TinyViT's attention tables from the loaded weights
