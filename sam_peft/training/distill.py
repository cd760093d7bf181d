"""Distillation from the frozen base: the adapter learns clicks without forgetting the base's boxes.

LiteMedSAM already answers boxes well, on every structure, including those no training label names; a
fine-tune that teaches clicks drifts on exactly those (forgetting). The base itself is a free teacher: with
peft it is the same model with its adapters switched off (`disable_adapter`), so it costs one no-grad
decoder pass and no second copy of the weights. Each step adds, beside the PHPG loss, the loss between the
adapter's and the base's masks for `boxes` random boxes per image. The boxes are drawn anywhere on the
image, not only around labelled structures, so the adapter is held to the base's answers on structures
it never sees labels for.
"""
from __future__ import annotations

import dataclasses

import torch

from ..models.decoding import decode_regions, encode_images, sam_of
from ..prompts.behaviours import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT
from .step import PHPGStep, StepOutput, segmentation_loss

BOX_SIDES = (0.08, 0.6)  # box side as a share of the image's side, drawn uniformly per axis


def random_boxes(original_sizes: torch.Tensor, input_size: int, boxes: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`boxes` random boxes per image inside its resized extent, in the model-input frame.

    original_sizes (B, 2) (h, w) -> points (B, boxes, 2, 2) (x, y) corners and labels (B, boxes, 2).
    """
    device = original_sizes.device
    b = original_sizes.shape[0]
    extent = (original_sizes.flip(-1).float() * input_size / original_sizes.amax(-1, keepdim=True))  # (B, 2) w, h
    extent = extent[:, None]
    rand = torch.rand((4, b, boxes, 2), generator=generator, device=device)
    side = (BOX_SIDES[0] + (BOX_SIDES[1] - BOX_SIDES[0]) * rand[0]) * extent
    centre = rand[1] * extent
    top_left = (centre - side / 2).clamp(min=0)
    bottom_right = torch.minimum(centre + side / 2, extent - 1)
    points = torch.stack([top_left, bottom_right], dim=2)
    labels = torch.tensor([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], device=device).expand(b, boxes, 2)
    return points, labels


def distillation_loss(model, batch: dict[str, torch.Tensor], boxes: int, image_embeddings: torch.Tensor | None = None,
                      generator: torch.Generator | None = None, num_images: float | None = None) -> torch.Tensor:
    """Dice + BCE of the adapter's logits against the frozen base's masks for random boxes (the PHPG loss, with
    the base's answer in place of a label), summed and divided by `num_images` x `boxes`: the mean over the
    boxes of the whole optimizer step (every micro-batch on every process); None: of this batch."""
    sam = sam_of(model)
    points, labels = random_boxes(batch["original_sizes"], sam.prompt_encoder.input_image_size, boxes, generator)
    with torch.no_grad(), model.disable_adapter():
        teacher_embeddings = (image_embeddings if image_embeddings is not None
                              else encode_images(model, batch["pixel_values"]))
        teacher, _ = decode_regions(model, teacher_embeddings, points, labels)
    student_embeddings = image_embeddings if image_embeddings is not None else encode_images(model, batch["pixel_values"])
    student, _ = decode_regions(model, student_embeddings, points, labels)
    images = len(points) if num_images is None else max(num_images, 1)
    return segmentation_loss(student.float(), teacher > 0).sum() / (images * boxes)


class DistilledStep(PHPGStep):
    """`PHPGStep` plus `weight` x `distillation_loss` in training; validation sees the plain PHPG step."""

    def __init__(self, model, rounds: int = 3, weight: float = 1.0, boxes: int = 4):
        super().__init__(model, rounds=rounds)
        if weight < 0 or boxes < 1:
            raise ValueError(f"distillation needs weight >= 0 and boxes >= 1, got {weight} and {boxes}")
        self.weight = weight
        self.boxes = boxes

    def forward(self, batch, image_embeddings=None, sample_weights=None, generator=None, num_regions=None,
                num_images=None) -> StepOutput:
        out = super().forward(batch, image_embeddings, sample_weights, generator, num_regions)
        if not self.training or not self.weight:
            return out
        extra = distillation_loss(self.model, batch, self.boxes, image_embeddings, generator, num_images)
        return dataclasses.replace(out, loss=out.loss + self.weight * extra)
