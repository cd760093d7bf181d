"""`evaluate`: interactive segmentation with simulated users.

Every organ instance of at least `min_pixels` pixels in every slice is prompted as different people would
prompt it (tight, jittered and loose boxes, a centre click, a random click), from its ground truth at
original resolution, with a generator seeded by (seed, slice row, organ, behaviour): a prompt never
depends on the batch or on which other behaviours run. The image encoder runs once per slice; every
behaviour and every click reuses that embedding. Predictions are upsampled to original resolution and
scored there: Dice, 3D Dice, NSD, and the IoU head's calibration error.

The click series behind `center_click`, `clicks_3`, `clicks_5` and NoC starts at the centre click; each
next click is the standard clicker's (`next_clicks`: the RITM / f-BRS protocol of published NoC figures)
on the original-resolution prediction, never on a pixel clicked before, with the previous low-res logits
fed back as the mask prompt, as a person refines a mask. As in that protocol, an instance whose Dice
reaches the highest NoC threshold is done: it gets no more clicks, and its Dice, mask and scores stay
those of its last click for the rest of the series.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from peft import PeftModel
from tqdm.auto import tqdm

from ..data.label_maps import organ_key
from ..data.prepare import check_writable, load_prepared, read_metadata
from ..io import atomic_path
from ..models.decoding import PAD_LABEL, encode_images, sam_of
from ..models.loading import processor_for
from ..names import did_you_mean
from ..prompts.behaviours import make_prompt
from ..prompts.clicks import PERFECT, next_clicks
from .metrics import clicks_to_reach, dice_counts, dice_from_counts, iou_from_counts, surface_dice
from .options import EVAL_BEHAVIOURS, EVAL_MIN_PIXELS
from .predictor import decode_prompts, stack_prompts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SINGLE_PROMPT_BEHAVIOURS = EVAL_BEHAVIOURS[:5]  # the human-factor spread compares these
CLICK_SERIES = {"center_click": 1, "clicks_3": 3, "clicks_5": 5}  # the click of the series each one scores
NOC_THRESHOLDS = {"85": 0.85, "90": 0.90}
DONE_DICE = max(NOC_THRESHOLDS.values())  # a simulated user stops clicking an instance at this Dice
# Work per model call on a CPU, where larger calls gain no speed but cost memory (LiteMedSAM, fp32): the encoder
# takes about 230 MB per image, the decoder about 40 MB per row. An accelerator takes a whole batch per call.
CPU_IMAGES_PER_CALL, CPU_DECODER_ROWS = 1, 8
NSD_TOLERANCE_MM = 2.0


@dataclass
class _Slice:
    row: int  # index in the evaluated split: seeds the prompts
    image: np.ndarray
    label: np.ndarray
    organs: np.ndarray  # compact ids of the instances to prompt
    case_id: str
    plane: str
    spacing: tuple[float, float]  # (row_mm, col_mm)


@dataclass
class _Instance:
    case: str
    organ: str
    pixels: int
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # behaviour -> (intersection, predicted)
    nsd: dict[str, float] = field(default_factory=dict)
    iou_estimate: dict[str, float] = field(default_factory=dict)  # behaviour -> the IoU head's estimate
    curve: list[float] = field(default_factory=list)  # Dice after 1, 2, ... clicks of the click series


def evaluate(
    model,
    data: Dataset | DatasetDict | str | Path,
    split: str = "test",
    behaviours: Sequence[str] = EVAL_BEHAVIOURS,
    noc: bool = True,
    max_clicks: int = 20,
    seed: int = 0,
    batch_size: int = 8,
    min_pixels: int = EVAL_MIN_PIXELS,
    organs: Sequence[str] | None = None,
    output_dir: str | Path | None = None,
    progress: bool = True,
    image_embeddings: torch.Tensor | None = None,
) -> dict:
    """Evaluate a SamModel / PeftModel on a prepared dataset (or its path) with simulated users.

    Returns (and with `output_dir` writes as metrics.json, metrics.md and PNG plots) the metrics: `dice`,
    `dice_3d`, `nsd` and `iou_error` per behaviour ({"mean", "per_organ"}, 3D also "per_case"), `noc`
    {"85", "90"} (None without `noc`), `dice_vs_clicks`, `spread`, counts and `slices_per_second`.
    `iou_error` is the IoU head's calibration: the mean absolute difference between its estimate of a
    mask's IoU and the IoU that mask achieves at original resolution (0: perfectly calibrated). That
    estimate picks one of SAM's candidate masks for a lone click and decides where `predict_volume` stops
    propagating, so a large error means those choices rest on a poor guess. `organs` restricts
    the evaluation to these organ names. The model's train/eval mode is restored afterwards, so a trainer
    can validate with a subset of behaviours and `noc=False`. `image_embeddings`: the (N, C, h, w) encoder
    output for every row of the evaluated split (a frozen-encoder cache), so validation skips the encoder.
    """
    if output_dir is not None:
        check_writable(output_dir, "output_dir (--output)")
    behaviours = _check_behaviours(behaviours, noc)
    organs = [organs] if isinstance(organs, str) else organs
    if max_clicks < 1 or batch_size < 1 or min_pixels < 1:
        raise ValueError(f"max_clicks, batch_size and min_pixels must be >= 1, got {max_clicks}, {batch_size}, "
                         f"{min_pixels}")
    dataset, organ_names, split = _load_split(data, split)
    keep = _organ_ids(organs, organ_names)
    if image_embeddings is not None and len(image_embeddings) != len(dataset):
        raise ValueError(f"image_embeddings has {len(image_embeddings)} rows, the evaluated split {len(dataset)}")
    n_clicks = max([CLICK_SERIES[b] for b in behaviours if b in CLICK_SERIES] + [max_clicks if noc else 0])
    processor = processor_for(model)
    was_training = model.training
    model.eval()
    instances, n_slices, start = [], 0, time.perf_counter()
    try:
        with torch.inference_mode():
            for batch in _batches(_slices(dataset, keep, min_pixels, progress), batch_size):
                instances += _evaluate_batch(model, processor, batch, behaviours, n_clicks, seed, organ_names,
                                             image_embeddings)
                n_slices += len(batch)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    if not instances:
        where = f"split {split!r}" if split else "the dataset"
        raise ValueError(f"nothing to evaluate: no slice of {where} holds an organ instance of at least {min_pixels} "
                         "pixels" + (f" among {list(organs)}" if organs else ""))
    metrics = _summarise(instances, behaviours, organ_names, max_clicks if noc else 0, n_slices, seconds)
    metrics["settings"] = {**model_record(model), "split": split,
                           "behaviours": list(behaviours), "noc": noc, "max_clicks": max_clicks, "seed": seed,
                           "min_pixels": min_pixels, "organs": list(organs) if organs else None,
                           "nsd_tolerance_mm": NSD_TOLERANCE_MM}
    if output_dir is not None:
        write_report(metrics, output_dir)
    return metrics


def model_record(model) -> dict:
    """{"model": the base's name or path, "adapter": the adapter's name or path (None for the plain base),
    "box_prompts": what answered box-only prompts}. An adapter is named when `load_adapter` loaded it."""
    adapter = getattr(model, "sam_peft_adapter", None)
    if adapter is None and isinstance(model, PeftModel):
        adapter = "a LoRA adapter (name not recorded)"
    box_prompts = getattr(model, "sam_peft_box_prompts", "adapter") if adapter else "base"
    return {"model": getattr(sam_of(model), "name_or_path", None), "adapter": adapter, "box_prompts": box_prompts}


# ------------------------------------------------------------------------------------------ inputs


def _check_behaviours(behaviours: Sequence[str], noc: bool) -> tuple[str, ...]:
    if isinstance(behaviours, str):
        behaviours = [behaviours]
    unknown = [b for b in behaviours if b not in EVAL_BEHAVIOURS]
    if unknown:
        raise ValueError(f"unknown behaviour(s) {unknown}; valid behaviours are {list(EVAL_BEHAVIOURS)}")
    if not behaviours and not noc:
        raise ValueError("nothing to evaluate: give at least one behaviour or noc=True")
    return tuple(dict.fromkeys(behaviours))


def _load_split(data, split: str) -> tuple[Dataset, list[str], str | None]:
    """The dataset to evaluate, its organ names, and the split name (None when given a Dataset)."""
    if isinstance(data, (str, Path)):
        data = load_prepared(data)
    if isinstance(data, DatasetDict):
        if split not in data:
            raise ValueError(f"split {split!r} is not in the dataset; it has {list(data)}")
        data = data[split]
    elif isinstance(data, Dataset):
        split = None
    else:
        raise TypeError(f"data must be a prepared dataset, its DatasetDict or its path, got {type(data).__name__}")
    return data, read_metadata(data)["organ_names"], split


def _organ_ids(organs: Sequence[str] | None, organ_names: Sequence[str]) -> set[int] | None:
    """Compact ids of the organs to evaluate (None: all)."""
    if organs is None:
        return None
    keys = [organ_key(name) for name in organs]
    unknown = [name for name in keys if name not in organ_names]
    if unknown:
        named = ", ".join(f"{name!r}{did_you_mean(name, organ_names)}" for name in unknown)
        raise ValueError(f"organ(s) {named} not in the dataset's label map; valid organs are {list(organ_names)}")
    return {organ_names.index(name) + 1 for name in keys}


def _slices(dataset: Dataset, keep: set[int] | None, min_pixels: int, progress: bool) -> Iterator[_Slice]:
    """The slices holding at least one instance to prompt, in dataset order."""
    rows = dataset.with_format("numpy", columns=["image", "label", "case_id", "plane", "spacing"])
    for row in tqdm(range(len(rows)), desc="Evaluating", unit="slice", disable=not progress):
        item = rows[row]
        label = np.asarray(item["label"])
        counts = np.bincount(label.ravel())
        organs = np.array([k for k in np.flatnonzero(counts >= min_pixels) if k > 0 and (keep is None or k in keep)])
        if organs.size:
            spacing = item["spacing"]
            image = np.asarray(item["image"], dtype=np.uint8)  # stored uint8; numpy formatting may widen it
            yield _Slice(row, image, label, organs, str(item["case_id"]), str(item["plane"]),
                         (float(spacing[0]), float(spacing[1])))


def _batches(slices: Iterable[_Slice], batch_size: int) -> Iterator[list[_Slice]]:
    """Consecutive slices of one shape, at most `batch_size` at a time."""
    batch = []
    for s in slices:
        if batch and (len(batch) == batch_size or s.label.shape != batch[0].label.shape):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


# ------------------------------------------------------------------------------------------ one batch


def _prompts(regions: list[tuple[_Slice, int]], masks: np.ndarray, behaviour: str, seed: int):
    """SAM tokens of one behaviour for every region: points (N, 1, P, 2) in the original frame; labels (N, 1, P)."""
    index = EVAL_BEHAVIOURS.index(behaviour)
    points, labels = stack_prompts([make_prompt(behaviour, mask, np.random.default_rng([seed, s.row, organ, index]))
                                    for (s, organ), mask in zip(regions, masks)])
    return points[:, None], labels[:, None]


def _embeddings(model, processor, slices: list[_Slice], cached: torch.Tensor | None) -> torch.Tensor:
    """(S, C, h, w) on the model's device and in its dtype: the encoder's output, or the cached rows."""
    parameter = next(model.parameters())
    if cached is not None:
        return cached[[s.row for s in slices]].to(parameter.device, parameter.dtype)
    step = CPU_IMAGES_PER_CALL if parameter.device.type == "cpu" else len(slices)
    embeddings = []
    for i in range(0, len(slices), step):
        pixels = torch.stack([processor.preprocess(s.image) for s in slices[i : i + step]])
        embeddings.append(encode_images(model, pixels.to(parameter.device, parameter.dtype)))
    return torch.cat(embeddings)


def _evaluate_batch(model, processor, slices, behaviours, n_clicks, seed, organ_names, cached) -> list[_Instance]:
    """Every instance of a batch of same-size slices is one row of the decoder batch (no padding rows)."""
    embeddings = _embeddings(model, processor, slices, cached)  # once per slice, shared by every prompt
    device, hw = embeddings.device, slices[0].label.shape
    regions = [(s, organ) for s in slices for organ in s.organs]
    masks_np = np.stack([s.label == organ for s, organ in regions])  # (N, H, W) ground truth
    targets = torch.from_numpy(masks_np)[:, None].to(device)
    image_of = torch.tensor([i for i, s in enumerate(slices) for _ in s.organs], device=device)
    every = torch.arange(len(regions), device=device)
    rows_per_call = CPU_DECODER_ROWS if device.type == "cpu" else len(regions)
    instances = [_Instance(s.case_id if s.plane == "axial" else f"{s.case_id}/{s.plane}", organ_names[organ - 1],
                           int(mask.sum())) for (s, organ), mask in zip(regions, masks_np)]

    def decode(rows: torch.Tensor, points: torch.Tensor, labels: torch.Tensor, mask_inputs=None):
        """Low-res logits (n, 1, h, w), IoU estimates (n, 1) and original-resolution masks (n, 1, H, W) of `rows`."""
        parts = []
        for part in torch.split(rows, rows_per_call):
            logits, iou = decode_prompts(model, embeddings[image_of[part]], points[part], labels[part],
                                         None if mask_inputs is None else mask_inputs[part])
            parts.append((logits, iou, processor.postprocess_masks(logits, hw) > 0))
        return (torch.cat(p) for p in zip(*parts))

    def score(behaviour: str, masks: torch.Tensor, iou: torch.Tensor) -> None:
        inter, pred, _ = (c[:, 0].cpu().numpy() for c in dice_counts(masks, targets))
        predicted, estimates = masks[:, 0].cpu().numpy(), iou[:, 0].float().cpu().numpy()
        for n, ((s, _), instance) in enumerate(zip(regions, instances)):
            instance.counts[behaviour] = (int(inter[n]), int(pred[n]))
            instance.nsd[behaviour] = surface_dice(predicted[n], masks_np[n], s.spacing, NSD_TOLERANCE_MM)
            instance.iou_estimate[behaviour] = float(estimates[n])

    for behaviour in (b for b in behaviours if b not in CLICK_SERIES):
        points, labels = _prompts(regions, masks_np, behaviour, seed)
        _, iou, masks = decode(every, processor.transform_coords(points, hw).to(device), labels.to(device))
        score(behaviour, masks, iou)
    if n_clicks:
        _click_series(regions, instances, masks_np, targets, seed, n_clicks, behaviours, processor, decode, score)
    return instances


def _click_series(regions, instances, masks_np, targets, seed, n_clicks, behaviours, processor, decode, score):
    """The centre click, then corrective clicks until each instance is done (see the module docstring)."""
    device, hw = targets.device, targets.shape[-2:]
    start, labels = _prompts(regions, masks_np, "center_click", seed)
    points, labels = processor.transform_coords(start, hw).to(device), labels.to(device)
    clicked = torch.zeros_like(targets)
    x, y = start[:, 0, 0].long().to(device).unbind(-1)
    clicked[torch.arange(len(regions), device=device), 0, y, x] = True
    active = torch.arange(len(regions), device=device)
    logits, iou, masks = decode(active, points, labels)
    for step in range(1, n_clicks + 1):
        dice = dice_from_counts(*(c[:, 0].cpu().numpy() for c in dice_counts(masks, targets)))
        for instance, value in zip(instances, dice):
            instance.curve.append(float(value))
        for behaviour in (b for b in behaviours if CLICK_SERIES.get(b) == step):
            score(behaviour, masks, iou)
        active = active[torch.from_numpy(dice[active.cpu().numpy()] < DONE_DICE).to(device)]
        if step == n_clicks or not len(active):
            continue
        click, click_label = next_clicks(masks[active], targets[active], clicked=clicked[active])
        valid = click_label[:, 0] != PERFECT  # PERFECT: no unclicked error pixel left, a padding token instead
        cx, cy = click[valid, 0].long().unbind(-1)
        clicked[active[valid], 0, cy, cx] = True
        new_points = points.new_zeros(len(regions), 1, 1, 2)
        new_labels = labels.new_full((len(regions), 1, 1), PAD_LABEL)
        new_points[active] = processor.transform_coords(click, hw)[:, :, None]
        new_labels[active] = torch.where(valid, click_label[:, 0], PAD_LABEL)[:, None, None]
        points, labels = torch.cat([points, new_points], dim=2), torch.cat([labels, new_labels], dim=2)
        logits[active], iou[active], masks[active] = decode(active, points, labels, logits)


# ------------------------------------------------------------------------------------------ summary


def _per_organ(values: np.ndarray, organ_of: list[str], organs: list[str]) -> dict:
    return {"mean": float(values.mean()),
            "per_organ": {o: float(values[[name == o for name in organ_of]].mean()) for o in organs}}


def _volume_dice(instances: list[_Instance], behaviour: str, organs: list[str]) -> dict:
    """Dice of the stacked slices of each (case, organ): counts summed over that organ's evaluated slices."""
    sums = defaultdict(lambda: np.zeros(3))
    for instance in instances:
        sums[instance.case, instance.organ] += (*instance.counts[behaviour], instance.pixels)
    per_case = defaultdict(dict)
    for (case, organ), (inter, pred, target) in sums.items():
        per_case[case][organ] = float(dice_from_counts(inter, pred, target))
    per_organ = {o: float(np.mean([c[o] for c in per_case.values() if o in c])) for o in organs}
    values = [v for c in per_case.values() for v in c.values()]
    return {"mean": float(np.mean(values)), "per_organ": per_organ, "per_case": dict(per_case)}


