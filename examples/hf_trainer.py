"""LoRA fine-tuning with `transformers.Trainer`: PHPG batches, CBDP pruning, a sam_peft adapter at the end.

    python examples/hf_trainer.py --model litemedsam --max-steps 50 --output runs/hf_trainer
    accelerate launch --num_processes 2 examples/hf_trainer.py --data data/flare22 --output runs/hf_trainer
    sam-peft evaluate --model litemedsam --adapter runs/hf_trainer --data data/flare22 --output runs/hf_eval

(Two processes on CPUs: `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...`.)

Trains on a generated phantom unless `--data` names a dataset made by `sam-peft prepare`. Without
`--max-steps` it trains `--epochs` epochs, with the learning rate decaying over the steps CBDP plans.
"""
import argparse

from transformers import TrainingArguments

from sam_peft import apply_lora, load_base_model, load_prepared, phantom_dataset, processor_for
from sam_peft.data import read_metadata
from sam_peft.training import PHPGRecipe
from sam_peft.training.hf_trainer import PHPGTrainer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="litemedsam", help="base: litemedsam, a Hub id or a local path")
    parser.add_argument("--data", help="a prepared dataset (default: a 4-case phantom)")
    parser.add_argument("--output", required=True, help="where the adapter (and Trainer checkpoints) go")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (default: --epochs epochs)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs; CBDP prunes the first 87.5%% of them")
    parser.add_argument("--batch-size", type=int, default=4, help="slices per device and step")
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args(argv)

    data = load_prepared(args.data) if args.data else phantom_dataset(4)
    meta = read_metadata(data)
    base = load_base_model(args.model)
    recipe = PHPGRecipe(processor_for(base), meta["organ_names"], data["train"], num_epochs=args.epochs)
    training_args = TrainingArguments(
        output_dir=args.output, max_steps=args.max_steps, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=0.05, logging_steps=10, save_strategy="no",
    )
    # the warm start (one scoring pass over every slice before epoch 0) pays off over whole epochs, not in a
    # short --max-steps run
    trainer = PHPGTrainer(apply_lora(base, "decoder"), training_args, recipe, warm_start=args.max_steps < 0,
                          adapter_info={"label_map": meta.get("label_map"), "data": args.data or "phantom"})
    trainer.train()
    trainer.save_model()  # a sam_peft adapter: sam_peft.load_adapter(args.output)


if __name__ == "__main__":
    main()
