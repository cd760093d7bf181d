"""`sam-peft evaluate` and `sam-peft predict`: argument parsers and runners, wired in by sam_peft/cli.py."""
from __future__ import annotations

import argparse
import typing

from ..cvpr25.cli import add_protocol_arguments, run_protocol
from ..data.cli import window_option
from ..data.options import WINDOWS
from ..io import reading
from ..models.options import DEFAULT_ADAPTER, DEFAULT_MODEL
from .options import EVAL_BEHAVIOURS, EVAL_MIN_PIXELS

if typing.TYPE_CHECKING:
    import torch


def bounded(kind: type, low: float | None = None, high: float | None = None):
    """An argparse type: a `kind` (int or float) in [low, high] (None: unbounded), refused by name before any work."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not (low is None or value >= low) or not (high is None or value <= high) or value != value:  # NaN
            where = f"in [{low:g}, {high:g}]" if low is not None and high is not None else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"must be {where}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


class _CudaWhenAvailable(str):
    """The type of --device's default: `parse_device` reads it as cuda when torch sees a GPU, else cpu. Resolved
    when the options are parsed, so that building the parser (and --help) imports no torch."""


DEFAULT_DEVICE = _CudaWhenAvailable("cuda when available")


def parse_device(name: str) -> torch.device:
    """A torch device this machine can use; anything else is an argparse error naming --device."""
    import torch

    if isinstance(name, _CudaWhenAvailable):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{name!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    problem = _device_problem(device)
    if problem:
        raise argparse.ArgumentTypeError(f"{name}: {problem}")
    return device


def _device_problem(device: torch.device) -> str | None:
    import torch

    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            return "this machine has no CUDA GPU that torch can use; use --device cpu"
        if (device.index or 0) >= count:
            return f"this machine has {count} CUDA GPU(s), cuda:0 .. cuda:{count - 1}"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return "this machine has no Apple GPU (MPS) that torch can use; use --device cpu"
    elif device.type == "meta":
        return "this device holds no data and cannot run a model; use cpu, cuda or mps"
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as error:  # torch asserts on backends it was not built with
            return f"torch cannot use this device here ({error})"
    return None


def add_model_arguments(parser: argparse.ArgumentParser, bundled_default: bool = True) -> None:
    """--model, --adapter and --device; `bundled_default` (every command: predict, evaluate and the app agree):
    without --adapter the base's bundled adapter is used (the click-capable default), and --no-adapter gives
    the plain base."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="base model: litemedsam, a Hub id, a local HF directory or a .pth checkpoint")
    adapter = parser.add_mutually_exclusive_group()
    default = f" (default with {DEFAULT_MODEL}: the bundled {DEFAULT_ADAPTER})" if bundled_default else ""
    adapter.add_argument("--adapter", help="LoRA adapter: a bundled name, a directory or a Hub id (trained on "
                         f"--model){default}")
    if bundled_default:
        adapter.add_argument("--no-adapter", action="store_true", help="the plain base model, no adapter")
    parser.add_argument("--box-prompts", choices=("adapter", "base"), default=None,
                        help="what answers a prompt that is only a box: the adapter, or the base with the adapter "
                        "off (default: the adapter's own choice; the bundled adapter answers boxes with the base)")
    parser.add_argument("--device", default=DEFAULT_DEVICE, type=parse_device,
                        help="torch device to run on: cpu, cuda, cuda:1, mps (default: cuda when available)")


def chosen_adapter(args: argparse.Namespace) -> str | None:
    """--adapter, else (without --no-adapter) the base's bundled adapter when installed, else None."""
    if args.adapter is None and not getattr(args, "no_adapter", True):
        from ..models import default_adapter_for

        return default_adapter_for(args.model)
    return args.adapter


def describe_model(args: argparse.Namespace) -> str:
    """The model a command runs, in words: printed before it is loaded, so a wrong default shows at once."""
    adapter = chosen_adapter(args)
    if adapter is None:
        return f"{args.model} (no adapter)"
    route = f", box prompts answered by the {args.box_prompts}" if args.box_prompts else ""
    return f"{args.model} + adapter {adapter}{route}" + (" (the bundled default; --no-adapter for the plain base)"
                                                         if args.adapter is None else "")


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str | None]:
    """The base with `chosen_adapter`, on --device; returns the model and the adapter used. The adapter's
    name is kept on the model (`sam_peft_adapter`) so that `evaluate` records which adapter it scored."""
    from ..models import load_adapter, load_base_model

    with reading(f"--model {args.model}"):
        model = load_base_model(args.model)
    adapter = chosen_adapter(args)
    if adapter:
        with reading(f"--adapter {adapter}"):
            model = load_adapter(adapter, base=model, box_prompts=args.box_prompts)
        model.sam_peft_adapter = adapter
    return model.to(args.device), adapter


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate", help="Dice / NSD / NoC with simulated users on a prepared dataset",
        description="Prompt every organ instance as simulated users would (boxes, clicks, corrective click "
        "series) and write metrics.json, metrics.md and plots to --output.",
    )
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="prepared dataset folder (from `sam-peft prepare`)")
    parser.add_argument("--split", default="test", help="dataset split to evaluate (default: test)")
    parser.add_argument("--output", required=True, help="folder for metrics.json, metrics.md and the plots")
    parser.add_argument("--behaviours", nargs="+", default=list(EVAL_BEHAVIOURS), choices=EVAL_BEHAVIOURS,
                        metavar="BEHAVIOUR", help=f"simulated users to score, from {', '.join(EVAL_BEHAVIOURS)} "
                        "(clicks_3 / clicks_5: series of error-guided clicks) (default: all)")
    parser.add_argument("--organs", nargs="+", metavar="ORGAN",
                        help="evaluate only these organs, named as in the dataset's label map, e.g. liver spleen "
                        "(default: all)")
    parser.add_argument("--no-noc", dest="noc", action="store_false", help="skip NoC@85/90 (the slow part)")
    parser.add_argument("--max-clicks", type=bounded(int, 1), default=20,
                        help="corrective clicks at most per instance for NoC; an instance not reaching the Dice "
                        "target counts as this many (default: 20)")
    parser.add_argument("--min-pixels", type=bounded(int, 1), default=EVAL_MIN_PIXELS,
                        help=f"smallest organ instance evaluated, in pixels (default: {EVAL_MIN_PIXELS})")
    parser.add_argument("--batch-size", type=bounded(int, 1), default=8, help="slices per forward (default: 8)")
    parser.add_argument("--seed", type=bounded(int, 0), default=0,
                        help="seed of the randomised prompts (jittered boxes, random clicks) (default: 0)")
    add_protocol_arguments(parser)
    return parser


