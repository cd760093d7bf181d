"""Fine-tune on a FLARE22-layout folder, on one or many GPUs.

    # once: the FLARE22 training cases -> a prepared slice dataset
    sam-peft prepare --images /data/FLARE22Train --label-map flare22 --output data/flare22 \
        --val-fraction 0.1 --test-fraction 0.1
    # train (any number of processes/GPUs; same command on a CPU for a smoke test)
    accelerate launch examples/finetune_flare22.py --config examples/flare22.yaml [--key value ...]
    # evaluate the adapter on the held-out cases
    sam-peft evaluate --model litemedsam --adapter runs/flare22_litemedsam/adapter --data data/flare22 \
        --split test --output runs/flare22_litemedsam/test
"""
import argparse

from sam_peft import TrainConfig, train
from sam_peft.training.cli import parse_overrides

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--config", default="examples/flare22.yaml")
parser.add_argument("--resume", action="store_true")
args, extra = parser.parse_known_args()

config = TrainConfig.from_yaml(args.config, parse_overrides(extra))
result = train(config, resume=args.resume)
if result:  # the main process
    print(f"best validation Dice {result['best_val_dice']:.4f}; adapter in {config.output_dir}/adapter")
