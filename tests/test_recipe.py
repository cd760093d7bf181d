"""PHPGRecipe: one organ filter, epochs that change prompts and plans, the step-normalised loss, and sampler
sharding under a 2-process accelerate launch."""
import inspect
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import SamModel

from sam_peft.data import load_prepared, read_metadata
from sam_peft.models import processor_for
from sam_peft.prompts import BEHAVIOURS
from sam_peft.pruning import CBDPSampler
from sam_peft.training import PHPGRecipe
from sam_peft.training.recipe import organs_per_sample
from test_train import setup  # noqa: F401 - the tiny SAM and a phantom prepared at 20 px (above MIN_PIXELS)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parts(setup):
    model = SamModel.from_pretrained(setup / "tiny_sam")
    train_set = load_prepared(setup / "data")["train"]
    return model, train_set, read_metadata(train_set)["organ_names"]


def _recipe(parts, **kw) -> PHPGRecipe:
    model, train_set, organ_names = parts
    return PHPGRecipe(processor_for(model), organ_names, train_set, **{"rounds": 1, "pruning": "none", **kw})


def test_one_organ_filter_for_regions_and_cbdp_groups(parts):
    recipe = _recipe(parts, min_pixels=5)
    assert recipe.min_pixels == recipe.collator.min_pixels == 20  # prepare's threshold wins
    rows = recipe.prepare_dataset()
    assert [rows[i]["sample_id"] for i in range(3)] == [0, 1, 2]
    batch = recipe.collator([rows[i] for i in range(len(rows))])
    scored = organs_per_sample(parts[1], recipe.min_pixels)  # the CBDP sampler's groups
    for i, organs in enumerate(batch["organ_ids"].tolist()):
        assert sorted(recipe.organ_names[o] for o in organs if o >= 0) == sorted(scored[i])  # same organs


def test_on_epoch_changes_prompts_and_plan(parts):
    recipe = _recipe(parts, pruning="random", prune_ratio=0.5, num_epochs=4, anneal=1.0,
                     behaviours={"random_click": 1})
    loader = recipe.dataloader(batch_size=64)
    items = [recipe.prepare_dataset()[i] for i in range(8)]
    recipe.on_epoch(0)
    plan, before = list(recipe.sampler), recipe.collator(items)
    recipe.on_epoch(1)
    assert (recipe.sampler.epoch, recipe.collator.epoch) == (1, 1)
    assert next(iter(loader))["sample_ids"].tolist() == list(recipe.sampler) != plan  # the loader follows the plan
    assert not torch.equal(before["points"], recipe.collator(items)["points"])  # new clicks in a new epoch


def test_loss_is_normalised_by_the_steps_regions(parts):
    """Two micro-batches with different region counts, each given the step's totals, add up to the loss (and
    gradients) of their union in one batch; each normalised by its own regions, they do not."""
    model = parts[0]
    recipe = _recipe(parts, max_regions=3, behaviours={"tight_box": 1})
    rows = recipe.prepare_dataset()
    items = [rows[i] for i in range(8)]
    whole, halves = recipe.collator(items), [recipe.collator(items[:4]), recipe.collator(items[4:])]
    counts = [h["region_valid"].sum().item() for h in halves]
    assert counts[0] != counts[1]
    step = recipe.step_module(model)

    def grads(loss):
        step.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in step.parameters() if p.grad is not None]

    reference = recipe.loss(step, whole)
    expected = grads(reference)
    totals = sum(recipe.count(h) for h in halves)
    assert totals.tolist() == [sum(counts), 8]
    shares = [recipe.loss(step, h, totals) for h in halves]
    torch.testing.assert_close(sum(shares), reference)
    for g, e in zip(grads(sum(shares)), expected):
        torch.testing.assert_close(g, e)
    means = [recipe.loss(step, h) for h in halves]
    assert abs((means[0] + means[1]) / 2 - reference) > 1e-4  # the old per-micro-batch mean differs


@pytest.mark.skipif("behaviours" not in inspect.signature(CBDPSampler.update).parameters,
                    reason="needs the CBDP sampler with per-(organ, behaviour) scores")
def test_loss_gives_cbdp_each_regions_behaviour(parts, monkeypatch):
    recipe = _recipe(parts, behaviours={"tight_box": 1, "center_click": 1})
    batch = recipe.collator([recipe.prepare_dataset()[i] for i in range(4)])
    calls, update = [], recipe.sampler.update

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return update(*args, **kwargs)

    monkeypatch.setattr(recipe.sampler, "update", spy)
    recipe.loss(recipe.step_module(parts[0]), batch)
    valid = batch["region_valid"]
    assert calls[0]["behaviours"] == [BEHAVIOURS[i] for i in batch["behaviour_ids"][valid].tolist()]


def test_planned_steps_follow_the_plan(parts):
    recipe = _recipe(parts, num_epochs=3)
    n = len(parts[1])
    assert recipe.planned_steps(4, grad_accum=2) == 3 * math.ceil(math.ceil(n / 4) / 2)
    assert recipe.planned_steps(4, num_processes=2) == 3 * math.ceil(n / 8)


@pytest.mark.slow
def test_each_kept_sample_is_seen_once_across_two_processes(setup, tmp_path):
    """2 CPU processes (gloo): the recipe's prepared DataLoader and a self-sharding sampler iterated directly
    each cover the epoch's plan once between them. Only accelerate's even_batches padding repeats samples: the
    last step is filled up from the start of the plan, so every process takes the same number of batches."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH"))
                                         if p)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "0", str(REPO / "tests" / "dist_recipe_script.py"), str(setup / "tiny_sam"), str(setup / "data"),
               str(out)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert [(r["recipe_replicas"], r["direct_replicas"]) for r in ranks] == [(1, 2), (1, 2)]
    kept_sizes = []
    for epoch in range(len(ranks[0]["epochs"])):
        plan = ranks[0]["epochs"][epoch]["plan"]
        assert ranks[1]["epochs"][epoch]["plan"] == plan  # one plan on every process
        kept_sizes.append(len(plan))
        seen = Counter(i for r in ranks for i in r["epochs"][epoch]["seen"])
        assert set(seen) == set(plan)
        padded = -(-len(plan) // 6) * 6  # batch 3 x 2 processes
        repeats = [i for i, c in seen.items() if c > 1]
        assert sum(seen.values()) == padded and set(repeats) <= set(plan[:padded - len(plan)])
        assert all(c <= 2 for c in seen.values())
        direct = Counter(i for r in ranks for i in r["epochs"][epoch]["direct_seen"])
        kept = ranks[0]["epochs"][epoch]["direct_kept"]
        assert set(direct) == set(kept) and sum(direct.values()) == len(kept) + len(kept) % 2
    assert kept_sizes[0] == len(load_prepared(setup / "data")["train"]) and kept_sizes[1] < kept_sizes[0]
