"""`train(config)`: the PHPG recipe on `accelerate`.

The same loop runs on one CPU, one GPU, or several processes under `accelerate launch`. `PHPGRecipe` brings
the PHPG batches, the CBDP plan and the loss; accelerate shards the prepared DataLoader over the processes
(the recipe's sampler yields the whole plan on each, as every process holds the same CBDP plan), steps the
learning-rate schedule, continues a resumed epoch (`skip_first_batches`), reduces the logged metrics and
checkpoints the model, optimizer, schedule, RNGs, sampler and loop position (`save_state`).

One optimizer step takes `grad_accum` micro-batches on every process. Their region counts are added up over
the step first, and each micro-batch's loss is its share of the step's loss, so accumulation and several
processes take the step one large batch would, whatever the number of regions in each micro-batch. DDP
averages gradients over the processes, hence the factor `num_processes` on each micro-batch's loss.
Validation is shared out over the processes as well (`validation.validate`).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import DatasetDict
from safetensors import safe_open
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from ..data import load_prepared, phantom_dataset, read_metadata
from ..io import atomic_path
from ..models import apply_lora, load_base_model, processor_for, save_adapter
from .config import TrainConfig
from .embedding_cache import image_embeddings
from .hub import write_model_card
from .recipe import PHPGRecipe
from .validation import organ_mean_dice, validate

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Progress:
    """Where the loop is; checkpointed with the model so a resumed run skips what was done."""

    epoch: int = 0
    batch: int = 0  # micro-batches this process has done in `epoch` (what a resume skips)
    step: int = 0  # optimizer steps overall
    best: float | None = None  # the best validation score (organ-mean Dice) so far
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


def lr_factor(progress: float, config: TrainConfig) -> float:
    """Share of the peak learning rate at a fraction of training: linear warmup, then cosine / poly decay or
    constant."""
    if progress < config.warmup_ratio:
        return progress / config.warmup_ratio
    rest = (progress - config.warmup_ratio) / max(1e-8, 1 - config.warmup_ratio)
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(rest, 1.0)))
    if config.schedule == "poly":
        return (1 - min(rest, 1.0)) ** 0.9
    return 1.0


class Checkpoints:
    """The `step-N` folders of a run. A folder counts once its `done` marker exists, written after every
    process has saved its part, and a folder this run completed is never written again."""

    def __init__(self, output: Path, keep: int):
        self.root, self.keep = output / "checkpoints", keep
        self.last_step: int | None = None  # the step of the newest checkpoint this run saved or resumed from

    def complete(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step-*") if (p / "done").exists())

    def usable(self, say) -> list[Path]:
        """Complete checkpoints, newest first, without those whose weight files cannot be opened (a cheap
        check before any expensive work; `resume` still falls back if a checkpoint fails to load)."""
        found = []
        for folder in reversed(self.complete()):
            try:
                for weights in folder.glob("*.safetensors"):
                    with safe_open(str(weights), "pt"):
                        pass
                found.append(folder)
            except Exception as err:  # noqa: BLE001 - any unreadable file disqualifies the checkpoint
                say(f"skipping checkpoint {folder}: {weights.name} cannot be read ({err})")
        return found

    def save(self, accelerator: Accelerator, progress: Progress) -> None:
        if progress.step == self.last_step:
            return  # no optimizer step since the last checkpoint: it already holds this state
        folder = self.root / f"step-{progress.step:07d}"
        if accelerator.is_main_process and folder.exists():
            shutil.rmtree(folder)  # left by a killed save, or by a run that resumed from an older checkpoint
        accelerator.wait_for_everyone()
        with _quiet_shared_tensors():
            accelerator.save_state(str(folder))
        accelerator.wait_for_everyone()  # every process's files are written before the marker says so
        if accelerator.is_main_process:
            with atomic_path(folder / "done") as tmp:
                tmp.write_text(json.dumps(progress.state_dict()))
            for old in self.complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        self.last_step = progress.step

    def resume(self, accelerator: Accelerator, candidates: list[Path]) -> None:
        """Load the newest of `candidates` that loads on every process; say which were skipped and why."""
        reasons = []
        for folder in candidates:
            error = None
            try:
                accelerator.load_state(str(folder))
            except Exception as err:  # noqa: BLE001 - a checkpoint that fails to load is skipped, whatever failed
                error = f"{type(err).__name__}: {err}"
            failed = accelerator.reduce(torch.tensor([float(error is not None)], device=accelerator.device), "sum")
            if not failed.item():
                self.last_step = int(folder.name.split("-")[1])
                accelerator.print(f"resumed from {folder}")
                return
            reasons.append(f"{folder.name}: {error or 'another process could not load it'}")
            accelerator.print(f"skipping checkpoint {folder}: {reasons[-1]}")
        raise ValueError(f"{self.root}: no checkpoint could be loaded ({'; '.join(reasons)}); "
                         "start again with overwrite=True (--overwrite)")

    def where(self) -> str:
        """How to continue after an interruption, from what is on disk."""
        found = self.complete()
        if not found:
            return "no checkpoint was written yet: rerun the same command to start again"
        state = json.loads((found[-1] / "done").read_text())
        return (f"the newest checkpoint is {found[-1]} (epoch {state['epoch']}, optimizer step {state['step']}): "
                "continue with --resume (train(config, resume=True))")


def _trained_run(output: Path) -> bool:
    """Whether `output` holds a run with something to keep: a checkpoint or a final adapter. A config.yaml
    (and a best_adapter) without them is a start interrupted before its first checkpoint: a rerun replaces it."""
    return bool(Checkpoints(output, 1).complete()) or (output / "adapter").exists()


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Fine-tune, validate each `eval_every` epochs, keep the best adapter; returns the final metrics.

    On KeyboardInterrupt it prints where the run stands and how to continue, then re-raises. A loss that is
    no longer finite stops the run with FloatingPointError before that step changes the weights; checkpoints
    and adapters written before it are kept.
    """
    config.validate()
    output = Path(config.output_dir)
    # mixed precision is autocast per step (below), not an accelerate setting: accelerate fixes that once per
    # process, and one process may run several trainings with different settings
    accelerator = Accelerator(log_with=config.log_with, project_dir=str(output))
    checkpoints = Checkpoints(output, config.keep_checkpoints)
    try:
        return _train(accelerator, config, checkpoints, resume, overwrite)
    except KeyboardInterrupt:
        if accelerator.is_main_process:
            print(f"\ntraining interrupted; {checkpoints.where()}", file=sys.stderr)
        raise


