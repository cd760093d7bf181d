"""Command line of the CVPR 2025 interactive 3D protocol: the participant's predict step (`challenge`), the
writer of challenge cases (`challenge-cases`) and the protocol options of `evaluate`."""
from __future__ import annotations

import argparse
import shlex
import sys

from .options import DEFAULT_PROPAGATION, PROPAGATION_CHOICES


def add_challenge_arguments(parser: argparse.ArgumentParser) -> None:
    from ..evaluation.cli import add_model_arguments

    add_model_arguments(parser, bundled_default=True)
    parser.add_argument("--inputs", required=True, help="folder of challenge .npz cases (imgs, spacing, boxes, clicks)")
    parser.add_argument("--outputs", required=True, help="folder for <case>.npz with 'segs'")
    parser.add_argument("--cache", help="folder for slice embeddings and per-class masks kept between steps "
                        "(default: OUTPUTS/.sam_peft_cache; '' disables it)")
    parser.add_argument("--propagation", default=DEFAULT_PROPAGATION, choices=PROPAGATION_CHOICES,
                        help="what a slice passes to the next: the box of its mask, plus its low-res logits as "
                        "mask prompt and/or a point inside it; auto: box+mask+point with an adapter, the box "
                        f"alone for a plain base (default: {DEFAULT_PROPAGATION})")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")


def add_challenge_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "challenge", help="one step of the CVPR 2025 interactive 3D challenge (the predict.sh contract)",
        description="Segment every INPUTS/*.npz (3D boxes and/or the clicks so far) into OUTPUTS/<case>.npz "
        "('segs', value k+1 for class k). Run once per interaction step; embeddings and masks are cached "
        "between runs.",
    )
    add_challenge_arguments(parser)
    return parser


def run_challenge(args: argparse.Namespace) -> None:
    import torch

    from ..evaluation.cli import load_model
    from .challenge import run_challenge as segment

    if args.threads:
        torch.set_num_threads(args.threads)
    model, adapter = load_model(args)
    segment(args.inputs, args.outputs, model, f"{args.model}|{adapter}", args.cache, args.propagation)


def add_challenge_cases_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "challenge-cases", help="write labelled volumes as CVPR 2025 challenge cases (imgs, gts, spacing, boxes)",
        description="Any layout `prepare` reads -> OUTPUT/<case>.npz: the volume in display orientation, "
        "windowed as `prepare` does, classes numbered 1..K, boxes as the organisers' get_boxes.py draws them.",
    )
    parser.add_argument("--images", required=True, help="dataset folder, or an image volume / folder")
    parser.add_argument("--labels", help="label volume / folder paired with --images")
    parser.add_argument("--output", required=True, help="folder for the .npz cases")
    parser.add_argument("--label-map", default="totalsegmentator", help="preset or {id: name} JSON/YAML file")
    parser.add_argument("--organs", nargs="+", metavar="ORGAN", help="classes to keep (default: all)")
    parser.add_argument("--min-voxels", type=int, default=1000, help="smallest class kept (default: 1000)")
    parser.add_argument("--window", default="abdomen", help="CT window, preset or LEVEL,WIDTH (default: abdomen)")
    parser.add_argument("--no-boxes", dest="boxes", action="store_false", help="clicks-only cases")
    return parser


def run_challenge_cases(args: argparse.Namespace) -> None:
    from .format import write_cases

    for path in write_cases(args.images, args.labels, args.output, args.label_map, args.organs, args.min_voxels,
                            args.window, boxes=args.boxes):
        print(f"wrote {path}")


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """`sam-peft evaluate --protocol cvpr25`: --data is then a folder of challenge .npz cases with 'gts'."""
    group = parser.add_argument_group("CVPR 2025 interactive 3D protocol (--protocol cvpr25)")
    group.add_argument("--protocol", default="simulated", choices=("simulated", "cvpr25"),
                       help="simulated: the slice-level simulated users on a prepared dataset; cvpr25: the "
                       "challenge's box + 5 clicks on .npz cases in --data, each step a fresh process "
                       "(without --adapter the base's bundled adapter is scored) (default: simulated)")
    group.add_argument("--gts", help="cvpr25: folder of ground-truth .npz files when the cases hold no 'gts'")
    group.add_argument("--command", help="cvpr25: the participant's program, run once per step with {inputs} and "
                       "{outputs} filled in, e.g. 'docker run ... -v {inputs}:/workspace/inputs ...' (default: "
                       "sam-peft challenge with --model / --adapter)")
    group.add_argument("--propagation", default=DEFAULT_PROPAGATION, choices=PROPAGATION_CHOICES,
                       help="cvpr25, default command: see `sam-peft challenge --help`")


def _default_command(args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "sam_peft.cli", "challenge", "--inputs", "{inputs}", "--outputs",
               "{outputs}", "--cache", f"{args.output}/cache", "--model", args.model, "--device", str(args.device),
               "--propagation", args.propagation]
    if getattr(args, "adapter", None):
        command += ["--adapter", args.adapter]
    if getattr(args, "no_adapter", False):
        command.append("--no-adapter")
    if getattr(args, "box_prompts", None):
        command += ["--box-prompts", args.box_prompts]
    return command


def run_protocol(args: argparse.Namespace) -> None:
    from .protocol import command_runner, evaluate_protocol

    command = shlex.split(args.command) if args.command else _default_command(args)
    result = evaluate_protocol(args.data, command_runner(command), args.output, gts=args.gts)
    summary = result["summary"]
    print("DSC per step " + " ".join(f"{v:.4f}" for v in summary["dsc_per_step"]))
    print("NSD per step " + " ".join(f"{v:.4f}" for v in summary["nsd_per_step"]))
    print(f"DSC_AUC {summary['dsc_auc']:.4f}  NSD_AUC {summary['nsd_auc']:.4f}  DSC_Final {summary['dsc_final']:.4f}  "
          f"NSD_Final {summary['nsd_final']:.4f}  {summary['seconds_per_class']:.1f} s per class "
          f"({'within' if summary['within_budget'] else 'OVER'} the 90 s budget)")
    print(f"metrics written to {args.output}")
