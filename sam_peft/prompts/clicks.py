"""Error-guided clicks: where a person would click next to correct a prediction.

The standard clicker of interactive segmentation benchmarks (RITM, f-BRS; the protocol behind published
NoC figures): take the Euclidean distance transform of the false-negative and of the false-positive mask,
each padded so that the image border counts as boundary, with pixels already clicked set to 0. The click
is positive when the false negatives' maximum distance is strictly larger (a tie gives a negative click),
and goes to the first pixel, in row-major order, holding that maximum. The sign thus follows the error
with the thickest blob, not the larger total area.

Evaluation on the CPU places clicks with scipy's exact transform on each error's bounding box (cheap and
small); on an accelerator, and for the randomised training clicks, a batched torch transform runs on the
device without a host sync.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

PERFECT = -10  # label of a region with no error pixel left to click (HF SAM's "padding point" label)


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
    clicked: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One corrective click per region.

    pred, target: bool (B, K, H, W); clicked: bool (B, K, H, W), the pixels clicked so far, which are never
    clicked again (None: none yet). Returns points (B, K, 2) float (x, y) pixel indices in that frame and
    labels (B, K) int64: 1 inside a false negative, 0 inside a false positive, PERFECT (with point (0, 0))
    where no unclicked error pixel is left. `random=False` (evaluation) is the standard clicker of the module
    docstring; `random=True` (training) keeps its sign but draws the point uniformly among the error pixels
    at least half the maximum distance from the boundary, from `generator` (on the tensors' device).
    """
    if pred.dtype != torch.bool or target.dtype != torch.bool:
        raise ValueError(f"pred and target must be bool masks, got {pred.dtype} and {target.dtype}")
    if pred.ndim != 4 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be (B, K, H, W), got {tuple(pred.shape)}, {tuple(target.shape)}")
    if clicked is not None and (clicked.dtype != torch.bool or clicked.shape != pred.shape):
        raise ValueError(f"clicked must be a bool mask shaped like pred {tuple(pred.shape)}, got {clicked.dtype} "
                         f"{tuple(clicked.shape)}")
    false_neg, false_pos = target & ~pred, pred & ~target
    if not random and pred.device.type == "cpu":
        return _clicks_on_crops(false_neg, false_pos, clicked)
    return _clicks_batched(false_neg, false_pos, clicked, random, generator)


def _clicks_batched(false_neg, false_pos, clicked, random: bool, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Both distance transforms of every region at once, on the device, with no host sync."""
    dist = distance_transform(torch.stack([false_neg, false_pos]))  # (2, B, K, H, W)
    if clicked is not None:
        dist = dist.masked_fill(clicked, 0)
    dist = dist.flatten(-2)
    peak = dist.amax(-1)  # (2, B, K): the farthest false negative, the farthest false positive
    positive = peak[0] > peak[1]
    chosen = torch.where(positive[..., None], dist[0], dist[1])
    best = peak.amax(0)
    if random:
        eligible = (chosen > 0) & (chosen >= 0.5 * best[..., None])
        score = torch.rand(chosen.shape, generator=generator, device=chosen.device)
        index = torch.where(eligible, score, -1.0).argmax(-1)
    else:
        index = chosen.argmax(-1)  # the first maximum in row-major order
    w = false_neg.shape[-1]
    points = torch.stack([index % w, index // w], dim=-1).float()
    return points, torch.where(best == 0, PERFECT, positive.long())


def _clicks_on_crops(false_neg, false_pos, clicked) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic clicker on the CPU: scipy's exact transform on each error's bounding box."""
    b, k, h, w = false_neg.shape
    points = torch.zeros(b * k, 2)
    labels = torch.full((b * k,), PERFECT, dtype=torch.int64)
    errors = (false_neg.reshape(-1, h, w).numpy(), false_pos.reshape(-1, h, w).numpy())
    done = None if clicked is None else clicked.reshape(-1, h, w).numpy()
    for i in range(b * k):
        (d_neg, *at_neg), (d_pos, *at_pos) = (_farthest(e[i], None if done is None else done[i]) for e in errors)
        if max(d_neg, d_pos) > 0:
            positive = d_neg > d_pos
            y, x = at_neg if positive else at_pos
            points[i] = torch.tensor([x, y], dtype=torch.float32)
            labels[i] = int(positive)
    return points.view(b, k, 2), labels.view(b, k)


def _farthest(error: np.ndarray, clicked: np.ndarray | None) -> tuple[float, int, int]:
    """(distance, y, x) of the first unclicked error pixel farthest from the error's boundary; 0 if none.

    On the bounding box padded by one background pixel the transform is exact: for a pixel inside the box,
    a background pixel outside it is never nearer than the padding ring.
    """
    rows, cols = np.flatnonzero(error.any(1)), np.flatnonzero(error.any(0))
    if rows.size == 0:
        return 0.0, 0, 0
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    dist = distance_transform_edt(np.pad(error[y0:y1, x0:x1], 1))[1:-1, 1:-1]
    if clicked is not None:
        dist[clicked[y0:y1, x0:x1]] = 0
    y, x = divmod(int(dist.argmax()), x1 - x0)
    return float(dist[y, x]), int(y0 + y), int(x0 + x)
