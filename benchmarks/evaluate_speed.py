"""Speed and peak memory of `sam_peft.evaluate` against a bare `MultiOrganPredictor` loop, on the real CT.

    python benchmarks/evaluate_speed.py [--slices 3] [--max-clicks 20] [--repeats 3] [--threads 1] [--device cpu]
                                        [--all-organs]

Prepares the real CT of ../shared/data once (outside the timing), takes the first `--slices` slices that
hold an abdominal organ, and times zero-shot LiteMedSAM on their abdominal organs (`--all-organs`: on
every organ of the label map, up to 40 instances per slice: the case that shows peak memory) in two
settings:

- validation: one tight box per instance, no NoC (what the trainer runs after each epoch);
- full protocol: the five single-prompt behaviours, then the click series up to `--max-clicks` (NoC).

Each setting runs through `evaluate` (prompts, decoding, Dice, 3D Dice, NSD, IoU-head error, NoC) and
through the bare loop a user would write with the predictor: per slice `set_image`, then per behaviour one
`predict` for all of the slice's organs, and for the click series a `predict` per click with the previous
low-res logits, the clicks placed by `next_clicks` (scipy's exact transform on the CPU) and an organ done
once its Dice reaches 0.9, as in `evaluate`. Both do the same decoder work; the loop computes only the
Dice it needs to stop. Reported: median seconds over `--repeats` (the two alternate, and take turns at
running first, so a change in the machine's load hits both), their ratio, and the peak resident memory of the process during each run
(sampled every 10 ms; on CUDA also the peak allocated GPU memory). The mean Dice after the last click of
both is printed as a check that they ran the same protocol.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import datasets
import numpy as np
import psutil
import torch

from sam_peft.data import prepare, read_metadata
from sam_peft.evaluation import EVAL_BEHAVIOURS, MultiOrganPredictor, evaluate
from sam_peft.models import load_base_model
from sam_peft.prompts import make_prompt, next_clicks

REAL_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalseg_ct"
ABDOMEN = ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas"]
SINGLE = ["tight_box", "jitter_box", "loose_box", "center_click", "random_click"]
DONE_DICE, MIN_PIXELS, SEED = 0.9, 100, 0
MB = 2**20


class PeakMemory(threading.Thread):
    """Peak RSS of this process (and peak allocated CUDA memory) between start() and stop()."""

    def __init__(self, device: str):
        super().__init__(daemon=True)
        self.process, self.cuda = psutil.Process(), torch.device(device).type == "cuda"
        self.peak, self._done = 0, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.gpu_peak = torch.cuda.max_memory_allocated() if self.cuda else None


def _spec(points: np.ndarray, labels: np.ndarray) -> dict:
    """SAM tokens from `make_prompt` -> the predictor's {"box"} / {"points", "labels"} prompt."""
    spec, clicks = {}, labels < 2
    if clicks.any():
        spec.update(points=points[clicks].tolist(), labels=labels[clicks].tolist())
    if not clicks.all():
        spec["box"] = points[~clicks].ravel().tolist()
    return spec


def _dice(mask: np.ndarray, target: np.ndarray) -> float:
    return 2 * float((mask & target).sum()) / float(mask.sum() + target.sum())


