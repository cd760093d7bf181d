"""`train(config)`: PHPG batches, CBDP sampling and LoRA adapters on `accelerate`.

The same code runs on one CPU, one GPU, or several processes under `accelerate launch`. The CBDP sampler
shards the data itself (so the DataLoader is not prepared), every process folds in every process's
losses, and `accelerator.save_state` checkpoints carry the sampler and the loop position, so `resume`
continues a killed run where it stopped.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import DatasetDict
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data import load_prepared, phantom_dataset, read_metadata
from ..io import atomic_path
from ..models import apply_lora, load_base_model, processor_for, save_adapter
from ..prompts import PHPGCollator
from ..pruning import CBDPSampler
from .config import TrainConfig
from .embedding_cache import image_embeddings
from .hub import write_model_card
from .step import PHPGStep


class _Rows(Dataset):
    """Prepared slices with their row index as `sample_id` (the key for CBDP scores and cached embeddings)."""

    def __init__(self, dataset):
        self.dataset = dataset.select_columns(["image", "label"]).with_format("numpy")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[int(index)], "sample_id": int(index)}


@dataclass
class Progress:
    """Where the loop is; checkpointed with the model so a resumed run skips what was done."""

    epoch: int = 0
    batch: int = 0  # batches done in `epoch`
    step: int = 0  # optimizer steps overall
    best: float = -math.inf
    train_seconds: float = 0.0  # time spent in training steps (not validation), across resumes
    history: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def load_data(config: TrainConfig) -> tuple[DatasetDict, dict]:
    if config.data is None:
        data = phantom_dataset(config.phantom_cases, seed=config.seed, val_fraction=0.25)
    elif Path(config.data).exists():
        data = load_prepared(config.data)
    else:
        from datasets import load_dataset

        data = load_dataset(config.data)
    for split in (config.train_split, config.val_split):
        if split not in data:
            raise ValueError(f"data {config.data or 'phantom'}: no split {split!r}; available: {sorted(data)}")
    return data, read_metadata(data)


def lr_at(progress: float, config: TrainConfig) -> float:
    """Learning rate at a fraction of training: linear warmup, then cosine / poly decay or constant.

    Driven by the fraction of epochs done, not a step count, so CBDP's shorter epochs decay the same way.
    """
    if progress < config.warmup_ratio:
        return config.lr * progress / config.warmup_ratio
    rest = (progress - config.warmup_ratio) / max(1e-8, 1 - config.warmup_ratio)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * min(rest, 1.0)))
    if config.schedule == "poly":
        return config.lr * (1 - min(rest, 1.0)) ** 0.9
    return config.lr


def claim_output_dir(output: Path, resume: bool, overwrite: bool) -> None:
    if (output / "config.yaml").exists() and not resume:
        if not overwrite:
            raise FileExistsError(f"{output} holds another run: pass resume=True (--resume) to continue it "
                                  "or overwrite=True (--overwrite) to replace it")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Fine-tune, validate each `eval_every` epochs, keep the best adapter; returns the final metrics."""
    from ..evaluation import evaluate

    config.validate()
    output = Path(config.output_dir)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, log_with=config.log_with,
                              project_dir=str(output), gradient_accumulation_steps=config.grad_accum)
    data, meta = load_data(config)  # bad data or model names fail before anything is written
    train_set, val_set = data[config.train_split], data[config.val_split]
    organ_names = meta["organ_names"]
    base = load_base_model(config.model)
    if accelerator.is_main_process:
        claim_output_dir(output, resume, overwrite)
        with atomic_path(output / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    processor = processor_for(base)
    cached = None
    if config.frozen_encoder:  # the encoder's output never changes: cache it for training and validation
        cache_dir = config.cache_dir or output.parent / ".embedding_cache"
        with accelerator.main_process_first():
            cached, val_cached = (image_embeddings(base, rows, processor, cache_dir, device=accelerator.device,
                                                   progress=accelerator.is_local_main_process)
                                  for rows in (train_set, val_set))
        evaluate = partial(evaluate, image_embeddings=val_cached)
    model = apply_lora(base, config.lora_preset, r=config.lora_r, alpha=config.lora_alpha,
                       dropout=config.lora_dropout, train_heads=config.train_heads,
                       verbose=accelerator.is_main_process)

    # Regions and CBDP scores must describe the same organs: those listed by prepare that reach min_pixels.
    min_pixels = max(config.min_pixels, meta.get("min_pixels", 1))
    sample_organs = [[o for o, n in zip(organs, pixels) if n >= min_pixels]
                     for organs, pixels in zip(train_set["organs"], train_set["organ_pixels"])]
    sampler = CBDPSampler(sample_organs, num_epochs=config.epochs, prune_ratio=config.prune_ratio,
                          anneal=config.anneal, seed=config.seed, strategy=config.pruning,
                          budget=config.prune_budget)
    collator = PHPGCollator(processor, organ_names, behaviours=config.behaviours, max_regions=config.max_regions,
                            min_pixels=min_pixels, seed=config.seed, include_pixels=cached is None)
    step = PHPGStep(model, rounds=config.rounds)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    step, optimizer = accelerator.prepare(step, optimizer)
    progress = Progress()
    accelerator.register_for_checkpointing(sampler, progress)
    if resume:
        _resume(accelerator, output)
    accelerator.init_trackers("sam_peft", config={k: str(v) for k, v in config.to_dict().items()})

    rows = _Rows(train_set)
    done, last_eval = False, (-1, None)  # (step, metrics) of the latest validation
    while progress.epoch < config.epochs and not done:
        epoch = progress.epoch
        if progress.batch == 0:  # mid-epoch, a resumed sampler already holds this epoch's plan
            sampler.set_epoch(epoch)
        collator.set_epoch(epoch)
        full_order = list(sampler)
        n_batches = math.ceil(len(full_order) / config.batch_size)
        order = full_order[progress.batch * config.batch_size:]
        loader = DataLoader(rows, batch_size=config.batch_size, sampler=order, collate_fn=collator,
                            num_workers=config.num_workers)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", initial=progress.batch,
                   total=progress.batch + len(loader), disable=not accelerator.is_local_main_process)
        step.train()
        for batch in bar:
            started = time.perf_counter()
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            ids = batch["sample_ids"]
            embeddings = None if cached is None else cached[ids.cpu()].to(accelerator.device, torch.float32)
            lr = lr_at((epoch + progress.batch / n_batches) / config.epochs, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            generator = torch.Generator(accelerator.device).manual_seed(config.seed * 1_000_003 + progress.step)
            with accelerator.accumulate(step):
                out = _guarded(lambda: step(batch, embeddings, sampler.weights(ids).to(accelerator.device), generator))
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(step.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            _score(sampler, batch, out, organ_names)
            progress.batch += 1
            progress.step += 1
            progress.train_seconds += time.perf_counter() - started
            valid = batch["region_valid"]
            dice = float((out.region_dice.sum() / valid.sum().clamp(min=1)).item())
            logs = {"loss": out.loss.item(), "dice": dice, "lr": lr,
                    "regions_per_s": int(valid.sum()) / (time.perf_counter() - started)}
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
            accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=progress.step)
            if config.checkpoint_every and progress.step % config.checkpoint_every == 0:
                _checkpoint(accelerator, output, progress, config.keep_checkpoints)
            if config.max_steps and progress.step >= config.max_steps:
                done = True
                break
        if done and progress.batch < n_batches:
            break  # stopped mid-epoch by max_steps
        summary = sampler.epoch_summary()
        accelerator.log({"cbdp/kept_fraction": summary["kept_fraction"]}, step=progress.step)
        progress.epoch += 1
        progress.batch = 0
        if progress.epoch % config.eval_every == 0 or progress.epoch == config.epochs:
            last_eval = (progress.step, _validate(accelerator, step, val_set, config, progress, output, evaluate,
                                                  summary))
        _checkpoint(accelerator, output, progress, config.keep_checkpoints)

    final = last_eval[1] if last_eval[0] == progress.step else None
    result = _finish(accelerator, step, val_set, config, progress, output, meta, evaluate, final)
    accelerator.end_training()
    return result


def _guarded(forward):
    """Turn a device out-of-memory error into advice on which setting to lower."""
    try:
        return forward()
    except torch.OutOfMemoryError as err:
        raise RuntimeError(
            "out of device memory in the training step: lower batch_size, max_regions or rounds, use "
            "mixed_precision: bf16, or frozen_encoder: true with lora_preset: decoder"
        ) from err


def _score(sampler: CBDPSampler, batch: dict, out, organ_names: list[str]) -> None:
    """Feed each valid region's loss to CBDP (ids and organs on the CPU, once per step)."""
    valid = batch["region_valid"].cpu()
    ids = batch["sample_ids"].cpu()[:, None].expand_as(valid)[valid]
    organs = [organ_names[i] for i in batch["organ_ids"].cpu()[valid].tolist()]
    sampler.update(ids.tolist(), organs, out.region_losses.float().cpu()[valid])


def _validate(accelerator, step, val_set, config, progress, output, evaluate, summary) -> dict | None:
    """Simulated-user validation on the main process; keeps the best adapter. Returns the metrics there."""
    model = accelerator.unwrap_model(step).model
    metrics = None
    if accelerator.is_main_process:
        metrics = evaluate(model, val_set, behaviours=config.eval_behaviours, noc=False, progress=False,
                           batch_size=config.batch_size)
        score = float(np.mean([metrics["dice"][b]["mean"] for b in config.eval_behaviours]))
        record = {"epoch": progress.epoch, "step": progress.step, "train_seconds": progress.train_seconds,
                  "val_dice": score, "val_dice_per_organ": {b: metrics["dice"][b]["per_organ"]
                                                           for b in config.eval_behaviours},
                  **{f"val_dice/{b}": metrics["dice"][b]["mean"] for b in config.eval_behaviours},
                  "kept_fraction": summary["kept_fraction"]}
        progress.history.append(record)
        accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=progress.step)
        accelerator.print(f"epoch {progress.epoch}: validation Dice {score:.4f} "
                          + " ".join(f"{b}={metrics['dice'][b]['mean']:.3f}" for b in config.eval_behaviours))
        if score > progress.best:
            progress.best = score
            save_adapter(model, output / "best_adapter", val_dice=score, epoch=progress.epoch)
        step.train()
    accelerator.wait_for_everyone()
    return metrics


