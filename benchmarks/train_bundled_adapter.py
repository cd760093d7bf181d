"""Train, measure and ship the bundled `litemedsam-phpg` adapter: LiteMedSAM that takes clicks, boxes kept.

Data: every labelled structure of the shared TotalSegmentator volumes in ../shared/data/totalseg_ct: the
CT `example_ct` (fast-model labels), `example_ct_sm` (the full model's labels; its 30 slices are
example_ct's top 30, so identical images are kept once, with these labels) and the MR `example_mr_sm`;
one label map by name (the CT's v2 ids, then the MR-only names). Held out for the forgetting evaluation:
a contiguous block of axial slices of each volume (`HOLDOUT`) and whole structures (`--unseen`, which
are background on every training slice); no training slice repeats a held-out image.

Every option in `--options` is a `TrainConfig` trained by the project's trainer (`sam_peft.train`) on
the same data, then evaluated by benchmarks/forgetting.py against zero-shot LiteMedSAM in the same run
(boxes and clicks for seen and unseen structures; the click series under variants of its decoding).
`--ship OPTION` copies that option's adapter, with a model card, to sam_peft/adapters/litemedsam-phpg.
The adapter to ship is trained on everything (`--all-data`: no held-out slices or structures, so no
forgetting evaluation), its card quoting the held-out study of the same recipe (`--study`):

    python benchmarks/train_bundled_adapter.py --output runs/bundled                 # the held-out study
    python benchmarks/train_bundled_adapter.py --output runs/bundled_all --all-data --options distill \
        --ship distill --study runs/bundled

On the 2-core CPU (frozen encoder, cached embeddings) a decoder pass costs about 0.1-0.3 s per region,
so one option takes hours; a GPU runs the whole study in minutes. `--check` tests the pipeline.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from datasets import DatasetDict

from sam_peft import TrainConfig, load_adapter, load_base_model, train
from sam_peft.data import VolumeCase, organ_key, prepare_volumes, read_volume
from sam_peft.data.label_maps import LabelMap
from sam_peft.models import processor_for

from forgetting import CLICK_VARIANTS, click_curves, evaluate_models, markdown, multi_piece_share

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "totalseg_ct"
if not SHARED.is_dir():  # a copy inside the checkout, for a machine without ../shared
    SHARED = REPO / "shared_data" / "totalseg_ct"
SHIP_TO = REPO / "sam_peft" / "adapters" / "litemedsam-phpg"
# (case id, image, labels, class map); example_ct_sm first, so its labels win for the slices it shares
VOLUMES = (
    ("ct_sm", "example_ct_sm", "example_seg", "class_map_total_v2.json"),
    ("ct", "example_ct", "example_seg_fast_force_split", "class_map_total_v2.json"),
    ("mr", "example_mr_sm", "example_seg_mr", "class_map_total_mr.json"),
)
DATA_NOTE = ("TotalSegmentator example CT (example_ct, example_ct_sm) and MR (example_mr_sm), all labelled "
             "structures but the held-out ones; see README.md")
HOLDOUT = {"ct": (52, 82), "mr": (8, 14)}  # axial slice_index blocks [start, stop): mid-abdomen to the pelvis rim
# never trained on: both kidneys (an organ kind gone), bowel, a muscle pair, a vein, a small organ
UNSEEN = ("kidney_left", "kidney_right", "small_bowel", "iliopsoas_left", "iliopsoas_right", "inferior_vena_cava",
          "gallbladder")
RECIPE = dict(model="litemedsam", lora_preset="decoder", lora_r=8, frozen_encoder=True, behaviours=None, rounds=2,
              batch_size=8, max_regions=8, lr=1e-3, eval_behaviours=["tight_box"], log_with=None)
OPTIONS = {
    "baseline": {},  # issue 15's recipe: LoRA r=8 + IoU/hypernetwork heads, full PHPG mixture, 2 rounds
    "distill": {"distill_weight": 1.0},  # + the frozen base's masks for 4 random boxes per slice
    "distill-rounds4": {"distill_weight": 1.0, "rounds": 4},  # + 4 training rounds (3 corrective clicks)
    "distill-lora-only": {"distill_weight": 1.0, "train_heads": []},  # + no head trained in full
}


def union_label_map() -> tuple[dict[int, str], dict[str, int]]:
    """{id: name}: the CT v2 ids, then MR names the CT map lacks; and the MR's {name: id} in that map."""
    ct = {int(k): v for k, v in json.loads((SHARED / "class_map_total_v2.json").read_text()).items()}
    ids = dict(ct)
    by_name = {organ_key(name): i for i, name in ct.items()}
    for name in json.loads((SHARED / "class_map_total_mr.json").read_text()).values():
        if organ_key(name) not in by_name:
            by_name[organ_key(name)] = max(ids) + 1
            ids[max(ids) + 1] = name
    return ids, by_name


