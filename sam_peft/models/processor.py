"""Image preprocessing and coordinate transforms that match a base model's training input.

SAM ViT bases expect the longest side resized to 1024, ImageNet normalisation, zero padding to a square.
LiteMedSAM expects the longest side resized to 256, pixels scaled to [0, 1], no normalisation. Getting
this wrong silently costs Dice, so the processor is derived from the model (`processor_for`), never
chosen by hand.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
LOW_RES = 256  # the mask decoder's output side for every SAM-family model here


@dataclass(frozen=True)
class SamInputProcessor:
    """Resize-longest-side + pad processor; all coordinates are (x, y) pixels."""

    image_size: int = 1024
    pixel_mean: tuple[float, float, float] | None = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] | None = IMAGENET_STD

    def to_dict(self) -> dict:
        return asdict(self)

    def resized_shape(self, original_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) after scaling the longest side to `image_size` (segment-anything's rounding)."""
        h, w = original_hw
        scale = self.image_size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def preprocess(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(H, W) grayscale or (H, W, 3) RGB, uint8 -> (3, S, S) float32 model input."""
        x = torch.as_tensor(np.asarray(image)).float()
        if x.ndim == 2:
            x = x[..., None].expand(*x.shape, 3)
        if x.ndim != 3 or x.shape[-1] not in (1, 3):
            raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3), got shape {tuple(x.shape)}")
        if x.shape[-1] == 1:
            x = x.expand(*x.shape[:2], 3)
        x = x.permute(2, 0, 1)[None]
        new_h, new_w = self.resized_shape(tuple(x.shape[-2:]))
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
        if self.pixel_mean is None:
            x = x / 255.0
        else:
            mean = torch.tensor(self.pixel_mean).view(3, 1, 1)
            std = torch.tensor(self.pixel_std).view(3, 1, 1)
            x = (x - mean) / std
        return F.pad(x, (0, self.image_size - new_w, 0, self.image_size - new_h))

    def _scale(self, original_hw: tuple[int, int]) -> tuple[float, float]:
        new_h, new_w = self.resized_shape(original_hw)
        return new_w / original_hw[1], new_h / original_hw[0]

    def transform_coords(self, coords: np.ndarray | torch.Tensor, original_hw: tuple[int, int]):
        """(..., 2) (x, y) in the original frame -> the model-input frame."""
        sx, sy = self._scale(original_hw)
        out = coords.clone().float() if isinstance(coords, torch.Tensor) else np.asarray(coords, dtype=np.float32).copy()
        out[..., 0] = out[..., 0] * sx
        out[..., 1] = out[..., 1] * sy
        return out

    def transform_boxes(self, boxes: np.ndarray | torch.Tensor, original_hw: tuple[int, int]):
        """(..., 4) (x0, y0, x1, y1) in the original frame -> the model-input frame."""
        shape = boxes.shape
        return self.transform_coords(boxes.reshape(*shape[:-1], 2, 2), original_hw).reshape(shape)

    def mask_to_low_res(self, mask: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(..., H, W) binary mask(s) in the original frame -> (..., 256, 256) float targets, padded like the image.

        Area interpolation keeps thin structures as fractional values; the caller thresholds at 0.5.
        """
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).float()
        lead, (h, w) = m.shape[:-2], m.shape[-2:]
        scale = LOW_RES / max(h, w)
        new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
        m = F.interpolate(m.reshape(-1, 1, h, w), size=(new_h, new_w), mode="area" if scale < 1 else "nearest")
        m = F.pad(m, (0, LOW_RES - new_w, 0, LOW_RES - new_h))
        return m.reshape(*lead, LOW_RES, LOW_RES)

    def postprocess_masks(self, low_res_logits: torch.Tensor, original_hw: tuple[int, int]) -> torch.Tensor:
        """(..., 256, 256) decoder logits -> (..., H, W) logits in the original frame (SAM's postprocessing)."""
        lead = low_res_logits.shape[:-2]
        x = low_res_logits.reshape(-1, 1, *low_res_logits.shape[-2:]).float()
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        new_h, new_w = self.resized_shape(original_hw)
        x = F.interpolate(x[..., :new_h, :new_w], size=tuple(original_hw), mode="bilinear", align_corners=False)
        return x.reshape(*lead, *original_hw)


LITEMEDSAM_PROCESSOR = SamInputProcessor(image_size=256, pixel_mean=None, pixel_std=None)
SAM_PROCESSOR = SamInputProcessor(image_size=1024)
