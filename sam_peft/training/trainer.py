"""`train(config)`: PHPG batches, CBDP sampling and LoRA adapters on `accelerate`.

The same code runs on one CPU, one GPU, or several processes under `accelerate launch`, and accelerate
carries the loop: the DataLoader over the CBDP plan is prepared (accelerate shards its batches over the
processes and marks the epoch's end, so a last incomplete accumulation window still steps), `accumulate`
and `sync_gradients` decide the optimizer steps, `skip_first_batches` continues a resumed epoch, `reduce`
combines the logged metrics and `save_state` checkpoints the model, optimizer, RNGs, CBDP sampler and loop
position. Every process holds the same CBDP plan (the sampler gathers every process's losses before it
plans an epoch), so the sampler itself does not shard.

Validation runs on the main process while the others wait at a barrier: the process-group timeout is raised
to `VALIDATION_TIMEOUT` so a large validation set does not trip the collective timeout (NCCL's default is
10 minutes); validation sets that take longer than that should be subsampled.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import InitProcessGroupKwargs, set_seed
from datasets import DatasetDict
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ..data import load_prepared, phantom_dataset, read_metadata
from ..io import atomic_path
from ..models import apply_lora, load_base_model, processor_for, save_adapter
from ..prompts import BEHAVIOURS, PHPGCollator
from ..pruning import CBDPSampler
from .config import TrainConfig
from .distill import DistilledStep
from .embedding_cache import image_embeddings
from .hub import write_model_card
from .step import PHPGStep
from .warm_start import score_before_training

VALIDATION_TIMEOUT = timedelta(hours=2)


class _Rows(Dataset):
    """Prepared slices with their row index as `sample_id` (the key for CBDP scores and cached embeddings)."""

    def __init__(self, dataset):
        self.dataset = dataset.select_columns(["image", "label"]).with_format("numpy")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[int(index)], "sample_id": int(index)}


class _Plan(Sampler[int]):
    """The CBDP sampler's current epoch plan, without its `set_epoch`.

    accelerate's prepared DataLoader calls `set_epoch(<its pass count>)` on the sampler it finds, which
    would fold in the losses and plan again; the trainer sets CBDP's epoch itself, and never mid-epoch, as a
    resumed epoch must keep the plan it was checkpointed with.
    """

    def __init__(self, cbdp: CBDPSampler):
        self.cbdp = cbdp

    def __iter__(self):
        return iter(self.cbdp)

    def __len__(self) -> int:
        return len(self.cbdp)


@dataclass
class Progress:
    """Where the loop is; checkpointed with the model so a resumed run skips what was done."""

    epoch: int = 0
    batch: int = 0  # micro-batches this process has done in `epoch` (what a resume skips)
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

    On KeyboardInterrupt it prints where the run stands and how to continue, then re-raises.
    """
    config.validate()
    output = Path(config.output_dir)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, log_with=config.log_with,
                              project_dir=str(output), gradient_accumulation_steps=config.grad_accum,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=VALIDATION_TIMEOUT)])
    checkpoints = Checkpoints(output, config.keep_checkpoints)
    try:
        return _train(accelerator, config, checkpoints, resume, overwrite)
    except KeyboardInterrupt:
        if accelerator.is_main_process:
            print(f"\ntraining interrupted; {checkpoints.where()}", file=sys.stderr)
        raise
    finally:
        # accelerate keeps its settings process-wide: a later train() in this process may choose others
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _train(accelerator: Accelerator, config: TrainConfig, checkpoints: Checkpoints, resume: bool,
           overwrite: bool) -> dict:
    from ..evaluation import evaluate

    output = Path(config.output_dir)
    # every check that can refuse the run comes before anything expensive or written, on every process
    data, meta = load_data(config)
    train_set, val_set = data[config.train_split], data[config.val_split]
    organ_names = meta["organ_names"]
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
    cached = None
    if config.frozen_encoder:  # the encoder's output never changes: cache it for training and validation
        cache_dir = config.cache_dir or output.parent / ".embedding_cache"
        with accelerator.main_process_first():
            cached, val_cached = (image_embeddings(base, rows, processor, cache_dir,
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
    # one unsharded plan on every process: the prepared DataLoader shards its batches
    sampler = CBDPSampler(sample_organs, num_epochs=config.epochs, prune_ratio=config.prune_ratio,
                          anneal=config.anneal, seed=config.seed, strategy=config.pruning,
                          budget=config.prune_budget, ema=config.prune_ema, organ_floor=config.prune_organ_floor,
                          max_weight=config.prune_max_weight, num_replicas=1, rank=0)
    collator = PHPGCollator(processor, organ_names, behaviours=config.behaviours, max_regions=config.max_regions,
                            min_pixels=min_pixels, seed=config.seed, include_pixels=cached is None)
    loader = DataLoader(_Rows(train_set), batch_size=config.batch_size, sampler=_Plan(sampler),
                        collate_fn=collator, num_workers=config.num_workers)
    step = (DistilledStep(model, config.rounds, config.distill_weight, config.distill_boxes) if config.distill_weight
            else PHPGStep(model, rounds=config.rounds))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    step, optimizer, loader = accelerator.prepare(step, optimizer, loader)
    progress = Progress()
    accelerator.register_for_checkpointing(sampler, progress)
    if resume:
        checkpoints.resume(accelerator, candidates)
    accelerator.init_trackers("sam_peft", config={k: str(v) for k, v in config.to_dict().items()})
    if config.pruning in ("cbdp", "infobatch") and config.prune_warm_start and not resume:
        score_before_training(accelerator.unwrap_model(step).model, _Rows(train_set), collator, sampler,
                              organ_names, image_embeddings=cached, batch_size=config.batch_size,
                              device=accelerator.device, progress=accelerator.is_local_main_process)

    done = bool(config.max_steps) and progress.step >= config.max_steps
    last_eval = (-1, None)  # (step, metrics) of the latest validation
    while progress.epoch < config.epochs and not done:
        epoch = progress.epoch
        if progress.batch == 0:  # mid-epoch, a resumed sampler already holds this epoch's plan
            sampler.set_epoch(epoch)
        collator.set_epoch(epoch)
        n_batches = len(loader)  # this process's micro-batches this epoch
        steps_per_epoch = math.ceil(n_batches / config.grad_accum)
        batches = accelerator.skip_first_batches(loader, progress.batch) if progress.batch else loader
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", initial=progress.batch, total=n_batches,
                   disable=not accelerator.is_local_main_process)
        step.train()
        window = torch.zeros(4, device=accelerator.device)  # loss, micro-batches, Dice sum, valid regions
        window_started = time.perf_counter()
        for batch in bar:
            started = time.perf_counter()
            ids = batch["sample_ids"]
            embeddings = None if cached is None else cached[ids.cpu()].to(accelerator.device, torch.float32)
            # constant within an accumulation window: the schedule moves once per optimizer step
            lr = lr_at((epoch + progress.batch // config.grad_accum / steps_per_epoch) / config.epochs, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            generator = torch.Generator(accelerator.device).manual_seed(config.seed * 1_000_003 + progress.step)
            with accelerator.accumulate(step):
                out = _guarded(lambda: step(batch, embeddings, sampler.weights(ids), generator))
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(step.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            _score(sampler, batch, out, organ_names)
            progress.batch += 1
            progress.train_seconds += time.perf_counter() - started
            window += torch.stack([out.loss.detach().float(), torch.ones_like(window[0]),
                                   out.region_dice.sum().float(), batch["region_valid"].sum().float()])
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            loss, micro, dice, regions = accelerator.reduce(window, "sum").tolist()
            logs = {"loss": loss / micro, "dice": dice / max(regions, 1), "lr": lr,
                    "regions_per_s": regions / (time.perf_counter() - window_started)}
            window.zero_()
            window_started = time.perf_counter()
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
            accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=progress.step)
            end_of_epoch = accelerator.gradient_state.end_of_dataloader  # the epoch's checkpoint follows
            if config.checkpoint_every and progress.step % config.checkpoint_every == 0 and not end_of_epoch:
                checkpoints.save(accelerator, progress)
            if config.max_steps and progress.step >= config.max_steps:
                done = True
                break
        if progress.batch < n_batches:
            break  # stopped mid-epoch by max_steps
        summary = sampler.epoch_summary()
        accelerator.log({"cbdp/kept_fraction": summary["kept_fraction"]}, step=progress.step)
        progress.epoch += 1
        progress.batch = 0
        if progress.epoch % config.eval_every == 0 or progress.epoch == config.epochs:
            last_eval = (progress.step, _validate(accelerator, step, val_set, config, progress, output, evaluate,
                                                  summary))
        checkpoints.save(accelerator, progress)

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
    behaviours = [BEHAVIOURS[b] for b in batch["behaviour_ids"].cpu()[valid].tolist()]
    sampler.update(ids.tolist(), organs, out.region_losses.float().cpu()[valid], behaviours=behaviours)


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
