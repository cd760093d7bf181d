"""Trains nothing, but drives a CBDPSampler the way a trainer would, under ``accelerate launch``.

Each process scores its share of the samples before epoch 0 (a warm start, rows rank::world_size), then
only the samples of its own shard, checkpoints and resumes mid-run, and writes the
per-epoch order, kept set and summary it saw to ``OUT_DIR/rank<i>.json``. ``tests/test_cbdp.py`` launches
it with two CPU processes and replays `run` in one process to compare.

Usage: accelerate launch --multi_gpu --num_processes 2 tests/dist_cbdp_script.py OUT_DIR (ACCELERATE_USE_CPU=1)
"""
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sam_peft.pruning import CBDPSampler

ORGANS = ("aorta", "kidney", "liver", "pancreas")
NUM_SAMPLES, NUM_EPOCHS, BATCH = 41, 4, 4
RESUME_EPOCH = 2  # the launched run checkpoints and resumes halfway through this epoch


def sample_organs() -> list[list[str]]:
    rng = np.random.default_rng(7)
    return [[o for o in ORGANS if rng.random() < 0.6] or ["liver"] for _ in range(NUM_SAMPLES)]


def loss(sample_id: int, organ: str, epoch: int) -> float:
    """A fixed pseudo-random loss per (sample, organ, epoch); pancreas is the hard organ."""
    noise = np.random.default_rng([epoch + 1, sample_id, ORGANS.index(organ)]).random()
    return float(noise) + (organ == "pancreas")


def behaviour(sample_id: int, organ: str) -> str:
    return ("tight_box", "center_click")[(sample_id + len(organ)) % 2]


def score(sampler: CBDPSampler, ids: list[int], organs: list[list[str]], epoch: int) -> None:
    regions = [(i, o) for i in ids for o in organs[i]]
    sampler.update([i for i, _ in regions], [o for _, o in regions], [loss(i, o, epoch) for i, o in regions],
                   behaviours=[behaviour(i, o) for i, o in regions])


def run(make_sampler: Callable[[], CBDPSampler], resume_epoch: int | None = None, rank: int = 0,
        world: int = 1) -> list[dict]:
    """A warm start over rows rank::world, then every epoch: set_epoch, record the plan, score each batch of
    this process's shard."""
    organs = sample_organs()
    sampler = make_sampler()
    score(sampler, list(range(rank, NUM_SAMPLES, world)), organs, -1)
    records = []
    for epoch in range(NUM_EPOCHS):
        sampler.set_epoch(epoch)
        order = list(sampler)
        kept = [i for i in range(NUM_SAMPLES) if sampler.weight(i) > 0]
        records.append({"order": order, "kept": kept, "summary": sampler.epoch_summary()})
        for start in range(0, len(order), BATCH):
            if epoch == resume_epoch and start == len(order) // 2 // BATCH * BATCH:
                state = sampler.state_dict()
                sampler = make_sampler()
                sampler.load_state_dict(state)
            score(sampler, order[start:start + BATCH], organs, epoch)
    return records


def make_sampler(**kwargs) -> CBDPSampler:
    return CBDPSampler(sample_organs(), NUM_EPOCHS, anneal=0.75, seed=3, budget="dataset", **kwargs)


def main(out_dir: Path) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator()
    records = run(make_sampler, resume_epoch=RESUME_EPOCH, rank=accelerator.process_index,
                  world=accelerator.num_processes)
    result = {"num_processes": accelerator.num_processes, "num_replicas": make_sampler().num_replicas,
              "records": records}
    path = out_dir / f"rank{accelerator.process_index}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group; gloo may abort at exit otherwise


if __name__ == "__main__":
    main(Path(sys.argv[1]))
