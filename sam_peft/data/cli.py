"""`sam-peft prepare` and `sam-peft phantom`: argument parsers and runners, wired in by sam_peft/cli.py."""
from __future__ import annotations

import argparse
import collections

from .options import MODALITIES, PHANTOM_LAYOUTS, PLANES, WINDOWS, Window, parse_window


def window_option(text: str) -> Window:
    """`parse_window` as an argparse type: its message, not argparse's bare 'invalid value', names the problem."""
    try:
        return parse_window(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_prepare_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prepare",
        help="medical volumes -> a Hugging Face dataset of 2D slices",
        description="Read NIfTI/DICOM/NPZ/PNG cases (nnU-Net/MSD, Synapse, TotalSegmentator, SAM-Med2D layouts or "
        "explicit --images/--labels), reorient them to the radiological view, window, slice and save a "
        "datasets.DatasetDict split by case.",
    )
    parser.add_argument("--images", required=True, help="dataset folder, image file/folder, or DICOM series folder")
    parser.add_argument("--labels", help="label file or folder matching --images by name")
    parser.add_argument("--label-map",
                        help="which organ each label id is: preset (totalsegmentator for TotalSegmentator CT, "
                        "totalsegmentator_mr for its MR task, flare22, btcv, synapse8), a JSON/YAML {id: name} file, "
                        "or 'dataset' for the names in dataset.json / mask files (default: those names, or "
                        "totalsegmentator for TotalSegmentator's case folders; required when the dataset has none)")
    parser.add_argument("--output", required=True, help="folder to write the dataset to")
    parser.add_argument("--window", default="abdomen", type=window_option,
                        help=f"CT window: {', '.join(WINDOWS)} or LEVEL,WIDTH in HU")
    parser.add_argument("--modality", default="auto", choices=MODALITIES,
                        help="ct: window; mr: 0.5-99.5 percentile normalisation; auto: decide per volume")
    parser.add_argument("--planes", nargs="+", default=["axial"], choices=PLANES,
                        help="slice planes to extract (default: axial)")
    parser.add_argument("--min-pixels", type=int, default=10, help="pixels for an organ to count on a slice")
    parser.add_argument("--empty-fraction", type=float, default=0.0, help="share of organ-free slices to keep")
    parser.add_argument("--spacing", type=float, help="resample slices in-plane to this pixel size (mm)")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="share of cases in the validation split (split by case, never by slice; default: 0)")
    parser.add_argument("--test-fraction", type=float, default=0.0,
                        help="share of cases in the test split (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case split (default: 0)")
    parser.add_argument("--num-proc", type=int, default=1, help="worker processes (one case each)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output dataset")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable or invalid cases and list them in OUTPUT/skipped.json")
    parser.add_argument("--ignore-unknown-labels", action="store_true",
                        help="label ids (or mask names) not in the label map become background")
    return parser


def run_prepare(args: argparse.Namespace) -> None:
    from .prepare import prepare, read_metadata

    dataset = prepare(
        args.images, args.labels, output=args.output, overwrite=args.overwrite, num_proc=args.num_proc,
        label_map=args.label_map, window=args.window, modality=args.modality, planes=args.planes,
        min_pixels=args.min_pixels, empty_fraction=args.empty_fraction, spacing=args.spacing,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
        skip_bad=args.skip_bad, ignore_unknown_labels=args.ignore_unknown_labels,
    )
    metadata = read_metadata(dataset)
    found = collections.Counter()
    for split, part in dataset.items():
        print(f"{split}: {part.num_rows} slices from {len(set(part['case_id']))} cases")
        found.update(organ for organs in part["organs"] for organ in organs)
    organs = [name for name in metadata["organ_names"] if found[name]]  # label-map order
    print(f"{len(organs)} of the {len(metadata['organ_names'])} organs of label map "
          f"{metadata['label_map']['name']!r} found (slices holding each): "
          + ", ".join(f"{name} {found[name]}" for name in organs))
    if list(dataset) == ["train"]:
        print("only a train split: `sam-peft evaluate --split train` and `sam-peft train --val-split train` score "
              "slices a model trained on them has seen (--val-fraction / --test-fraction hold cases out)")
    if metadata["skipped"]:
        print(f"skipped {len(metadata['skipped'])} cases, listed in {args.output}/skipped.json")
    print(f"saved to {args.output}")


def add_phantom_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "phantom",
        help="write synthetic abdominal CT phantoms (NIfTI, FLARE22 labels)",
        description="Write seeded synthetic abdominal CT cases in the nnU-Net/FLARE22 layout (or Synapse's).",
    )
    parser.add_argument("--output", required=True, help="folder to write the cases to; then `sam-peft prepare "
                        "--images OUTPUT --label-map flare22` (btcv for --layout synapse)")
    parser.add_argument("--cases", type=int, default=4, help="number of CT volumes (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same cases "
                        "(default: 0)")
    parser.add_argument("--layout", default="nnunet", choices=PHANTOM_LAYOUTS,
                        help="folder layout: nnunet (FLARE22/MSD: imagesTr/, labelsTr/, FLARE22 label ids) or "
                        "synapse (img/, label/, BTCV label ids) (default: nnunet)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    return parser


def run_phantom(args: argparse.Namespace) -> None:
    from .phantom import write_phantom

    output = write_phantom(args.output, args.cases, args.seed, layout=args.layout, overwrite=args.overwrite)
    print(f"wrote {args.cases} phantom cases to {output}")
