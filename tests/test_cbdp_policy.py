"""CBDP's policy on a skewed synthetic organ set with fixed scores: unbiased weights, bounded weights, hard
organs kept, the paper's iteration budget; and the pure policy functions one by one."""
import numpy as np
import pytest

from sam_peft.pruning import MAX_WEIGHT, CBDPSampler
from sam_peft.pruning.policy import (cbdp_probabilities, draw, fold_scores, infobatch_probabilities,
                                     slice_difficulty)

HARD = {"pancreas", "duodenum", "stomach"}


def skewed_set() -> list[list[str]]:
    """300 slices: most hold only easy organs, a few hold the hard ones (as in abdominal CT)."""
    return ([["liver"]] * 120 + [["liver", "spleen"]] * 60 + [["kidney"]] * 40 + [["liver", "stomach"]] * 30
            + [["pancreas", "duodenum"]] * 20 + [["stomach"]] * 15 + [["pancreas", "kidney"]] * 15)


def fixed_losses(organs: list[list[str]]) -> dict[tuple[int, str], float]:
    """A fixed loss per region: hard organs ~4x the easy ones, a lognormal spread within each organ."""
    rng = np.random.default_rng(123)
    return {(i, o): (1.2 if o in HARD else 0.3) * rng.lognormal(0, 0.5) for i, names in enumerate(organs)
            for o in names}


def warm_sampler(organs, losses, seed=0, **kwargs) -> CBDPSampler:
    """A sampler given every region's loss before epoch 0 (a warm start), planned for epoch 0."""
    sampler = CBDPSampler(organs, **{"num_epochs": 8, "budget": "dataset", "seed": seed, **kwargs})
    keys = sorted(losses)
    sampler.update([i for i, _ in keys], [o for _, o in keys], [losses[k] for k in keys],
                   behaviours=["tight_box"] * len(keys))
    sampler.set_epoch(0)
    return sampler


def weights_over_seeds(strategy: str, seeds: int = 400) -> np.ndarray:
    organs = skewed_set()
    losses = fixed_losses(organs)
    kw = {"budget": "pool"} if strategy == "infobatch" else {}
    return np.stack([warm_sampler(organs, losses, seed=s, strategy=strategy, **kw).weights(range(len(organs))).numpy()
                     for s in range(seeds)])


@pytest.mark.parametrize("strategy", ["cbdp", "infobatch", "random"])
def test_weights_are_unbiased_and_bounded(strategy):
    weights = weights_over_seeds(strategy)
    mean = weights.mean(0)  # E[weight x kept] per slice, over 400 seeds
    assert np.mean((mean >= 0.75) & (mean <= 1.25)) >= 0.95, np.sort(mean)[:10]
    assert weights.max() <= MAX_WEIGHT + 1e-6
    assert (weights == 0).any()  # it does prune


def test_hard_organ_slices_are_kept_clearly_more_often():
    organs = skewed_set()
    kept = (weights_over_seeds("cbdp", seeds=100) > 0).mean(0)
    hard = np.array([bool(HARD & set(names)) for names in organs])
    assert kept[hard].mean() > 1.8 * kept[~hard].mean(), (kept[hard].mean(), kept[~hard].mean())
    assert kept[hard].mean() > 0.8
    # the same budget spent at random keeps every slice half the time
    random_kept = (weights_over_seeds("random", seeds=100) > 0).mean(0)
    assert random_kept[hard].mean() == pytest.approx(0.5, abs=0.05)


def test_warm_start_gives_the_papers_iteration_budget():
    organs = skewed_set()
    losses = fixed_losses(organs)
    sampler = warm_sampler(organs, losses, prune_ratio=0.5, anneal=0.875)
    seen = []
    for epoch in range(8):
        sampler.set_epoch(epoch)
        seen.append(len(sampler))
        ids = list(sampler)
        keys = [(i, o) for i in ids for o in organs[i]]
        sampler.update([i for i, _ in keys], [o for _, o in keys], [losses[k] for k in keys])
    assert seen == [150] * 7 + [300]  # epoch 0 prunes: its scores came before it
    assert sum(seen) / (8 * 300) == pytest.approx(0.5625)
    assert [sampler.planned_num_samples(e) for e in range(8)] == seen
    # without the warm start epoch 0 has no scores and keeps everything
    cold = CBDPSampler(organs, num_epochs=8, budget="dataset")
    cold.set_epoch(0)
    assert len(cold) == 300


def test_draw_has_the_given_marginals_and_a_fixed_count():
    rng = np.random.default_rng(0)
    p = np.clip(rng.random(50), 0.2, 1.0)
    p[:5] = 1.0
    masks = np.stack([draw(p, np.random.default_rng(s)) for s in range(4000)])
    assert np.abs(masks.mean(0) - p).max() < 0.035
    assert masks[:, :5].all()
    counts = masks.sum(1)
    assert set(counts.tolist()) <= {int(np.floor(p.sum())), int(np.ceil(p.sum()))}


