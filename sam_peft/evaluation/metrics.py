"""Segmentation metrics of the evaluation protocol (`evaluate`).

Dice and IoU from pixel counts (counted batched in torch, on the model's device; summed over slices for 3D
Dice), the normalised surface Dice (NSD) at a tolerance in millimetres (scipy, on CPU), and the number of
clicks needed to reach a Dice (NoC).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.ndimage import binary_erosion, distance_transform_edt


def dice_counts(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bool (..., H, W) masks -> (intersection, predicted, target) pixel counts (...): what Dice sums up."""
    inter = (pred & target).flatten(-2).sum(-1)
    return inter, pred.flatten(-2).sum(-1), target.flatten(-2).sum(-1)


def dice_score(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of bool (..., H, W) masks as a float tensor (...) on their device; 1 where both masks are empty."""
    inter, predicted, total = (c.float() for c in dice_counts(pred, target))
    total = predicted + total
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


def dice_from_counts(inter, pred, target):
    """2 |P & T| / (|P| + |T|) from counts (scalars or arrays); 1 where both masks are empty."""
    inter, total = np.asarray(inter, dtype=np.float64), np.asarray(pred, dtype=np.float64) + np.asarray(target)
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


def iou_from_counts(inter, pred, target):
    """|P & T| / |P | T| from counts (scalars or arrays); 1 where both masks are empty."""
    inter = np.asarray(inter, dtype=np.float64)
    union = np.asarray(pred, dtype=np.float64) + np.asarray(target) - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a background neighbour (4-connectivity); outside the array counts as background."""
    return mask & ~binary_erosion(mask, border_value=0)


def surface_dice(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0) -> float:
    """Normalised surface Dice (Nikolov et al. 2021) of two bool masks on a grid with `spacing` mm per axis.

    The share of both boundaries that lies within `tolerance_mm` of the other boundary, with boundaries as
    pixel sets. 1 when both masks are empty, 0 when exactly one is. Computed on the crop around both masks.
    """
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if pred.shape != target.shape or len(spacing) != pred.ndim:
        raise ValueError(f"masks {pred.shape} and {target.shape} must have one shape, and spacing {spacing} one "
                         "size per axis")
    if not pred.any() and not target.any():
        return 1.0
    if not pred.any() or not target.any():
        return 0.0
    both = np.argwhere(pred | target)
    margin = [int(np.ceil(tolerance_mm / s)) + 1 for s in spacing]
    window = tuple(slice(max(0, lo - m), hi + m + 1) for lo, hi, m in zip(both.min(0), both.max(0), margin))
    pred_surface, target_surface = _surface(pred[window]), _surface(target[window])
    to_target = distance_transform_edt(~target_surface, sampling=spacing)
    to_pred = distance_transform_edt(~pred_surface, sampling=spacing)
    close = (to_target[pred_surface] <= tolerance_mm).sum() + (to_pred[target_surface] <= tolerance_mm).sum()
    return float(close / (pred_surface.sum() + target_surface.sum()))


def clicks_to_reach(curves: np.ndarray, threshold: float) -> np.ndarray:
    """NoC: (N, C) Dice after 1..C clicks -> (N,) the first click count reaching `threshold`; C where none does."""
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim != 2 or curves.shape[1] == 0:
        raise ValueError(f"curves must be (instances, clicks) with at least one click, got shape {curves.shape}")
    reached = curves >= threshold
    return np.where(reached.any(1), reached.argmax(1) + 1, curves.shape[1])
