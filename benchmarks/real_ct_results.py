"""First real-data results: zero-shot vs tight-box LoRA vs PHPG LoRA on the real CT in ../shared/data.

The CT (TotalSegmentator example, model-made labels) is prepared with the abdominal organs only; a
contiguous block of axial slices (the upper end of the abdomen, `--holdout` of the organ-bearing slices)
is held out for evaluation and the rest trains. Every recipe is evaluated with the full simulated-user
protocol. Frozen-encoder mode (decoder LoRA + heads on cached embeddings) so it runs on a CPU.

    python benchmarks/real_ct_results.py --epochs 15 --output runs/real_ct15
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from datasets import DatasetDict

from sam_peft import TrainConfig, evaluate, load_adapter, load_base_model, prepare, train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg_ct"
ABDOMEN = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
           7: "pancreas", 52: "aorta", 63: "inferior_vena_cava"}
RECIPES = {
    "tight-box LoRA": dict(behaviours={"tight_box": 1.0}, rounds=1),
    "PHPG LoRA": dict(behaviours=None, rounds=2),
}


def prepared_split(output: Path, holdout: float, source: Path = SHARED) -> Path:
    """Prepare the CT in `source` (abdominal organs), then hold out the top `holdout` of its slices as
    `validation`."""
    data = prepare(source / "example_ct.nii.gz", source / "example_seg_fast_force_split.nii.gz",
                   output=output / "prepared_all", overwrite=True, label_map=ABDOMEN,
                   ignore_unknown_labels=True, min_pixels=10)
    slices = data["train"]
    cut = sorted(slices["slice_index"])[int(len(slices) * (1 - holdout))]
    split = DatasetDict(train=slices.filter(lambda s: s < cut, input_columns="slice_index"),
                        validation=slices.filter(lambda s: s >= cut, input_columns="slice_index"))
    split.save_to_disk(str(output / "prepared"))
    print(f"train: {split['train'].num_rows} slices (index < {cut}); held out: {split['validation'].num_rows}")
    return output / "prepared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/real_ct")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--holdout", type=float, default=0.25)
    parser.add_argument("--max-regions", type=int, default=4)
    parser.add_argument("--noc", action="store_true", help="also NoC@85/90 (20 clicks per instance: slow on CPU)")
    args = parser.parse_args()
    output = Path(args.output)
    data = prepared_split(output, args.holdout)

    behaviours = ("tight_box", "jitter_box", "loose_box", "center_click", "random_click", "clicks_3", "clicks_5")
    results, started = {}, time.perf_counter()
    results["zero-shot"] = evaluate(load_base_model("litemedsam"), str(data), split="validation",
                                    behaviours=behaviours, noc=args.noc, output_dir=output / "zero-shot")
    for name, recipe in RECIPES.items():
        run = output / name.split()[0]
        config = TrainConfig.from_dict(dict(data=str(data), epochs=args.epochs, eval_every=args.epochs,
                                            batch_size=8, max_regions=args.max_regions, lr=1e-3, log_with=None,
                                            eval_behaviours=["tight_box"], output_dir=str(run),
                                            cache_dir=str(output / "cache"), **recipe))
        train(config, overwrite=True)
        results[name] = evaluate(load_adapter(run / "adapter"), str(data), split="validation",
                                 behaviours=behaviours, noc=args.noc, output_dir=run / "eval")

    print(f"\nHeld-out Dice ({results['zero-shot']['n_instances']} organ instances), "
          f"{time.perf_counter() - started:.0f} s")
    print("| recipe | " + " | ".join(behaviours) + " | spread |" + (" NoC@85 | NoC@90 |" if args.noc else ""))
    print("|---" * (len(behaviours) + 2 + 2 * args.noc) + "|")
    for name, m in results.items():
        noc = f" {m['noc']['85']:.2f} | {m['noc']['90']:.2f} |" if args.noc else ""
        print(f"| {name} | " + " | ".join(f"{m['dice'][b]['mean']:.3f}" for b in behaviours)
              + f" | {m['spread']:.3f} |" + noc)
    (output / "results.json").write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
