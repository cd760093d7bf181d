"""Preparation throughput (slices/s): the real CT of ../shared/data and a 20-case phantom in the FLARE22 layout.

    python benchmarks/prepare_throughput.py [--repeats 3] [--num-proc 1] [--cases 20]

Times `sam_peft.data.prepare` end to end (read, reorient, window, slice, write Arrow, save) and prints the
median over the repeats. The phantom NIfTI files are written once, outside the timing.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import datasets

from sam_peft.data import prepare, write_phantom

REAL_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalseg_ct"


def throughput(repeats: int, work: Path, name: str, *args, **kwargs) -> None:
    rates = []
    for i in range(repeats):
        start = time.perf_counter()
        dataset = prepare(*args, output=work / f"{name}-{i}", **kwargs)
        seconds = time.perf_counter() - start
        slices = sum(part.num_rows for part in dataset.values())
        rates.append(slices / seconds)
    print(f"{name}: {slices} slices, median {statistics.median(rates):.0f} slices/s "
          f"(min {min(rates):.0f}, max {max(rates):.0f}, {repeats} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--cases", type=int, default=20)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        if (REAL_CT / "example_ct.nii.gz").exists():
            throughput(args.repeats, work, "real CT 122x101x112 (axial, min_pixels 1)",
                       REAL_CT / "example_ct.nii.gz", REAL_CT / "example_seg_fast_force_split.nii.gz",
                       label_map="totalsegmentator", min_pixels=1, num_proc=args.num_proc)
        else:
            print(f"real CT not found at {REAL_CT}; skipped")
        write_phantom(work / "phantom", args.cases, seed=0)
        throughput(args.repeats, work, f"phantom {args.cases} cases 32x160x160 (axial)", work / "phantom",
                   label_map="flare22", num_proc=args.num_proc)


if __name__ == "__main__":
    main()
