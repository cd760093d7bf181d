"""CBDPSampler: exact pruning properties, determinism, resume, edge-case datasets, workers, sharding."""
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
LIVER_LOSSES = {(i, "liver"): float(i) for i in range(20)}  # mean 9.5: samples 0..9 are well learned
ORGANS = [["liver", "kidney"], ["liver"], ["spleen"], ["kidney", "spleen", "pancreas"]] * 6


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_single_organ_kept_fraction_and_weights(ratio):
    sampler = scored_sampler(LIVER, LIVER_LOSSES, prune_ratio=ratio)
    dropped = set(range(20)) - kept(sampler)
    assert len(dropped) == int(ratio * 10) and dropped <= set(range(10))
    assert sorted(sampler) == sorted(kept(sampler)) and len(sampler) == 20 - len(dropped)
    for i in range(20):
        expected = 0.0 if i in dropped else 10 / (10 - len(dropped)) if i < 10 else 1.0
        assert sampler.weight(i) == pytest.approx(expected)
    assert torch.allclose(sampler.weights(torch.arange(20)), torch.tensor([sampler.weight(i) for i in range(20)]))
    summary = sampler.epoch_summary()
    assert summary["kept"] == 20 - len(dropped) and summary["pruned_per_organ"] == {"liver": len(dropped)}
    assert summary["kept_fraction"] == pytest.approx(1 - len(dropped) / 20)
    assert summary["samples_saved"] == len(dropped)  # epoch 0 had no scores, so pruned nothing


def test_takes_the_organs_column_of_a_prepared_dataset():
    column = datasets.Dataset.from_dict({"organs": ORGANS})["organs"]
    sampler = CBDPSampler(column, num_epochs=4)
    assert sampler.organs == ("kidney", "liver", "pancreas", "spleen") and sampler.num_samples == len(ORGANS)
    sampler.update([3, 3], ["pancreas", "spleen"], [0.1, 0.2])


@pytest.mark.parametrize("budget", ["pool", "dataset"])
def test_unscored_and_organless_samples_are_never_pruned(budget):
    organs = LIVER + [[]] * 5
    losses = {k: v for k, v in LIVER_LOSSES.items() if k[0] >= 4}  # samples 0..3 never scored
    sampler = scored_sampler(organs, losses, budget=budget, prune_ratio=0.9)
    assert set(range(4)) | set(range(20, 25)) <= kept(sampler)
    assert all(sampler.weight(i) == 1.0 for i in [0, 1, 2, 3, 20, 24])
    # pool: samples 4..11, below the mean 11.5; "dataset" may drop every scored sample but the last of the
    # pool and of the rest, which carry their group's weight
    assert sampler.epoch_summary()["pruned"] == (int(0.9 * 8) if budget == "pool" else 16 - 2)


@pytest.mark.parametrize(("ratio", "pool_losses"), [(0.5, False), (0.7, False), (0.5, True)])
def test_dataset_budget_drops_a_share_of_all_samples(ratio, pool_losses):
    # LIVER_LOSSES: pool 0..9, smaller than the budget; pool_losses: pool 0..14, larger than it
    losses = {(i, "liver"): 0.0 if i < 15 else 10.0 for i in range(20)} if pool_losses else LIVER_LOSSES
    sampler = scored_sampler(LIVER, losses, prune_ratio=ratio, budget="dataset")
    dropped = set(range(20)) - kept(sampler)
    assert len(dropped) == int(ratio * 20) == len(LIVER) - len(sampler)
    if pool_losses:  # 10 of the 15 pooled samples, at random; the 5 kept ones carry the pool's weight
        assert dropped < set(range(15))
        assert all(sampler.weight(i) == pytest.approx(3.0) for i in set(range(15)) - dropped)
        assert all(sampler.weight(i) == 1.0 for i in range(15, 20))
    else:  # the pool but one (it carries the pool's weight), then the samples with the next-lowest losses
        pool_kept = set(range(10)) - dropped
        assert len(pool_kept) == 1 and sampler.weight(pool_kept.pop()) == pytest.approx(10.0)
        assert dropped - set(range(10)) == set(range(10, int(ratio * 20) + 1))
        rest_kept = set(range(10, 20)) - dropped
        assert all(sampler.weight(i) == pytest.approx(10 / len(rest_kept)) for i in rest_kept)


