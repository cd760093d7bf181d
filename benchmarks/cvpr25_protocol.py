"""The CVPR 2025 interactive 3D protocol on the shared CT: the case, the propagation study, the protocol run.

1. Writes the CT (TotalSegmentator labels) as a challenge case: every labelled abdominal structure
   (ABDOMINAL below) with >= 1000 voxels, boxes as the organisers' get_boxes.py draws them (--no-boxes: a
   clicks-only case; --scan mr: the shared MR, every labelled structure with >= 1000 voxels).
2. Propagation study (--study): for each class, the box step with every propagation variant (what one
   slice passes to the next: its mask's box, + its low-res logits as mask prompt, + a point inside it),
   per-slice Dice against the distance to the box's middle slice, and the per-slice tight-box Dice (each
   slice prompted with its own ground-truth box: what propagation could reach at best with boxes).
3. Protocol (--protocol): `sam-peft evaluate --protocol cvpr25`, each of the six steps a fresh process.

    OMP_NUM_THREADS=1 python benchmarks/cvpr25_protocol.py --output runs/cvpr25 --protocol --study
    OMP_NUM_THREADS=1 python benchmarks/cvpr25_protocol.py --output runs/cvpr25_noboxes --protocol --no-boxes
    OMP_NUM_THREADS=1 python benchmarks/cvpr25_protocol.py --output runs/cvpr25_mr --protocol --scan mr [--no-boxes]

Embeddings are cached under OUTPUT/protocol/cache (shared by the study and the protocol run). The CT is the patient
the bundled adapter was trained on: these numbers are not a generalisation claim.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sam_peft.cvpr25.options import PROPAGATION

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalseg_ct"
# Abdominal organs, their vessels and the lumbar spine (TotalSegmentator names); the chest, pelvis, muscles
# and ribs are left out.
ABDOMINAL = ("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
             "adrenal_gland_right", "adrenal_gland_left", "small_bowel", "duodenum", "colon", "aorta",
             "inferior_vena_cava", "portal_vein_and_splenic_vein", "vertebrae_L1", "vertebrae_L2", "vertebrae_L3",
             "vertebrae_L4", "vertebrae_L5")
# scan -> image, labels, label map, structures kept (None: every labelled one)
SCANS = {"ct": ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz", "totalsegmentator", ABDOMINAL),
         "mr": ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz", "totalsegmentator_mr", None)}
BINS = ((0, 0), (1, 2), (3, 5), (6, 10), (11, 20), (21, 1000))


def write_case(data: Path, output: Path, scan: str = "ct", boxes: bool = True) -> Path:
    from sam_peft.cvpr25 import write_cases

    image, labels, label_map, organs = SCANS[scan]
    [path] = write_cases(data / image, data / labels, output / "cases", label_map, organs, min_voxels=1000,
                         boxes=boxes)
    return path


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def study(case_path: Path, output: Path, adapter: str, variants: tuple[str, ...]) -> dict:
    """Per-slice Dice vs distance from z_mid for each propagation variant, and the tight-box reference."""
    import sam_peft
    from sam_peft.cvpr25 import read_case
    from sam_peft.cvpr25.segmenter import EmbeddingCache, Segmenter, content_key
    from sam_peft.evaluation.predictor import MultiOrganPredictor

    case = read_case(case_path)
    model = sam_peft.load_adapter(adapter)
    predictor = MultiOrganPredictor(model)
    folder = output / "protocol" / "cache" / content_key(case.imgs, f"litemedsam|{adapter}") / "embeddings"
    embeddings = EmbeddingCache(predictor, case.imgs, folder)
    segmenter = Segmenter(predictor, embeddings, case.imgs.shape)
    result = {"classes": case.class_names, "tight_box": {}, "variants": {}}
    for k, (name, box) in enumerate(zip(case.class_names, case.boxes)):
        truth = case.gts == k + 1
        zs = range(box["z_min"], box["z_max"] + 1)
        tight = []
        for z in zs:
            if truth[z].any():
                ys, xs = np.nonzero(truth[z])
                mask = segmenter.segment(z, np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)).mask
                tight.append(_dice(mask, truth[z]))
        result["tight_box"][name] = {"per_slice_mean": float(np.mean(tight))}
        for variant in variants:
            segmenter.propagation = variant
            start = time.perf_counter()
            state = segmenter.box_step(box)
            per_slice = [(abs(z - box["z_mid"]), _dice(state.masks[z], truth[z])) for z in zs if truth[z].any()]
            result["variants"].setdefault(variant, {})[name] = {
                "dsc": _dice(state.masks, truth), "per_slice": per_slice, "seconds": time.perf_counter() - start}
        print(f"{name:<30} tight-box {result['tight_box'][name]['per_slice_mean']:.3f}  " + "  ".join(
            f"{v} {result['variants'][v][name]['dsc']:.3f}" for v in variants), flush=True)
    (output / "propagation_study.json").write_text(json.dumps(result, indent=1))
    report = study_table(result)
    (output / "propagation_study.md").write_text(report)
    print(report)
    return result


def study_table(result: dict) -> str:
    """Markdown: per variant, mean 3D DSC over classes and mean per-slice Dice per distance bin."""
    header = "| propagation | 3D DSC (mean of classes) | " + " | ".join(
        f"dist {lo}-{hi}" if hi < 1000 else f"dist > {lo - 1}" for lo, hi in BINS) + " |"
    lines = [header, "|" + "---|" * (2 + len(BINS))]
    for variant, classes in result["variants"].items():
        pairs = [p for c in classes.values() for p in c["per_slice"]]
        cells = []
        for lo, hi in BINS:
            values = [d for distance, d in pairs if lo <= distance <= hi]
            cells.append(f"{np.mean(values):.3f} ({len(values)})" if values else "-")
        lines.append(f"| {variant} | {np.mean([c['dsc'] for c in classes.values()]):.4f} | " + " | ".join(cells) + " |")
    tight = np.mean([t["per_slice_mean"] for t in result["tight_box"].values()])
    lines.append(f"\nMean per-slice tight-box Dice (each slice prompted with its own ground-truth box): {tight:.4f}")
    return "\n".join(lines) + "\n"


def protocol(output: Path) -> None:
    subprocess.run([sys.executable, "-m", "sam_peft.cli", "evaluate", "--protocol", "cvpr25", "--data", str(output / "cases"),
                    "--output", str(output / "protocol")], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with the shared CT and MR and their labels")
    parser.add_argument("--scan", default="ct", choices=tuple(SCANS), help="which of them (default: ct)")
    parser.add_argument("--no-boxes", dest="boxes", action="store_false", help="a clicks-only case")
    parser.add_argument("--output", type=Path, default=Path("runs/cvpr25"))
    parser.add_argument("--adapter", default="litemedsam-phpg")
    parser.add_argument("--study", action="store_true", help="run the propagation study")
    parser.add_argument("--variants", nargs="+", default=list(PROPAGATION), choices=PROPAGATION,
                        help="propagation variants of the study (default: all)")
    parser.add_argument("--protocol", action="store_true", help="run the six-step protocol")
    args = parser.parse_args()
    if args.study and not args.boxes:
        parser.error("--study propagates boxes: it needs a case with boxes (drop --no-boxes)")
    torch.set_num_threads(1)
    path = write_case(args.data, args.output, args.scan, args.boxes)
    print(f"case written to {path}")
    if args.study:
        study(path, args.output, args.adapter, tuple(args.variants))
    if args.protocol:
        protocol(args.output)


if __name__ == "__main__":
    main()
