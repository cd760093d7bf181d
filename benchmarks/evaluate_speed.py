"""Evaluation speed (slices/s) of `sam_peft.evaluate` on the real CT of ../shared/data, zero-shot LiteMedSAM.

    python benchmarks/evaluate_speed.py [--device cpu] [--batch-size 8] [--slices 16] [--threads 1]

Prepares the CT once (outside the timing), then times two settings on the abdominal organs: the trainer's
validation (tight_box only, no NoC) and the full protocol (every behaviour + NoC up to 20 clicks). The
figure is end to end: reading slices, prompts, encoder, decoder and metrics. `--slices` limits the run to
that many slices holding an abdominal organ (default: all 43). On CPU cores shared with other jobs,
`--threads 1` is often faster than torch's default.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import datasets
import torch

from sam_peft.data import prepare
from sam_peft.evaluation import EVAL_BEHAVIOURS, evaluate
from sam_peft.models import load_base_model

REAL_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalseg_ct"
ABDOMEN = ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--slices", type=int, help="evaluate only the first N slices with an abdominal organ")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (REAL_CT / "example_ct.nii.gz").exists():
        raise SystemExit(f"real CT not found at {REAL_CT}")
    datasets.disable_progress_bars()
    model = load_base_model("litemedsam").to(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        data = prepare(REAL_CT / "example_ct.nii.gz", REAL_CT / "example_seg_fast_force_split.nii.gz",
                       output=Path(scratch) / "ct", label_map="totalsegmentator", min_pixels=100)["train"]
        if args.slices:
            keep = [i for i, organs in enumerate(data["organs"]) if set(organs) & set(ABDOMEN)][: args.slices]
            data = data.select(keep)
        for name, settings in [("validation (tight_box, no NoC)", dict(behaviours=["tight_box"], noc=False)),
                               ("full protocol (7 behaviours + NoC@20)", dict(behaviours=EVAL_BEHAVIOURS, noc=True))]:
            metrics = evaluate(model, data, organs=ABDOMEN, batch_size=args.batch_size, progress=False, **settings)
            print(f"{name}: {metrics['n_slices']} slices, {metrics['n_instances']} instances, "
                  f"{metrics['slices_per_second']:.2f} slices/s on {args.device} ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