@pytest.mark.parametrize("strategy", ["cbdp", "infobatch"])
def test_dataset_budget_ranks_by_loss_relative_to_the_organ(strategy):
    # Two organs on very different loss scales, nothing below threshold beyond one sample each. cbdp ranks
    # samples by loss over their organ's mean, so it drops the best-learned of both organs; infobatch by
    # loss over the global mean, so the low-loss organ goes first. The per-organ cap holds under cbdp.
    organs = [["easy"]] * 10 + [["hard"]] * 10
    losses = {(i, "easy"): 0.1 + 0.01 * i for i in range(10)} | {(i, "hard"): 1.0 + 0.1 * (i - 10) for i in range(10, 20)}
    summary = scored_sampler(organs, losses, strategy=strategy, budget="dataset", prune_ratio=0.6).epoch_summary()
    assert summary["pruned"] == 12
    if strategy == "cbdp":
        assert summary["pruned_per_organ"] == {"easy": 6, "hard": 6}
    else:  # every easy sample is in the pool; its last one is kept to carry the pool's weight
        assert summary["pruned_per_organ"] == {"easy": 9, "hard": 3}


def test_dataset_budget_for_random_and_multi_organ_caps():
    assert scored_sampler(LIVER, LIVER_LOSSES, strategy="random", budget="dataset").epoch_summary()["pruned"] == 10
    losses = {(i, o): float((i * 7 + len(o)) % 5) for i, organs in enumerate(ORGANS) for o in organs}
    pool = scored_sampler(ORGANS, losses).epoch_summary()
    dataset = scored_sampler(ORGANS, losses, budget="dataset").epoch_summary()
    assert pool["pruned"] < dataset["pruned"] <= int(0.5 * len(ORGANS))
    counts = {o: sum(o in organs for organs in ORGANS) for o in dataset["pruned_per_organ"]}
    assert all(n <= int(0.5 * counts[o]) for o, n in dataset["pruned_per_organ"].items())


def well_learned(organs, losses, strategy) -> set[int]:
    """The pool, computed from the definition: under cbdp every scored region below its organ's mean
    loss; under infobatch the sample's mean region loss below the mean of those means."""
    scored = [[o for o in organs[i] if (i, o) in losses] for i in range(len(organs))]
    if strategy == "cbdp":
        by_organ: dict[str, list[float]] = {}
        for (i, o), loss in losses.items():
            by_organ.setdefault(o, []).append(loss)
        mean = {o: np.mean(v) for o, v in by_organ.items()}
        return {i for i, names in enumerate(scored) if names and all(losses[i, o] < mean[o] for o in names)}
    sample = {i: np.mean([losses[i, o] for o in names]) for i, names in enumerate(scored) if names}
    threshold = np.mean(list(sample.values()))
    return {i for i, value in sample.items() if value < threshold}


def assert_unbiased(sampler: CBDPSampler, organs, losses) -> None:
    """Every group samples may be dropped from keeps its size as the sum of its kept weights, so all kept
    weights sum to N: the pool, the scored samples outside it (budget "dataset"; never touched under "pool"),
    and the never-scored samples (never dropped); under cbdp each split by organ set."""
    weights = sampler.weights(range(len(organs))).double().numpy()
    assert weights.sum() == pytest.approx(len(organs))
    pool = well_learned(organs, losses, sampler.strategy)
    scored = {i for i, _ in losses}
    groups: dict[tuple, list[int]] = {}
    for i in range(len(organs)):
        part = "pool" if i in pool else "rest" if i in scored else "unscored"
        stratum = tuple(sorted(set(organs[i]))) if sampler.strategy == "cbdp" else ()
        groups.setdefault((part, stratum), []).append(i)
    for (part, _), members in groups.items():
        kept_weights = weights[members][weights[members] > 0]
        assert kept_weights.sum() == pytest.approx(len(members)), (part, members, weights[members])
        assert np.allclose(kept_weights, kept_weights[0])  # drops within a group are alike
        if part == "unscored" or (part == "rest" and sampler.budget == "pool"):
            assert (weights[members] == 1).all()


