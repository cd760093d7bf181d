"""Warm start for data pruning: score every training slice once before epoch 0, so epoch 0 can prune.

Without it a pruning sampler knows nothing before the first epoch and must train on every slice; at 8 epochs
and anneal 0.875 that alone costs 1/8 of the run's saving. The pass is cheap: no gradients, one PHPG round,
and with a frozen encoder it runs on the cached embeddings (decoder passes only).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..prompts import BEHAVIOURS, PHPGCollator
from ..pruning import CBDPSampler
from .step import phpg_forward


@torch.no_grad()
def score_before_training(
    model: torch.nn.Module,
    rows: Dataset,
    collator: PHPGCollator,
    sampler: CBDPSampler,
    organ_names: list[str],
    *,
    image_embeddings: torch.Tensor | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> int:
    """Give `sampler` a first-round loss for every region of every row; returns the regions scored here.

    rows: items are dicts with image, label and sample_id (the trainer's rows). Prompts and regions come from
    `collator` as in training (under its `max_regions` the organs not drawn count as average until they are
    seen: `policy.slice_difficulty`). image_embeddings: the
    (N, C, h, w) cached encoder outputs indexed by sample_id (frozen encoder); otherwise the encoder runs.
    Under torch.distributed each process scores rows rank::world_size; the sampler gathers them at its
    next `set_epoch`, which must come before the first epoch is planned.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)
    indices = list(range(rank, len(rows), world))
    was_training = model.training
    model.eval()
    scored = 0
    try:
        for start in tqdm(range(0, len(indices), batch_size), desc="scoring slices before training",
                          disable=not progress):
            batch = collator([rows[i] for i in indices[start:start + batch_size]])
            ids = batch["sample_ids"]
            embeddings = None if image_embeddings is None else image_embeddings[ids].to(device, torch.float32)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = phpg_forward(model, batch, rounds=1, image_embeddings=embeddings, random_clicks=False)
            valid = batch["region_valid"].cpu()
            organs = [organ_names[o] for o in batch["organ_ids"].cpu()[valid].tolist()]
            behaviours = [BEHAVIOURS[b] for b in batch["behaviour_ids"].cpu()[valid].tolist()]
            region_ids = ids[:, None].expand_as(valid)[valid]
            sampler.update(region_ids.tolist(), organs, out.region_losses.float().cpu()[valid], behaviours=behaviours)
            scored += len(organs)
    finally:
        model.train(was_training)
    return scored
