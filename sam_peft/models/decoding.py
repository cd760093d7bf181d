"""Segment-multi-region decoding: all regions of a batch of images through the mask decoder at once.

HF's `SamModel.forward` adds a mask prompt once per image, and cannot mix boxes with point-only prompts
in one call. Here every region is a row of the decoder batch (regions flattened into the batch
dimension), so each region carries its own sparse tokens and its own previous-mask prompt. Prompts use
SAM's token vocabulary: 1 positive click, 0 negative click, 2/3 box corners, -1 "not a point" (padding).
"""
from __future__ import annotations

import torch
from transformers import SamModel

PAD_LABEL = -1


def sam_of(model) -> SamModel:
    """The SamModel inside a PeftModel / DDP wrapper (LoRA layers stay injected in it)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def encode_images(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, C, h, w). Calls the encoder directly: `get_image_embeddings` is no-grad."""
    return sam_of(model).vision_encoder(pixel_values).last_hidden_state


def embed_prompt_tokens(model, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, P, 2) pixel coords in the model-input frame + (N, P) labels -> (N, P, C) sparse embeddings."""
    encoder = sam_of(model).prompt_encoder
    size = encoder.input_image_size
    coords = (points.float() + 0.5) / size  # pixel centres, normalised like SAM
    pe = encoder.shared_embedding(coords[:, None])[:, 0]
    labels = labels[..., None]
    out = torch.where(labels == PAD_LABEL, encoder.not_a_point_embed.weight.to(pe.dtype), pe)
    for token in range(len(encoder.point_embed)):
        out = torch.where(labels == token, out + encoder.point_embed[token].weight.to(pe.dtype), out)
    return out


def decode_regions(
    model,
    image_embeddings: torch.Tensor,
    points: torch.Tensor,
    labels: torch.Tensor,
    mask_inputs: torch.Tensor | None = None,
    multimask_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode K regions per image in one decoder call.

    image_embeddings (B, C, h, w); points (B, K, P, 2); labels (B, K, P); mask_inputs (B, K, 256, 256)
    low-res logits or None. Returns low-res logits (B, K, M, 256, 256) and IoU predictions (B, K, M),
    M = 3 with `multimask_output` else 1.
    """
    sam = sam_of(model)
    b, k = labels.shape[:2]
    embeddings = image_embeddings.repeat_interleave(k, dim=0)  # (B*K, C, h, w)
    sparse = embed_prompt_tokens(model, points.reshape(b * k, *points.shape[2:]), labels.reshape(b * k, -1))
    if mask_inputs is None:
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand_as(embeddings)
    else:
        dense = sam.prompt_encoder.mask_embed(mask_inputs.reshape(b * k, 1, *mask_inputs.shape[-2:]))
    positional = sam.get_image_wide_positional_embeddings().to(embeddings.dtype)
    masks, iou = sam.mask_decoder(
        image_embeddings=embeddings,
        image_positional_embeddings=positional.expand(b * k, -1, -1, -1),
        sparse_prompt_embeddings=sparse[:, None].to(embeddings.dtype),
        dense_prompt_embeddings=dense.to(embeddings.dtype),
        multimask_output=multimask_output,
    )
    return masks.reshape(b, k, *masks.shape[2:]), iou.reshape(b, k, -1)


def is_single_click(labels: torch.Tensor) -> torch.Tensor:
    """(..., P) labels -> (...) bool: exactly one click and no box, the ambiguous case for multimask output."""
    clicks = ((labels == 0) | (labels == 1)).sum(-1)
    has_box = (labels == 2).any(-1)
    return (clicks == 1) & ~has_box