@pytest.mark.parametrize("budget", ["pool", "dataset"])
@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_weights_keep_each_group_whole_on_15_of_20_well_learned(ratio, budget):
    # At ratio 0.5 under "dataset", kept pool samples used to weigh 1 / (1 - ratio) = 2 though 10 of the 15
    # were dropped: total weight 15 instead of 20 (8.3 at ratio 0.7).
    losses = {(i, "liver"): 0.0 if i < 15 else 10.0 for i in range(20)}
    for strategy in ("infobatch", "cbdp"):
        sampler = scored_sampler(LIVER, losses, prune_ratio=ratio, budget=budget, strategy=strategy)
        assert sampler.epoch_summary()["pruned"] == int(ratio * (20 if budget == "dataset" else 15))
        assert_unbiased(sampler, LIVER, losses)


@pytest.mark.parametrize("budget", ["pool", "dataset"])
@pytest.mark.parametrize("strategy", ["infobatch", "cbdp"])
def test_weights_keep_each_group_whole_on_random_organ_mixes(strategy, budget):
    rng = np.random.default_rng(0)
    pruned = 0
    for case in range(12):
        vocabulary = [f"organ{k}" for k in range(rng.integers(1, 6))]
        organs = [sorted(set(rng.choice(vocabulary, rng.integers(1, 4)).tolist())) for _ in range(rng.integers(5, 60))]
        organs += [[]] * int(rng.integers(0, 3))  # slices with no organ
        losses = {(i, o): float(rng.gamma(2.0)) for i, names in enumerate(organs) for o in names
                  if rng.random() > 0.15}  # some regions never scored (e.g. under the collator's min_pixels)
        for ratio in (0.2, 0.5, 0.7, 0.9):
            sampler = scored_sampler(organs, losses, strategy=strategy, budget=budget, prune_ratio=ratio,
                                     seed=case)
            assert_unbiased(sampler, organs, losses)
            pruned += sampler.epoch_summary()["pruned"] > 0
    assert pruned >= 40  # of the 48 plans: the property is not met by dropping nothing


def test_non_finite_losses_are_ignored():
    sampler = CBDPSampler(LIVER, num_epochs=8)
    score(sampler, LIVER, LIVER_LOSSES)
    sampler.update([0, 19], ["liver", "liver"], [float("nan"), float("inf")])
    sampler.set_epoch(1)
    assert sampler.epoch_summary()["pruned"] == 5


def test_per_organ_cap_redirects_drops():
    # 18 of 20 samples are well learned under either threshold rule; infobatch drops 9 of them with no
    # regard to organ, so one organ loses more than half its 10 samples for some seeds. CBDP never does.
    organs = [["rare"]] * 10 + [["common"]] * 10
    losses = {(i, organs[i][0]): 9.0 if i in (0, 10) else 0.0 for i in range(20)}
    exceeded = 0
    for seed in range(40):
        capped = scored_sampler(organs, losses, seed=seed).epoch_summary()
        assert capped["pruned"] == 9 and max(capped["pruned_per_organ"].values()) <= 5
        uncapped = scored_sampler(organs, losses, seed=seed, strategy="infobatch").epoch_summary()
        assert uncapped["pruned"] == 9
        exceeded += max(uncapped["pruned_per_organ"].values()) > 5
    assert exceeded > 0


def test_cbdp_keeps_a_rare_hard_organ_that_infobatch_dilutes():
    # 80 samples of an easy common organ; 20 also hold a rare hard organ, beside a perfectly learned common
    # region. Averaged over the sample (infobatch), the hard region hides below the global mean.
    organs = [["common"]] * 80 + [["common", "rare"]] * 20
    losses = {(i, "common"): (0.6, 1.0)[i % 2] for i in range(80)}
    losses |= {(i, "common"): 0.0 for i in range(80, 100)} | {(i, "rare"): (0.7, 0.9)[i % 2] for i in range(80, 100)}
    rare = set(range(80, 100))
    rates = {}
    for strategy in ("infobatch", "cbdp"):
        plans = [kept(scored_sampler(organs, losses, seed=seed, strategy=strategy)) for seed in range(10)]
        rates[strategy] = sum(len(plan & rare) for plan in plans) / (10 * len(rare))
        if strategy == "cbdp":  # rare regions above their organ's mean are never dropped
            assert all({i for i in rare if i % 2} <= plan for plan in plans)
    assert rates["cbdp"] > rates["infobatch"] + 0.1


