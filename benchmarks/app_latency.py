"""Web-app latency on the CPU, measured through the app's own session handlers (no browser, no network).

    python benchmarks/app_latency.py [--threads 1] [--slices 8] [--clicks 8] [--reach 3] [--adapter DIR|--no-adapter]

Opens the example CT as the app's "Open the example CT" button does, then on `--slices` axial slices with
the liver (TotalSegmentator labels of ../shared/data): a slice change (the slice drawn with its overlays:
what the page does when the slider moves), the first prompt on the slice (a box from two corner clicks:
the image encoder runs once, then the decoder), and `--clicks` refining clicks on slices already encoded
(positive clicks inside the liver, each from the previous logits: the decoder only). Prints medians and
the process's peak resident memory (`ru_maxrss`, model included); also times one propagation of
`--reach` slices each way. The model is what `sam-peft app` would load with the same options.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import torch
from scipy import ndimage

from sam_peft.app.cli import add_app_parser, load_app_model
from sam_peft.app.state import EXAMPLE_CT, open_example
from sam_peft.data import read_volume, to_display

LIVER = 5  # TotalSegmentator id


def timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--slices", type=int, default=8, help="liver slices visited")
    parser.add_argument("--clicks", type=int, default=8, help="refining clicks on encoded slices")
    parser.add_argument("--reach", type=int, default=3, help="slices each way of the timed propagation")
    app_options = add_app_parser(argparse.ArgumentParser().add_subparsers())
    args, rest = parser.parse_known_args()
    app_args = app_options.parse_args(rest)
    if args.threads:
        torch.set_num_threads(args.threads)
    seg = EXAMPLE_CT.with_name("example_seg_fast_force_split.nii.gz")
    if not seg.exists():
        raise SystemExit(f"real CT labels not found at {seg}")
    load_seconds, app = timed(lambda: load_app_model(app_args))
    open_seconds, session = timed(lambda: open_example(app))
    reference = to_display(read_volume(seg, "label")).array == LIVER
    area = reference.sum(axis=(1, 2))
    zs = np.flatnonzero(area >= 200)
    zs = zs[np.linspace(0, len(zs) - 1, min(args.slices, len(zs))).round().astype(int)]

    change, first = [], []
    for z in zs:
        change.append(timed(lambda: session.render(app, int(z)))[0])
        ys, xs = np.nonzero(reference[z])
        session.click(app, int(z), int(xs.min()), int(ys.min()), "liver", "box corner")  # no model work
        first.append(timed(lambda: session.click(app, int(z), int(xs.max()), int(ys.max()), "liver", "box corner"))[0])
    rng = np.random.default_rng(0)
    refine = []
    for i in range(args.clicks):
        z = int(zs[i % len(zs)])
        inside = np.argwhere(ndimage.binary_erosion(reference[z], iterations=3))
        y, x = inside[rng.integers(len(inside))]
        refine.append(timed(lambda: session.click(app, z, int(x), int(y), "liver", "positive click"))[0])
        refine[-1] += timed(lambda: session.render(app, z))[0]  # the page shows the new mask
    z = int(zs[len(zs) // 2])
    propagate_seconds, _ = timed(lambda: session.propagate(app, z, reach=args.reach))

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model: {app.note}; torch threads {torch.get_num_threads()}; CT {session.pixels.shape} (D, H, W)")
    print(f"start-up (model load + warm-up) {load_seconds:.2f} s, open the example CT {open_seconds:.2f} s")
    print(f"slice change (draw slice + overlays), median of {len(change)}: {statistics.median(change) * 1000:.0f} ms")
    print(f"first prompt on a slice (encoder + decoder), median of {len(first)}: "
          f"{statistics.median(first) * 1000:.0f} ms")
    print(f"click on an encoded slice (decoder + draw), median of {len(refine)}: "
          f"{statistics.median(refine) * 1000:.0f} ms (max {max(refine) * 1000:.0f} ms)")
    print(f"propagation of {2 * args.reach} slices: {propagate_seconds:.2f} s")
    print(f"peak resident memory {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