def _train(accelerator: Accelerator, config: TrainConfig, checkpoints: Checkpoints, resume: bool,
           overwrite: bool) -> dict:
    model, recipe, val_set, val_cached, meta, candidates = _setup(accelerator, config, checkpoints, resume, overwrite)
    step = recipe.step_module(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    # sized for one process: accelerate steps a prepared schedule once per process at each optimizer step
    planned = recipe.planned_steps(config.batch_size, config.grad_accum)
    scheduler = LambdaLR(optimizer, lambda done: lr_factor(done / planned, config))
    step, optimizer, loader, scheduler = accelerator.prepare(
        step, optimizer, recipe.dataloader(config.batch_size, config.num_workers), scheduler)
    scaler = torch.amp.GradScaler(accelerator.device.type, enabled=config.mixed_precision == "fp16")
    autocast = partial(torch.autocast, accelerator.device.type, dtype=AUTOCAST.get(config.mixed_precision),
                       enabled=config.mixed_precision in AUTOCAST)
    progress = Progress()
    accelerator.register_for_checkpointing(recipe.sampler, progress, scaler)
    if resume:
        checkpoints.resume(accelerator, candidates)
    accelerator.init_trackers("sam_peft", config={k: str(v) for k, v in config.to_dict().items()})
    if config.pruning in ("cbdp", "infobatch") and config.prune_warm_start and not resume:  # epoch 0 prunes too
        recipe.score_before_training(accelerator.unwrap_model(step).model, batch_size=config.batch_size,
                                     device=accelerator.device, progress=accelerator.is_local_main_process)
    validation = partial(_validate, accelerator, step, val_set, config, progress, val_cached)

    done = bool(config.max_steps) and progress.step >= config.max_steps
    validated_at = None  # the optimizer step of the latest validation
    while progress.epoch < config.epochs and not done:
        recipe.on_epoch(progress.epoch, plan=progress.batch == 0)  # a resumed epoch keeps its plan
        n_batches = len(loader)  # this process's micro-batches this epoch
        batches = accelerator.skip_first_batches(loader, progress.batch) if progress.batch else loader
        bar = tqdm(total=n_batches, initial=progress.batch, desc=f"epoch {progress.epoch + 1}/{config.epochs}",
                   disable=not accelerator.is_local_main_process)
        step.train()
        for window in _windows(batches, config.grad_accum):
            started = time.perf_counter()
            logs = _optimizer_step(accelerator, recipe, step, optimizer, scheduler, scaler, autocast, window, config,
                                   progress)
            progress.step += 1
            progress.batch += len(window)
            progress.train_seconds += time.perf_counter() - started
            logs["regions_per_s"] = logs.pop("regions") / (time.perf_counter() - started)
            bar.update(len(window))
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
            accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=progress.step)
            if config.checkpoint_every and progress.step % config.checkpoint_every == 0 and progress.batch < n_batches:
                checkpoints.save(accelerator, progress)  # (the epoch's end has its own checkpoint)
            if config.max_steps and progress.step >= config.max_steps:
                done = True
                break
        bar.close()
        if progress.batch < n_batches:
            break  # stopped mid-epoch by max_steps
        summary = recipe.sampler.epoch_summary()
        accelerator.log({"cbdp/kept_fraction": summary["kept_fraction"]}, step=progress.step)
        progress.epoch, progress.batch = progress.epoch + 1, 0
        if progress.epoch % config.eval_every == 0 or progress.epoch == config.epochs:
            metrics, validated_at = validation(summary["kept_fraction"]), progress.step
        checkpoints.save(accelerator, progress)

    if validated_at != progress.step:  # the final weights were not validated yet (max_steps mid-epoch)
        metrics = validation(None)
    result = _finish(accelerator, step, config, progress, output=Path(config.output_dir), meta=meta, metrics=metrics)
    accelerator.end_training()
    return result


