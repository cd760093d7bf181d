"""CBDPSampler's mechanics: budgets, weights, scores, determinism, resume, edge-case datasets, workers, sharding
(the policy's statistical properties: test_cbdp_policy.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import dist_cbdp_script
from sam_peft.pruning import STRATEGIES, CBDPSampler


def score(sampler: CBDPSampler, organs: list[list[str]], losses: dict[tuple[int, str], float]) -> None:
    """Report losses[(sample, organ)] for every listed region, as a trainer would after its steps."""
    keys = [(i, o) for i in range(len(organs)) for o in organs[i] if (i, o) in losses]
    sampler.update([i for i, _ in keys], [o for _, o in keys], [losses[k] for k in keys])


def scored_sampler(organs, losses, epoch=1, **kwargs) -> CBDPSampler:
    sampler = CBDPSampler(organs, **{"num_epochs": 8, **kwargs})
    score(sampler, organs, losses)
    sampler.set_epoch(epoch)
    return sampler


def kept(sampler: CBDPSampler) -> set[int]:
    return {i for i in range(sampler.num_samples) if sampler.weight(i) > 0}


LIVER = [["liver"]] * 20
LIVER_LOSSES = {(i, "liver"): float(i) for i in range(20)}  # mean 9.5: samples 0..9 are below it
ORGANS = [["liver", "kidney"], ["liver"], ["spleen"], ["kidney", "spleen", "pancreas"]] * 6


@pytest.mark.parametrize(("budget", "kept_count"), [("pool", 15), ("dataset", 10)])
def test_budget_and_weights(budget, kept_count):
    sampler = scored_sampler(LIVER, LIVER_LOSSES, budget=budget)
    p = sampler.keep_probabilities()
    assert len(sampler) == len(kept(sampler)) == kept_count and p.sum() == pytest.approx(kept_count)
    assert sorted(sampler) == sorted(kept(sampler))
    assert np.all(np.diff(p) >= 0) and p.min() >= 0.2  # harder slices are kept more often
    for i in range(20):
        assert sampler.weight(i) == pytest.approx(1 / p[i] if i in kept(sampler) else 0.0)
    assert torch.allclose(sampler.weights(torch.arange(20)), torch.tensor([sampler.weight(i) for i in range(20)]))
    summary = sampler.epoch_summary()
    assert summary["kept"] == kept_count and summary["pruned_per_organ"] == {"liver": 20 - kept_count}
    assert summary["samples_saved"] == 20 - kept_count  # epoch 0 had no scores, so pruned nothing


def test_takes_the_organs_column_of_a_prepared_dataset():
    column = datasets.Dataset.from_dict({"organs": ORGANS})["organs"]
    sampler = CBDPSampler(column, num_epochs=4)
    assert sampler.organs == ("kidney", "liver", "pancreas", "spleen") and sampler.num_samples == len(ORGANS)
    sampler.update([3, 3], ["pancreas", "spleen"], [0.1, 0.2], behaviours=["tight_box", "center_click"])


@pytest.mark.parametrize("strategy", ["cbdp", "infobatch"])
def test_unscored_and_organless_samples_are_never_pruned(strategy):
    organs = LIVER + [[]] * 5
    losses = {k: v for k, v in LIVER_LOSSES.items() if k[0] >= 4}  # samples 0..3 never scored
    sampler = scored_sampler(organs, losses, strategy=strategy, prune_ratio=0.9)
    assert set(range(4)) | set(range(20, 25)) <= kept(sampler)
    assert all(sampler.weight(i) == 1.0 for i in [0, 1, 2, 3, 20, 24])
    assert sampler.epoch_summary()["pruned"] > 0


def test_infobatch_drops_ratio_of_the_below_mean_slices():
    sampler = scored_sampler(LIVER, LIVER_LOSSES, strategy="infobatch")
    assert kept(sampler) >= set(range(10, 20))  # above the mean: kept, weight 1
    assert all(sampler.weight(i) == 1.0 for i in range(10, 20))
    assert len(set(range(10)) - kept(sampler)) == 5  # half of the pool, each at probability 0.5
    assert all(sampler.weight(i) == pytest.approx(2.0) for i in set(range(10)) & kept(sampler))


def test_non_finite_losses_are_ignored():
    sampler = CBDPSampler(LIVER, num_epochs=8)
    sampler.update([0, 19], ["liver", "liver"], [float("nan"), float("inf")])
    sampler.set_epoch(1)
    assert sampler.epoch_summary()["pruned"] == 0  # nothing scored
    score(sampler, LIVER, LIVER_LOSSES)
    sampler.update([0, 19], ["liver", "liver"], [float("nan"), float("inf")])
    sampler.set_epoch(2)
    assert sampler.epoch_summary()["pruned"] == 5


def test_random_keeps_a_fresh_uniform_subset_each_epoch():
    sampler = CBDPSampler(LIVER, num_epochs=4, strategy="random", anneal=0.5, budget="dataset")
    plans = []
    for epoch in range(4):
        sampler.set_epoch(epoch)  # needs no scores
        plans.append(kept(sampler))
        if epoch < 2:
            assert len(plans[-1]) == 10 and all(sampler.weight(i) == pytest.approx(2.0) for i in plans[-1])
    assert plans[0] != plans[1] and plans[2] == plans[3] == set(range(20))
    assert sampler.planned_num_samples(0) == 10 and sampler.planned_num_samples(2) == 20


def test_annealing_and_planned_num_samples():
    sampler = CBDPSampler(LIVER, num_epochs=7, anneal=0.5, budget="dataset")  # prunes in epochs 0..3 (< 3.5)
    for epoch in range(7):
        score(sampler, LIVER, LIVER_LOSSES)
        sampler.set_epoch(epoch)
        assert len(sampler) == sampler.planned_num_samples(epoch) == (10 if epoch <= 3 else 20)
        if epoch >= 4:
            assert sampler.weights(range(20)).eq(1).all()
    assert sampler.epoch_summary()["samples_saved"] == 40
    assert sampler.epoch_summary()["saved_fraction"] == pytest.approx(40 / (7 * 20))
    assert CBDPSampler(LIVER, num_epochs=7, strategy="none").planned_num_samples(0) == 20
    assert CBDPSampler(LIVER, num_epochs=7).planned_num_samples(0) == 15  # pool: estimated as half of N


def test_ema_remembers_past_losses():
    organs = [["liver"]] * 6
    plans = {}
    for ema in (0.0, 0.9):
        sampler = CBDPSampler(organs, num_epochs=8, ema=ema, budget="dataset", seed=1)
        for epoch, first in enumerate((10.0, 0.1)):
            score(sampler, organs, {(i, "liver"): first for i in (0, 1)} | {(i, "liver"): 1.0 for i in range(2, 6)})
            sampler.set_epoch(epoch + 1)
        plans[ema] = sampler.keep_probabilities()[:2].tolist()
    # latest only: samples 0 and 1 are now the easiest (the floor); EMA 0.9: they stay the hardest
    assert plans[0.0] == pytest.approx([0.2, 0.2]) and plans[0.9] == pytest.approx([1.0, 1.0])


def run_epochs(sampler, organs, epochs, rng_seed=0, reverse=False):
    """Per epoch: set_epoch, then score every sample of the epoch with seeded losses; the plans seen."""
    gen = torch.Generator().manual_seed(rng_seed)
    seen = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        seen.append((list(sampler), sampler.weights(range(len(organs))).tolist(), sampler.epoch_summary()))
        regions = [(i, o) for i in sampler for o in organs[i]]
        losses = torch.rand(len(regions), generator=gen).tolist()
        if reverse:  # same losses, delivered in the opposite order
            regions, losses = regions[::-1], losses[::-1]
        behaviours = [("tight_box", "center_click")[(i + len(o)) % 2] for i, o in regions]
        sampler.update([i for i, _ in regions], [o for _, o in regions], losses, behaviours=behaviours)
    return seen


def test_deterministic_for_seed_and_epoch():
    first = run_epochs(CBDPSampler(ORGANS, num_epochs=6, seed=1), ORGANS, range(6))
    assert run_epochs(CBDPSampler(ORGANS, num_epochs=6, seed=1), ORGANS, range(6), reverse=True) == first
    assert any(s["pruned"] for _, _, s in first)
    other_seed = run_epochs(CBDPSampler(ORGANS, num_epochs=6, seed=2), ORGANS, range(6))
    assert [order for order, _, _ in other_seed] != [order for order, _, _ in first]
    assert first[0][0] != first[1][0]  # a new order each epoch


@pytest.mark.parametrize("strategy", ["cbdp", "infobatch"])
def test_resume_yields_the_same_sequence(tmp_path, strategy):
    def make():
        return CBDPSampler(ORGANS, num_epochs=6, seed=4, strategy=strategy)

    def plans(extra_losses: bool, checkpoint: Path | None = None):
        sampler = make()
        seen = run_epochs(sampler, ORGANS, range(3))
        if extra_losses:  # pending at the checkpoint: they must travel with it
            score(sampler, ORGANS, {(i, o): 50.0 for i in range(4) for o in ORGANS[i]})
        if checkpoint is not None:  # mid-run: epoch 2 planned, its losses not yet folded in
            torch.save(sampler.state_dict(), checkpoint)
            resumed = make()
            resumed.load_state_dict(torch.load(checkpoint))
            assert list(resumed) == list(sampler) and resumed.epoch_summary() == sampler.epoch_summary()
            sampler = resumed
        return seen + run_epochs(sampler, ORGANS, range(3, 6))

    assert plans(True, tmp_path / "sampler.pt") == plans(True) != plans(False)


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"seed": 5}, "seed=4.*seed=5"),
        ({"prune_ratio": 0.3}, "prune_ratio=0.5.*prune_ratio=0.3"),
        ({"anneal": 0.5}, "anneal=0.875.*anneal=0.5"),
        ({"num_epochs": 8}, "num_epochs=6.*num_epochs=8"),
        ({"strategy": "infobatch"}, "strategy='cbdp'.*strategy='infobatch'"),
        ({"budget": "dataset"}, "budget='pool'.*budget='dataset'"),
        ({"ema": 0.9}, "ema=0.5.*ema=0.9"),
        ({"organ_floor": 0.3}, "organ_floor=0.5.*organ_floor=0.3"),
        ({"max_weight": 4.0}, "max_weight=5.0.*max_weight=4.0"),
        ({"sample_organs": ORGANS[:-1]}, "num_samples=24.*num_samples=23"),
    ],
)
def test_load_state_dict_rejects_other_settings(changed, message):
    settings = {"sample_organs": ORGANS, "num_epochs": 6, "seed": 4}
    saved = CBDPSampler(**settings)
    run_epochs(saved, ORGANS, range(2))
    state = saved.state_dict()
    with pytest.raises(ValueError, match=message):
        CBDPSampler(**{**settings, **changed}).load_state_dict(state)
    CBDPSampler(**settings, num_replicas=2, rank=1).load_state_dict(state)  # another world size may resume
    with pytest.raises(ValueError, match="no 'anneal'"):
        CBDPSampler(**settings).load_state_dict({k: v for k, v in state.items() if k != "anneal"})


def test_empty_dataset():
    sampler = CBDPSampler([], num_epochs=2, num_replicas=2, rank=1)
    sampler.update([], [], [])
    sampler.set_epoch(1)
    assert len(sampler) == 0 and list(sampler) == [] and sampler.weights([]).numel() == 0
    summary = sampler.epoch_summary()
    assert summary["kept"] == summary["pruned"] == 0 and summary["kept_fraction"] == 1.0
    assert summary["kept_per_organ"] == {}


def test_single_sample_dataset():
    sampler = CBDPSampler([["liver"]], num_epochs=4, num_replicas=2, rank=1)
    for epoch in range(4):
        sampler.update([0], ["liver"], [0.5])
        sampler.set_epoch(epoch)
        assert list(sampler) == [0] and sampler.weight(0) == 1.0  # padded: both processes get sample 0


def test_sharded_by_rank_in_one_process():
    organs = ORGANS + [["liver"]]  # 25 samples
    shards = [scored_sampler(organs, {(i, o): float(i % 7) for i in range(25) for o in organs[i]},
                             num_replicas=3, rank=r) for r in range(3)]
    plan = kept(shards[0])
    assert 0 < len(plan) < 25 and all(kept(s) == plan for s in shards)
    orders = [list(s) for s in shards]
    assert len({len(o) for o in orders}) == 1 and set().union(*orders) == plan
    assert sum(map(len, orders)) - len(plan) == -len(plan) % 3  # repeats only as padding


def test_dataloader_with_workers():
    losses = {(i, o): float(i % 5) for i in range(len(ORGANS)) for o in ORGANS[i]}
    sampler = scored_sampler(ORGANS, losses)
    loader = DataLoader(TensorDataset(torch.arange(len(ORGANS))), batch_size=4, sampler=sampler, num_workers=2)
    batches = [ids for (ids,) in loader]
    assert torch.cat(batches).tolist() == list(sampler) and len(sampler) < len(ORGANS)
    assert all(sampler.weights(ids).gt(0).all() for ids in batches)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prune_ratio": 1.0}, "prune_ratio"),
        ({"prune_ratio": -0.1}, "prune_ratio"),
        ({"anneal": 1.5}, "anneal"),
        ({"strategy": "fast"}, "none, random, infobatch, cbdp"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"seed": -1}, "seed"),
        ({"num_replicas": 2, "rank": 2}, "rank"),
        ({"ema": 1.0}, "ema"),
        ({"budget": "all"}, "pool, dataset"),
        ({"strategy": "infobatch", "budget": "dataset"}, "does not apply to infobatch"),
        ({"organ_floor": 0.0}, "organ_floor"),
        ({"max_weight": 1.0}, "max_weight"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CBDPSampler(LIVER, **{"num_epochs": 4, **kwargs})


def test_bad_updates():
    sampler = CBDPSampler(ORGANS, num_epochs=4)
    with pytest.raises(ValueError, match=r"equal lengths.*\[2, 2, 1\]"):
        sampler.update([0, 1], ["liver"], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"equal lengths.*\[1, 1, 1, 2\]"):
        sampler.update([0], ["liver"], [0.1], behaviours=["tight_box", "tight_box"])
    with pytest.raises(ValueError, match="unknown behaviour 'poke'"):
        sampler.update([0], ["liver"], [0.1], behaviours=["poke"])
    with pytest.raises(ValueError, match="unknown sample id 24"):
        sampler.update([0, 24], ["liver", "liver"], [0.1, 0.2])
    with pytest.raises(ValueError, match="sample 1 has no organ 'kidney'"):
        sampler.update([1], ["kidney"], [0.1])
    with pytest.raises(ValueError, match="integers"):
        sampler.update([0.5], ["liver"], [0.1])
    with pytest.raises(ValueError, match="unknown sample id -1"):
        sampler.weight(-1)
    with pytest.raises(TypeError, match=r"sample_organs\[1\]"):
        CBDPSampler([["liver"], "liver"], num_epochs=4)
    assert STRATEGIES == ("none", "random", "infobatch", "cbdp")


@pytest.mark.slow
def test_distributed_shards_under_accelerate(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", dist_cbdp_script.__file__, str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["num_processes"] for r in ranks] == [r["num_replicas"] for r in ranks] == [2, 2]

    # One process fed every sample's losses, with no checkpoint: the decisions two processes must agree on.
    alone = dist_cbdp_script.run(lambda: dist_cbdp_script.make_sampler(num_replicas=1, rank=0))
    for epoch, (a, b, single) in enumerate(zip(ranks[0]["records"], ranks[1]["records"], alone)):
        assert a["summary"] == b["summary"] == single["summary"], f"epoch {epoch}"
        assert a["kept"] == b["kept"] == single["kept"]
        assert len(a["order"]) == len(b["order"]) and set(a["order"]) | set(b["order"]) == set(a["kept"])
        assert len(a["order"]) + len(b["order"]) - len(a["kept"]) == len(a["kept"]) % 2
    summaries = [a["summary"] for a in ranks[0]["records"]]
    assert summaries[-1]["pruned"] == 0  # annealed
    # epoch 0 prunes too, on the scores both processes' warm starts gathered: the dataset budget exactly
    assert all(s["kept"] == 41 - 20 for s in summaries[:-1])


@pytest.mark.parametrize(("setting", "value"), [("prune_ema", 1.0), ("prune_ema", -0.1), ("prune_organ_floor", 0.0),
                                                ("prune_organ_floor", 1.5), ("prune_max_weight", 1.0)])
def test_train_config_refuses_out_of_range_pruning_settings_by_name(setting, value):
    from sam_peft.training import TrainConfig

    with pytest.raises(ValueError, match=rf"^{setting}\b"):
        TrainConfig(**{setting: value})


def test_train_config_pruning_combinations():
    from sam_peft.training import TrainConfig

    with pytest.raises(ValueError, match="prune_budget 'dataset' does not apply to pruning infobatch"):
        TrainConfig(pruning="infobatch", prune_budget="dataset")
    TrainConfig(pruning="cbdp", epochs=1)  # the warm start lets the only epoch prune
    with pytest.raises(ValueError, match="leaves 1 epoch.*without prune_warm_start"):
        TrainConfig(pruning="cbdp", epochs=1, prune_warm_start=False)
    config = TrainConfig(prune_ema=0.8, prune_organ_floor=0.3, prune_max_weight=4.0)
    assert (config.prune_ema, config.prune_organ_floor, config.prune_max_weight, config.prune_warm_start) == (
        0.8, 0.3, 4.0, True)
