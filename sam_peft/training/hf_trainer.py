"""`PHPGTrainer`: `transformers.Trainer` driven by a `PHPGRecipe`, for projects built around the Trainer.

What the plain Trainer cannot do with PHPG batches, and what this subclass changes:
- data: the train DataLoader uses the recipe's collator and its CBDP plan (one unsharded plan per process;
  accelerate, inside the Trainer, shards the batches) and never drops dataset columns, so
  `remove_unused_columns` does not apply;
- epochs: the recipe's `on_epoch` plans each epoch before it starts, and the loop runs each epoch for its
  own (pruned) length, so a last incomplete gradient-accumulation window still steps;
- loss: `compute_loss` is the recipe's loss, divided by the region count of the whole accumulated batch
  across processes (`num_items_in_batch`, counted from `region_valid`, as the Trainer counts tokens);
- schedule: sized from the steps the pruning policy plans (`planned_num_samples`), not from full epochs,
  so a pruned run's learning rate still decays to its end;
- saving: `save_model`, checkpoints and `push_to_hub` write a sam_peft adapter (`load_adapter(dir)`).

The model given is the PEFT model (`apply_lora`); the Trainer trains the recipe's step module around it
(the whole PHPG step in its forward), so DDP under `accelerate launch` syncs the gradients of every round.
Validation is not the Trainer's (a loss on PHPG batches says little): run `sam_peft.evaluate` on the
saved adapter. Resuming from a Trainer checkpoint is refused: it would not hold the CBDP scores.
Per-epoch lengths go through `Trainer._run_epoch`, which transformers 5.17 and later have.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
import transformers
from peft import PeftModel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from ..models import save_adapter
from .hub import write_model_card
from .warm_start import score_before_training

__all__ = ["PHPGTrainer"]


def _held(factor, last: int, step: int) -> float:
    """A schedule's factor at `step`, held at its value at `last` after it."""
    return factor(min(step, last))


def _recipe_record(model: PeftModel, recipe) -> dict:
    """The settings the model card shows (`hub.RECIPE_FIELDS`), from the model and the recipe."""
    info, mixture, sampler = getattr(model, "sam_peft_info", {}), recipe.collator.mixture, recipe.sampler
    return {"lora_r": model.peft_config[model.active_adapter].r, "lora_preset": info.get("preset"),
            "train_heads": info.get("train_heads", []), "rounds": recipe.rounds,
            "behaviours": dict(zip(mixture.names, mixture.probabilities.round(4).tolist())),
            "pruning": sampler.strategy, "prune_ratio": sampler.prune_ratio, "anneal": sampler.anneal}