def _setup(accelerator, config, checkpoints, resume, overwrite):
    """Data, base model with adapters, embedding cache and recipe; refuses a run before anything is written."""
    output = Path(config.output_dir)
    data, meta = load_data(config)  # every check that can refuse the run comes before anything expensive
    train_set, val_set = data[config.train_split], data[config.val_split]
    candidates = []
    if resume:
        candidates = checkpoints.usable(accelerator.print)
        if not candidates:
            raise FileNotFoundError(f"{output}: nothing to resume, no usable checkpoint under {checkpoints.root}; "
                                    "run without resume (--resume) to start")
    elif _trained_run(output) and not overwrite:
        raise FileExistsError(f"{output} holds another run: pass resume=True (--resume) to continue it "
                              "or overwrite=True (--overwrite) to replace it")
    base = load_base_model(config.model).to(accelerator.device)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if overwrite and not resume and output.exists():
            shutil.rmtree(output)
        with atomic_path(output / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    processor = processor_for(base)
    cached = val_cached = None
    if config.frozen_encoder:  # the encoder's output never changes: cache it for training and validation
        cache_dir = config.cache_dir or output.parent / ".embedding_cache"
        with accelerator.main_process_first():
            cached, val_cached = (image_embeddings(base, rows, processor, cache_dir,
                                                   progress=accelerator.is_local_main_process)
                                  for rows in (train_set, val_set))
    model = apply_lora(base, config.lora_preset, r=config.lora_r, alpha=config.lora_alpha,
                       dropout=config.lora_dropout, train_heads=config.train_heads,
                       verbose=accelerator.is_main_process)
    recipe = PHPGRecipe.from_config(config, processor, train_set, meta["organ_names"], image_embeddings=cached)
    return model, recipe, val_set, val_cached, meta, candidates


def _windows(batches, size: int):
    """The micro-batches of each optimizer step: `size` at a time, the epoch's last step takes the rest."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _optimizer_step(accelerator, recipe, step, optimizer, scheduler, scaler, autocast, window, config,
                    progress) -> dict:
    """One optimizer step over the micro-batches of `window`, each loss its share of the whole step's (regions
    counted over the window on every process first). Returns the step's logs."""
    totals = accelerator.reduce(sum(recipe.count(batch) for batch in window), "sum")  # regions, slices
    logged = torch.zeros(2, device=accelerator.device)  # the step's loss, Dice summed over regions
    for i, batch in enumerate(window):
        with accelerator.no_sync(step) if i + 1 < len(window) else nullcontext():  # one all-reduce per step
            with autocast():
                loss, out = _guarded(recipe.loss, step, batch, totals, progress.step, True)
            accelerator.backward(scaler.scale(loss * accelerator.num_processes))  # DDP averages over processes
        logged += torch.stack([loss.detach().float(), out.region_dice.sum().float()])
    loss, dice = accelerator.reduce(logged, "sum").tolist()
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"the training loss is {loss} at optimizer step {progress.step + 1} (epoch {progress.epoch + 1}): "
            f"lower lr (now {config.lr:g}) or max_grad_norm, or raise warmup_ratio; the run stopped before "
            "this step, and its checkpoints and adapters so far are kept")
    if config.max_grad_norm:
        scaler.unscale_(optimizer)
        accelerator.clip_grad_norm_(step.parameters(), config.max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad()
    regions = totals[0].item()
    return {"loss": loss, "dice": dice / max(regions, 1), "lr": lr, "regions": regions}


def _guarded(forward, *args):
    """Turn a device out-of-memory error into advice on which setting to lower."""
    try:
        return forward(*args)
    except torch.OutOfMemoryError as err:
        raise RuntimeError(
            "out of device memory in the training step: lower batch_size, max_regions or rounds, use "
            "mixed_precision: bf16, or frozen_encoder: true with lora_preset: decoder"
        ) from err


def _validate(accelerator, step, val_set, config, progress, val_cached, kept_fraction) -> dict:
    """Simulated-user validation on every process's share of the slices; the main process keeps the best
    adapter by organ-mean Dice (each organ counts once) and records the worst organ."""
    model = accelerator.unwrap_model(step).model
    metrics = validate(accelerator, model, val_set, config.eval_behaviours, batch_size=config.batch_size,
                       image_embeddings=val_cached)
    score, worst, worst_dice = organ_mean_dice(metrics, config.eval_behaviours)
    record = {"epoch": progress.epoch, "step": progress.step, "train_seconds": progress.train_seconds,
              "val_dice": score, "val_worst_organ": worst, "val_worst_organ_dice": worst_dice,
              "val_dice_per_organ": {b: metrics["dice"][b]["per_organ"] for b in config.eval_behaviours},
              **{f"val_dice/{b}": metrics["dice"][b]["mean"] for b in config.eval_behaviours},
              "kept_fraction": kept_fraction}
    progress.history.append(record)
    accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=progress.step)
    accelerator.print(f"epoch {progress.epoch}: validation Dice {score:.4f} (organ mean; worst {worst} "
                      f"{worst_dice:.3f}) " + " ".join(f"{b}={metrics['dice'][b]['mean']:.3f}"
                                                        for b in config.eval_behaviours))
    if progress.best is None or score > progress.best:
        progress.best = score
        if accelerator.is_main_process:
            save_adapter(model, Path(config.output_dir) / "best_adapter", val_dice=score, epoch=progress.epoch)
    accelerator.wait_for_everyone()
    return metrics


