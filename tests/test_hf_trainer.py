"""PHPGTrainer: transformers.Trainer on a PHPGRecipe (loss normalisation, pruned epochs, schedule, saving)."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from accelerate.state import AcceleratorState
from sam_peft.data import load_prepared, read_metadata
from sam_peft.models import apply_lora, load_adapter, load_base_model, processor_for
from sam_peft.training import PHPGRecipe
from sam_peft.training.hf_trainer import PHPGTrainer
from test_train import setup  # noqa: F401 - the tiny SAM and prepared phantom fixture

pytestmark = pytest.mark.usefixtures("fresh_state")


@pytest.fixture
def fresh_state():
    """The Trainer's accelerator keeps its settings process-wide: each test starts and leaves with none."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _trainer(setup, out, recipe_kw=None, **args_kw) -> PHPGTrainer:  # noqa: F811 - setup is the fixture's value
    data = load_prepared(setup / "data")
    base = load_base_model(setup / "tiny_sam")
    recipe = PHPGRecipe(processor_for(base), read_metadata(data)["organ_names"], data["train"],
                        **{"rounds": 1, "max_regions": 2, **(recipe_kw or {})})
    torch.manual_seed(0)  # the same LoRA initialisation in every run
    model = apply_lora(base, "decoder", verbose=False)
    args = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-3, save_strategy="no",
                disable_tqdm=True, num_train_epochs=1, use_cpu=True)
    return PHPGTrainer(model, TrainingArguments(**{**args, **args_kw}), recipe)


def _lora(trainer: PHPGTrainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.peft_model.named_parameters() if "lora_" in n}


def test_accumulated_micro_batches_take_the_one_batch_step(setup, tmp_path):  # noqa: F811
    """One step of 2 accumulated micro-batches of 2 equals one step of a batch of 4 (SGD: the update is the
    gradient), though the micro-batches hold different numbers of regions: the loss is divided by the regions
    of the whole step, not averaged over micro-batch means."""
    sgd = dict(max_steps=1, optim="sgd", learning_rate=0.5, max_grad_norm=0.0)
    one = _trainer(setup, tmp_path / "one", {"max_regions": None}, **sgd)
    first = list(one.recipe.sampler)[:4]
    regions = [one.recipe.count(one.recipe.collator([one.train_dataset[i] for i in pair]))[0].item()
               for pair in (first[:2], first[2:])]
    assert regions[0] != regions[1]  # micro-batch means would weigh the regions differently
    before = _lora(one)
    one.train()
    two = _trainer(setup, tmp_path / "two", {"max_regions": None}, per_device_train_batch_size=2,
                   gradient_accumulation_steps=2, **sgd)
    two.train()
    assert one.state.global_step == two.state.global_step == 1
    after_one, after_two = _lora(one), _lora(two)
    assert any(not torch.equal(after_one[n], before[n]) for n in before)
    for name in before:
        torch.testing.assert_close(after_two[name], after_one[name], rtol=1e-4, atol=1e-6, msg=name)


class _EpochLengths(TrainerCallback):
    """Records each epoch's kept samples and the optimizer step it ended at."""

    def __init__(self, recipe):
        self.recipe, self.epochs = recipe, []

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epochs.append((len(self.recipe.sampler), state.global_step))


def test_pruned_epochs_run_their_own_length_under_the_planned_schedule(setup, tmp_path):  # noqa: F811
    """CBDP epochs (dataset budget: half of the slices) each end with a step for their last, incomplete
    accumulation window; with the warm start epoch 0 prunes too, the run takes the planned steps and the
    linear schedule, sized from them, reaches zero at its last step."""
    trainer = _trainer(setup, tmp_path / "run", {"pruning": "cbdp", "prune_budget": "dataset", "num_epochs": 3,
                                                 "anneal": 0.5},
                       num_train_epochs=3, gradient_accumulation_steps=2, lr_scheduler_type="linear")
    lengths = _EpochLengths(trainer.recipe)
    trainer.add_callback(lengths)
    trainer.train()
    n = len(trainer.train_dataset)
    kept = [k for k, _ in lengths.epochs]
    assert kept == [trainer.recipe.planned_num_samples(e) for e in range(3)] and kept[0] < n == kept[2]
    steps = [math.ceil(math.ceil(k / 4) / 2) for k in kept]  # micro-batches of 4, accumulated by 2
    assert [s for _, s in lengths.epochs] == [sum(steps[:e + 1]) for e in range(3)]
    assert trainer.schedule_steps == trainer.recipe.planned_steps(4, 2) == trainer.state.global_step
    assert set(trainer.lr_scheduler.get_last_lr()) == {0.0}  # every parameter group


def test_saves_a_sam_peft_adapter_next_to_the_checkpoints(setup, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    trainer = _trainer(setup, out, max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    trainer.save_model()
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()  # saving did not replace the folder
    for folder in (out, out / "checkpoint-2"):
        saved = load_file(str(folder / "adapter_model.safetensors"))
        assert any("lora_B" in k for k in saved) and all(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)
        model = load_adapter(folder, base=load_base_model(setup / "tiny_sam"))
        assert model.sam_peft_info["organ_names"] == list(trainer.recipe.organ_names)
        loaded = {n: p for n, p in model.named_parameters() if "lora_B" in n}
        assert loaded and all(v.abs().max() > 0 for v in loaded.values())
    trainer.create_model_card()  # what push_to_hub uploads beside the adapter
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "rounds" in card and "strategy `cbdp`" in card


def test_refuses_what_it_cannot_do(setup, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="num_train_epochs=3.*recipe's 1 epochs"):
        _trainer(setup, tmp_path, num_train_epochs=3).train()
    trainer = _trainer(setup, tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="cannot resume"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="eval_dataset"):
        PHPGTrainer(trainer.peft_model, trainer.args, trainer.recipe, eval_dataset=trainer.train_dataset)
    with pytest.raises(ValueError, match="PEFT model"):
        PHPGTrainer(trainer.peft_model.get_base_model(), trainer.args, trainer.recipe)


@pytest.mark.slow
def test_two_processes_take_the_one_process_steps(setup, tmp_path):  # noqa: F811
    """2 processes x batch 2 under `accelerate launch` (CPU, gloo) end where 1 process x batch 4 does: the
    Trainer's accelerate shards the recipe's unsharded plan once, and the loss, divided by the regions of the
    step on both processes and scaled back up for DDP's averaging, gives the one-process gradient."""
    script = Path(__file__).with_name("dist_hf_trainer_script.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    for head, out, batch in (([sys.executable], "one", 4), (launch, "two", 2)):
        done = subprocess.run([*head, str(script), str(setup / "tiny_sam"), str(setup / "data"), str(tmp_path / out),
                               str(batch)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (load_file(str(tmp_path / out / "adapter_model.safetensors")) for out in ("one", "two"))
    assert one.keys() == two.keys() and any("lora_B" in k for k in one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
