"""Validation during training: `evaluate`'s simulated users, with the slices shared out over the processes.

Each process evaluates the slices whose row index is congruent to its rank, the per-instance results are
gathered with `gather_for_metrics` and put back in row order, and every process summarises the same list.
Prompts are seeded by row, not by batch, so the metrics are those of `evaluate` on one process (up to float
rounding between differently composed decoder batches). No process waits on another for longer than its own
share, so no collective timeout needs raising.
"""
from __future__ import annotations

import importlib
import time

import numpy as np
import torch

from ..data import read_metadata
from ..evaluation.options import EVAL_MIN_PIXELS
from ..models import processor_for

protocol = importlib.import_module("sam_peft.evaluation.evaluate")  # the module (the package exports the function)


def validate(accelerator, model, dataset, behaviours, *, batch_size: int = 8, seed: int = 0,
             image_embeddings: torch.Tensor | None = None, min_pixels: int = EVAL_MIN_PIXELS) -> dict:
    """`evaluate(model, dataset, behaviours, noc=False)`'s metrics, computed on every process's share of the slices.

    Collective: every process must call it. Returns the same metrics on every process.
    """
    behaviours = protocol._check_behaviours(behaviours, noc=False)
    organ_names = read_metadata(dataset)["organ_names"]
    n_clicks = max([protocol.CLICK_SERIES[b] for b in behaviours if b in protocol.CLICK_SERIES] + [0])
    rank, world = accelerator.process_index, accelerator.num_processes
    slices = (s for s in protocol._slices(dataset, None, min_pixels, False) if s.row % world == rank)
    processor = processor_for(model)
    found, n_slices, start = [], 0, time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in protocol._batches(slices, batch_size):
                instances = protocol._evaluate_batch(model, processor, batch, behaviours, n_clicks, seed,
                                                     organ_names, image_embeddings)
                found += zip([s.row for s in batch for _ in s.organs], instances)
                n_slices += len(batch)
    finally:
        model.train(was_training)
    found = accelerator.gather_for_metrics(found, use_gather_object=True)
    n_slices = int(accelerator.reduce(torch.tensor(n_slices, device=accelerator.device), "sum"))
    if not found:
        raise ValueError(f"validation: no slice holds an organ instance of at least {min_pixels} pixels")
    instances = [instance for _, instance in sorted(found, key=lambda pair: pair[0])]  # stable: organ order kept
    return protocol._summarise(instances, behaviours, organ_names, 0, n_slices, time.perf_counter() - start)


def organ_mean_dice(metrics: dict, behaviours) -> tuple[float, str, float]:
    """(organ-mean Dice, worst organ, its Dice), each organ's Dice averaged over `behaviours` first: every
    organ counts once, however many instances it has."""
    organs = list(metrics["dice"][behaviours[0]]["per_organ"])
    per_organ = {o: float(np.mean([metrics["dice"][b]["per_organ"][o] for b in behaviours])) for o in organs}
    worst = min(per_organ, key=per_organ.get)
    return float(np.mean(list(per_organ.values()))), worst, per_organ[worst]
