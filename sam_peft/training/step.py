"""The PHPG training step: all regions of a batch in parallel, refined by error-guided clicks.

Round 0 decodes every region from its simulated-human prompt; each later round adds one corrective click
per region (`next_clicks`, where the prediction is wrong) and feeds the previous low-res logits back as
that region's mask prompt. Every round is supervised (Dice + BCE on low-res logits) and the IoU head
learns to predict the IoU actually achieved. Everything stays batched on the device, with no per-region
loop; the only host reads are the few integers `decode_regions` needs to group regions by prompt length.
`regions_per_forward=1` turns the same code into the segment-single-region baseline.

Rounds are chained only through detached prompts (the previous logits and the new click), so no gradient
flows between rounds. With `checkpoint_rounds` (the default when gradients are on) each round's decoder
activations are freed after its forward and recomputed during backward, one round at a time: peak memory
then stays at about one round's worth whatever the number of rounds, for the price of a second decoder
forward (the image encoder, which dominates a step with encoder adapters, is not recomputed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..evaluation.metrics import dice_score
from ..models.decoding import PAD_LABEL, decode_regions, encode_images, sam_of
from ..prompts.clicks import PERFECT, next_clicks


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar: weighted region losses summed, over regions (`num_regions`) x rounds
    region_losses: torch.Tensor  # (B, K) detached mean loss per region over rounds (CBDP scores)
    region_dice: torch.Tensor  # (B, K) detached Dice of the final round
    low_res_logits: torch.Tensor  # (B, K, 256, 256) final-round logits, detached


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice + BCE per region: (..., H, W) -> (...)."""
    prob = logits.sigmoid().flatten(-2)
    t = target.flatten(-2).to(prob.dtype)
    dice = 1 - (2 * (prob * t).sum(-1) + 1) / (prob.sum(-1) + t.sum(-1) + 1)
    bce = F.binary_cross_entropy_with_logits(logits.flatten(-2), t, reduction="none").mean(-1)
    return dice + bce


def hard_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred = (logits > 0).flatten(-2)
    t = target.flatten(-2)
    inter = (pred & t).sum(-1).float()
    union = (pred | t).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def _decode(model, embeddings, points, labels, mask_inputs, size):
    """decode_regions (multimask for single clicks), logits resized to the targets' side: a no-op for real
    SAM-family models, whose decoder output is already 256x256; tiny test models decode at a smaller side."""
    logits, iou_pred = decode_regions(model, embeddings, points, labels, mask_inputs, multimask_output="auto")
    if logits.shape[-1] != size:
        logits = F.interpolate(logits.flatten(1, 2), size=(size, size), mode="bilinear",
                               align_corners=False).unflatten(1, logits.shape[1:3])
    return logits, iou_pred


def _round(model, embeddings, points, labels, mask_inputs, targets):
    """One decoder pass -> (chosen logits, per-region loss).

    Single-click regions get SAM's three candidates: the loss takes the best of them (SAM's recipe) and the
    next round continues from the IoU head's choice; the IoU head learns the IoU each candidate achieved.
    """
    logits, iou_pred = _decode(model, embeddings, points, labels, mask_inputs, targets.shape[-1])
    expanded = targets[:, :, None].expand_as(logits)
    loss = segmentation_loss(logits.float(), expanded).min(-1).values
    iou_loss = (iou_pred.float() - hard_iou(logits, expanded)).square().mean(-1)
    chosen = iou_pred.argmax(-1)
    logits = torch.take_along_dim(logits, chosen[:, :, None, None, None], dim=2)[:, :, 0]
    return logits, loss + iou_loss