class PHPGTrainer(Trainer):
    """A `transformers.Trainer` for PHPG + CBDP LoRA fine-tuning; everything else (TrainingArguments,
    logging, callbacks, checkpoints, Hub push) is the Trainer's.

    Args:
        model: the PEFT model from `sam_peft.apply_lora` (or `load_adapter(..., is_trainable=True)`).
        args: the TrainingArguments. Without `max_steps`, `num_train_epochs` must equal the recipe's epochs
            (its pruning anneals over them); with `max_steps`, training takes exactly that many steps.
        recipe: the `PHPGRecipe` built on the training split (`recipe.train_set`), with the sampler unsharded
            (its default `num_replicas=1, rank=0`).
        adapter_info: extra entries for the saved adapter's `sam_peft.json` (e.g. `label_map`, `data`);
            the organ names are always recorded.
        warm_start: score every slice before epoch 0 so that it can prune (see `train`).
        kwargs: any other `Trainer` argument (callbacks, optimizers, ...), except `train_dataset` (the
            recipe's) and `eval_dataset`.
    """

    def __init__(self, model: PeftModel, args: TrainingArguments, recipe, *, adapter_info: dict | None = None,
                 warm_start: bool = True, **kwargs):
        if not hasattr(Trainer, "_run_epoch"):
            raise ImportError(f"PHPGTrainer needs transformers>=5.17 (its Trainer runs each epoch in _run_epoch); "
                              f"this is {transformers.__version__}: pip install -U 'transformers>=5.17,<6'")
        if not isinstance(model, PeftModel):
            raise ValueError(f"model must be the PEFT model from sam_peft.apply_lora, got {type(model).__name__}")
        for name, why in (("train_dataset", "the recipe's training split is trained on"),
                          ("eval_dataset", "run sam_peft.evaluate on the saved adapter (simulated-user Dice)")):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name}: PHPGTrainer takes none; {why}")
        if args.dataloader_persistent_workers:
            raise ValueError("dataloader_persistent_workers: the collator's epoch would not reach persistent "
                             "workers; leave it False")
        if args.dataloader_drop_last:
            raise ValueError("dataloader_drop_last: a CBDP epoch plan is trained whole; leave it False")
        self.recipe, self.peft_model, self.warm_start = recipe, model, warm_start
        self.adapter_info = {"organ_names": list(recipe.organ_names), "recipe": _recipe_record(model, recipe),
                             **(adapter_info or {})}
        super().__init__(model=recipe.step_module(model), args=args, train_dataset=recipe.prepare_dataset(),
                         **kwargs)
        # compute_loss divides by the regions of the whole accumulated batch: no further division by the
        # accumulation steps
        self.model_accepts_loss_kwargs = True

    # ---- data and loss ----

    def get_train_dataloader(self) -> DataLoader:
        """The recipe's loader (its epoch plan, PHPG batches), sharded over the processes by accelerate."""
        return self.accelerator.prepare(self.recipe.dataloader(self._train_batch_size,
                                                               num_workers=self.args.dataloader_num_workers))

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The next accumulation window's batches and their (regions, slices) summed over every process:
        the `num_items_in_batch` that `compute_loss` normalises by."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        totals = torch.zeros(2, device=device)
        for batch in batches:
            totals += self.recipe.count(batch).to(device)
        if self.accelerator.num_processes > 1:  # every process holds a window of the same length
            totals = self.accelerator.reduce(totals, "sum")
        return batches, totals

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        out = self.recipe.loss(model, inputs, totals=num_items_in_batch, step=self.state.global_step,
                               return_outputs=return_outputs)
        if num_items_in_batch is not None and self.accelerator.num_processes > 1:
            scale = self.accelerator.num_processes  # DDP averages gradients over the processes
            out = (out[0] * scale, out[1]) if return_outputs else out * scale
        return out

    # ---- epochs and schedule ----

    def set_initial_training_values(self, args: TrainingArguments, dataloader: DataLoader):
        """Epochs and steps from the pruning plan. With `max_steps`, that many steps, over as many epochs as
        they take; else the recipe's epochs, whatever their actual lengths (the loop's step bound is full
        epochs), with the learning-rate schedule sized from the planned steps (`create_scheduler`)."""
        num_samples = len(self.train_dataset)
        processes, accumulation = self.accelerator.num_processes, args.gradient_accumulation_steps
        full_micro = math.ceil(num_samples / (self._train_batch_size * processes))
        full_steps = math.ceil(full_micro / accumulation)
        epochs = self.recipe.sampler.num_epochs
        if args.max_steps > 0:
            max_steps, num_train_epochs = args.max_steps, sys.maxsize  # as the Trainer does without epochs
            self.schedule_steps = max_steps
        elif args.num_train_epochs != epochs:
            raise ValueError(f"num_train_epochs={args.num_train_epochs} differs from the recipe's {epochs} epochs "
                             "(its pruning anneals over them): set the same number in both, or set max_steps")
        else:
            max_steps, num_train_epochs = epochs * full_steps, epochs
            self.schedule_steps = self.recipe.planned_steps(self._train_batch_size, accumulation, processes)
        total_batch = self.get_total_train_batch_size(args)
        return (num_train_epochs, full_steps, num_samples, self.schedule_steps * total_batch, total_batch,
                full_micro, max_steps)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """The TrainingArguments' schedule over the planned steps; where the pruning policy keeps more than
        it planned, the steps past the plan hold its last value."""
        if self.lr_scheduler is not None:  # given by the user
            return self.lr_scheduler
        scheduler = super().create_scheduler(self.schedule_steps, optimizer)
        if isinstance(scheduler, LambdaLR):
            scheduler.lr_lambdas = [partial(_held, factor, self.schedule_steps) for factor in scheduler.lr_lambdas]
        return scheduler

    def _run_epoch(self, *, epoch: int, train_dataloader, **kwargs):
        """Plan the epoch, then run it for its own length: a pruned epoch ends its last accumulation window
        with an optimizer step instead of carrying its gradient into the next epoch."""
        self.recipe.on_epoch(epoch)
        micro = len(train_dataloader)
        kwargs.update(steps_in_epoch=micro,
                      num_update_steps_per_epoch=math.ceil(micro / self.args.gradient_accumulation_steps))
        return super()._run_epoch(epoch=epoch, train_dataloader=train_dataloader, **kwargs)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """`Trainer.train`, after scoring every slice once (no gradients, one round) when the sampler would
        prune epoch 0 by scores and `warm_start` is on: epoch 0 then prunes as the plan assumes."""
        if resume_from_checkpoint:
            raise ValueError("resume_from_checkpoint: PHPGTrainer cannot resume (Trainer checkpoints do not hold "
                             "the CBDP scores); start a new run")
        sampler = self.recipe.sampler
        if self.warm_start and sampler.strategy in ("cbdp", "infobatch") and sampler.prunes(0):
            score_before_training(self.peft_model, self.train_dataset, self.recipe.collator, sampler,
                                  list(self.recipe.organ_names), image_embeddings=self.recipe.image_embeddings,
                                  batch_size=self._train_batch_size, device=self.args.device,
                                  progress=self.is_local_process_zero() and not self.args.disable_tqdm)
        return super().train(**kwargs)

    # ---- saving ----

    def create_model_card(self, *args, **kwargs) -> None:
        """sam_peft's model card (base, recipe, how to load the adapter), for `push_to_hub`."""
        if self.is_world_process_zero():
            write_model_card(self.args.output_dir, repo_id=self.hub_model_id)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write a sam_peft adapter into `output_dir`, next to what is there (checkpoints, logs)."""
        if not self.args.should_save:
            return
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".adapter.", dir=output_dir) as tmp:
            staged = save_adapter(self.peft_model, Path(tmp) / "adapter", **self.adapter_info)
            for path in staged.iterdir():
                os.replace(path, output_dir / path.name)
        torch.save(self.args, output_dir / TRAINING_ARGS_NAME)