def bare_loop(model, data, organ_ids: dict[int, str], behaviours: list[str], n_clicks: int) -> float:
    """The protocol as a plain predictor loop; returns the mean Dice after the last click (nan without clicks)."""
    predictor, last = MultiOrganPredictor(model), []
    for row, item in enumerate(data.with_format("numpy")):
        label = np.asarray(item["label"])
        counts = np.bincount(label.ravel())
        organs = [k for k in organ_ids if k < len(counts) and counts[k] >= MIN_PIXELS]
        if not organs:
            continue
        predictor.set_image(np.asarray(item["image"], dtype=np.uint8))
        targets = {organ_ids[k]: label == k for k in organs}

        def prompts(behaviour: str) -> dict:
            index = EVAL_BEHAVIOURS.index(behaviour)
            return {organ_ids[k]: _spec(*make_prompt(behaviour, label == k, np.random.default_rng([SEED, row, k, index])))
                    for k in organs}

        for behaviour in behaviours:
            predictor.predict(prompts(behaviour))
        if not n_clicks:
            continue
        series = prompts("center_click")
        clicked = {name: np.zeros_like(target) for name, target in targets.items()}
        for name, spec in series.items():
            (x, y), = spec["points"]
            clicked[name][int(y), int(x)] = True
        out = predictor.predict(series)
        active = list(series)
        for step in range(1, n_clicks + 1):
            active = [name for name in active if _dice(out[name].mask, targets[name]) < DONE_DICE]
            if step == n_clicks or not active:
                break
            pred = torch.from_numpy(np.stack([out[name].mask for name in active]))[None]
            target = torch.from_numpy(np.stack([targets[name] for name in active]))[None]
            done = torch.from_numpy(np.stack([clicked[name] for name in active]))[None]
            points, labels = next_clicks(pred, target, clicked=done)
            for name, (x, y), click_label in zip(active, points[0].long().tolist(), labels[0].tolist()):
                if click_label >= 0:  # PERFECT: nothing left to click, the prompt stays as it is
                    clicked[name][y, x] = True
                    series[name]["points"].append([x, y])
                    series[name]["labels"].append(click_label)
            out.update(predictor.predict({name: series[name] for name in active},
                                         mask_inputs={name: out[name].low_res_logits for name in active}))
        last += [_dice(out[name].mask, targets[name]) for name in series]
    return float(np.mean(last)) if last else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slices", type=int, default=3, help="the first N slices holding an abdominal organ")
    parser.add_argument("--max-clicks", type=int, default=20, help="NoC's click budget in the full protocol")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--all-organs", action="store_true", help="every organ of the label map, not only the abdomen")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (REAL_CT / "example_ct.nii.gz").exists():
        raise SystemExit(f"real CT not found at {REAL_CT}")
    datasets.disable_progress_bars()
    model = load_base_model("litemedsam").to(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        data = prepare(REAL_CT / "example_ct.nii.gz", REAL_CT / "example_seg_fast_force_split.nii.gz",
                       output=Path(scratch) / "ct", label_map="totalsegmentator", min_pixels=MIN_PIXELS)["train"]
        keep = [i for i, organs in enumerate(data["organs"]) if set(organs) & set(ABDOMEN)][: args.slices]
        data = data.select(keep)
        names = read_metadata(data)["organ_names"]
        organs = names if args.all_organs else [o for o in ABDOMEN if o in names]
        organ_ids = {names.index(o) + 1: o for o in organs}
        settings = [("validation: tight_box, no NoC", ["tight_box"], False),
                    (f"full protocol: 5 prompts + NoC to {args.max_clicks} clicks", SINGLE, True)]
        print(f"zero-shot LiteMedSAM on {len(data)} real CT slices ({args.device}, {torch.get_num_threads()} "
              f"threads), median of {args.repeats}:")
        print("| setting | evaluate s | bare loop s | ratio | evaluate peak RSS MB | loop peak RSS MB | last-click Dice "
              "evaluate / loop |")
        print("|---|---|---|---|---|---|---|")
        for name, behaviours, noc in settings:
            times, peaks, dice = {"evaluate": [], "loop": []}, {"evaluate": [], "loop": []}, {}
            for repeat in range(args.repeats):
                for kind in ("evaluate", "loop")[:: 1 if repeat % 2 == 0 else -1]:  # neither always runs first
                    start = time.perf_counter()
                    with PeakMemory(args.device) as memory:
                        if kind == "evaluate":
                            metrics = evaluate(model, data, behaviours=behaviours, noc=noc, max_clicks=args.max_clicks,
                                               organs=organs, seed=SEED, min_pixels=MIN_PIXELS, progress=False)
                            curve = metrics["dice_vs_clicks"]
                            dice[kind] = curve[-1] if curve else float("nan")
                        else:
                            dice[kind] = bare_loop(model, data, organ_ids, behaviours, args.max_clicks if noc else 0)
                    times[kind].append(time.perf_counter() - start)
                    peaks[kind].append((memory.peak, memory.gpu_peak or 0))
            t_eval, t_loop = statistics.median(times["evaluate"]), statistics.median(times["loop"])
            memory = {kind: _megabytes(values) for kind, values in peaks.items()}
            last = "-" if not noc else f"{dice['evaluate']:.4f} / {dice['loop']:.4f}"  # no clicks, no last click
            print(f"| {name} ({metrics['n_instances']} instances) | {t_eval:.1f} | {t_loop:.1f} | {t_eval / t_loop:.2f} | "
                  f"{memory['evaluate']} | {memory['loop']} | {last} |", flush=True)


def _megabytes(peaks: list[tuple[int, int]]) -> str:
    """The highest peak RSS of the repeats, with the peak GPU memory beside it when there is one."""
    rss, gpu = (max(values) for values in zip(*peaks))
    return f"{rss / MB:.0f}" + (f" (GPU {gpu / MB:.0f})" if gpu else "")


if __name__ == "__main__":
    main()
