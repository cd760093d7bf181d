"""LoRA fine-tuning in a plain `accelerate` loop: the recipe's loader, epoch plan and loss, nothing else.

    python examples/accelerate_loop.py --model litemedsam --max-steps 50 --output runs/accelerate_loop
    accelerate launch --num_processes 2 examples/accelerate_loop.py --output runs/accelerate_loop

(Two processes on CPUs: `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...`.)

Trains on a generated phantom unless `--data` names a dataset made by `sam-peft prepare`, and writes a
sam_peft adapter (`sam_peft.load_adapter(<output>)`). Without `--max-steps` it trains `--epochs` epochs, with
the learning rate decaying over the steps CBDP plans.
"""
import argparse
import itertools

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from sam_peft import apply_lora, load_base_model, load_prepared, phantom_dataset, processor_for, save_adapter
from sam_peft.data import read_metadata
from sam_peft.training import PHPGRecipe
from sam_peft.training.warm_start import score_before_training


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="litemedsam", help="base: litemedsam, a Hub id or a local path")
    parser.add_argument("--data", help="a prepared dataset (default: a 4-case phantom)")
    parser.add_argument("--output", required=True, help="the adapter directory to write")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs epochs)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs; CBDP prunes the first 87.5%% of them")
    parser.add_argument("--batch-size", type=int, default=4, help="slices per process and step")
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args(argv)

    accelerator = Accelerator()
    data = load_prepared(args.data) if args.data else phantom_dataset(4)
    meta = read_metadata(data)
    base = load_base_model(args.model)
    recipe = PHPGRecipe(processor_for(base), meta["organ_names"], data["train"], num_epochs=args.epochs)
    model = apply_lora(base, "decoder", verbose=accelerator.is_main_process)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    total = args.max_steps or recipe.planned_steps(args.batch_size, num_processes=accelerator.num_processes)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=total // 20, num_training_steps=total)
    # the step module goes through DDP; the recipe's loader holds the whole epoch plan and prepare shards it
    step, optimizer, loader = accelerator.prepare(recipe.step_module(model), optimizer,
                                                  recipe.dataloader(args.batch_size))
    if not args.max_steps:  # score every slice once, so that epoch 0 prunes too, as the planned steps assume
        score_before_training(model, recipe.prepare_dataset(), recipe.collator, recipe.sampler, recipe.organ_names,
                              batch_size=args.batch_size, device=accelerator.device,
                              progress=accelerator.is_local_main_process)
    done = 0
    for epoch in itertools.count() if args.max_steps else range(args.epochs):
        recipe.on_epoch(epoch)  # plans the epoch from the losses recorded so far, new prompts
        for batch in loader:
            totals = accelerator.reduce(recipe.count(batch), "sum")  # the step's regions on every process
            loss = recipe.loss(step, batch, totals=totals, step=done) * accelerator.num_processes  # DDP averages
            accelerator.backward(loss)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            done += 1
            if done == args.max_steps:
                break
        last = accelerator.reduce(loss.detach(), "mean")
        accelerator.print(f"epoch {epoch}: {len(loader)} steps, last loss {last:.4f}")
        if done == args.max_steps:
            break
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_adapter(accelerator.unwrap_model(step).model, args.output, organ_names=meta["organ_names"],
                     label_map=meta.get("label_map"), data=args.data or "phantom")


if __name__ == "__main__":
    main()