def phpg_forward(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    rounds: int = 3,
    image_embeddings: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
    random_clicks: bool = True,
    generator: torch.Generator | None = None,
    regions_per_forward: int | None = None,
    checkpoint_rounds: bool = True,
    num_regions: float | None = None,
) -> StepOutput:
    """Run the multi-region iterative step on a collated PHPG batch (see `PHPGCollator`).

    image_embeddings: precomputed (B, C, h, w) for frozen-encoder training; otherwise the encoder runs on
    `batch["pixel_values"]` once per image (once per chunk of `regions_per_forward` regions: the baseline).
    sample_weights: (B,) CBDP loss weights. checkpoint_rounds: recompute each round's decoder pass in backward
    instead of keeping its activations (memory flat in `rounds`); only matters when gradients are on.
    num_regions: the regions the loss is normalised by: those of the whole optimizer step (every micro-batch
    on every process), so the step equals one large batch's; None: this batch's valid regions.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    valid = batch["region_valid"]
    k = valid.shape[1]
    chunk = k if regions_per_forward is None else regions_per_forward
    parts = [
        _forward_regions(model, batch, slice(start, start + chunk), rounds, image_embeddings, random_clicks, generator,
                         checkpoint_rounds and rounds > 1 and torch.is_grad_enabled())
        for start in range(0, k, chunk)
    ]
    region_loss = torch.cat([p[0] for p in parts], dim=1)  # (B, K) summed over rounds
    logits = torch.cat([p[1] for p in parts], dim=1)
    weights = valid.float() if sample_weights is None else valid.float() * sample_weights[:, None].float()
    regions = valid.sum().clamp(min=1) if num_regions is None else max(num_regions, 1)
    loss = (region_loss * weights).sum() / (regions * rounds)
    dice = dice_score(logits > 0, batch["targets"].bool())
    return StepOutput(loss=loss, region_losses=(region_loss / rounds).detach() * valid,
                      region_dice=dice.detach() * valid, low_res_logits=logits.detach())


def _forward_regions(model, batch, regions: slice, rounds, image_embeddings, random_clicks, generator, recompute):
    embeddings = image_embeddings if image_embeddings is not None else encode_images(model, batch["pixel_values"])
    points = batch["points"][:, regions].float()
    labels = batch["point_labels"][:, regions]
    targets = batch["targets"][:, regions].bool()
    scale = sam_of(model).prompt_encoder.input_image_size / targets.shape[-1]  # low-res -> model-input pixels
    mask_inputs, total = None, 0.0
    for r in range(rounds):
        if recompute and r + 1 < rounds:  # the last round's activations are consumed first by backward anyway
            logits, loss = checkpoint(_round, model, embeddings, points, labels, mask_inputs, targets,
                                      use_reentrant=False)
        else:
            logits, loss = _round(model, embeddings, points, labels, mask_inputs, targets)
        total = total + loss
        if r + 1 < rounds:
            click, click_label = next_clicks(logits.detach() > 0, targets, random=random_clicks, generator=generator)
            click_label = torch.where(click_label == PERFECT, PAD_LABEL, click_label)
            points = torch.cat([points, ((click + 0.5) * scale - 0.5)[:, :, None]], dim=2)
            labels = torch.cat([labels, click_label[:, :, None]], dim=2)
            mask_inputs = _mask_prompt(model, logits.detach())
    return total, logits


def _mask_prompt(model, logits: torch.Tensor) -> torch.Tensor:
    """Previous logits at the side the prompt encoder takes (4x the embedding side: 256 for SAM models)."""
    side = 4 * sam_of(model).config.prompt_encoder_config.image_embedding_size
    if logits.shape[-1] == side:
        return logits
    return F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)


class PHPGStep(nn.Module):
    """`phpg_forward` as a module, so `accelerate`/DDP wraps the whole step and syncs its gradients."""

    def __init__(self, model: nn.Module, rounds: int = 3, regions_per_forward: int | None = None,
                 checkpoint_rounds: bool = True):
        super().__init__()
        self.model = model
        self.rounds = rounds
        self.regions_per_forward = regions_per_forward
        self.checkpoint_rounds = checkpoint_rounds

    def forward(self, batch, image_embeddings=None, sample_weights=None, generator=None, num_regions=None,
                num_images=None) -> StepOutput:
        """`phpg_forward`; `num_images` (the step's slices) is for subclasses adding per-slice terms."""
        return phpg_forward(self.model, batch, self.rounds, image_embeddings, sample_weights,
                            random_clicks=self.training, generator=generator,
                            regions_per_forward=self.regions_per_forward, checkpoint_rounds=self.checkpoint_rounds,
                            num_regions=num_regions)
