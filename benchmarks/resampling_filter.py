"""Does the resampling filter of LiteMedSAM's preprocessing matter? Box Dice per structure, area vs bilinear.

LiteMedSAM's reference code shrinks a slice to 256 pixels with OpenCV's INTER_AREA; a bilinear resize is
the other common choice. Small structures are where the two could differ. This prepares the shared CT
(TotalSegmentator labels) with its small and mid-size abdominal structures and scores the base's tight and
loose boxes, which is also what the bundled adapter answers box prompts with, under both filters, on every
slice (zero-shot: no slice was trained on). This CT is small (101 x 112 pixels a slice at 3 mm), so
instances from 20 pixels count here, not evaluate's default 100: otherwise the small structures vanish.

    python benchmarks/resampling_filter.py --output runs/resampling
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from sam_peft import evaluate, load_base_model, prepare
from sam_peft.models import LITEMEDSAM_PROCESSOR

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg_ct"
STRUCTURES = {2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 7: "pancreas", 8: "adrenal_gland_right",
              9: "adrenal_gland_left", 52: "aorta", 63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein"}
FILTERS = ("area", "bilinear")
BEHAVIOURS = ("tight_box", "loose_box")
MIN_PIXELS = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/resampling")
    args = parser.parse_args()
    output = Path(args.output)
    data = prepare(SHARED / "example_ct.nii.gz", SHARED / "example_seg_fast_force_split.nii.gz", output=output / "prepared",
                   overwrite=True, label_map=STRUCTURES, ignore_unknown_labels=True, min_pixels=10)
    results = {}
    for name in FILTERS:
        model = load_base_model("litemedsam")
        model.sam_peft_processor = dataclasses.replace(LITEMEDSAM_PROCESSOR, resample=name)
        results[name] = evaluate(model, data, split="train", behaviours=BEHAVIOURS, noc=False,
                                 min_pixels=MIN_PIXELS)
    (output / "results.json").write_text(json.dumps(results, indent=2, default=float))
    organs = sorted(results["area"]["dice"]["tight_box"]["per_organ"])
    counts = results["area"]["instances_per_organ"]
    print(f"\nLiteMedSAM box Dice on the shared CT, every slice ({results['area']['n_instances']} instances)")
    print("| structure | n | " + " | ".join(f"{b} {f}" for b in BEHAVIOURS for f in FILTERS) + " |")
    print("|---" * (2 + len(BEHAVIOURS) * len(FILTERS)) + "|")
    for organ in organs + ["mean"]:
        cells = [results[f]["dice"][b]["per_organ"].get(organ) if organ != "mean" else results[f]["dice"][b]["mean"]
                 for b in BEHAVIOURS for f in FILTERS]
        n = counts.get(organ, "") if organ != "mean" else results["area"]["n_instances"]
        print(f"| {organ} | {n} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
