"""Fine-tune on a FLARE22-layout folder, on one or many GPUs.

    # once: the FLARE22 training cases -> a prepared slice dataset
    sam-peft prepare --images /data/FLARE22Train --label-map flare22 --output data/flare22 \
        --val-fraction 0.1 --test-fraction 0.1
    # train (any number of processes/GPUs; same command on a CPU for a smoke test)
    accelerate launch examples/finetune_flare22.py --config examples/flare22.yaml [--setting value ...]
    # evaluate the adapter on the held-out cases
    sam-peft evaluate --model litemedsam --adapter runs/flare22_litemedsam/adapter --data data/flare22 \
        --split test --output runs/flare22_litemedsam/test
"""
import sys

from sam_peft import train
from sam_peft.training.cli import parse_train_args

config, args = parse_train_args(sys.argv[1:], prog="finetune_flare22.py")  # the options of `sam-peft train`
result = train(config, resume=args.resume, overwrite=args.overwrite)
if result:  # the main process
    print(f"best validation Dice {result['best_val_dice']:.4f}; adapter in {config.output_dir}/adapter")
