"""`evaluate`: interactive segmentation with simulated users, the protocol of DESIGN.md section 7.

Every organ instance of at least `min_pixels` pixels in every slice is prompted as different people would
prompt it, from its ground truth at original resolution, with a generator seeded by (seed, slice row,
organ, behaviour): a prompt never depends on the batch or on which other behaviours run. The image
encoder runs once per slice; every behaviour and every click reuses that embedding, and all instances of
a batch of slices go through the mask decoder together, once per behaviour or click. Predictions are
upsampled to original resolution and scored there.

The click series behind `center_click`, `clicks_3`, `clicks_5` and NoC starts at the centre click; each
next click goes where the original-resolution prediction is wrong (`next_clicks`), with the previous
low-res logits fed back as the mask prompt, as a person refines a mask.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tqdm.auto import tqdm

from ..data.label_maps import organ_key
from ..data.prepare import load_prepared, read_metadata
from ..io import atomic_path
from ..models.decoding import PAD_LABEL, encode_images, sam_of
from ..models.loading import processor_for
from ..prompts.behaviours import make_prompt
from ..prompts.clicks import PERFECT, next_clicks
from .metrics import clicks_to_reach, dice_counts, dice_from_counts, surface_dice
from .predictor import decode_prompts, stack_prompts

EVAL_BEHAVIOURS = ("tight_box", "jitter_box", "loose_box", "center_click", "random_click", "clicks_3", "clicks_5")
SINGLE_PROMPT_BEHAVIOURS = EVAL_BEHAVIOURS[:5]  # the human-factor spread compares these
CLICK_SERIES = {"center_click": 1, "clicks_3": 3, "clicks_5": 5}  # the click of the series each one scores
NOC_THRESHOLDS = {"85": 0.85, "90": 0.90}
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
    min_pixels: int = 100,
    organs: Sequence[str] | None = None,
    output_dir: str | Path | None = None,
    progress: bool = True,
    image_embeddings: torch.Tensor | None = None,
) -> dict:
    """Evaluate a SamModel / PeftModel on a prepared dataset (or its path) with simulated users.

    Returns (and with `output_dir` writes as metrics.json, metrics.md and PNG plots) the metrics: `dice`,
    `dice_3d` and `nsd` per behaviour ({"mean", "per_organ"}, 3D also "per_case"), `noc` {"85", "90"}
    (None without `noc`), `dice_vs_clicks`, `spread`, counts and `slices_per_second`. `organs` restricts
    the evaluation to these organ names. The model's train/eval mode is restored afterwards, so a trainer
    can validate with a subset of behaviours and `noc=False`. `image_embeddings`: the (N, C, h, w) encoder
    output for every row of the evaluated split (a frozen-encoder cache), so validation skips the encoder.
    """
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
    metrics["settings"] = {"model": getattr(sam_of(model), "name_or_path", None), "split": split,
                           "behaviours": list(behaviours), "noc": noc, "max_clicks": max_clicks, "seed": seed,
                           "min_pixels": min_pixels, "organs": list(organs) if organs else None,
                           "nsd_tolerance_mm": NSD_TOLERANCE_MM}
    if output_dir is not None:
        write_report(metrics, output_dir)
    return metrics


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
        raise ValueError(f"organ(s) {unknown} are not in the dataset's label map; valid organs are {list(organ_names)}")
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
            yield _Slice(row, np.asarray(item["image"]), label, organs, str(item["case_id"]), str(item["plane"]),
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


def _prompts(regions: list[tuple[_Slice, int]], masks: np.ndarray, behaviour: str, seed: int, processor):
    """SAM tokens of one behaviour for every region: points (N, 1, P, 2), model-input frame; labels (N, 1, P)."""
    index = EVAL_BEHAVIOURS.index(behaviour)
    points, labels = stack_prompts([make_prompt(behaviour, mask, np.random.default_rng([seed, s.row, organ, index]))
                                    for (s, organ), mask in zip(regions, masks)])
    return processor.transform_coords(points, masks.shape[-2:])[:, None], labels[:, None]


def _evaluate_batch(model, processor, slices, behaviours, n_clicks, seed, organ_names, cached) -> list[_Instance]:
    """Every instance of a batch of same-size slices is one row of the decoder batch (no padding rows)."""
    parameter = next(model.parameters())
    device, hw = parameter.device, slices[0].label.shape
    regions = [(s, organ) for s in slices for organ in s.organs]
    masks_np = np.stack([s.label == organ for s, organ in regions])  # (N, H, W) ground truth
    targets = torch.from_numpy(masks_np)[:, None].to(device)
    image_of = torch.tensor([i for i, s in enumerate(slices) for _ in s.organs], device=device)
    if cached is None:
        pixels = torch.stack([processor.preprocess(s.image) for s in slices]).to(device, parameter.dtype)
        embeddings = encode_images(model, pixels)
    else:
        embeddings = cached[[s.row for s in slices]].to(device, parameter.dtype)
    embeddings = embeddings[image_of]  # once per slice, shared by every behaviour and click
    instances = [_Instance(s.case_id if s.plane == "axial" else f"{s.case_id}/{s.plane}", organ_names[organ - 1],
                           int(mask.sum())) for (s, organ), mask in zip(regions, masks_np)]

    def decode(points, labels, mask_inputs=None):
        logits, _ = decode_prompts(model, embeddings, points.to(device), labels.to(device), mask_inputs)
        return logits, processor.postprocess_masks(logits, hw) > 0

    def score(behaviour: str, masks: torch.Tensor) -> None:
        inter, pred, _ = (c[:, 0].cpu().numpy() for c in dice_counts(masks, targets))
        predicted = masks[:, 0].cpu().numpy()
        for n, ((s, _), instance) in enumerate(zip(regions, instances)):
            instance.counts[behaviour] = (int(inter[n]), int(pred[n]))
            instance.nsd[behaviour] = surface_dice(predicted[n], masks_np[n], s.spacing, NSD_TOLERANCE_MM)

    for behaviour in (b for b in behaviours if b not in CLICK_SERIES):
        score(behaviour, decode(*_prompts(regions, masks_np, behaviour, seed, processor))[1])

    points, labels = (t.to(device) for t in _prompts(regions, masks_np, "center_click", seed, processor))
    mask_inputs = None
    for step in range(1, n_clicks + 1):
        logits, masks = decode(points, labels, mask_inputs)
        curve = dice_from_counts(*(c[:, 0].cpu().numpy() for c in dice_counts(masks, targets)))
        for instance, value in zip(instances, curve):
            instance.curve.append(float(value))
        for behaviour in (b for b in behaviours if CLICK_SERIES.get(b) == step):
            score(behaviour, masks)
        if step < n_clicks:
            click, click_label = next_clicks(masks, targets)
            click_label = torch.where(click_label == PERFECT, PAD_LABEL, click_label)  # nothing left to correct
            points = torch.cat([points, processor.transform_coords(click, hw)[:, :, None]], dim=2)
            labels = torch.cat([labels, click_label[:, :, None]], dim=2)
            mask_inputs = logits
    return instances


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
    dice, dice_3d, nsd = {}, {}, {}
    for behaviour in behaviours:
        inter, pred = np.array([instance.counts[behaviour] for instance in instances]).T
        dice[behaviour] = _per_organ(dice_from_counts(inter, pred, pixels), organ_of, organs)
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
    lines = [f"# Evaluation of {s['model'] or 'the model'}" + (f" on split {s['split']}" if s["split"] else ""), "",
             f"{metrics['n_instances']} organ instances (>= {s['min_pixels']} px) in {metrics['n_slices']} slices of "
             f"{metrics['n_cases']} cases; seed {s['seed']}; {metrics['slices_per_second']:.2f} slices/s.", ""]
    dice, organs = metrics["dice"], list(metrics["instances_per_organ"])
    if dice:
        lines += ["## Mean per behaviour", ""] + _table(
            ["behaviour", "Dice", "3D Dice", f"NSD@{s['nsd_tolerance_mm']:g}mm"],
            [[b, dice[b]["mean"], metrics["dice_3d"][b]["mean"], metrics["nsd"][b]["mean"]] for b in dice])
        lines += ["## Dice per organ", ""] + _table(
            ["organ", "instances", *dice],
            [[o, metrics["instances_per_organ"][o], *(dice[b]["per_organ"][o] for b in dice)] for o in organs])
    lines += ["Human-factor spread (max - min of the mean Dice over the single-prompt behaviours): "
              f"{_cell(metrics['spread'])}", ""]
    if metrics["noc"]:
        lines += [f"NoC@85: {metrics['noc']['85']:.2f}, NoC@90: {metrics['noc']['90']:.2f} "
                  f"(at most {s['max_clicks']} clicks)", ""]
    if metrics["dice_vs_clicks"]:
        curve = metrics["dice_vs_clicks"]
        lines += ["## Mean Dice after each click", ""]
        lines += _table(["clicks", *range(1, len(curve) + 1)], [["Dice", *curve]])
    return "\n".join(lines)


def _organ_figure(metrics: dict) -> Figure:
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