def _summarise(instances, behaviours, organ_names, max_clicks, n_slices, seconds) -> dict:
    organ_of = [instance.organ for instance in instances]
    organs = [name for name in organ_names if name in set(organ_of)]  # label-map order
    pixels = np.array([instance.pixels for instance in instances])
    dice, dice_3d, nsd, iou_error = {}, {}, {}, {}
    for behaviour in behaviours:
        inter, pred = np.array([instance.counts[behaviour] for instance in instances]).T
        dice[behaviour] = _per_organ(dice_from_counts(inter, pred, pixels), organ_of, organs)
        estimates = np.array([instance.iou_estimate[behaviour] for instance in instances])
        iou_error[behaviour] = _per_organ(np.abs(estimates - iou_from_counts(inter, pred, pixels)), organ_of, organs)
        nsd[behaviour] = _per_organ(np.array([instance.nsd[behaviour] for instance in instances]), organ_of, organs)
        dice_3d[behaviour] = _volume_dice(instances, behaviour, organs)
    curves = np.array([instance.curve for instance in instances]).reshape(len(instances), -1)
    single = [dice[b]["mean"] for b in SINGLE_PROMPT_BEHAVIOURS if b in dice]
    return {
        "dice": dice,
        "noc": {key: float(clicks_to_reach(curves[:, :max_clicks], threshold).mean())
                for key, threshold in NOC_THRESHOLDS.items()} if max_clicks else None,
        "spread": max(single) - min(single) if len(single) > 1 else None,
        "dice_3d": dice_3d,
        "nsd": nsd,
        "iou_error": iou_error,
        "dice_vs_clicks": curves.mean(0).tolist(),
        "n_instances": len(instances),
        "instances_per_organ": {o: organ_of.count(o) for o in organs},
        "n_slices": n_slices,
        "n_cases": len({instance.case for instance in instances}),
        "slices_per_second": n_slices / seconds,
    }


