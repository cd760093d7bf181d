"""CBDP against its baselines: iterations and training time to reach full training's validation Dice.

For each strategy (none = full training, random, infobatch, cbdp) the same PHPG run is trained on a
phantom set (frozen encoder, decoder LoRA + heads), validated every epoch. Printed per strategy: total
iterations and training seconds, the iterations / seconds at which validation Dice first reached what full
training ends with (minus `--tolerance`), the ratio to full training, and the final Dice per organ.

    python benchmarks/cbdp_pruning.py --cases 6 --slices 16 --epochs 8 --output runs/cbdp
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sam_peft import TrainConfig, train
from sam_peft.data import phantom_cases, prepare_volumes
from sam_peft.pruning import STRATEGIES


def first_reach(history: list[dict], target: float) -> dict | None:
    return next((h for h in history if h["val_dice"] >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/cbdp")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--slices", type=int, default=16, help="axial slices per phantom case")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--prune-ratio", type=float, default=0.5)
    parser.add_argument("--tolerance", type=float, default=0.005, help="Dice below full training still counted")
    parser.add_argument("--model", default="litemedsam")
    args = parser.parse_args()
    output = Path(args.output)
    data = output / "data"
    prepare_volumes(phantom_cases(args.cases, seed=0, shape=(args.slices, 160, 160)), output=data, overwrite=True,
                    label_map="flare22", val_fraction=1 / args.cases, seed=0)

    runs = {}
    for strategy in STRATEGIES:
        config = TrainConfig.from_dict(dict(
            model=args.model, data=str(data), epochs=args.epochs, pruning=strategy, prune_ratio=args.prune_ratio,
            batch_size=8, rounds=2, max_regions=3, lr=1e-3, log_with=None, eval_behaviours=["tight_box", "center_click"],
            output_dir=str(output / strategy), cache_dir=str(output / "cache")))
        runs[strategy] = train(config, overwrite=True)

    full = runs["none"]
    target = full["history"][-1]["val_dice"] - args.tolerance
    print(f"\n{args.cases} phantom cases x {args.slices} slices, {args.epochs} epochs, prune ratio {args.prune_ratio};"
          f" target = full training's final validation Dice {target + args.tolerance:.4f} - {args.tolerance}")
    print("| strategy | iterations | train s | final Dice | iterations to target | ratio | seconds to target |")
    print("|---|---|---|---|---|---|---|")
    for strategy, run in runs.items():
        last, reach = run["history"][-1], first_reach(run["history"], target)
        to_target = f"{reach['step']} | {reach['step'] / first_reach(full['history'], target)['step']:.2%} | " \
                    f"{reach['train_seconds']:.0f}" if reach else "not reached | - | -"
        print(f"| {strategy} | {last['step']} | {last['train_seconds']:.0f} | {last['val_dice']:.4f} | {to_target} |")
    organs = sorted(full["history"][-1]["val_dice_per_organ"]["tight_box"])
    print("\nFinal validation Dice per organ (mean of tight_box and center_click):")
    print("| strategy | " + " | ".join(organs) + " |")
    print("|---" * (len(organs) + 1) + "|")
    for strategy, run in runs.items():
        per = run["history"][-1]["val_dice_per_organ"]
        print(f"| {strategy} | " + " | ".join(
            f"{(per['tight_box'][o] + per['center_click'][o]) / 2:.3f}" for o in organs) + " |")
    (output / "results.json").write_text(json.dumps(runs, indent=2, default=float))


if __name__ == "__main__":
    main()
