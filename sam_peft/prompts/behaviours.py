"""Simulated human prompting behaviours: how different people would prompt one organ.

Every behaviour turns one organ mask into SAM prompt tokens in the mask's own pixel frame: points (P, 2)
float32 (x, y) pixel indices and labels (P,) int64 with SAM's vocabulary (1 positive click, 0 negative
click, 2 / 3 the top-left / bottom-right box corners). Pixel distances that model human imprecision are
given at 1024 scale (the SAM input side) and scaled to the frame's longest side, so a behaviour means the
same thing at any image resolution. NumPy, one region at a time: the collator and the evaluation call it
on CPU at original resolution.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from .clicks import distance_transform
from .options import BEHAVIOURS

POSITIVE, NEGATIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 1, 0, 2, 3
JITTER_SD = 0.1  # of the box side
JITTER_CAP = 20.0  # px at 1024 scale, per coordinate
LOOSE_RANGE = (0.1, 0.3)  # of the box side, per side
SHIFT_MAX = 0.2  # of the box side, per axis
BOUNDARY_BAND = 6.0  # px at 1024 scale
MULTI_POSITIVES = (2, 4)
MULTI_NEGATIVES = (1, 3)
NEIGHBOUR_REACH = 0.25  # of the organ's longer box side: how far away a "neighbouring" pixel may lie

Mask = np.ndarray  # bool (H, W)
Rng = np.random.Generator
Prompt = tuple[np.ndarray, np.ndarray]


def _bbox(mask: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) inclusive pixel indices of the mask's True pixels."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


def _sides(box: np.ndarray) -> np.ndarray:
    """Pixel extent (w, h, w, h) aligned with (x0, y0, x1, y1); a one-pixel box has sides 1."""
    w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
    return np.array([w, h, w, h])


def _box_prompt(box: np.ndarray, shape: tuple[int, int]) -> Prompt:
    """Clip to the image, order the corners, and emit the two corner tokens."""
    h, w = shape
    box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1])
    corners = np.sort(box.reshape(2, 2), axis=0)
    return corners.astype(np.float32), np.array([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], dtype=np.int64)


def _click_prompt(flat_indices: np.ndarray, labels: Sequence[int], width: int) -> Prompt:
    ys, xs = np.divmod(np.asarray(flat_indices, dtype=np.int64), width)
    return np.stack([xs, ys], axis=-1).astype(np.float32), np.asarray(labels, dtype=np.int64)


def _interior_distance(mask: np.ndarray) -> np.ndarray:
    """Distance of each mask pixel to the organ boundary (image border included), computed on the bbox crop."""
    x0, y0, x1, y1 = _bbox(mask).astype(int)
    crop = np.pad(mask[y0 : y1 + 1, x0 : x1 + 1], 1)  # padding with False == the border counts as boundary
    dist = np.zeros(mask.shape, dtype=np.float32)
    dist[y0 : y1 + 1, x0 : x1 + 1] = distance_transform(torch.from_numpy(crop)).numpy()[1:-1, 1:-1]
    return dist


def _sample_pixels(candidates: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to n distinct flat indices drawn uniformly from the True pixels of `candidates`."""
    pool = np.flatnonzero(candidates)
    return rng.choice(pool, size=min(n, pool.size), replace=False)


def _tight_box(mask: Mask, rng: Rng, neighbours: Mask, scale: float) -> Prompt:
    return _box_prompt(_bbox(mask), mask.shape)


def _jitter_box(mask: Mask, rng: Rng, neighbours: Mask, scale: float) -> Prompt:
    """Each coordinate moved by N(0, (10% of its side)^2) noise, each move clipped to 20 px at 1024 scale."""
    box = _bbox(mask)
    cap = JITTER_CAP * scale
    noise = np.clip(rng.normal(0.0, JITTER_SD * _sides(box)), -cap, cap)
    return _box_prompt(box + noise, mask.shape)


def _loose_box(mask: Mask, rng: Rng, neighbours: Mask, scale: float) -> Prompt:
    box = _bbox(mask)
    margin = rng.uniform(*LOOSE_RANGE, size=4) * _sides(box)
    return _box_prompt(box + margin * np.array([-1, -1, 1, 1]), mask.shape)


def _shifted_box(mask: Mask, rng: Rng, neighbours: Mask, scale: float) -> Prompt:
    """The tight box moved by up to 20% of its size per axis; the move halves until the box overlaps the organ."""
    box = _bbox(mask)
    shift = rng.uniform(-SHIFT_MAX, SHIFT_MAX, size=2) * _sides(box)[:2]
    for _ in range(8):
        corners, labels = _box_prompt(box + np.tile(shift, 2), mask.shape)
        (x0, y0), (x1, y1) = np.rint(corners).astype(int)
        if mask[y0 : y1 + 1, x0 : x1 + 1].any():
            return corners, labels
        shift = shift / 2
    return _box_prompt(box, mask.shape)


def _center_click(mask: Mask, rng: Rng, neighbours: Mask, scale: float) -> Prompt:
    """The interior pixel farthest from the boundary (the first in row-major order on ties, as next_clicks)."""
    return _click_prompt([np.argmax(_interior_distance(mask))], [POSITIVE], mask.shape[1])


def _random_click(mask: Mask, rng: Rng, neighbours: Mask, scale: float) -> Prompt:
    return _click_prompt(_sample_pixels(mask, 1, rng), [POSITIVE], mask.shape[1])