# ------------------------------------------------------------------------------------------ report


def write_report(metrics: dict, output_dir: str | Path) -> None:
    """metrics.json, metrics.md, dice_per_organ.png and (with clicks) dice_vs_clicks.png, each written atomically."""
    output_dir = Path(output_dir)
    figures = {"dice_per_organ.png": _organ_figure(metrics)} if metrics["dice"] else {}
    if metrics["dice_vs_clicks"]:
        figures["dice_vs_clicks.png"] = _clicks_figure(metrics)
    for name, figure in figures.items():
        with atomic_path(output_dir / name) as tmp:
            figure.savefig(tmp, format="png", dpi=120)
    with atomic_path(output_dir / "metrics.md") as tmp:
        tmp.write_text(_markdown(metrics))
    with atomic_path(output_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(header: list, rows: list[list]) -> list[str]:
    return [f"| {' | '.join(map(str, header))} |", f"|{'---|' * len(header)}",
            *(f"| {' | '.join(map(_cell, row))} |" for row in rows), ""]


def _markdown(metrics: dict) -> str:
    s = metrics["settings"]
    model = (s["model"] or "the model") + (f" + adapter {s['adapter']}" if s.get("adapter") else "")
    lines = [f"# Evaluation of {model}" + (f" on split {s['split']}" if s["split"] else ""), "",
             f"{metrics['n_instances']} organ instances (>= {s['min_pixels']} px) in {metrics['n_slices']} slices of "
             f"{metrics['n_cases']} cases; seed {s['seed']}; {metrics['slices_per_second']:.2f} slices/s.", ""]
    dice, organs = metrics["dice"], list(metrics["instances_per_organ"])
    if dice:
        lines += ["## Mean per behaviour", ""] + _table(
            ["behaviour", "Dice", "3D Dice", f"NSD@{s['nsd_tolerance_mm']:g}mm", "IoU-head error"],
            [[b, dice[b]["mean"], metrics["dice_3d"][b]["mean"], metrics["nsd"][b]["mean"],
              metrics["iou_error"][b]["mean"]] for b in dice])
        lines += ["IoU-head error: mean |IoU head's estimate - achieved IoU| (0: the model's confidence can be "
                  "trusted).", ""]
        lines += ["## Dice per organ", ""] + _table(
            ["organ", "instances", *dice],
            [[o, metrics["instances_per_organ"][o], *(dice[b]["per_organ"][o] for b in dice)] for o in organs])
    lines += ["Human-factor spread (max - min of the mean Dice over the single-prompt behaviours): "
              f"{_cell(metrics['spread'])}", ""]
    if metrics["noc"]:
        lines += [f"NoC@85: {metrics['noc']['85']:.2f}, NoC@90: {metrics['noc']['90']:.2f} "
                  f"(at most {s['max_clicks']} clicks; an instance gets no more clicks once its Dice reaches "
                  f"{DONE_DICE:g})", ""]
    if metrics["dice_vs_clicks"]:
        curve = metrics["dice_vs_clicks"]
        lines += ["## Mean Dice after each click", ""]
        lines += _table(["clicks", *range(1, len(curve) + 1)], [["Dice", *curve]])
    return "\n".join(lines)


def _organ_figure(metrics: dict) -> Figure:
    from matplotlib.figure import Figure  # here, not at the top: `import sam_peft` stays free of matplotlib

    dice, organs = metrics["dice"], list(metrics["instances_per_organ"])
    figure = Figure(figsize=(max(6.0, 0.25 * len(organs) * (len(dice) + 1)), 4.5), layout="constrained")
    axes = figure.subplots()
    width, x = 0.8 / len(dice), np.arange(len(organs))
    for i, (behaviour, values) in enumerate(dice.items()):
        axes.bar(x + i * width, [values["per_organ"][o] for o in organs], width, label=behaviour)
    axes.set_xticks(x + 0.4 - width / 2, organs, rotation=45, ha="right")
    axes.set(ylim=(0, 1), ylabel="Dice", title="Dice per organ and behaviour")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def _clicks_figure(metrics: dict) -> Figure:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    curve = metrics["dice_vs_clicks"]
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    axes.plot(range(1, len(curve) + 1), curve, marker="o", label="click series")
    for i, threshold in enumerate(NOC_THRESHOLDS.values()):
        axes.axhline(threshold, color="grey", linestyle=":", linewidth=1, label="NoC thresholds" if i == 0 else None)
    if "tight_box" in metrics["dice"]:
        axes.axhline(metrics["dice"]["tight_box"]["mean"], color="C1", linestyle="--", label="tight box")
    axes.set(xlabel="clicks", ylabel="mean Dice", ylim=(0, 1), title="Mean Dice against the number of clicks")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(loc="lower right")
    return figure