def volume_cases() -> list[VolumeCase]:
    """The shared volumes with labels in the union map's ids."""
    _, by_name = union_label_map()
    cases = []
    for case_id, image, labels, class_map in VOLUMES:
        label = read_volume(SHARED / f"{labels}.nii.gz", "label")
        names = {int(k): v for k, v in json.loads((SHARED / class_map).read_text()).items()}
        lut = np.zeros(max(names) + 1, dtype=np.int16)
        for raw, name in names.items():
            lut[raw] = by_name[organ_key(name)]
        label.array = lut[np.asarray(label.array, dtype=np.int64)]
        cases.append(VolumeCase(case_id, read_volume(SHARED / f"{image}.nii.gz"), label))
    return cases


def _held_out(case: str, index: int) -> bool:
    start, stop = HOLDOUT.get(case, (0, 0))
    return start <= index < stop


def split_rows(dataset) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(case, slice) keys of the training and the held-out slices: identical images kept once, in VOLUMES
    order, and a training slice never repeats a held-out image."""
    order = [case for case, *_ in VOLUMES]
    rows = sorted(range(len(dataset)), key=lambda i: (order.index(dataset[i]["case_id"]), dataset[i]["slice_index"]))
    digest = {i: hashlib.sha1(np.asarray(dataset[i]["image"], dtype=np.uint8).tobytes()).hexdigest() for i in rows}
    key = {i: (dataset[i]["case_id"], dataset[i]["slice_index"]) for i in rows}
    held = [i for i in rows if _held_out(*key[i])]
    held_images = {digest[i] for i in held}
    seen_images, train = set(), []
    for i in rows:
        if i in held or digest[i] in held_images or digest[i] in seen_images:
            continue
        seen_images.add(digest[i])
        train.append(i)
    first_held, kept = set(), []
    for i in held:
        if digest[i] not in first_held:
            first_held.add(digest[i])
            kept.append(i)
    return [key[i] for i in train], [key[i] for i in kept]


def _select(dataset, keys: list[tuple[str, int]]):
    wanted = set(keys)
    return dataset.filter(lambda c, s: (c, s) in wanted, input_columns=["case_id", "slice_index"])


def prepare_data(output: Path, unseen: tuple[str, ...], check: bool = False,
                 all_data: bool = False) -> tuple[Path, Path, list[str]]:
    """-> (training data: train + validation with the seen structures, evaluation data: the held-out slices
    with every structure, the seen structures). `all_data`: the held-out slices are trained on too (and still
    validated on, as a check that training ran) and no structure is unseen."""
    ids, _ = union_label_map()
    cases = volume_cases()
    everything = prepare_volumes(cases, output=output / "all", overwrite=True, label_map=ids, min_pixels=10)["train"]
    train_keys, held_keys = split_rows(everything)
    if all_data:
        train_keys, unseen = train_keys + held_keys, ()
    if check:
        train_keys, held_keys = train_keys[::len(train_keys) // 4][:4], held_keys[:2]
    unseen = {organ_key(name) for name in unseen}
    present = {o for organs in _select(everything, train_keys)["organs"] for o in organs}
    seen = sorted(present - unseen)
    seen_map = {i: name for i, name in ids.items() if organ_key(name) in seen}
    seen_data = prepare_volumes(cases, output=output / "seen_all", overwrite=True,
                                label_map=LabelMap.from_ids(seen_map, "totalsegmentator CT+MR"),
                                ignore_unknown_labels=True, min_pixels=10)["train"]
    DatasetDict(train=_select(seen_data, train_keys), validation=_select(seen_data, held_keys)).save_to_disk(
        str(output / "train"))
    DatasetDict(validation=_select(everything, held_keys)).save_to_disk(str(output / "eval"))
    (output / "seen.json").write_text(json.dumps(seen))
    held = "trained on too" if all_data else "held out"
    print(f"{len(train_keys)} training slices, {len(held_keys)} validation slices ({HOLDOUT}, {held}); "
          f"{len(seen)} seen structures; unseen: {sorted(unseen)}")
    return output / "train", output / "eval", seen


def run_option(name: str, data: Path, output: Path, epochs: int, seed: int, max_steps: int | None) -> float:
    """Train one option with `sam_peft.train`; returns its wall time in seconds."""
    config = TrainConfig.from_dict(dict(RECIPE, **OPTIONS[name], data=str(data), epochs=epochs, eval_every=epochs,
                                        seed=seed, max_steps=max_steps, output_dir=str(output / name),
                                        cache_dir=str(output / "cache")))
    started = time.perf_counter()
    train(config, overwrite=True)
    return time.perf_counter() - started


def ship(option_dir: Path, card: str, box_prompts: str) -> None:
    """The adapter's files, its box-prompt route (`load_adapter`'s default) and its model card into the
    package (replacing any earlier bundle)."""
    SHIP_TO.mkdir(parents=True, exist_ok=True)
    for old in SHIP_TO.iterdir():
        if old.is_file():
            old.unlink()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(option_dir / "adapter" / name, SHIP_TO / name)
    info = json.loads((option_dir / "adapter" / "sam_peft.json").read_text())
    info["data"] = DATA_NOTE  # not the run's local folder
    info["box_prompts"] = box_prompts
    (SHIP_TO / "sam_peft.json").write_text(json.dumps(info, indent=2))
    (SHIP_TO / "README.md").write_text(card)
    print(f"shipped {option_dir.name} to {SHIP_TO}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/bundled")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, from {list(OPTIONS)}")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true",
                        help="pipeline check: 4 training slices, 2 held-out, 2 steps per option, 2 clicks")
    parser.add_argument("--unseen", default=",".join(UNSEEN), help="structures never trained on")
    parser.add_argument("--clicks", type=int, default=7, help="click-series length for the decoding variants")
    parser.add_argument("--curves", default="baseline,distill-rounds4",
                        help="models whose click series is decoded in every variant (zero-shot or options)")
    parser.add_argument("--ship", help="option whose adapter goes to sam_peft/adapters/litemedsam-phpg")
    parser.add_argument("--box-prompts", choices=("base", "adapter"), default="base",
                        help="what answers box-only prompts of the shipped adapter by default (load_adapter's "
                        "box_prompts): the base, as measured safer on unseen structures and other patients, or "
                        "the adapter")
    parser.add_argument("--all-data", action="store_true",
                        help="train on every slice and structure (nothing held out, no evaluation): the adapter to ship")
    parser.add_argument("--study", help="with --all-data: a held-out study's --output, whose report the card quotes")
    parser.add_argument("--reuse", action="store_true",
                        help="keep adapters and evaluations already in --output (e.g. trained on a GPU)")
    args = parser.parse_args()
    output, options = Path(args.output), [o for o in args.options.split(",") if o]
    unknown = [o for o in options + ([args.ship] if args.ship else []) if o not in OPTIONS]
    if unknown:
        parser.error(f"unknown option(s) {unknown}; choose from {list(OPTIONS)}")
    study = Path(args.study) / "report.md" if args.study else None
    if study is not None and not study.is_file():
        parser.error(f"--study {args.study}: no report.md there; run the held-out study into that folder first")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    train_data, eval_data, seen = prepare_data(output / "data", tuple(args.unseen.split(",")), args.check,
                                               args.all_data)
    max_steps, clicks = (2, 2) if args.check else (None, args.clicks)
    timings = output / "timings.json"  # training seconds and device per option
    done = json.loads(timings.read_text()) if args.reuse and timings.exists() else {"seconds": {}, "device": {}}
    if args.all_data:  # nothing is held out, so nothing to evaluate on: the card quotes the study
        for name in options:
            train_unless_reused(name, args, output, train_data, done, timings, device, max_steps)
        report = study.read_text() if study else "Not measured for this recipe (no `--study` given).\n"
    else:
        report = held_out_study(args, options, output, train_data, eval_data, seen, done, timings, device,
                                max_steps, clicks, started)
    if args.ship:
        ship(output / args.ship, model_card(args, seen, report, done["seconds"][args.ship], done["device"][args.ship]),
             args.box_prompts)


def train_unless_reused(name: str, args, output: Path, train_data: Path, done: dict, timings: Path, device: str,
                        max_steps: int | None) -> None:
    """Train one option (unless `--reuse` finds its adapter); its seconds and device go to `timings`."""
    if not (args.reuse and (output / name / "adapter").is_dir()):
        done["seconds"][name] = run_option(name, train_data, output, args.epochs, args.seed, max_steps)
        done["device"][name] = device
        timings.write_text(json.dumps(done))


def held_out_study(args, options, output: Path, train_data: Path, eval_data: Path, seen: list[str], done: dict,
                   timings: Path, device: str, max_steps: int | None, clicks: int, started: float) -> str:
    """Train each option and evaluate it against zero-shot on the held-out slices; -> the report."""
    seconds = done["seconds"]
    previous = output / "results.json"
    curves = json.loads(previous.read_text()).get("curves") or {} if args.reuse and previous.exists() else {}
    models = {"zero-shot": load_base_model("litemedsam")}
    results = evaluate_models(models, eval_data, "validation", output / "eval", device, reuse=args.reuse)
    pieces = multi_piece_share(eval_data, "validation")
    for name in options:  # one option at a time, the report rewritten after each: a cut-short run keeps its tables
        train_unless_reused(name, args, output, train_data, done, timings, device, max_steps)
        models[name] = load_adapter(output / name / "adapter")
        results.update(evaluate_models({name: models[name]}, eval_data, "validation", output / "eval", device,
                                       reuse=args.reuse))
        write_report(output, markdown(results, set(seen), seconds, pieces), seen, seconds, results)
    for name in (n for n in args.curves.split(",") if n in models):
        variants = click_curves(models[name], eval_data, "validation", CLICK_VARIANTS, clicks, device=device)
        curves |= {f"{name}: {variant}": curve for variant, curve in variants.items()}
    curve_table = "\n".join(["| model: click-series decoding | " + " | ".join(map(str, range(1, clicks + 1))) + " |",
                             "|---" * (clicks + 1) + "|"]
                            + [f"| {k} | " + " | ".join(f"{v:.3f}" for v in c) + " |" for k, c in curves.items()])
    processor = processor_for(models["zero-shot"]).to_dict()
    curve_text = f"Mean Dice after each click, all held-out instances:\n\n{curve_table}\n\n" if curves else ""
    report = (f"{markdown(results, set(seen), seconds, pieces)}\n\n{curve_text}Trained on {done['device']}; this call ran on {device} ({time.perf_counter() - started:.0f} s, "
              f"evaluations it reused kept); preprocessing {processor}.\n")
    write_report(output, report, seen, seconds, results, curves)
    print(report)
    return report


def write_report(output: Path, report: str, seen, seconds, results, curves=None) -> None:
    (output / "report.md").write_text(report)
    (output / "results.json").write_text(json.dumps({"seconds": seconds, "seen": seen, "curves": curves,
                                                     "metrics": results}, indent=1, default=float))


BOX_ROUTES = {
    "base": """Box-only prompts (a box, no click) are answered by the base, adapter off, and everything with a click by
