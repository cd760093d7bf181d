"""CBDP against its baselines: iterations and training time to reach full training's validation Dice.

For each run (full training, static random pruning, InfoBatch, CBDP; `pool` / `dataset` say what the
prune ratio is a share of, see `CBDPSampler`) and each seed, the same PHPG run is trained (frozen encoder,
decoder LoRA + heads) and validated every epoch. Printed per seed: total iterations and training seconds,
the iterations and seconds at which validation Dice first reached what full training of that seed ends with
(minus `--tolerance`), their ratio to full training, and the final validation Dice per organ. With several
seeds, a summary pairs every run with full training of the same seed and quotes medians.

A finished run whose configuration matches is reused, not retrained: seeds can be split over processes
sharing one `--output`, and a last call with all seeds prints the summary.

    # a phantom set of 32 x 32 = 1024 training slices (+ 2 validation cases), box prompts, one round
    python benchmarks/cbdp_pruning.py --cases 34 --val-cases 2 --slices 32 --epochs 8 --output runs/cbdp
    # a prepared dataset with train / validation splits (e.g. the real CT split of real_ct_results.py)
    python benchmarks/cbdp_pruning.py --data runs/real_ct/prepared --epochs 16 --seeds 0,1,2 --output runs/cbdp_ct
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

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
_WHERE = ("output_dir", "cache_dir")  # where a run was written does not change what it computes


def first_reach(history: list[dict], target: float) -> dict | None:
    return next((h for h in history if h["val_dice"] >= target), None)


def run_or_reuse(config: TrainConfig) -> dict:
    """Train, unless `output_dir` already holds a finished run of the same configuration."""
    output = Path(config.output_dir)
    if (output / "metrics.json").exists() and (output / "config.yaml").exists():
        try:
            saved = TrainConfig.from_dict(yaml.safe_load((output / "config.yaml").read_text())).to_dict()
        except ValueError:  # written by another version: retrain
            saved = {}
        if all(saved.get(k) == v for k, v in config.to_dict().items() if k not in _WHERE):
            print(f"reusing the finished run in {output}")
            return json.loads((output / "metrics.json").read_text())
    return train(config, overwrite=True)


def organ_dice(run: dict) -> dict[str, float]:
    """Final validation Dice per organ: the mean of tight_box and jitter_box."""
    per = run["history"][-1]["val_dice_per_organ"]
    return {o: (per["tight_box"][o] + per["jitter_box"][o]) / 2 for o in per["tight_box"]}


def print_organ_table(title: str, organs: list[str], rows: dict[str, dict[str, float]], fmt: str) -> None:
    print(f"\n{title}")
    print("| run | " + " | ".join(organs) + " |")
    print("|---" * (len(organs) + 1) + "|")
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(format(values[o], fmt) for o in organs) + " |")


def report_seed(runs: dict[str, dict], tolerance: float) -> None:
    full = runs["none"]
    target = full["history"][-1]["val_dice"] - tolerance
    full_reach = first_reach(full["history"], target)
    print(f"target = full training's final validation Dice {target + tolerance:.4f} - {tolerance}")
    print("| run | iterations | vs full | train s | final Dice | iterations to target | vs full | s to target |")
    print("|---|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        last, reach = run["history"][-1], first_reach(run["history"], target)
        to_target = (f"{reach['step']} | {reach['step'] / full_reach['step']:.1%} | {reach['train_seconds']:.0f}"
                     if reach else "not reached | - | -")
        print(f"| {name} | {last['step']} | {last['step'] / full['history'][-1]['step']:.1%} | "
              f"{last['train_seconds']:.0f} | {last['val_dice']:.4f} | {to_target} |")
    print_organ_table("Final validation Dice per organ (mean of tight_box and jitter_box):", sorted(organ_dice(full)),
                      {name: organ_dice(run) for name, run in runs.items()}, ".3f")


def report_seeds(by_seed: dict[int, dict[str, dict]], tolerance: float) -> None:
    """Each run against full training of the same seed; medians over seeds."""
    names = list(next(iter(by_seed.values())))
    print(f"\nSummary over seeds {sorted(by_seed)}: medians of per-seed values, each run paired with full "
          "training of its seed")
    print("| run | iterations vs full | final Dice | Dice - full | seeds reaching target "
          "| iterations to target vs full |")
    print("|---|---|---|---|---|---|")
    for name in names:
        ratios, finals, deltas, reach_ratios = [], [], [], []
        for runs in by_seed.values():
            full, run = runs["none"]["history"], runs[name]["history"]
            ratios.append(run[-1]["step"] / full[-1]["step"])
            finals.append(run[-1]["val_dice"])
            deltas.append(run[-1]["val_dice"] - full[-1]["val_dice"])
            target = full[-1]["val_dice"] - tolerance
            reach = first_reach(run, target)
            if reach:
                reach_ratios.append(reach["step"] / first_reach(full, target)["step"])
        to_target = f"{statistics.median(reach_ratios):.1%}" if reach_ratios else "-"
        print(f"| {name} | {statistics.median(ratios):.1%} | {statistics.median(finals):.4f} | "
              f"{statistics.median(deltas):+.4f} | {len(reach_ratios)}/{len(by_seed)} | {to_target} |")
    organs = sorted(organ_dice(next(iter(by_seed.values()))["none"]))
    deltas = {name: {o: statistics.median(organ_dice(runs[name])[o] - organ_dice(runs["none"])[o]
                                          for runs in by_seed.values()) for o in organs} for name in names[1:]}
    print_organ_table("Final Dice per organ minus full training's, median over seeds:", organs, deltas, "+.3f")


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
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (LoRA init, prompts, order)")
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
    try:
        seeds = sorted({int(s) for s in args.seeds.split(",")})
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    output = Path(args.output)
    data = args.data
    if data is None:
        data = str(output / "data")
        phantom = {"cases": args.cases, "val_cases": args.val_cases, "slices": args.slices}
        made = output / "phantom.json"  # processes sharing one --output share one phantom
        if not made.exists() or json.loads(made.read_text()) != phantom:
            prepare_volumes(phantom_cases(args.cases, seed=0, shape=(args.slices, 160, 160)), output=data,
                            overwrite=True, label_map="flare22", val_fraction=args.val_cases / args.cases, seed=0)
            made.write_text(json.dumps(phantom))

    by_seed: dict[int, dict[str, dict]] = {}
    for seed in seeds:
        for name in names:
            strategy, budget = RUNS[name]
            config = TrainConfig.from_dict(dict(
                model=args.model, data=data, epochs=args.epochs, pruning=strategy, prune_budget=budget,
                prune_ratio=args.prune_ratio, behaviours={b: 1.0 for b in args.behaviours.split(",")},
                batch_size=8, rounds=args.rounds, max_regions=args.max_regions, lr=args.lr, seed=seed,
                log_with=None, eval_behaviours=["tight_box", "jitter_box"],
                output_dir=str(output / f"seed{seed}" / name), cache_dir=str(output / "cache")))
            by_seed.setdefault(seed, {})[name] = run_or_reuse(config)

    print(f"\n{data}: {args.epochs} epochs, prune ratio {args.prune_ratio}, behaviours {args.behaviours}, "
          f"{args.rounds} round(s)")
    for seed, runs in by_seed.items():
        print(f"\nseed {seed}: ", end="")
        report_seed(runs, args.tolerance)
    if len(seeds) > 1:
        report_seeds(by_seed, args.tolerance)
    (output / "results.json").write_text(json.dumps(
        {str(seed): runs for seed, runs in by_seed.items()}, indent=2, default=float))


if __name__ == "__main__":
    main()
