"""Segment-multi-region decoding: all regions of a batch of images through the mask decoder at once.

HF's `SamModel.forward` adds a mask prompt once per image, and cannot mix boxes with point-only prompts
in one call. Here every region is a row of the decoder batch (regions flattened into the batch
dimension), so each region carries its own sparse tokens and its own previous-mask prompt. Prompts use
SAM's token vocabulary: 1 positive click, 0 negative click, 2/3 box corners, -1 "not a point" (padding).
"""
from __future__ import annotations

import torch
from transformers import SamModel

PAD_LABEL = -1  # SAM's "not a point" token: padding in prompts


def sam_of(model) -> SamModel:
    """The SamModel inside a PeftModel / DDP wrapper (LoRA layers stay injected in it)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def encode_images(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, C, h, w). Calls the encoder directly: `get_image_embeddings` is no-grad.

    Without gradients on a CPU, one image at a time: a core gains nothing from a batch, and the encoder's
    temporaries grow with it (LiteMedSAM: about 230 MB per image, so 8 images peaked 1.7 GB above the rest).
    """
    encoder = sam_of(model).vision_encoder
    if len(pixel_values) > 1 and pixel_values.device.type == "cpu" and not torch.is_grad_enabled():
        return torch.cat([encoder(image).last_hidden_state for image in pixel_values.split(1)])
    return encoder(pixel_values).last_hidden_state


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
    multimask_output: bool | str = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode K regions per image, batched.

    image_embeddings (B, C, h, w); points (B, K, P, 2); labels (B, K, P); mask_inputs (B, K, 4h, 4w) low-res
    logits or None. Returns low-res logits (B, K, M, 4h, 4w) and IoU predictions (B, K, M): M = 1 without
    `multimask_output`, M = 3 with it. `"auto"` gives SAM's three candidates to single-click regions (the
    ambiguous case) and the single mask, repeated three times, to every other region, so that choosing by
    the IoU head or by the lowest loss works the same for all rows.

    Each region is decoded with exactly the tokens original SAM would give it: its own prompt tokens, plus
    one "not a point" token when it has no box. Padding tokens are not neutral (the decoder attends to
    them), so regions are grouped by token count and each group is one decoder call; finding the groups
    reads a few integers back from the device.
    """
    b, k, p = labels.shape
    flat_labels = torch.cat([labels.reshape(b * k, p), labels.new_full((b * k, 1), PAD_LABEL)], dim=1)
    flat_points = torch.cat([points.reshape(b * k, p, 2), points.new_zeros(b * k, 1, 2)], dim=1)
    order = torch.argsort((flat_labels == PAD_LABEL).int(), dim=1, stable=True)  # real tokens first
    flat_labels = flat_labels.gather(1, order)
    flat_points = flat_points.gather(1, order[..., None].expand(-1, -1, 2))
    n_real = (flat_labels != PAD_LABEL).sum(1)
    n_tokens = torch.where((flat_labels == 2).any(1), n_real, n_real + 1)
    auto = multimask_output == "auto"
    group = 2 * n_tokens + (is_single_click(flat_labels).long() if auto else 0)
    dense_all = None if mask_inputs is None else mask_inputs.reshape(b * k, 1, *mask_inputs.shape[-2:])
    rows_per_group, outputs = [], []
    for key in torch.unique(group).tolist():
        count, single = divmod(key, 2)
        rows = torch.nonzero(group == key)[:, 0]
        dense = None if dense_all is None else dense_all[rows]
        masks, iou = _decode_rows(model, image_embeddings[rows // k], flat_points[rows, :count],
                                  flat_labels[rows, :count], dense, bool(single) if auto else multimask_output)
        if auto and not single:
            masks, iou = masks.expand(-1, 3, -1, -1), iou.expand(-1, 3)
        outputs.append((masks, iou))
        rows_per_group.append(rows)
    restore = torch.argsort(torch.cat(rows_per_group))
    masks = torch.cat([o[0] for o in outputs])[restore]
    iou = torch.cat([o[1] for o in outputs])[restore]
    return masks.reshape(b, k, *masks.shape[1:]), iou.reshape(b, k, -1)


def _decode_rows(model, embeddings, points, labels, mask_inputs, multimask_output):
    """One decoder call; every row is one region with its own image embedding, tokens and mask prompt."""
    sam = sam_of(model)
    n = labels.shape[0]
    sparse = embed_prompt_tokens(model, points, labels)
    if mask_inputs is None:
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand_as(embeddings)
    else:
        dense = sam.prompt_encoder.mask_embed(mask_inputs)
    positional = sam.get_image_wide_positional_embeddings().to(embeddings.dtype)
    masks, iou = sam.mask_decoder(
        image_embeddings=embeddings,
        image_positional_embeddings=positional.expand(n, -1, -1, -1),
        sparse_prompt_embeddings=sparse[:, None].to(embeddings.dtype),
        dense_prompt_embeddings=dense.to(embeddings.dtype),
        multimask_output=multimask_output,
    )
    return masks[:, 0], iou[:, 0]


def is_single_click(labels: torch.Tensor) -> torch.Tensor:
    """(..., P) labels -> (...) bool: exactly one click and no box, the ambiguous case for multimask output."""
    clicks = ((labels == 0) | (labels == 1)).sum(-1)
    has_box = (labels == 2).any(-1)
    return (clicks == 1) & ~has_box
