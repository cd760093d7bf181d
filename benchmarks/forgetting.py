"""Forgetting and click behaviour of an adapter against zero-shot, on held-out slices and unseen structures.

`compare` evaluates models with the full simulated-user protocol on a held-out split and splits every
figure into structures the adapters were trained on (seen) and structures never trained on (unseen);
`markdown` prints the tables with the targets of the bundled adapter (boxes within `BOX_TOLERANCE` of
zero-shot on every structure; centre click, clicks_3 on seen structures; clicks_5 above clicks_3; spread).
`click_curves` measures why corrections stop helping: the click series with and without the previous
mask fed back, and with the IoU head's or the best of SAM's three candidates at every click.

Run by benchmarks/train_bundled_adapter.py; on its own, for adapters already trained:

    python benchmarks/forgetting.py --data runs/bundled/data/eval --seen runs/bundled/data/seen.json \
        --adapters baseline=runs/bundled/baseline/adapter distill=runs/bundled/distill/adapter

`--curves-only --variants 1,2 --no-zero-shot` decodes only the adapters' series, as evaluated and without
mask feedback (the numbers index `CLICK_VARIANTS`), when CPU time is short.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from sam_peft import evaluate, load_adapter, load_base_model
from sam_peft.data import load_prepared
from sam_peft.evaluation.evaluate import DONE_DICE, EVAL_BEHAVIOURS, _batches, _load_split, _prompts, _slices
from sam_peft.evaluation.metrics import dice_counts, dice_from_counts
from sam_peft.models import processor_for
from sam_peft.models.decoding import PAD_LABEL, decode_regions, encode_images
from sam_peft.prompts.clicks import PERFECT, next_clicks

BOX_TOLERANCE = 0.01
TARGETS = {"center_click": 0.80, "clicks_3": 0.88, "spread": 0.10}
MIN_PIXELS = 30  # at 3 mm pixels this keeps the aorta and the IVC in the evaluation


def evaluate_models(models: Mapping[str, object], data: str | Path, split: str, output: Path,
                    device: str = "cpu", min_pixels: int = MIN_PIXELS, reuse: bool = False) -> dict[str, dict]:
    """Full protocol (every behaviour, clicks to 5, no NoC) for each model; metrics.json per model
    (`reuse`: read back when already there)."""
    results = {}
    for name, model in models.items():
        if reuse and (output / name / "metrics.json").exists():
            results[name] = json.loads((output / name / "metrics.json").read_text())
            continue
        results[name] = evaluate(model.to(device), str(data), split=split, behaviours=EVAL_BEHAVIOURS, noc=False,
                                 min_pixels=min_pixels, batch_size=16, progress=False, output_dir=output / name)
    return results


def group_mean(metrics: dict, behaviour: str, organs: Sequence[str]) -> float:
    """Instance-weighted mean Dice of one behaviour over the given structures."""
    counts = metrics["instances_per_organ"]
    organs = [o for o in organs if o in counts]
    n = np.array([counts[o] for o in organs])
    values = np.array([metrics["dice"][behaviour]["per_organ"][o] for o in organs])
    return float((values * n).sum() / n.sum()) if n.sum() else float("nan")


def summary(metrics: dict, zero_shot: dict, seen: set[str]) -> dict:
    """Per group (seen / unseen): mean Dice per behaviour, spread, and the worst box change per structure."""
    organs = list(metrics["instances_per_organ"])
    out = {}
    for group, members in (("seen", [o for o in organs if o in seen]), ("unseen", [o for o in organs if o not in seen])):
        if not members:
            continue
        means = {b: group_mean(metrics, b, members) for b in EVAL_BEHAVIOURS}
        single = [means[b] for b in ("tight_box", "jitter_box", "loose_box", "center_click", "random_click")]
        worst = {b: min((metrics["dice"][b]["per_organ"][o] - zero_shot["dice"][b]["per_organ"][o], o)
                        for o in members) for b in ("tight_box", "loose_box")}
        out[group] = {"structures": members, "instances": sum(metrics["instances_per_organ"][o] for o in members),
                      "dice": means, "spread": max(single) - min(single), "worst_box": worst}
    return out


def targets(s: dict, zero: dict) -> dict[str, bool]:
    """Which of the bundled adapter's targets a model's `summary` reaches; the click targets read both as
    Dice and as a ratio to zero-shot's tight box on the same instances (zero: zero-shot's `summary`)."""
    boxes = all(g["worst_box"][b][0] >= -BOX_TOLERANCE for g in s.values() for b in ("tight_box", "loose_box"))
    seen, reference = s.get("seen", {}).get("dice", {}), zero.get("seen", {}).get("dice", {}).get("tight_box", 1.0)
    return {"boxes within 0.01 on every structure": boxes,
            "seen centre click >= 0.80": seen.get("center_click", 0) >= TARGETS["center_click"],
            "seen clicks_3 >= 0.88": seen.get("clicks_3", 0) >= TARGETS["clicks_3"],
            "seen centre / zero-shot tight >= 0.80": seen.get("center_click", 0) / reference >= TARGETS["center_click"],
            "seen clicks_3 / zero-shot tight >= 0.88": seen.get("clicks_3", 0) / reference >= TARGETS["clicks_3"],
            "clicks_5 > clicks_3 (seen and unseen)": all(g["dice"]["clicks_5"] > g["dice"]["clicks_3"] for g in s.values()),
            "spread < 0.10 (seen and unseen)": all(g["spread"] < TARGETS["spread"] for g in s.values())}


def multi_piece_share(data: str | Path, split: str, min_pixels: int = MIN_PIXELS) -> dict[str, float]:
    """{structure: share of its evaluated instances that lie in 2+ pieces on their slice (8-connected)}: one
    click cannot select such an instance whole."""
    dataset, organ_names, _ = _load_split(load_prepared(data), split)
    pieces: dict[str, list[bool]] = {}
    for s in _slices(dataset, None, min_pixels, False):
        for organ in s.organs:
            count = ndimage.label(s.label == organ, structure=np.ones((3, 3)))[1]
            pieces.setdefault(organ_names[organ - 1], []).append(count > 1)
    return {name: float(np.mean(flags)) for name, flags in pieces.items()}


def use(box_dice: float, clicks_dice: float) -> str:
    """Which prompt a user should trust for a structure: the box unless five clicks beat it by over 0.01."""
    return "clicks" if clicks_dice > box_dice + BOX_TOLERANCE else "box"


def markdown(results: dict[str, dict], seen: set[str], seconds: Mapping[str, float] | None = None,
             pieces: Mapping[str, float] | None = None) -> str:
    """The option table (seen / unseen rows), the targets reached, and the per-structure box changes
    (with `pieces`, from `multi_piece_share`: a column of it and its correlation with the centre click)."""
    zero = results["zero-shot"]
    summaries = {name: summary(m, zero, seen) for name, m in results.items()}
    head = ["option", "group", "n", *EVAL_BEHAVIOURS, "spread", "worst tight", "worst loose"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, s in summaries.items():
        for group, g in s.items():
            worst = [f"{g['worst_box'][b][0]:+.3f} ({g['worst_box'][b][1]})" if name != "zero-shot" else "-"
                     for b in ("tight_box", "loose_box")]
            lines.append(f"| {name} | {group} | {g['instances']} | "
                         + " | ".join(f"{g['dice'][b]:.3f}" for b in EVAL_BEHAVIOURS)
                         + f" | {g['spread']:.3f} | " + " | ".join(worst) + " |")
    lines += ["", f"Targets (boxes: worst structure's change against zero-shot >= -{BOX_TOLERANCE}; spread: max - min "
              "over the five single-prompt behaviours):", "",
              "| option | " + " | ".join(targets(summaries["zero-shot"], summaries["zero-shot"])) + (" | train s |" if seconds else " |"),
              "|---" * (len(targets(summaries["zero-shot"], summaries["zero-shot"])) + 1 + bool(seconds)) + "|"]
    for name, s in summaries.items():
        if name == "zero-shot":
            continue
        cells = ["yes" if ok else "no" for ok in targets(s, summaries["zero-shot"]).values()]
        lines.append(f"| {name} | " + " | ".join(cells) + (f" | {seconds.get(name, float('nan')):.0f} |" if seconds else " |"))
    organs = list(zero["instances_per_organ"])
    names = [n for n in results if n != "zero-shot"]
    piece_head = " multi-piece |" if pieces else ""
    lines += ["", "Per structure: box columns of an option are its change against zero-shot; centre and clicks_5 are Dice"
              + ("; multi-piece: share of the instances in 2+ pieces on their slice" if pieces else "")
              + "; use: the prompt to trust with the adapter answering boxes through the base (box: the base's "
              "tight box is within 0.01 of the adapter's clicks_5 or above it; clicks: five clicks do better).",
              "", f"| structure | seen | n |{piece_head} zero-shot tight | zero-shot loose | "
              + " | ".join(f"{n} tight | {n} loose | {n} centre | {n} clicks_5 | {n} use" for n in names) + " |",
              "|---" * (5 + bool(pieces) + 5 * len(names)) + "|"]
    for o in organs:
        d = lambda m, b: m["dice"][b]["per_organ"][o]  # noqa: E731
        piece_cell = f" {pieces[o]:.2f} |" if pieces else ""
        lines.append(f"| {o} | {'yes' if o in seen else 'no'} | {zero['instances_per_organ'][o]} |{piece_cell} "
                     f"{d(zero, 'tight_box'):.3f} | {d(zero, 'loose_box'):.3f} | "
                     + " | ".join(f"{d(results[n], 'tight_box') - d(zero, 'tight_box'):+.3f} | "
                                  f"{d(results[n], 'loose_box') - d(zero, 'loose_box'):+.3f} | "
                                  f"{d(results[n], 'center_click'):.3f} | {d(results[n], 'clicks_5'):.3f} | "
                                  f"{use(d(zero, 'tight_box'), d(results[n], 'clicks_5'))}" for n in names)
                     + " |")
    if pieces:
        share = [pieces[o] for o in organs]
        centre = {n: [results[n]["dice"]["center_click"]["per_organ"][o] for o in organs] for n in names}
        lines += ["", "Correlation across structures of the multi-piece share with the centre click's Dice: "
                  + ", ".join(f"{n} r = {np.corrcoef(share, centre[n])[0, 1]:+.2f}" for n in names) + "."]
    return "\n".join(lines)


@torch.inference_mode()
def click_curves(model, data: str | Path, split: str, variants: Mapping[str, dict], clicks: int = 7,
                 min_pixels: int = MIN_PIXELS, seed: int = 0, device: str = "cpu", batch_size: int = 16,
                 every: int = 1) -> dict[str, list[float]]:
    """Mean Dice after each click of `evaluate`'s click series, under variants of how the series decodes.

    Each variant is a dict of: feedback (feed the previous low-res logits back as the mask prompt, as
    `evaluate` does; default True); multimask: "first" (SAM's three candidates for the lone first click
    only, as `evaluate`) or "all" (three at every click); choice: "iou" (the IoU head picks, as
    `evaluate`) or "oracle" (the candidate with the best Dice against the reference: a perfect choice).
    The encoder runs once per slice for all variants; `every` keeps every n-th slice of the split.
    """
    model = model.to(device).eval()
    processor = processor_for(model)
    dataset = load_prepared(data)[split]
    dataset = dataset.select(range(0, len(dataset), every))
    curves = {name: [] for name in variants}
    for batch in _batches(_slices(dataset, None, min_pixels, False), batch_size):
        regions = [(s, organ) for s in batch for organ in s.organs]
        masks_np = np.stack([s.label == organ for s, organ in regions])
        targets_ = torch.from_numpy(masks_np)[:, None].to(device)
        pixels = torch.stack([processor.preprocess(s.image) for s in batch]).to(device)
        image_of = torch.tensor([i for i, s in enumerate(batch) for _ in s.organs], device=device)
        embeddings = encode_images(model, pixels)[image_of]
        start, labels = _prompts(regions, masks_np, "center_click", seed)
        for name, variant in variants.items():
            curves[name].append(_series(model, processor, embeddings, start, labels, targets_, clicks, **variant))
    return {name: np.concatenate(parts).mean(0).tolist() for name, parts in curves.items()}


def _series(model, processor, embeddings, start, labels, targets_, clicks: int, feedback: bool = True,
            multimask: str = "first", choice: str = "iou") -> np.ndarray:
    """(N, clicks) Dice of one click series, as `evaluate` runs it (no pixel clicked twice; an instance at
    `DONE_DICE` gets no more clicks and keeps its mask) but for the variant's decoding. Regions are rows:
    embeddings (N, C, h, w), start points (N, 1, 1, 2) in the original frame."""
    device, hw, n = targets_.device, tuple(targets_.shape[-2:]), len(targets_)
    points, labels = processor.transform_coords(start, hw).to(device), labels.to(device)
    rows = torch.arange(n, device=device)
    clicked = torch.zeros_like(targets_)
    x, y = start[:, 0, 0].long().to(device).unbind(-1)
    clicked[rows, 0, y, x] = True
    mask_inputs, masks, dice, curve = None, None, None, []
    for step in range(clicks):
        logits, iou = decode_regions(model, embeddings, points, labels, mask_inputs,
                                     True if multimask == "all" else "auto")
        logits, iou = logits[:, 0], iou[:, 0]  # one region per row: (N, M, 256, 256), (N, M)
        full = processor.postprocess_masks(logits, hw) > 0  # (N, M, H, W)
        candidates = torch.as_tensor(dice_from_counts(*(c.cpu().numpy() for c in dice_counts(full, targets_.expand_as(full)))))
        pick = (candidates.argmax(-1) if choice == "oracle" else iou.argmax(-1).cpu()).to(device)
        active = rows if dice is None else rows[torch.from_numpy(dice < DONE_DICE).to(device)]
        if masks is None:
            masks, chosen, dice = full[rows, pick][:, None], logits[rows, pick], candidates[rows.cpu(), pick.cpu()].numpy()
        else:  # finished instances keep their mask
            masks[active] = full[active, pick[active]][:, None]
            chosen[active] = logits[active, pick[active]]
            dice[active.cpu()] = candidates[active.cpu(), pick[active].cpu()].numpy()
        curve.append(dice.copy())
        active = rows[torch.from_numpy(dice < DONE_DICE).to(device)]
        click, click_label = next_clicks(masks, targets_, clicked=clicked)
        valid = (click_label[:, 0] != PERFECT) & torch.isin(rows, active)
        cx, cy = click[valid, 0].long().unbind(-1)
        clicked[rows[valid], 0, cy, cx] = True
        points = torch.cat([points, processor.transform_coords(click, hw)[:, :, None]], dim=2)
        labels = torch.cat([labels, torch.where(valid, click_label[:, 0], PAD_LABEL)[:, None, None]], dim=2)
        mask_inputs = chosen[:, None] if feedback else None
    return np.stack(curve, 1)


CLICK_VARIANTS = {
    "as evaluated (feedback, IoU head)": dict(),
    "no mask feedback": dict(feedback=False),
    "3 candidates every click, IoU head": dict(multimask="all"),
    "3 candidates every click, oracle": dict(multimask="all", choice="oracle"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared evaluation data (all structures)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--seen", required=True, help="JSON list of the structures the adapters were trained on")
    parser.add_argument("--adapters", nargs="+", default=[], help="NAME=ADAPTER_DIR pairs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="runs/forgetting")
    parser.add_argument("--curves-only", action="store_true", help="only the click-series decoding variants")
    parser.add_argument("--clicks", type=int, default=7)
    parser.add_argument("--every", type=int, default=1, help="click variants on every n-th slice (CPU time)")
    parser.add_argument("--batch-size", type=int, default=4, help="slices per decoder batch (memory)")
    parser.add_argument("--variants", default=",".join(str(i + 1) for i in range(len(CLICK_VARIANTS))),
                        help="click-series decodings to run, by number: "
                             + "; ".join(f"{i + 1} = {name}" for i, name in enumerate(CLICK_VARIANTS)))
    parser.add_argument("--no-zero-shot", action="store_true", help="with --curves-only: the adapters' series only")
    args = parser.parse_args()
    names = list(CLICK_VARIANTS)
    numbers = [int(i) if i.strip().isdigit() else 0 for i in args.variants.split(",")]
    if not all(1 <= n <= len(names) for n in numbers):
        parser.error(f"--variants {args.variants!r}: expected comma-separated numbers from 1 to {len(names)}")
    variants = {names[n - 1]: CLICK_VARIANTS[names[n - 1]] for n in numbers}
    if args.no_zero_shot and not (args.curves_only and args.adapters):
        parser.error("--no-zero-shot needs --curves-only and at least one of --adapters")
    models = {} if args.no_zero_shot else {"zero-shot": load_base_model("litemedsam")}
    models.update({name: load_adapter(path) for name, path in (pair.split("=", 1) for pair in args.adapters)})
    output = Path(args.output)
    if not args.curves_only:
        results = evaluate_models(models, args.data, args.split, output, args.device)
        seen = set(json.loads(Path(args.seen).read_text()))
        print(markdown(results, seen, pieces=multi_piece_share(args.data, args.split)))
    print("| model: click-series decoding | " + " | ".join(map(str, range(1, args.clicks + 1))) + " |")
    print("|---" * (args.clicks + 1) + "|")
    for name, model in reversed(models.items()):  # adapters first: on a CPU the zero-shot curves come last
        curves = click_curves(model, args.data, args.split, variants, args.clicks, device=args.device,
                              every=args.every, batch_size=args.batch_size)
        for variant, curve in curves.items():
            print(f"| {name}: {variant} | " + " | ".join(f"{v:.3f}" for v in curve) + " |", flush=True)


if __name__ == "__main__":
    main()