def test_cbdp_probabilities_hit_the_budget_within_bounds():
    d = np.array([0.1, 0.5, 1.0, 2.0, 8.0, np.nan, 1.0, 0.0])
    p = cbdp_probabilities(d, budget=5.0, max_weight=5.0)
    assert p.sum() == pytest.approx(5.0) and p[5] == 1.0  # never scored: kept
    assert p.min() >= 0.2 and p.max() <= 1.0
    assert np.all(np.diff(p[[7, 0, 1, 2, 3, 4]]) >= 0)  # monotone in difficulty
    assert p[4] == 1.0 and p[0] == 0.2
    assert (cbdp_probabilities(d, budget=20.0) == 1).all()
    assert cbdp_probabilities(d, budget=1.0)[:5].tolist() == [0.2] * 5  # infeasible: the floor


def test_infobatch_prunes_below_the_global_mean():
    members = np.array([[1, 0], [1, 1], [0, 1], [1, 0], [0, 0]], dtype=bool)
    raw = np.array([[0.1, np.nan], [0.2, 0.4], [np.nan, 2.0], [np.nan, np.nan], [np.nan, np.nan]])
    # slice means 0.1, 0.3, 2.0 (mean 0.8); slices 3, 4 never scored
    assert infobatch_probabilities(raw, members, 0.5).tolist() == [0.5, 0.5, 1.0, 1.0, 1.0]


def test_scores_are_normalised_per_organ_and_behaviour():
    # the loose box on organ 0 loses twice the tight box; relative to their own cells the regions match
    ids = np.array([0, 1, 2, 3])
    organs = np.zeros(4, dtype=np.int64)
    behaviours = np.array([0, 0, 2, 2])
    losses = np.array([1.0, 3.0, 2.0, 6.0])
    scores, organ_loss = fold_scores(np.full((4, 1), np.nan), np.full(1, np.nan), ids, organs, behaviours, losses,
                                     np.ones(4), ema=0.5)
    assert scores[:, 0].tolist() == pytest.approx([0.5, 1.5, 0.5, 1.5])
    assert organ_loss[0] == pytest.approx(3.0)


def test_cells_of_one_region_keep_their_signal():
    # organs 0 and 1 x behaviours 0 and 1, one region per cell: per-cell means would give every region 1;
    # organ mean x behaviour factor (0.67 and 1.33 here) does not
    scores, organ_loss = fold_scores(np.full((4, 2), np.nan), np.full(2, np.nan), np.array([0, 1, 2, 3]),
                                     np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), np.array([1.0, 4.0, 2.0, 2.0]),
                                     np.ones(4), ema=0.0)
    assert [scores[0, 0], scores[1, 0], scores[2, 1], scores[3, 1]] == pytest.approx([2 / 3, 4 / 3, 4 / 3, 2 / 3])
    assert organ_loss.tolist() == pytest.approx([2.25, 2.25])


def test_cell_means_are_importance_weighted():
    # kept slices 0 (weight 1, loss 1) and 1 (weight 3, loss 3): the estimated cell mean is 2.5
    scores, organ_loss = fold_scores(np.full((3, 1), np.nan), np.full(1, np.nan), np.array([0, 1]),
                                     np.array([0, 0]), np.array([-1, -1]), np.array([1.0, 3.0]),
                                     np.array([1.0, 3.0, 0.0]), ema=0.0)
    assert scores[:2, 0].tolist() == pytest.approx([0.4, 1.2]) and np.isnan(scores[2, 0])
    assert organ_loss[0] == pytest.approx(2.5)


def test_stale_scores_decay_toward_the_cell_mean():
    scores = np.array([[0.2], [1.0], [1.8]])
    organ_loss = np.array([1.0])
    # only slice 1 is seen (at its cell's mean); slices 0 and 2 were dropped
    new, _ = fold_scores(scores, organ_loss, np.array([1]), np.array([0]), np.array([0]), np.array([5.0]),
                         np.ones(3), ema=0.5)
    assert new[:, 0].tolist() == pytest.approx([0.6, 1.0, 1.4])
    # and an epoch without any update changes nothing
    same, _ = fold_scores(scores, organ_loss, *(np.zeros(0, np.int64),) * 3, np.zeros(0), np.ones(3), ema=0.5)
    assert np.array_equal(same, scores)


def test_slice_difficulty_takes_the_hardest_organ_with_a_floor():
    members = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=bool)
    scores = np.array([[1.0, np.nan, np.nan], [0.5, np.nan, np.nan], [np.nan, np.nan, 1.0],
                       [np.nan, np.nan, np.nan]])
    organ_loss = np.array([0.1, np.nan, 2.9])  # mean 1.5: organ 0 factor 0.067 -> floor 0.5; organ 2 1.93
    d = slice_difficulty(scores, organ_loss, members, organ_floor=0.5)
    # slice 1: organ 1 never scored (factor 1, score 1) beats organ 0's 0.5 x 0.5; slice 3 never scored
    assert d[:3].tolist() == pytest.approx([0.5, 1.0, 2.9 / 1.5]) and np.isnan(d[3])