def _boundary_click(mask: Mask, rng: Rng, neighbours: Mask, scale: float) -> Prompt:
    """A uniform organ pixel within 6 px (at 1024 scale, at least 1 px) of the organ boundary."""
    band = max(1.0, BOUNDARY_BAND * scale)
    dist = _interior_distance(mask)
    return _click_prompt(_sample_pixels(mask & (dist <= band), 1, rng), [POSITIVE], mask.shape[1])


def _multi_click(mask: Mask, rng: Rng, neighbours: Mask, scale: float) -> Prompt:
    """2-4 positives inside, 1-3 negatives on neighbouring organs near this one (organ ambiguity).

    "Near" means within 25% of the organ's longer box side of the organ (at least 2 px). Without a
    neighbouring organ there, the negatives go to background near the organ instead.
    """
    positives = _sample_pixels(mask, rng.integers(MULTI_POSITIVES[0], MULTI_POSITIVES[1] + 1), rng)
    box = _bbox(mask)
    reach = max(2.0, NEIGHBOUR_REACH * _sides(box).max())
    (x0, y0, x1, y1), r, (h, w) = box.astype(int), int(np.ceil(reach)), mask.shape
    window = slice(max(0, y0 - r), min(h, y1 + r + 1)), slice(max(0, x0 - r), min(w, x1 + r + 1))
    near = np.zeros_like(mask)
    near[window] = distance_transform_edt(~mask[window]) <= reach  # distance to the organ
    near &= ~mask
    candidates = near & neighbours
    if not candidates.any():
        candidates = near & ~neighbours
    negatives = _sample_pixels(candidates, rng.integers(MULTI_NEGATIVES[0], MULTI_NEGATIVES[1] + 1), rng)
    labels = [POSITIVE] * len(positives) + [NEGATIVE] * len(negatives)
    return _click_prompt(np.concatenate([positives, negatives]), labels, w)


# name -> (behaviour, the most prompt tokens it emits), for each of `BEHAVIOURS` (options.py) in its order
_BEHAVIOURS: dict[str, tuple[Callable[..., Prompt], int]] = {
    "tight_box": (_tight_box, 2),
    "jitter_box": (_jitter_box, 2),
    "loose_box": (_loose_box, 2),
    "shifted_box": (_shifted_box, 2),
    "center_click": (_center_click, 1),
    "random_click": (_random_click, 1),
    "boundary_click": (_boundary_click, 1),
    "multi_click": (_multi_click, MULTI_POSITIVES[1] + MULTI_NEGATIVES[1]),
}
assert tuple(_BEHAVIOURS) == BEHAVIOURS, "options.BEHAVIOURS names the behaviours defined here, in this order"


def _check_names(names: Iterable[str]) -> None:
    unknown = sorted(set(names) - set(BEHAVIOURS))
    if unknown:
        raise ValueError(f"unknown behaviour(s) {unknown}; valid behaviours are {list(BEHAVIOURS)}")


def make_prompt(
    behaviour: str,
    mask: np.ndarray,
    rng: np.random.Generator,
    neighbours: np.ndarray | None = None,
    frame_side: float | None = None,
) -> Prompt:
    """Prompt tokens for one organ mask (H, W) in its own pixel frame: points (P, 2) float32, labels (P,) int64.

    `neighbours`: bool (H, W), the other organs' pixels (used by multi_click). `frame_side`: the longest
    side of the frame that maps to 1024 (default: the mask's longest side), which scales pixel distances.
    """
    _check_names([behaviour])
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D (H, W), got shape {mask.shape}")
    if not mask.any():
        raise ValueError(f"cannot prompt an empty mask (behaviour {behaviour!r})")
    if frame_side is not None and frame_side <= 0:
        raise ValueError(f"frame_side must be > 0, got {frame_side}")
    neighbours = np.zeros_like(mask) if neighbours is None else np.asarray(neighbours, dtype=bool)
    if neighbours.shape != mask.shape:
        raise ValueError(f"neighbours shape {neighbours.shape} does not match mask shape {mask.shape}")
    behave = _BEHAVIOURS[behaviour][0]
    return behave(mask, rng, neighbours & ~mask, (frame_side or max(mask.shape)) / 1024)


class BehaviourMixture:
    """A weighted choice among behaviours. `weights`: name -> weight, a list of names (equal weights), or
    None (all behaviours, equal weights). Zero weights are allowed, negative or all-zero ones are not."""

    def __init__(self, weights: Mapping[str, float] | Sequence[str] | None = None):
        if weights is None:
            weights = BEHAVIOURS
        if isinstance(weights, str):
            raise ValueError(f"behaviours must be a list of names or a name -> weight mapping, got {weights!r}")
        if not isinstance(weights, Mapping):
            weights = dict.fromkeys(weights, 1.0)
        _check_names(weights)
        values = np.array([float(weights[name]) for name in weights])
        if not np.all(np.isfinite(values)) or (values < 0).any():
            raise ValueError(f"behaviour weights must be finite and >= 0, got {dict(weights)}")
        if values.sum() == 0:
            raise ValueError(f"behaviour weights must not all be zero, got {dict(weights)}")
        keep = values > 0
        self.names: tuple[str, ...] = tuple(name for name, k in zip(weights, keep) if k)
        self.probabilities = values[keep] / values[keep].sum()

    def sample(self, rng: np.random.Generator) -> str:
        return self.names[rng.choice(len(self.names), p=self.probabilities)]

    @property
    def max_points(self) -> int:
        """The most prompt tokens any behaviour of this mixture can emit."""
        return max(_BEHAVIOURS[name][1] for name in self.names)

    def __repr__(self) -> str:
        return f"BehaviourMixture({dict(zip(self.names, self.probabilities.round(4).tolist()))})"
