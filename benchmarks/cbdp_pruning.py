"""CBDP against its baselines: Dice at a fixed iteration budget, and iterations to reach full training's Dice.

For each run and seed the same PHPG run is trained (frozen encoder, decoder LoRA + heads), validated every
`--eval-every` epochs, on the GPU when there is one (accelerate's choice). The runs: `none` (full training),
`infobatch` (InfoBatch: slices whose mean loss is below the global mean are dropped with probability
prune_ratio, the kept ones weigh 1 / (1 - prune_ratio)), `random` (a fresh uniform subset each epoch at CBDP's
iteration budget), `cbdp` (class-balanced, difficulty-weighted keep probabilities at the paper's budget, N -
floor(prune_ratio N) slices per pruned epoch) and `cbdp-pool` (CBDP's probabilities at InfoBatch's budget).
Pruned runs score every slice before epoch 0 (warm start), so epoch 0 prunes too.

Dice is organ-mean: per organ the mean of the validation behaviours' Dice (tight_box and jitter_box), then
the mean over organs. Printed per seed: iterations and training seconds, final organ-mean Dice, the
iterations at which it first reached what full training of that seed ends with (minus `--tolerance`), and
Dice per organ. With several seeds, a summary pairs every run with full training of the same seed and quotes
medians. The tables go to `--tables` (default `<output>/tables.md`), headed by the command and the device;
`--results` gets them as JSON: {"runs": {name: {"seeds": {seed: {"iterations", "organ_mean_dice",
"per_organ_dice"}}}}}.

A finished run whose configuration matches is reused, not retrained: seeds and runs can be split over
processes sharing one `--output` (a call without `none` trains only the pruned runs), and a last call with
all seeds and runs prints the tables. `--time-budget` stops starting new runs once the next one (estimated
as the longest so far) would end past it, and reports the finished ones.

    # the real CT split of real_ct_results.py (40 training slices, 14 validation slices of the same
    # patient), boxes and centre clicks, one round, 5 epochs, 5 seeds (benchmarks/README.md)
    python benchmarks/cbdp_pruning.py --real-ct --epochs 5 --anneal 0.8 --seeds 0,1,2,3,4 --batch-size 4 \\
        --max-regions 1 --behaviours tight_box,jitter_box,center_click --eval-behaviours tight_box,jitter_box \\
        --eval-every 5 --runs none,infobatch,random,cbdp --output runs/cbdp_ct5_v2 \\
        --results benchmarks/results/cbdp_real_ct.json
    # a phantom set of 32 x 32 = 1024 training slices (+ 1 validation case)
    python benchmarks/cbdp_pruning.py --cases 33 --val-cases 1 --slices 32 --epochs 8 --output runs/cbdp
    # --time-budget 0 trains nothing: it prepares the data, or reports the finished runs
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from real_ct_results import SHARED, prepared_split
from sam_peft import TrainConfig, train
from sam_peft.data import phantom_cases, prepare_volumes
from sam_peft.io import atomic_path

RUNS = {  # name -> (strategy, budget)
    "none": ("none", "pool"),
    "infobatch": ("infobatch", "pool"),
    "random": ("random", "dataset"),
    "cbdp": ("cbdp", "dataset"),
    "cbdp-pool": ("cbdp", "pool"),
}
DICE_BEHAVIOURS = ("tight_box", "jitter_box")  # organ Dice: the mean of these
_WHERE = ("output_dir", "cache_dir")  # where a run was written does not change what it computes
REAL_CT_HOLDOUT = 0.25  # real_ct_results.py's default: the top quarter of the organ-bearing slices


def record_dice(record: dict) -> dict[str, float]:
    """Validation Dice per organ of one history record: the mean over DICE_BEHAVIOURS."""
    per = record["val_dice_per_organ"]
    return {o: statistics.fmean(per[b][o] for b in DICE_BEHAVIOURS) for o in per[DICE_BEHAVIOURS[0]]}


def organ_mean(record: dict) -> float:
    return statistics.fmean(record_dice(record).values())


def first_reach(history: list[dict], target: float) -> dict | None:
    return next((h for h in history if organ_mean(h) >= target), None)


def finished_run(config: TrainConfig) -> dict | None:
    """The metrics of a finished run of the same configuration in `output_dir`, if there is one."""
    output = Path(config.output_dir)
    if not ((output / "metrics.json").exists() and (output / "config.yaml").exists()):
        return None
    try:
        saved = TrainConfig.from_dict(yaml.safe_load((output / "config.yaml").read_text())).to_dict()
    except ValueError:  # written by another version: retrain
        return None
    if any(saved.get(k) != v for k, v in config.to_dict().items() if k not in _WHERE):
        return None
    return json.loads((output / "metrics.json").read_text())


def organ_dice(run: dict) -> dict[str, float]:
    """Final validation Dice per organ."""
    return record_dice(run["history"][-1])


def organ_table(title: str, organs: list[str], rows: dict[str, dict[str, float]], fmt: str) -> list[str]:
    lines = ["", title, "", "| run | " + " | ".join(organs) + " |", "|---" * (len(organs) + 1) + "|"]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(format(values[o], fmt) for o in organs) + " |")
    return lines


def seed_tables(runs: dict[str, dict], tolerance: float) -> list[str]:
    full = runs["none"]
    target = organ_mean(full["history"][-1]) - tolerance
    full_reach = first_reach(full["history"], target)
    lines = [f"target = full training's final organ-mean Dice {target + tolerance:.4f} - {tolerance}", "",
             "| run | iterations | vs full | train s | final Dice | iterations to target | vs full | s to target |",
             "|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        last, reach = run["history"][-1], first_reach(run["history"], target)
        to_target = (f"{reach['step']} | {reach['step'] / full_reach['step']:.1%} | {reach['train_seconds']:.0f}"
                     if reach else "not reached | - | -")
        lines.append(f"| {name} | {last['step']} | {last['step'] / full['history'][-1]['step']:.1%} | "
                     f"{last['train_seconds']:.0f} | {organ_mean(last):.4f} | {to_target} |")
    return lines + organ_table("Final validation Dice per organ (mean of tight_box and jitter_box):",
                               sorted(organ_dice(full)), {name: organ_dice(run) for name, run in runs.items()}, ".3f")


def summary_tables(by_seed: dict[int, dict[str, dict]], tolerance: float) -> list[str]:
    """Each run against full training of the same seed; medians over seeds."""
    names = list(next(iter(by_seed.values())))
    lines = ["", f"Summary over seeds {sorted(by_seed)}: medians of per-seed values, each run paired with full "
             "training of its seed", "",
             "| run | iterations vs full | final organ-mean Dice | Dice - full | seeds reaching target "
             "| iterations to target vs full |",
             "|---|---|---|---|---|---|"]
    for name in names:
        ratios, finals, deltas, reach_ratios = [], [], [], []
        for runs in by_seed.values():
            full, run = runs["none"]["history"], runs[name]["history"]
            ratios.append(run[-1]["step"] / full[-1]["step"])
            finals.append(organ_mean(run[-1]))
            deltas.append(organ_mean(run[-1]) - organ_mean(full[-1]))
            target = organ_mean(full[-1]) - tolerance
            reach = first_reach(run, target)
            if reach:
                reach_ratios.append(reach["step"] / first_reach(full, target)["step"])
        to_target = f"{statistics.median(reach_ratios):.1%}" if reach_ratios else "-"
        lines.append(f"| {name} | {statistics.median(ratios):.1%} | {statistics.median(finals):.4f} | "
                     f"{statistics.median(deltas):+.4f} | {len(reach_ratios)}/{len(by_seed)} | {to_target} |")
    organs = sorted(organ_dice(next(iter(by_seed.values()))["none"]))
    deltas = {name: {o: statistics.median(organ_dice(runs[name])[o] - organ_dice(runs["none"])[o]
                                          for runs in by_seed.values()) for o in organs} for name in names[1:]}
    return lines + organ_table("Final Dice per organ minus full training's, median over seeds:", organs, deltas,
                               "+.3f")


def results_json(by_seed: dict[int, dict[str, dict]], names: list[str], command: str, setting: str) -> dict:
    """Per run and seed: optimizer steps, final organ-mean Dice, Dice per organ (and per validated behaviour)."""
    runs: dict[str, dict] = {name: {"seeds": {}} for name in names}
    for seed, seed_runs in by_seed.items():
        for name, run in seed_runs.items():
            last = run["history"][-1]
            per_behaviour = {b: statistics.fmean(d.values()) for b, d in last["val_dice_per_organ"].items()}
            runs[name]["seeds"][str(seed)] = {
                "iterations": last["step"], "organ_mean_dice": organ_mean(last), "per_organ_dice": record_dice(last),
                "organ_mean_dice_per_behaviour": per_behaviour, "train_seconds": last["train_seconds"]}
    return {"command": command, "setting": setting, "organ_dice": f"mean of {' and '.join(DICE_BEHAVIOURS)} per "
            "organ, then the mean over organs (validation slices of the training patient)", "runs": runs}


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    return f"cpu ({torch.get_num_threads()} threads)"


def prepare_phantom(output: Path, cases: int, val_cases: int, slices: int) -> str:
    """The seeded phantom under `output/data`, made once for processes sharing one `--output`."""
    data = output / "data"
    phantom = {"cases": cases, "val_cases": val_cases, "slices": slices}
    made = output / "phantom.json"
    if not made.exists() or json.loads(made.read_text()) != phantom:
        prepare_volumes(phantom_cases(cases, seed=0, shape=(slices, 160, 160)), output=data, overwrite=True,
                        label_map="flare22", val_fraction=val_cases / cases, seed=0)
        made.write_text(json.dumps(phantom))
    return str(data)


def prepare_real_ct(output: Path, source: Path) -> str:
    """real_ct_results.py's split of the real CT in `source`, under `output/real_ct`, made once."""
    missing = [f for f in ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz") if not (source / f).is_file()]
    if missing:
        raise SystemExit(f"--real-ct: {source} lacks {', '.join(missing)} (the TotalSegmentator example CT); "
                         "pass the folder that holds them")
    made = output / "real_ct.json"
    if not made.exists() or json.loads(made.read_text()) != {"holdout": REAL_CT_HOLDOUT}:
        prepared_split(output / "real_ct", REAL_CT_HOLDOUT, source)
        made.write_text(json.dumps({"holdout": REAL_CT_HOLDOUT}))
    return str(output / "real_ct" / "prepared")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/cbdp")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="a prepared dataset with train and validation splits (default: a phantom)")
    source.add_argument("--real-ct", nargs="?", const=str(SHARED), type=Path, metavar="DIR",
                        help=f"prepare real_ct_results.py's split of the real CT in DIR (default {SHARED})")
    parser.add_argument("--cases", type=int, default=34, help="phantom cases, validation cases included")
    parser.add_argument("--val-cases", type=int, default=2)
    parser.add_argument("--slices", type=int, default=32, help="axial slices per phantom case")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--prune-ratio", type=float, default=0.5)
    parser.add_argument("--anneal", type=float, default=0.875, help="fraction of the epochs that prune")
    parser.add_argument("--runs", default="none,infobatch,random,cbdp", help=f"from {list(RUNS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (LoRA init, prompts, order)")
    parser.add_argument("--behaviours", default="tight_box,jitter_box,center_click",
                        help="PHPG mixture, comma-separated, or 'all' (every behaviour, equal weights; box "
                             "prompts decode one mask, a centre click three: cheap on a CPU)")
    parser.add_argument("--eval-behaviours", default="tight_box,jitter_box,center_click",
                        help="validated behaviours (must include tight_box and jitter_box, the organ Dice)")
    parser.add_argument("--eval-every", type=int, default=1, help="validate every this many epochs (and after "
                        "the last): iterations to target are only seen at validations")
    parser.add_argument("--prune-ema", type=float, default=0.5, help="cbdp's score EMA (TrainConfig.prune_ema)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-regions", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--tolerance", type=float, default=0.005, help="Dice below full training still counted")
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="start no run that would end (at the longest run's duration) past this many seconds")
    parser.add_argument("--tables", type=Path, help="where to write the tables (default <output>/tables.md)")
    parser.add_argument("--results", type=Path, help="where to write the results as JSON (default <output>/cbdp.json)")
    args = parser.parse_args()
    names = sorted(args.runs.split(","), key=lambda name: name != "none")  # full training first: it sets the target
    if unknown := set(names) - set(RUNS):
        parser.error(f"--runs: unknown {sorted(unknown)}; choose from {list(RUNS)}")
    try:
        seeds = sorted({int(s) for s in args.seeds.split(",")})
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    behaviours = None if args.behaviours == "all" else {b: 1.0 for b in args.behaviours.split(",")}
    eval_behaviours = args.eval_behaviours.split(",")
    if not set(DICE_BEHAVIOURS) <= set(eval_behaviours):
        parser.error(f"--eval-behaviours must include {', '.join(DICE_BEHAVIOURS)}")
    started = time.monotonic()
    output = Path(args.output)
    if args.real_ct is not None:
        data = prepare_real_ct(output, args.real_ct)
    else:
        data = args.data or prepare_phantom(output, args.cases, args.val_cases, args.slices)

    by_seed: dict[int, dict[str, dict]] = {}
    longest, skipped = 0.0, []
    for seed in seeds:
        for name in names:
            strategy, budget = RUNS[name]
            config = TrainConfig.from_dict(dict(
                model=args.model, data=data, epochs=args.epochs, pruning=strategy, prune_budget=budget,
                prune_ratio=args.prune_ratio, anneal=args.anneal, prune_ema=args.prune_ema, behaviours=behaviours,
                batch_size=args.batch_size,
                rounds=args.rounds, max_regions=args.max_regions, lr=args.lr, seed=seed, log_with=None,
                mixed_precision=args.mixed_precision, eval_behaviours=eval_behaviours, eval_every=args.eval_every,
                output_dir=str(output / f"seed{seed}" / name), cache_dir=str(output / "cache")))
            run = finished_run(config)
            if run is not None:
                print(f"reusing the finished run in {config.output_dir}")
            elif args.time_budget is not None and time.monotonic() - started + longest > args.time_budget:
                skipped.append(f"seed {seed} {name}")
                continue
            else:
                run_started = time.monotonic()
                run = train(config, overwrite=True)
                longest = max(longest, time.monotonic() - run_started)
            by_seed.setdefault(seed, {})[name] = run

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    lines = [f"`{command}`", "",
             f"{data}: {args.epochs} epochs, prune ratio {args.prune_ratio}, anneal {args.anneal}, behaviours "
             f"{args.behaviours}, validated on {args.eval_behaviours}, "
             f"{args.rounds} round(s), up to {args.max_regions} regions per slice, batch {args.batch_size}, "
             f"{device_name()}, {time.monotonic() - started:.0f} s in all"]
    if skipped:
        lines.append(f"not run (--time-budget {args.time_budget:g} s): {', '.join(skipped)}")
    for seed, runs in by_seed.items():
        if "none" in runs:  # full training sets the target
            table = seed_tables(runs, args.tolerance)
            only = f"(only {', '.join(runs)}) " if len(runs) < len(names) else ""
            lines += ["", f"seed {seed}: {only}{table[0]}", *table[1:]]
        else:  # a process that trains some runs while another trains full training
            lines += ["", f"seed {seed}: finished {', '.join(runs)}; no full training (`none`) to compare with: "
                      "a call whose --runs include none prints the tables"]
    complete = {seed: runs for seed, runs in by_seed.items() if len(runs) == len(names)}
    if len(complete) > 1 and "none" in names:
        lines += summary_tables(complete, args.tolerance)
    print("\n".join(lines))
    with atomic_path(args.tables or output / "tables.md") as path:
        path.write_text("\n".join(lines) + "\n")
    with atomic_path(output / "results.json") as path:
        path.write_text(json.dumps({str(seed): runs for seed, runs in by_seed.items()}, indent=2, default=float))
    with atomic_path(args.results or output / "cbdp.json") as path:
        path.write_text(json.dumps(results_json(by_seed, names, command, lines[2]), indent=2) + "\n")


if __name__ == "__main__":
    main()
