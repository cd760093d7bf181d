"""PHPG training-step throughput in regions/s: single- vs multi-region, refinement rounds, cached embeddings.

    python benchmarks/phpg_throughput.py [--model litemedsam|sam-vit-base-random|PATH] [--images N] [--regions K]
        [--rounds 3] [--repeats R] [--warmup 1] [--device auto] [--dtype bf16|fp32] [--preset encoder+decoder]
        [--threads T] [--compile] [--peak-tflops 790]

A step is forward + backward + AdamW step with LoRA r=8 (`--preset`), on one batch that `PHPGCollator`
builds from phantom slices (every behaviour in the mixture), so all variants see the same regions:

- single: one region per forward (`regions_per_forward=1`, the encoder reruns per region), 1 round;
- multi: all regions of an image in one forward, 1 round; multi + rounds: `--rounds` rounds;
- cached: embeddings precomputed, decoder LoRA only, 1 region per decoder call vs all at once (1 round);
- the collator's CPU time per batch, and `next_clicks` timed alone on the step's own tensors, each as a
  share of the multi + rounds step.

`sam-vit-base-random` is SAM ViT-B (1024 input) with random weights: the throughput of the architecture
without its weights, for machines that cannot download them. `--compile` compiles the image encoder and
the mask decoder in place (`nn.Module.compile`). FLOPs of the multi + rounds step are counted with
`torch.utils.flop_counter` (matmuls, convolutions, attention; forward and backward) and reported as
TFLOP/s and as a share of `--peak-tflops` (MFU; 790 is the bf16 matmul rate measured on an H200/H100).

Medians over `--repeats` after `--warmup` runs (CUDA synchronised). bf16 autocast on CUDA, fp32 on the CPU.
Defaults: 4 images x 8 regions x 5 repeats on CUDA; 2 x 4 x 3 on the CPU (a few minutes on 2 cores). On a
CPU shared with other jobs, `--threads 1` avoids intra-op threads waiting for a busy core (here every op of
`next_clicks` took ~8 ms with 2 threads against ~0.05 ms with 1).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable

import datasets
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm
from transformers import SamConfig, SamModel

from sam_peft.data import phantom_dataset, read_metadata
from sam_peft.models import PRESETS, apply_lora, load_base_model, processor_for
from sam_peft.models.decoding import encode_images
from sam_peft.prompts import PHPGCollator, next_clicks
from sam_peft.training.step import phpg_forward

SLICES_PER_CASE = 8  # a 32-slice phantom case has about 8 slices with 8+ organs: one case per 8 images


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device, desc: str) -> float:
    """Median wall time of `fn` over `repeats` runs after `warmup` untimed ones."""
    times = []
    for i in tqdm(range(warmup + repeats), desc=desc, leave=False):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def phantom_items(images: int) -> tuple[list[str], list[dict]]:
    """Organ names and the `images` phantom slices with the most organs, as a DataLoader yields them."""
    dataset = phantom_dataset(math.ceil(images / SLICES_PER_CASE))
    rows = dataset["train"]
    order = sorted(range(rows.num_rows), key=lambda i: -len(rows[i]["organs"]))
    return read_metadata(dataset)["organ_names"], [dict(rows[i], sample_id=i) for i in order[:images]]


RANDOM_VIT_B = "sam-vit-base-random"


def lora_model(name: str, preset: str, device: torch.device, compile_modules: bool = False):
    base = SamModel(SamConfig()).eval() if name == RANDOM_VIT_B else load_base_model(name)
    model = apply_lora(base, preset, r=8, verbose=False).to(device)
    if compile_modules:
        compile_model(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def compile_model(model) -> None:
    """Compile the encoder and decoder in place (parameter names, and so LoRA and the optimizer, unchanged)."""
    sam = model.get_base_model()
    sam.vision_encoder.compile()
    sam.mask_decoder.compile(dynamic=True)  # region groups change size from call to call


def training_step(model, optimizer, batch, autocast, **step_kwargs) -> Callable[[], None]:
    """One optimiser step of `phpg_forward(model, batch, **step_kwargs)`, as a closure to time."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = phpg_forward(model, batch, **step_kwargs).loss
        loss.backward()
        optimizer.step()

    return step


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="litemedsam", help="litemedsam, a checkpoint, an HF directory or Hub id")
    parser.add_argument("--images", type=int, help="images per batch (default 4 on CUDA, 2 on the CPU)")
    parser.add_argument("--regions", type=int, help="regions per image (default 8 on CUDA, 4 on the CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the multi + rounds step (>= 2)")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (default 5 on CUDA, 3 on the CPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="autocast dtype (default bf16 on CUDA, else fp32)")
    parser.add_argument("--preset", default="encoder+decoder", choices=sorted(PRESETS),
                        help="LoRA targets of the full step")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the image encoder and mask decoder")
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="the device's matmul peak in TFLOP/s, for MFU (default: bf16 measured on an H200)")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    on_cuda = args.device.type == "cuda"
    args.images = args.images or (4 if on_cuda else 2)
    args.regions = args.regions or (8 if on_cuda else 4)
    args.repeats = args.repeats or (5 if on_cuda else 3)
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    for name, low in (("images", 1), ("regions", 1), ("rounds", 2), ("repeats", 1), ("warmup", 0), ("threads", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name} must be >= {low}, got {getattr(args, name)}")
    return args


def main() -> None:
    args = parse_args()
    device, rounds = args.device, args.rounds
    datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    bf16 = args.dtype == "bf16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    model, optimizer = lora_model(args.model, args.preset, device)
    processor = processor_for(model)
    organ_names, items = phantom_items(args.images)
    collator = PHPGCollator(processor, organ_names, max_regions=args.regions, seed=0)
    collate_s = median_seconds(lambda: collator(items), args.repeats, args.warmup, torch.device("cpu"), "collator")
    batch = {key: value.to(device) for key, value in collator(items).items()}
    regions = int(batch["region_valid"].sum())
    generator = torch.Generator(device=device).manual_seed(0)
    full = dict(random_clicks=True, generator=generator)
    with FlopCounterMode(display=False) as counter:  # model FLOPs: eager, no compilation, no recomputation
        training_step(model, optimizer, batch, autocast, rounds=rounds, checkpoint_rounds=False, **full)()
    step_flops = counter.get_total_flops()
    if args.compile:
        compile_model(model)
    timings = {}

    def measure(label: str, step: Callable[[], None]) -> None:
        timings[label] = median_seconds(step, args.repeats, args.warmup, device, label)

    measure("single", training_step(model, optimizer, batch, autocast, rounds=1, regions_per_forward=1, **full))
    measure("multi", training_step(model, optimizer, batch, autocast, rounds=1, **full))
    measure("rounds", training_step(model, optimizer, batch, autocast, rounds=rounds, **full))
    with torch.no_grad(), autocast():
        pred = phpg_forward(model, batch, rounds=1, random_clicks=False).low_res_logits > 0
    targets = batch["targets"]
    click_s = median_seconds(lambda: next_clicks(pred, targets, random=True, generator=generator),
                             args.repeats, args.warmup, device, "next_clicks") * (rounds - 1)

    del model, optimizer
    decoder_model, decoder_optimizer = lora_model(args.model, "decoder", device, args.compile)
    with torch.no_grad(), autocast():
        embeddings = encode_images(decoder_model, batch["pixel_values"])
    cached = dict(rounds=1, image_embeddings=embeddings, **full)
    cached_step = dict(model=decoder_model, optimizer=decoder_optimizer, batch=batch, autocast=autocast, **cached)
    measure("cached single", training_step(regions_per_forward=1, **cached_step))
    measure("cached multi", training_step(**cached_step))

    b, k = batch["region_valid"].shape
    on_cuda = device.type == "cuda"
    card = torch.cuda.get_device_name(device) if on_cuda else f"CPU, intra-op threads: {torch.get_num_threads()}"
    print(f"{args.model} ({processor.image_size} input), {card}, torch {torch.__version__}, {args.dtype}; "
          f"batch {b} images x {k} regions ({regions} valid) from phantom slices; LoRA r=8 {args.preset} "
          f"(cached: decoder){', compiled' if args.compile else ''}; median of {args.repeats} after {args.warmup} warmup")
    rows = [
        ("single: 1 region/forward, 1 round", timings["single"], regions),
        (f"multi: {k} regions/forward, 1 round", timings["multi"], regions),
        (f"multi + {rounds} rounds", timings["rounds"], regions),
        ("cached embeddings, decoder LoRA, 1 region/call", timings["cached single"], regions),
        (f"cached embeddings, decoder LoRA, {k} regions/call", timings["cached multi"], regions),
        ("collator (CPU), per batch", collate_s, None),
        (f"next_clicks x {rounds - 1} (in a multi + {rounds} rounds step)", click_s, None),
    ]
    print("| measurement | ms | regions/s |\n|---|---|---|")
    for label, seconds, count in rows:
        rate = f"{count / seconds:.2f}" if count else ""
        print(f"| {label} | {seconds * 1e3:.1f} | {rate} |")
    print(f"multi / single = {timings['single'] / timings['multi']:.2f}x; "
          f"multi + {rounds} rounds / single = {timings['single'] / timings['rounds']:.2f}x; "
          f"cached multi / single-call = {timings['cached single'] / timings['cached multi']:.2f}x; "
          f"clicks share of a multi + {rounds} rounds step = {100 * click_s / timings['rounds']:.1f}%; "
          f"collator share = {100 * collate_s / timings['rounds']:.1f}% (before DataLoader workers overlap it)")
    achieved = step_flops / timings["rounds"] / 1e12
    print(f"multi + {rounds} rounds step: {step_flops / 1e12:.3f} TFLOP (forward + backward, counted), "
          f"{achieved:.1f} TFLOP/s = {100 * achieved / args.peak_tflops:.1f}% of {args.peak_tflops:.0f} TFLOP/s (MFU); "
          f"peak memory {_peak_memory(device)}")


def _peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (process peak)"


if __name__ == "__main__":
    main()
