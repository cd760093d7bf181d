"""Peak memory of one PHPG training step against the number of refinement rounds, with and without
`checkpoint_rounds` (each round's decoder pass recomputed in backward instead of kept).

    python benchmarks/round_memory.py [--model litemedsam] [--images N] [--regions K] [--rounds 1,2,3,4]
        [--preset encoder+decoder] [--device auto] [--threads T]

Every configuration runs in a fresh subprocess (so one's peak does not hide another's) on the same
collated phantom batch as `phpg_throughput.py`. Peak memory of the step: on CUDA
`torch.cuda.max_memory_allocated` minus what was allocated before it; on the CPU the process's peak
resident set (ru_maxrss) minus its resident set just before the step. Also prints the step's wall time
(one step after one warm-up step).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phpg_throughput import lora_model, phantom_items, training_step  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure_one(args: argparse.Namespace) -> dict:
    """One configuration in this process: a warm-up step, then the measured step."""
    from sam_peft.models import processor_for
    from sam_peft.prompts import PHPGCollator

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, optimizer = lora_model(args.model, args.preset, device)
    organ_names, items = phantom_items(args.images)
    batch = {k: v.to(device) for k, v in PHPGCollator(processor_for(model), organ_names, max_regions=args.regions,
                                                      seed=0)(items).items()}
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else contextlib.nullcontext)
    step = training_step(model, optimizer, batch, autocast, rounds=args.one_rounds,
                         checkpoint_rounds=args.one_checkpoint, generator=torch.Generator(device).manual_seed(0))
    step()  # warm-up: optimizer state and allocator caches exist before the measured step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _rss_bytes()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"seconds": time.perf_counter() - start, "peak_mib": peak / 2**20,
            "regions": int(batch["region_valid"].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--regions", type=int, default=4)
    parser.add_argument("--rounds", default="1,2,3,4", help="comma-separated round counts")
    parser.add_argument("--preset", default="encoder+decoder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--one-rounds", type=int, help=argparse.SUPPRESS)  # internal: run one configuration
    parser.add_argument("--one-checkpoint", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one_rounds is not None:
        print(json.dumps(measure_one(args)))
        return
    rows = []
    for rounds in [int(r) for r in args.rounds.split(",")]:
        for recompute in (0, 1):
            command = [sys.executable, __file__, "--model", args.model, "--images", str(args.images), "--regions",
                       str(args.regions), "--preset", args.preset, "--device", args.device,
                       "--one-rounds", str(rounds), "--one-checkpoint", str(recompute)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append((rounds, recompute, json.loads(out)))
            print(f"rounds {rounds} checkpoint_rounds={bool(recompute)}: {rows[-1][2]}", file=sys.stderr)
    print(f"{args.model}, {args.device}, {args.images} images x {args.regions} regions, LoRA {args.preset}, "
          f"torch {torch.__version__}")
    print("| rounds | checkpoint_rounds | step peak MiB | step s |\n|---|---|---|---|")
    for rounds, recompute, r in rows:
        print(f"| {rounds} | {'yes' if recompute else 'no'} | {r['peak_mib']:.0f} | {r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