def _finish(accelerator, step, config, progress, output: Path, meta: dict, metrics: dict) -> dict:
    """Final adapter, metrics and model card (main process), written atomically. `metrics`: the validation of
    the final weights."""
    result = {"steps": progress.step, "epochs": progress.epoch, "best_val_dice": progress.best,
              "history": progress.history, "final": metrics}
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(step).model
        info = dict(organ_names=meta["organ_names"], label_map=meta.get("label_map"), data=config.data or "phantom",
                    metrics={b: metrics["dice"][b]["mean"] for b in config.eval_behaviours})
        save_adapter(model, output / "adapter", **info)
        write_model_card(output / "adapter", info, config)
        with atomic_path(output / "metrics.json") as tmp:
            tmp.write_text(json.dumps(_strict_json(result), indent=2, allow_nan=False))
    accelerator.wait_for_everyone()
    return result


def _strict_json(value):
    """`value` with non-finite floats as None (JSON has no NaN or Infinity) and numpy scalars as Python's."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if hasattr(value, "item") and not hasattr(value, "__len__"):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


@contextmanager
def _quiet_shared_tensors():
    """accelerate reports the positional embedding SAM shares between its image and prompt encoders as
    "Removed shared tensor" at every checkpoint; loading ties it again, so the user has nothing to act on."""
    log = logging.getLogger("accelerate.utils.other")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