def _checkpoint(accelerator, output: Path, progress: Progress, keep: int) -> None:
    folder = output / "checkpoints" / f"step-{progress.step:07d}"
    accelerator.save_state(str(folder))  # atomic enough: _resume only trusts folders with a done marker
    if accelerator.is_main_process:
        (folder / "done").write_text(json.dumps(progress.state_dict()))
        for old in _checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _checkpoints(output: Path) -> list[Path]:
    return sorted(p for p in (output / "checkpoints").glob("step-*") if (p / "done").exists())


def _resume(accelerator, output: Path) -> None:
    found = _checkpoints(output)
    if not found:
        raise FileNotFoundError(f"{output}: resume requested but no finished checkpoint under {output / 'checkpoints'}")
    accelerator.load_state(str(found[-1]))
    accelerator.print(f"resumed from {found[-1]}")


def _finish(accelerator, step, val_set, config, progress, output, meta, evaluate, metrics) -> dict:
    """Final adapter, metrics and model card (main process), written atomically. `metrics`: the validation
    of the final weights when the last epoch already ran it."""
    result = {}
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(step).model
        if metrics is None:
            metrics = evaluate(model, val_set, behaviours=config.eval_behaviours, noc=False, progress=False,
                               batch_size=config.batch_size)
        result = {"steps": progress.step, "epochs": progress.epoch, "best_val_dice": progress.best,
                  "history": progress.history, "final": metrics}
        info = dict(organ_names=meta["organ_names"], label_map=meta.get("label_map"), data=config.data or "phantom",
                    metrics={b: metrics["dice"][b]["mean"] for b in config.eval_behaviours})
        save_adapter(model, output / "adapter", **info)
        write_model_card(output / "adapter", info, config)
        with atomic_path(output / "metrics.json") as tmp:
            tmp.write_text(json.dumps(result, indent=2, default=float))
    accelerator.wait_for_everyone()
    return result