the adapter (`box_prompts: "base"` in `sam_peft.json`; `load_adapter(..., box_prompts="adapter")` answers
boxes with the adapter too). Why: on the training patients' held-out slices the adapter's own boxes gained
on structures it was trained on (tight box 0.807 vs 0.717) but lost to the base on structures it never saw
(loose box 0.761 vs 0.795; small bowel -0.172, gallbladder -0.096; tables below), the case of every new
user's structures and scans. Answered by the base, box prompts score exactly the base's Dice; clicks and
corrections keep the adapter's.""",
    "adapter": """Every prompt, boxes included, is answered by the adapter (`box_prompts: "adapter"` in `sam_peft.json`).""",
}


def model_card(args, seen: list[str], report: str, seconds: float, device: str) -> str:
    recipe = {**RECIPE, **OPTIONS[args.ship], "epochs": args.epochs, "seed": args.seed}
    slices = f"CT slices {HOLDOUT['ct'][0]}-{HOLDOUT['ct'][1] - 1} and MR slices {HOLDOUT['mr'][0]}-{HOLDOUT['mr'][1] - 1}"
    if args.all_data:
        held_out = (f"Nothing held out: every slice and every labelled structure. The figures below are the same recipe's "
                    f"with {slices} and every slice of {args.unseen.replace(',', ', ')} held out.")
        command = f"--all-data --options {args.ship} --ship {args.ship}" + (f" --study {args.study}" if args.study else "")
    else:
        held_out = f"Held out: {slices}, and every slice of {args.unseen.replace(',', ', ')}."
        command = f"--options {args.ship} --ship {args.ship}"
    distilled = (" It is also trained to reproduce the frozen base's own masks for random boxes (distillation "
                 "from the base), against forgetting what the base does well; the held-out figures say how far "
                 "that holds." if recipe.get("distill_weight") else "")
    return f"""# litemedsam-phpg: LiteMedSAM that takes clicks

The bundled sam_peft adapter for the offline LiteMedSAM base. Zero-shot LiteMedSAM answers boxes but not
clicks (a centre click scores a Dice near 0.05); this adapter, trained with the project's PHPG recipe,
answers boxes, single clicks and click corrections.{distilled}

    import sam_peft
    model = sam_peft.load_adapter("litemedsam-phpg")

{BOX_ROUTES[args.box_prompts]}

## Data

The TotalSegmentator example volumes (labels made by TotalSegmentator, not by hand): the CT `example_ct`
(3 mm, fast-model labels), `example_ct_sm` (the same CT's top 30 slices, full-model labels) and the MR
`example_mr_sm`; axial slices, CT in the abdomen window (level 40, width 400), MR by 0.5-99.5 percentiles.
{held_out} Trained on {len(seen)} structures (the label map in `sam_peft.json`): {', '.join(seen)}.

## Recipe

`python benchmarks/train_bundled_adapter.py --epochs {args.epochs} {command}`,
with `sam_peft.train`: {json.dumps(recipe)}; CBDP pruning (pool budget, ratio 0.5, anneal 0.875), AdamW
with warmup and cosine decay, frozen encoder (cached embeddings). Trained on {device} in {seconds:.0f} s.

## Held-out results (Dice; 'seen' = structures trained on, 'unseen' = never trained on)

{report}
## Limitations

Labels are TotalSegmentator's own predictions on two example scans, not expert annotations, and the
held-out slices come from the same two patients. The box columns above are the adapter's own boxes
(`box_prompts="adapter"`); with the default route boxes score the zero-shot columns.
"""


if __name__ == "__main__":
    main()
