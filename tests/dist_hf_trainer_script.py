"""Two SGD steps of PHPGTrainer on a tiny random SAM, written as a sam_peft adapter to OUT_DIR.

``tests/test_hf_trainer.py`` runs it on one process with batch 4 and under ``accelerate launch`` on two
processes with batch 2: the Trainer shards the recipe's one epoch plan and DDP sums the step's gradient, so
both take the same steps.

Usage: [ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2] tests/dist_hf_trainer_script.py
MODEL_DIR DATA_DIR OUT_DIR BATCH
"""
import sys

import torch
from transformers import TrainingArguments

from sam_peft.data import load_prepared, read_metadata
from sam_peft.models import apply_lora, load_base_model, processor_for
from sam_peft.training import PHPGRecipe
from sam_peft.training.hf_trainer import PHPGTrainer


def main(model_dir: str, data_dir: str, out_dir: str, batch: int) -> None:
    data = load_prepared(data_dir)
    base = load_base_model(model_dir)
    # one round (no random refinement clicks) and all organs: the regions per slice differ
    recipe = PHPGRecipe(processor_for(base), read_metadata(data)["organ_names"], data["train"], rounds=1)
    torch.manual_seed(0)
    model = apply_lora(base, "decoder", verbose=False)
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=2, optim="sgd",
                             learning_rate=0.5, max_grad_norm=0.0, lr_scheduler_type="constant",
                             save_strategy="no", disable_tqdm=True)
    trainer = PHPGTrainer(model, args, recipe)
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main(*sys.argv[1:4], int(sys.argv[4]))
