"""CBDP against its baselines: iterations and training time to reach full training's validation Dice.

For each run (full training, static random pruning, InfoBatch, CBDP; `pool` / `dataset` say what the
prune ratio is a share of, see `CBDPSampler`) the same PHPG run is trained (frozen encoder, decoder LoRA +
heads) and validated every epoch. Printed per run: total iterations and training seconds, the iterations
and seconds at which validation Dice first reached what full training ends with (minus `--tolerance`),
their ratio to full training, and the final validation Dice per organ.

    # a phantom set of 32 x 32 = 1024 training slices (+ 2 validation cases), box prompts, one round
    python benchmarks/cbdp_pruning.py --cases 34 --val-cases 2 --slices 32 --epochs 8 --output runs/cbdp
    # a prepared dataset with train / validation splits (e.g. the real CT split of real_ct_results.py)
    python benchmarks/cbdp_pruning.py --data runs/real_ct/prepared --epochs 16 --output runs/cbdp_ct
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sam_peft import TrainConfig, train
from sam_peft.data import phantom_cases, prepare_volumes

RUNS = {  # name -> (strategy, budget)
    "none": ("none", "pool"),
    "random": ("random", "dataset"),
    "infobatch": ("infobatch", "dataset"),
    "cbdp": ("cbdp", "dataset"),
    "cbdp-pool": ("cbdp", "pool"),
    "infobatch-pool": ("infobatch", "pool"),
}


def first_reach(history: list[dict], target: float) -> dict | None:
    return next((h for h in history if h["val_dice"] >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/cbdp")
    parser.add_argument("--data", help="a prepared dataset with train and validation splits (default: a phantom)")
    parser.add_argument("--cases", type=int, default=34, help="phantom cases, validation cases included")
    parser.add_argument("--val-cases", type=int, default=2)
    parser.add_argument("--slices", type=int, default=32, help="axial slices per phantom case")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--prune-ratio", type=float, default=0.5)
    parser.add_argument("--runs", default="none,random,infobatch,cbdp,cbdp-pool", help=f"from {list(RUNS)}")
    parser.add_argument("--behaviours", default="tight_box,jitter_box,loose_box",
                        help="PHPG mixture, comma-separated (box prompts decode one mask: cheap on a CPU)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-regions", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--tolerance", type=float, default=0.005, help="Dice below full training still counted")
    parser.add_argument("--model", default="litemedsam")
    args = parser.parse_args()
    names = args.runs.split(",")
    if unknown := set(names) - set(RUNS):
        parser.error(f"--runs: unknown {sorted(unknown)}; choose from {list(RUNS)}")
    if names[0] != "none":
        parser.error("--runs must start with none: full training sets the target")
    output = Path(args.output)
    data = args.data
    if data is None:
        data = str(output / "data")
        prepare_volumes(phantom_cases(args.cases, seed=0, shape=(args.slices, 160, 160)), output=data,
                        overwrite=True, label_map="flare22", val_fraction=args.val_cases / args.cases, seed=0)

    runs = {}
    for name in names:
        strategy, budget = RUNS[name]
        config = TrainConfig.from_dict(dict(
            model=args.model, data=data, epochs=args.epochs, pruning=strategy, prune_budget=budget,
            prune_ratio=args.prune_ratio, behaviours={b: 1.0 for b in args.behaviours.split(",")},
            batch_size=8, rounds=args.rounds, max_regions=args.max_regions, lr=args.lr, log_with=None,
            eval_behaviours=["tight_box", "jitter_box"], output_dir=str(output / name),
            cache_dir=str(output / "cache")))
        runs[name] = train(config, overwrite=True)

    full = runs["none"]
    target = full["history"][-1]["val_dice"] - args.tolerance
    full_reach = first_reach(full["history"], target)
    print(f"\n{data}: {args.epochs} epochs, prune ratio {args.prune_ratio}, behaviours {args.behaviours}, "
          f"{args.rounds} round(s); target = full training's final validation Dice "
          f"{target + args.tolerance:.4f} - {args.tolerance}")
    print("| run | iterations | vs full | train s | final Dice | iterations to target | vs full | s to target |")
    print("|---|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        last, reach = run["history"][-1], first_reach(run["history"], target)
        to_target = (f"{reach['step']} | {reach['step'] / full_reach['step']:.1%} | {reach['train_seconds']:.0f}"
                     if reach else "not reached | - | -")
        print(f"| {name} | {last['step']} | {last['step'] / full['history'][-1]['step']:.1%} | "
              f"{last['train_seconds']:.0f} | {last['val_dice']:.4f} | {to_target} |")
    organs = sorted(full["history"][-1]["val_dice_per_organ"]["tight_box"])
    print("\nFinal validation Dice per organ (mean of tight_box and jitter_box):")
    print("| run | " + " | ".join(organs) + " |")
    print("|---" * (len(organs) + 1) + "|")
    for name, run in runs.items():
        per = run["history"][-1]["val_dice_per_organ"]
        print(f"| {name} | " + " | ".join(
            f"{(per['tight_box'][o] + per['jitter_box'][o]) / 2:.3f}" for o in organs) + " |")
    (output / "results.json").write_text(json.dumps(runs, indent=2, default=float))


if __name__ == "__main__":
    main()
