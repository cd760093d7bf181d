"""What `import sam_peft` costs a host project, against `import transformers, peft` (what any peft user pays):
the median wall time and the median peak resident memory of N fresh interpreters each, and their ratio;
also `sam-peft --help` and the first use of `sam_peft.load_adapter` (which imports torch, transformers, peft).

    python benchmarks/import_time.py --runs 7
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# each snippet prints its wall time (s) and the interpreter's peak RSS (ru_maxrss, KiB on Linux) as JSON
PROBE = """
import json, resource, sys, time
start = time.perf_counter()
{code}
seconds = time.perf_counter() - start
print(json.dumps([seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))
"""
CASES = {
    "import sam_peft": "import sam_peft",
    "import transformers, peft": "import transformers, peft\nfrom transformers import SamModel\nfrom peft import PeftModel",
    "sam-peft --help": "from sam_peft.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "sam_peft.load_adapter (first use)": "import sam_peft\nsam_peft.load_adapter",
}


def measure(code: str, runs: int) -> tuple[float, float]:
    """Median seconds and median peak RSS (MiB) of `code` over `runs` fresh interpreters."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    samples = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", PROBE.format(code=code)], env=env, capture_output=True,
                              text=True, check=True)
        samples.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return statistics.median(s for s, _ in samples), statistics.median(m for _, m in samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh interpreters per case (default 7)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    results = {name: measure(code, args.runs) for name, code in CASES.items()}
    print(f"median of {args.runs} fresh interpreters (python {sys.version.split()[0]})")
    print(f"{'case':<36}{'seconds':>10}{'peak RSS MiB':>15}")
    for name, (seconds, mib) in results.items():
        print(f"{name:<36}{seconds:>10.3f}{mib:>15.0f}")
    (light_s, light_m), (hf_s, hf_m) = results["import sam_peft"], results["import transformers, peft"]
    print(f"import sam_peft / import transformers, peft: time {light_s / hf_s:.3f}x, peak RSS {light_m / hf_m:.3f}x")


if __name__ == "__main__":
    main()