def run_evaluate(args: argparse.Namespace) -> None:
    if args.protocol == "cvpr25":
        return run_protocol(args)
    from ..data.prepare import check_writable, load_prepared
    from .evaluate import evaluate

    check_writable(args.output, "--output")
    data = load_prepared(args.data)  # before the model: a wrong path fails fast
    if args.split not in data:
        raise ValueError(f"--split {args.split}: {args.data} has only the split(s) {list(data)}; `sam-peft prepare` "
                         "splits by case, so a dataset of one case has only 'train' (--split train scores the slices a "
                         "model trained on it has seen)")
    print(f"model: {describe_model(args)}")
    metrics = evaluate(
        load_model(args)[0], data, split=args.split, behaviours=args.behaviours, noc=args.noc,
        max_clicks=args.max_clicks, seed=args.seed, batch_size=args.batch_size, min_pixels=args.min_pixels,
        organs=args.organs, output_dir=args.output,
    )
    print(f"{metrics['n_instances']} instances in {metrics['n_slices']} slices "
          f"({metrics['slices_per_second']:.2f} slices/s)")
    for behaviour, dice in metrics["dice"].items():
        print(f"  {behaviour:<14} Dice {dice['mean']:.4f}")
    if metrics["noc"]:
        print(f"  NoC@85 {metrics['noc']['85']:.2f}  NoC@90 {metrics['noc']['90']:.2f}")
    print(f"metrics written to {args.output}")


def add_predict_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict", help="segment a NIfTI / DICOM volume from prompts into a label NIfTI",
        description="Prompts JSON, per organ: {\"slices\": {\"<z>\": {\"box\": [x0, y0, x1, y1]} or {\"points\": "
        "[[x, y], ...], \"labels\": [1, 0, ...]}}} and/or {\"box3d\": [x0, y0, z0, x1, y1, z1]}, in the display "
        "frame of prepared slices (z: axial slice from inferior, x: column from patient right, y: row from "
        "anterior). A prompted slice's mask propagates to the neighbouring slices until the organ ends.",
    )
    add_model_arguments(parser)
    parser.add_argument("--input", required=True, help="NIfTI file or DICOM series folder")
    parser.add_argument("--prompts", required=True, help="prompts JSON file")
    parser.add_argument("--output", required=True, help="label volume to write (.nii.gz); the label map goes "
                        "beside it as .json")
    parser.add_argument("--label-map", help="output ids: preset (e.g. totalsegmentator, flare22) or JSON/YAML "
                        "{id: name} file (default: the adapter's training label map, else totalsegmentator)")
    parser.add_argument("--window", default="abdomen", type=window_option,
                        help=f"CT window of the training data: {', '.join(WINDOWS)} or LEVEL,WIDTH in HU")
    parser.add_argument("--modality", default="auto", choices=("auto", "ct", "mr"),
                        help="ct: apply --window; mr: 0.5-99.5 percentile normalisation; auto: decide from the "
                        "intensities (default: auto)")
    parser.add_argument("--no-propagate", dest="propagate", action="store_false",
                        help="segment only the prompted slices")
    parser.add_argument("--min-score", type=bounded(float, 0.0, 1.0), default=0.75,
                        help="a propagated mask the IoU head rates below this, and more than 0.1 below its "
                        "organ's median rating, ends the organ (so does a mask that vanishes, fades below 10%% "
                        "of the organ's largest or overlaps the previous slice's by under 50%%)")
    return parser


def run_predict(args: argparse.Namespace) -> None:
    from .volume import predict_volume

    print(f"model: {describe_model(args)}")
    info = predict_volume(lambda: load_model(args)[0], args.input, args.prompts, args.label_map, args.output,
                          window=args.window, modality=args.modality, propagate=args.propagate,
                          min_score=args.min_score)
    for organ, voxels in info["voxels"].items():
        print(f"  {organ:<24} {voxels} voxels")
    print(f"labels written to {args.output} (label map beside it, .json)")
