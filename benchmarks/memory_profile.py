"""Peak resident memory and wall time of the main jobs, run as a user runs them (a `sam-peft` process).

    python benchmarks/memory_profile.py demo [--timeline]
    python benchmarks/memory_profile.py evaluate [--slices 5] [--timeline]

`demo` runs `sam-peft demo`; `evaluate` prepares the real CT of ../shared/data (outside the measurement)
and runs `sam-peft evaluate` with the full protocol (every behaviour + NoC up to 20 clicks) on the first
`--slices` slices holding an abdominal organ. The command runs in a child process whose resident set size
(RSS, summed over its process tree) is sampled every 50 ms; the figure is the peak of that sum, beside the
kernel's own per-process peak (`ru_maxrss`) as a cross-check. `--timeline` prints the job's output with
the RSS at each line, which shows the stage the memory goes to.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REAL_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalseg_ct"
ABDOMEN = ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas"]
MB = 2**20


class PeakRSS(threading.Thread):
    """Samples the RSS of a process and its descendants until `stop()`; `peak` and `current` in bytes."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.process, self.interval = psutil.Process(pid), interval
        self.peak = self.current = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                self.current = sum(p.memory_info().rss for p in tree if p.is_running())
            except psutil.Error:  # a process of the tree ended between listing and reading it
                pass
            self.peak = max(self.peak, self.current)
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def measure(command: list[str], timeline: bool) -> tuple[float, int, int]:
    """Run `command`; returns wall seconds, peak tree RSS and the largest single-process `ru_maxrss` (bytes)."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sampler = PeakRSS(child.pid)
    sampler.start()
    for line in child.stdout:  # the job's own output (its results), with the RSS at each line on --timeline
        stamp = f"[{time.perf_counter() - started:7.1f} s {sampler.current / MB:7.0f} MB] " if timeline else ""
        if timeline or "\r" not in line:  # progress bars only on --timeline
            print(f"{stamp}{line.rstrip()}", flush=True)
    code = child.wait()
    sampler.stop()
    if code:
        raise SystemExit(f"{' '.join(command)} exited with {code}")
    return time.perf_counter() - started, sampler.peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def evaluate_command(scratch: Path, slices: int) -> list[str]:
    """Prepare the real CT once and return the full-protocol `sam-peft evaluate` on `slices` abdominal slices."""
    from datasets import DatasetDict

    from sam_peft.data import prepare

    if not (REAL_CT / "example_ct.nii.gz").exists():
        raise SystemExit(f"real CT not found at {REAL_CT}")
    data = prepare(REAL_CT / "example_ct.nii.gz", REAL_CT / "example_seg_fast_force_split.nii.gz",
                   output=scratch / "full", label_map="totalsegmentator", min_pixels=100)
    keep = [i for i, organs in enumerate(data["train"]["organs"]) if set(organs) & set(ABDOMEN)][:slices]
    DatasetDict({"train": data["train"].select(keep)}).save_to_disk(str(scratch / "ct"))
    return [sys.executable, "-m", "sam_peft.cli", "evaluate", "--no-adapter", "--data", str(scratch / "ct"),
            "--split", "train", "--organs", *ABDOMEN, "--output", str(scratch / "eval")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=("demo", "evaluate"))
    parser.add_argument("--slices", type=int, default=5, help="evaluate: abdominal CT slices evaluated")
    parser.add_argument("--timeline", action="store_true", help="print the job's output with the RSS at each line")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if args.job == "demo":
            command = [sys.executable, "-m", "sam_peft.cli", "demo", "--output", str(scratch / "demo")]
        else:
            command = evaluate_command(scratch, args.slices)
        seconds, peak, maxrss = measure(command, args.timeline)
    threads = os.environ.get("OMP_NUM_THREADS", "torch default")
    print(f"{args.job}{f' ({args.slices} slices)' if args.job == 'evaluate' else ''}: {seconds:.0f} s, "
          f"peak RSS {peak / MB:.0f} MB (process tree; largest process ru_maxrss {maxrss / MB:.0f} MB), "
          f"{psutil.cpu_count()} CPUs, OMP_NUM_THREADS={threads}")


if __name__ == "__main__":
    main()
