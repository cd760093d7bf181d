"""The PHPG training recipe: what a training loop needs besides a model and an optimizer.

`PHPGRecipe` owns the three pieces that must agree with each other: the PHPG collator (which regions a slice
yields and their prompts), the CBDP sampler (which slices an epoch keeps, their loss weights, and the region
losses it scores them by) and the PHPG loss. Any loop drives it the same way; `sam_peft.train` is one such loop
(accelerate), and a `transformers.Trainer` is another:

    recipe = PHPGRecipe.from_config(config, processor, train_set, organ_names)
    loader = recipe.dataloader(batch_size=8)          # a prepared (sharded) DataLoader is fine: see below
    step = recipe.step_module(model)                   # the module to wrap in DDP / accelerator.prepare
    for epoch in range(config.epochs):
        recipe.on_epoch(epoch)                         # plans the epoch, new prompts every epoch
        for batch in loader:
            loss = recipe.loss(step, batch)            # also scores the regions for CBDP
            loss.backward(); optimizer.step(); optimizer.zero_grad()

Sharding: the sampler yields the whole epoch plan on every process (num_replicas=1, rank=0), for a loader
that something else shards: `accelerator.prepare(loader)` or `transformers.Trainer`. A loop that iterates the
plan itself on several processes, without such a loader, passes `num_replicas`/`rank` (or leaves them None:
torch.distributed's world size and rank), so each process takes its own share. Sharding in both places would
leave each process 1/world_size^2 of the data.

Normalisation: the PHPG loss is a sum over regions divided by the number of regions of the whole optimizer
step (all micro-batches of an accumulation window on all processes), so accumulation and several processes
take the same step as one large batch even when micro-batches hold different numbers of regions. Count
the step's regions with `count`, add them up, and pass the totals to `loss`; without them a micro-batch is
normalised by its own regions (right for one micro-batch per step on one process).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import read_metadata
from ..prompts import BEHAVIOURS, PHPGCollator
from ..prompts.collator import MIN_PIXELS
from ..pruning import CBDPSampler
from .distill import DistilledStep
from .step import PHPGStep, StepOutput

CLICK_SEED_STRIDE = 1_000_003  # refinement clicks of optimizer step s draw from seed * stride + s


class IndexedSlices(Dataset):
    """Prepared slices (image, label) with their row index as `sample_id`: the key of prompts' seeds, CBDP
    scores and cached embeddings."""

    def __init__(self, dataset):
        self.dataset = dataset.select_columns(["image", "label"]).with_format("numpy")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[int(index)], "sample_id": int(index)}


class EpochPlan(Sampler[int]):
    """The CBDP sampler's current epoch plan, without its `set_epoch`.

    accelerate's prepared DataLoader (and so `transformers.Trainer`) calls `set_epoch(<its pass count>)` on the
    sampler it finds, which would fold in the losses and plan again mid-run; the recipe's `on_epoch` plans,
    never mid-epoch, as a resumed epoch must keep the plan it was checkpointed with.
    """

    def __init__(self, cbdp: CBDPSampler):
        self.cbdp = cbdp

    def __iter__(self):
        return iter(self.cbdp)

    def __len__(self) -> int:
        return len(self.cbdp)


def organ_threshold(min_pixels: int, dataset) -> int:
    """The one organ filter's threshold: `min_pixels`, raised to prepare's own when that is higher (the
    dataset's `organs` column lists only organs that reached prepare's threshold, and the sampler can only
    score organs listed there)."""
    try:
        prepared = read_metadata(dataset).get("min_pixels", 1)
    except ValueError:  # not made by `sam-peft prepare`: its organ lists are taken as they are
        prepared = 1
    return max(min_pixels, prepared)


def organs_per_sample(dataset, min_pixels: int) -> list[list[str]]:
    """Organ names of each slice with at least `min_pixels` pixels (from prepare's organs/organ_pixels)."""
    return [[organ for organ, n in zip(organs, pixels) if n >= min_pixels]
            for organs, pixels in zip(dataset["organs"], dataset["organ_pixels"])]


class PHPGRecipe:
    """Owns the PHPG collator, the CBDP sampler and the PHPG loss for one training run.

    Args:
        processor: the base model's `SamInputProcessor` (`sam_peft.models.processor_for(model)`).
        organ_names: the dataset's organ names (label k -> organ_names[k - 1]).
        train_set: the prepared training split (columns image, label, organs, organ_pixels).
        behaviours: simulated-user mixture {name: weight} or names (None: all equally).
        rounds: PHPG rounds per step (the prompt, then error-guided clicks).
        max_regions: organs decoded per slice, sampled (None: all).
        min_pixels: pixels an organ needs on a slice to become a region and a CBDP group member; raised to
            prepare's threshold when that is higher (`organ_threshold`).
        pruning, prune_ratio, prune_budget, anneal, num_epochs: the CBDP sampler's policy.
        seed: seeds data order, prompts and refinement clicks.
        distill_weight, distill_boxes: distillation from the frozen base (0: off).
        image_embeddings: (N, C, h, w) cached encoder output indexed by sample_id (frozen encoder); batches
            then carry no pixels.
        num_replicas, rank: the sampler's shard; 1 and 0 for a loader that accelerate or Trainer shards.
    """

    def __init__(self, processor, organ_names: Sequence[str], train_set, *,
                 behaviours: Mapping[str, float] | Sequence[str] | None = None, rounds: int = 3,
                 max_regions: int | None = None, min_pixels: int = MIN_PIXELS, pruning: str = "cbdp",
                 prune_ratio: float = 0.5, prune_budget: str = "pool", anneal: float = 0.875, num_epochs: int = 1,
                 seed: int = 0, distill_weight: float = 0.0, distill_boxes: int = 4,
                 image_embeddings: torch.Tensor | None = None, num_replicas: int | None = 1, rank: int | None = 0):
        self.organ_names = tuple(organ_names)
        self.train_set = train_set
        self.rounds, self.seed = rounds, seed
        self.distill_weight, self.distill_boxes = distill_weight, distill_boxes
        self.image_embeddings = image_embeddings
        self.min_pixels = organ_threshold(min_pixels, train_set)
        self.sampler = CBDPSampler(organs_per_sample(train_set, self.min_pixels), num_epochs=num_epochs,
                                   prune_ratio=prune_ratio, anneal=anneal, seed=seed, strategy=pruning,
                                   budget=prune_budget, num_replicas=num_replicas, rank=rank)
        self.collator = PHPGCollator(processor, self.organ_names, behaviours=behaviours, max_regions=max_regions,
                                     min_pixels=self.min_pixels, seed=seed, include_pixels=image_embeddings is None)

    @classmethod
    def from_config(cls, config, processor, train_set, organ_names: Sequence[str],
                    image_embeddings: torch.Tensor | None = None) -> "PHPGRecipe":
        """The recipe of a `TrainConfig` (its PHPG, CBDP and distillation settings)."""
        return cls(processor, organ_names, train_set, behaviours=config.behaviours, rounds=config.rounds,
                   max_regions=config.max_regions, min_pixels=config.min_pixels, pruning=config.pruning,
                   prune_ratio=config.prune_ratio, prune_budget=config.prune_budget, anneal=config.anneal,
                   num_epochs=config.epochs, seed=config.seed, distill_weight=config.distill_weight,
                   distill_boxes=config.distill_boxes, image_embeddings=image_embeddings)

    # ------------------------------------------------------------------------------------------ data

    def prepare_dataset(self, dataset=None) -> IndexedSlices:
        """`dataset` (default: the training split) as items the collator takes: image, label, sample_id.

        Returns:
            A torch Dataset; item i is row i of `dataset` with `sample_id` i.
        """
        return IndexedSlices(self.train_set if dataset is None else dataset)

    def dataloader(self, batch_size: int, num_workers: int = 0) -> DataLoader:
        """A DataLoader over the training split in the current epoch plan, collated into PHPG batches.

        Returns:
            A DataLoader to pass to `accelerator.prepare` (which shards it) or to iterate directly.
        """
        return DataLoader(self.prepare_dataset(), batch_size=batch_size, sampler=EpochPlan(self.sampler),
                          collate_fn=self.collator, num_workers=num_workers)

    def on_epoch(self, epoch: int, plan: bool = True) -> None:
        """Start `epoch`: the sampler plans it (from the scores recorded so far) and the collator draws new
        prompts. `plan=False` keeps the sampler's current plan (a run resumed in the middle of `epoch`)."""
        if plan:
            self.sampler.set_epoch(epoch)
        self.collator.set_epoch(epoch)

    def planned_num_samples(self, epoch: int) -> int:
        """Samples the sampler aims to keep in `epoch` (sizes learning-rate schedules before epochs are planned).

        Returns:
            The policy's budget for `epoch` when the sampler states one, else the training split's size.
        """
        planned = getattr(self.sampler, "planned_num_samples", None)
        return planned(epoch) if planned is not None else len(self.train_set)

    def planned_steps(self, batch_size: int, grad_accum: int = 1, num_processes: int = 1) -> int:
        """Optimizer steps of the whole run as planned (`planned_num_samples` summed over the epochs).

        Returns:
            The number of optimizer steps, each of `grad_accum` micro-batches of `batch_size` per process.
        """
        per_step = batch_size * num_processes
        return sum(math.ceil(math.ceil(self.planned_num_samples(e) / per_step) / grad_accum)
                   for e in range(self.sampler.num_epochs))

    # ------------------------------------------------------------------------------------------ loss

    def step_module(self, model: nn.Module) -> PHPGStep:
        """The training step as a module around `model` (with distillation when distill_weight > 0): the module
        to hand to `accelerator.prepare` / DDP, so the whole step runs inside its forward."""
        if self.distill_weight:
            return DistilledStep(model, self.rounds, self.distill_weight, self.distill_boxes)
        return PHPGStep(model, rounds=self.rounds)

    @staticmethod
    def count(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(regions, slices) of a batch as a float tensor on its device, to add up over an optimizer step.

        Returns:
            tensor([valid regions, slices]).
        """
        valid = batch["region_valid"]
        return torch.stack([valid.sum(), valid.new_tensor(valid.shape[0], dtype=torch.long)]).float()

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], totals: torch.Tensor | None = None,
             step: int | None = None, return_outputs: bool = False):
        """The CBDP-weighted PHPG loss of a batch (plus distillation); records each region's loss for CBDP.

        Args:
            model: the `step_module` (possibly wrapped by DDP / accelerate), or a SAM / peft model, which is
                then wrapped on the fly (fine on one process; under DDP pass the wrapped step module).
            batch: a collated PHPG batch on the model's device.
            totals: `count` summed over every micro-batch of this optimizer step on every process; the loss is
                then this batch's share of the step's loss (region losses summed, divided by the step's
                regions; distillation by the step's slices). None: this batch is the whole step.
            step: the optimizer step, seeding the refinement clicks (None: unseeded).
            return_outputs: also return the `StepOutput` (region losses, region Dice, logits).

        Returns:
            The scalar loss, or (loss, StepOutput) with `return_outputs`.
        """
        module = model if isinstance(getattr(model, "module", model), PHPGStep) else self.step_module(model)
        ids = batch["sample_ids"]
        device = batch["region_valid"].device
        embeddings = None
        if self.image_embeddings is not None:
            embeddings = self.image_embeddings[ids.cpu()].to(device, torch.float32)
        generator = None
        if step is not None:
            generator = torch.Generator(device).manual_seed(self.seed * CLICK_SEED_STRIDE + step)
        num_regions, num_images = (None, None) if totals is None else totals.tolist()
        out = module(batch, embeddings, self.sampler.weights(ids), generator, num_regions=num_regions,
                     num_images=num_images)
        self.record(batch, out)
        return (out.loss, out) if return_outputs else out.loss

    def record(self, batch: Mapping[str, torch.Tensor], out: StepOutput) -> None:
        """Give each valid region's loss, organ and behaviour to the CBDP sampler."""
        valid = batch["region_valid"].cpu()
        ids = batch["sample_ids"].cpu()[:, None].expand_as(valid)[valid]
        organs = [self.organ_names[i] for i in batch["organ_ids"].cpu()[valid].tolist()]
        behaviours = [BEHAVIOURS[i] for i in batch["behaviour_ids"].cpu()[valid].tolist()]
        self.sampler.update(ids.tolist(), organs, out.region_losses.float().cpu()[valid], behaviours=behaviours)