def test_random_is_a_static_subset():
    sampler = CBDPSampler(LIVER, num_epochs=4, strategy="random", anneal=0.5)
    plans = []
    for epoch in range(4):
        score(sampler, LIVER, LIVER_LOSSES if epoch % 2 else {k: -v for k, v in LIVER_LOSSES.items()})
        sampler.set_epoch(epoch)
        plans.append(kept(sampler))
        assert all(sampler.weight(i) == 1.0 for i in plans[-1])
    assert plans[0] == plans[1] and len(plans[0]) == 20 - int(0.5 * 20 / 2)
    assert plans[2] == plans[3] == set(range(20))


def test_annealing():
    sampler = CBDPSampler(LIVER, num_epochs=7, anneal=0.5)  # prunes in epochs 0..3 (< 3.5)
    for epoch in range(7):
        score(sampler, LIVER, LIVER_LOSSES)
        sampler.set_epoch(epoch)
        summary = sampler.epoch_summary()
        assert summary["pruned"] == (5 if epoch <= 3 else 0)
        if epoch >= 4:
            assert len(sampler) == 20 and sampler.weights(range(20)).eq(1).all()
    assert sampler.epoch_summary()["samples_saved"] == 20
    assert sampler.epoch_summary()["saved_fraction"] == pytest.approx(20 / (7 * 20))


def test_ema_scores_remember_past_losses():
    organs = [["liver"]] * 6
    plans = {}
    for mode in ("latest", "ema"):
        sampler = CBDPSampler(organs, num_epochs=8, score=mode)
        for epoch, first in enumerate((10.0, 0.0)):
            score(sampler, organs, {(i, "liver"): first for i in (0, 1)} | {(i, "liver"): 1.0 for i in range(2, 6)})
            sampler.set_epoch(epoch + 1)
        plans[mode] = sorted([sampler.weight(0), sampler.weight(1)])
    # latest: samples 0 and 1 are now the best (the pool: one dropped, the other weighs 2); ema:
    # 0.9 * 10 + 0.1 * 0 keeps them hard, so samples 2..5 are the pool and 0, 1 keep weight 1.
    assert plans == {"latest": [0.0, 2.0], "ema": [1.0, 1.0]}


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
        sampler.update([i for i, _ in regions], [o for _, o in regions], losses)
    return seen


def test_deterministic_for_seed_and_epoch():
    first = run_epochs(CBDPSampler(ORGANS, num_epochs=6, seed=1), ORGANS, range(6))
    assert run_epochs(CBDPSampler(ORGANS, num_epochs=6, seed=1), ORGANS, range(6), reverse=True) == first
    assert any(s["pruned"] for _, _, s in first)
    other_seed = run_epochs(CBDPSampler(ORGANS, num_epochs=6, seed=2), ORGANS, range(6))
    assert [order for order, _, _ in other_seed] != [order for order, _, _ in first]
    assert first[0][0] != first[1][0]  # a new order each epoch


@pytest.mark.parametrize("score_mode", ["latest", "ema"])
def test_resume_yields_the_same_sequence(tmp_path, score_mode):
    def make():
        return CBDPSampler(ORGANS, num_epochs=6, seed=4, score=score_mode)

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
        ({"score": "ema"}, "score='latest'.*score='ema'"),
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
        ({"score": "max"}, "latest, ema"),
        ({"ema": 1.0}, "ema"),
        ({"budget": "all"}, "pool, dataset"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CBDPSampler(LIVER, **{"num_epochs": 4, **kwargs})


def test_bad_updates():
    sampler = CBDPSampler(ORGANS, num_epochs=4)
    with pytest.raises(ValueError, match="equal-length.*2, 1, 2"):
        sampler.update([0, 1], ["liver"], [0.1, 0.2])
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
    assert summaries[0]["pruned"] == 0 and summaries[-1]["pruned"] == 0  # nothing scored yet; annealed
    assert all(s["pruned"] > 0 for s in summaries[1:-1])
