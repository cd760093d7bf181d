"""The PHPG collator: every organ of every slice becomes a region with a simulated human prompt.

Prompts are drawn at original resolution (where the behaviours' pixel distances mean what they say) and
then mapped to the model-input frame, so the same slice gets the same prompt whatever the base model.
Randomness comes from `np.random.default_rng([seed, epoch, sample_id])`: a sample's regions and prompts
depend only on (seed, epoch, sample), never on the batch it lands in or the worker that builds it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..models.decoding import PAD_LABEL
from ..models.processor import LOW_RES, SamInputProcessor
from .behaviours import BEHAVIOURS, BehaviourMixture, make_prompt
from .options import MIN_PIXELS


class PHPGCollator:
    """`collate_fn` for a DataLoader over prepared slices (dicts with `image`, `label`, `sample_id`).

    `label` holds compact organ indices: 0 background, k -> organ_names[k - 1]. Organs with fewer than
    `min_pixels` pixels are skipped. `max_regions` caps the regions per slice by choosing organs uniformly
    without replacement, so every organ present has the same chance whatever its size (weighting by how
    rare an organ is in the batch would make a sample's regions depend on its batch). `max_points` fixes
    the token axis P (static shapes); by default P is the batch maximum. Call `set_epoch` before each
    epoch; with `num_workers > 0` the workers receive a copy of the collator when iteration starts, so do
    not combine `set_epoch` with `persistent_workers=True`.

    Returns tensors: pixel_values (B, 3, S, S) float32 (only with `include_pixels`), original_sizes (B, 2)
    (h, w), points (B, K, P, 2) float32 (x, y) in the model-input frame, point_labels (B, K, P) int64
    (-1 padding), region_valid (B, K) bool, targets (B, K, 256, 256) bool, organ_ids and behaviour_ids
    (B, K) int64 (-1 padding; indices into organ_names and BEHAVIOURS), sample_ids (B,). K >= 1.
    """

    def __init__(
        self,
        processor: SamInputProcessor,
        organ_names: Sequence[str],
        behaviours: Mapping[str, float] | Sequence[str] | None = None,
        max_regions: int | None = None,
        min_pixels: int = MIN_PIXELS,
        seed: int = 0,
        max_points: int | None = None,
        include_pixels: bool = True,
    ):
        self.processor = processor
        self.organ_names = tuple(organ_names)
        if not self.organ_names:
            raise ValueError("organ_names must name at least one organ")
        self.mixture = BehaviourMixture(behaviours)
        if max_regions is not None and max_regions < 1:
            raise ValueError(f"max_regions must be >= 1 or None, got {max_regions}")
        if min_pixels < 1:
            raise ValueError(f"min_pixels must be >= 1, got {min_pixels}")
        if max_points is not None and max_points < self.mixture.max_points:
            raise ValueError(
                f"max_points={max_points} is too small: behaviours {self.mixture.names} emit up to "
                f"{self.mixture.max_points} prompt points"
            )
        self.max_regions = max_regions
        self.min_pixels = min_pixels
        self.seed = seed
        self.max_points = max_points
        self.include_pixels = include_pixels
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _unpack(self, item: Mapping, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Validated (image, label, sample_id) of one dataset item."""
        if "sample_id" not in item:
            raise ValueError(
                f"batch item {index} has no 'sample_id'; wrap the dataset so every item carries its index "
                "(prompts are seeded by (seed, epoch, sample_id))"
            )
        image, label, sample_id = np.asarray(item["image"]), np.asarray(item["label"]), int(item["sample_id"])
        if label.ndim != 2 or image.shape[:2] != label.shape:
            raise ValueError(
                f"sample {sample_id}: label must be 2D (H, W) and the image (H, W) or (H, W, 3) on the same grid, "
                f"got label {label.shape} and image {image.shape}"
            )
        if label.min() < 0 or label.max() > len(self.organ_names):
            raise ValueError(
                f"sample {sample_id}: label values must lie in [0, {len(self.organ_names)}] "
                f"(0 background, k -> organ_names[k - 1]), got [{label.min()}, {label.max()}]"
            )
        return image, label, sample_id

    def _regions(self, label: np.ndarray, sample_id: int) -> dict:
        """Organ ids, behaviour ids, prompts (model-input frame) and low-res targets of one slice."""
        rng = np.random.default_rng([self.seed, self.epoch, sample_id])
        values, counts = np.unique(label[label > 0], return_counts=True)
        organs = values[counts >= self.min_pixels]
        if self.max_regions is not None and organs.size > self.max_regions:
            organs = np.sort(rng.choice(organs, size=self.max_regions, replace=False))
        masks = label[None] == organs[:, None, None]
        behaviours, prompts = [], []
        for mask in masks:
            behaviour = self.mixture.sample(rng)
            points, labels = make_prompt(behaviour, mask, rng, neighbours=(label > 0) & ~mask)
            behaviours.append(BEHAVIOURS.index(behaviour))
            prompts.append((self.processor.transform_coords(points, label.shape), labels))
        low_res = self.processor.mask_to_low_res(masks)
        targets = low_res >= 0.5
        vanished = ~targets.flatten(1).any(-1)
        targets[vanished] = low_res[vanished] > 0  # a tiny organ keeps the low-res pixels it touches
        return {"organs": organs - 1, "behaviours": behaviours, "prompts": prompts, "targets": targets}

    def __call__(self, items: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        unpacked = [self._unpack(item, i) for i, item in enumerate(items)]
        regions = [self._regions(label, sample_id) for _, label, sample_id in unpacked]
        b = len(items)
        k = max(1, max(len(r["prompts"]) for r in regions))
        p = self.max_points or max([1] + [len(labels) for r in regions for _, labels in r["prompts"]])
        points = torch.zeros(b, k, p, 2)
        point_labels = torch.full((b, k, p), PAD_LABEL, dtype=torch.int64)
        targets = torch.zeros(b, k, LOW_RES, LOW_RES, dtype=torch.bool)
        organ_ids = torch.full((b, k), -1, dtype=torch.int64)
        behaviour_ids = torch.full((b, k), -1, dtype=torch.int64)
        for i, r in enumerate(regions):
            n = len(r["prompts"])
            for j, (coords, labels) in enumerate(r["prompts"]):
                points[i, j, : len(labels)] = torch.from_numpy(coords)
                point_labels[i, j, : len(labels)] = torch.from_numpy(labels)
            targets[i, :n] = r["targets"]
            organ_ids[i, :n] = torch.from_numpy(r["organs"].astype(np.int64))
            behaviour_ids[i, :n] = torch.tensor(r["behaviours"], dtype=torch.int64)
        batch = {
            "original_sizes": torch.tensor([label.shape for _, label, _ in unpacked], dtype=torch.int64),
            "points": points,
            "point_labels": point_labels,
            "region_valid": organ_ids >= 0,
            "targets": targets,
            "organ_ids": organ_ids,
            "behaviour_ids": behaviour_ids,
            "sample_ids": torch.tensor([sample_id for _, _, sample_id in unpacked], dtype=torch.int64),
        }
        if self.include_pixels:
            batch["pixel_values"] = torch.stack([self.processor.preprocess(image) for image, _, _ in unpacked])
        return batch
