"""Error-guided clicks: where a person would click next to correct a prediction, batched on the device.

The click goes inside the larger error (false negatives -> positive click, false positives -> negative
click), at the error pixel farthest from the error's boundary, as in the RITM / SAM interactive protocol.
"Larger" compares the total error AREA, not the largest connected component: connected components have
no batched GPU implementation, and the farthest-from-boundary pixel already lands in the thickest error
blob, which is nearly always the largest one.
"""
from __future__ import annotations

import math

import torch

PERFECT = -10  # label of a region whose prediction is already exact (HF SAM's "padding point" label)


def _row_distance(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> distance along each row to the nearest False pixel; outside the row counts as False."""
    w = mask.shape[-1]
    idx = torch.arange(w, device=mask.device)
    last_bg = torch.where(mask, -1, idx).cummax(dim=-1).values
    next_bg = torch.where(mask, w, idx).flip(-1).cummin(dim=-1).values.flip(-1)
    return torch.minimum(idx - last_bg, next_bg - idx).float()


def distance_transform(mask: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distance of each True pixel to the nearest False pixel (0 on False pixels).

    The image border counts as boundary: the result equals scipy's
    `distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]`, so a one-pixel mask has distance 1. Separable
    (row distances, then a min over every row offset of g(y')^2 + (y - y')^2), with no data-dependent
    control flow, so it runs batched on any device without a host sync. Takes (..., H, W), returns float32.
    """
    mask = torch.as_tensor(mask).bool()
    *lead, h, w = mask.shape
    g2 = _row_distance(mask.reshape(-1, h, w)).square()
    ys = torch.arange(h, device=mask.device)
    to_border = torch.minimum(ys + 1, h - ys).float().square()[:, None]
    d2 = torch.minimum(g2, to_border)
    # Every pixel is within (min(h, w) + 1) // 2 of the padded border, so no farther row offset can win;
    # nor can an offset dy with dy^2 > max(g2), since d2 <= g2 already. That second, data-dependent bound
    # needs a host read, so it is used on the CPU only (on an accelerator the loop stays sync-free).
    last = min((min(h, w) + 1) // 2, h - 1)
    if mask.device.type == "cpu" and g2.numel():
        last = min(last, math.isqrt(int(g2.max())))
    for dy in range(1, last + 1):
        d2[:, dy:].clamp_(max=g2[:, :-dy] + dy * dy)
        d2[:, :-dy].clamp_(max=g2[:, dy:] + dy * dy)
    return d2.sqrt().reshape(*lead, h, w)


def next_clicks(
    pred: torch.Tensor,
    target: torch.Tensor,
    random: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One corrective click per region.

    pred, target: bool (B, K, H, W). Returns points (B, K, 2) float (x, y) pixel indices in that frame and
    labels (B, K) int64: 1 inside false negatives, 0 inside false positives, -10 (with point (0, 0)) where
    pred == target. Ties in error area go to the positive click. `random=False` (evaluation) picks the
    first pixel, in row-major order, at the maximal distance from the error boundary; `random=True`
    (training) picks uniformly among error pixels at least half that distance, drawing from `generator`
    (which must live on the tensors' device).
    """
    if pred.dtype != torch.bool or target.dtype != torch.bool:
        raise ValueError(f"pred and target must be bool masks, got {pred.dtype} and {target.dtype}")
    if pred.ndim != 4 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be (B, K, H, W), got {tuple(pred.shape)}, {tuple(target.shape)}")
    false_neg = target & ~pred
    false_pos = pred & ~target
    n_neg = false_neg.flatten(2).sum(-1)
    n_pos = false_pos.flatten(2).sum(-1)
    positive = n_neg >= n_pos
    error = torch.where(positive[..., None, None], false_neg, false_pos)
    dist = distance_transform(error).flatten(2)
    if random:
        peak = dist.amax(-1, keepdim=True)
        eligible = (dist > 0) & (dist >= 0.5 * peak)
        score = torch.rand(dist.shape, generator=generator, device=dist.device)
        index = torch.where(eligible, score, -1.0).argmax(-1)
    else:
        index = dist.argmax(-1)
    w = pred.shape[-1]
    points = torch.stack([index % w, index // w], dim=-1).float()
    labels = torch.where(n_neg + n_pos == 0, PERFECT, positive.long())
    return points, labels
