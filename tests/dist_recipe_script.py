"""Counts the samples each process sees per epoch under ``accelerate launch`` (CPU, gloo), two ways:

- the recipe's DataLoader prepared by accelerate (accelerate shards it; the recipe's sampler does not), with
  the PHPG loss of a tiny random SAM scoring every region, so the CBDP sampler really prunes from epoch 1;
- a CBDPSampler left to shard itself by torch.distributed's world size and rank, iterated directly.

Writes ``OUT_DIR/rank<i>.json``; ``tests/test_recipe.py`` launches it with two processes and checks the counts.

Usage: accelerate launch --multi_gpu --num_processes 2 tests/dist_recipe_script.py MODEL_DIR DATA_DIR OUT_DIR
(ACCELERATE_USE_CPU=1)
"""
import json
import os
import sys
from pathlib import Path

import torch
from transformers import SamModel

from sam_peft.data import load_prepared, read_metadata
from sam_peft.models import processor_for
from sam_peft.pruning import CBDPSampler
from sam_peft.training import PHPGRecipe
from sam_peft.training.recipe import organs_per_sample

EPOCHS, BATCH = 3, 3


def main(model_dir: Path, data_dir: Path, out_dir: Path) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator()
    train_set = load_prepared(data_dir)["train"]
    model = SamModel.from_pretrained(model_dir)
    recipe = PHPGRecipe(processor_for(model), read_metadata(train_set)["organ_names"], train_set, rounds=1,
                        pruning="cbdp", prune_ratio=0.5, num_epochs=EPOCHS, anneal=1.0, seed=0)
    step = recipe.step_module(model)
    loader = accelerator.prepare(recipe.dataloader(BATCH))
    direct = CBDPSampler(organs_per_sample(train_set, recipe.min_pixels), num_epochs=EPOCHS, seed=0,
                         strategy="random", prune_ratio=0.5, anneal=1.0)  # shards by torch.distributed
    epochs = []
    for epoch in range(EPOCHS):
        recipe.on_epoch(epoch)
        direct.set_epoch(epoch)
        seen = []
        with torch.no_grad():
            for batch in loader:
                recipe.loss(step, batch)  # scores the regions: the next epoch prunes by them
                seen += batch["sample_ids"].tolist()
        epochs.append({"plan": list(recipe.sampler), "seen": seen, "batches": len(loader),
                       "direct_kept": sorted(i for i in range(direct.num_samples) if direct.weight(i) > 0),
                       "direct_seen": list(direct)})
    result = {"num_processes": accelerator.num_processes, "recipe_replicas": recipe.sampler.num_replicas,
              "direct_replicas": direct.num_replicas, "epochs": epochs}
    path = out_dir / f"rank{accelerator.process_index}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:4]))
