"""The pruning policy: region scores -> per-slice keep probabilities -> kept slices and their weights.

Pure functions of arrays, separate from the sampler's mechanics (state, gathering, sharding, resume), so each
property is tested directly. Every strategy ends in the same two steps: a keep probability ``p_i`` per slice,
then a draw whose marginals are exactly ``p_i``; a kept slice weighs ``1 / p_i``. So ``E[weight x kept] = 1``
for every slice and every strategy: the weighted loss of a pruned epoch is an unbiased estimate of the full
epoch's. ``p_i >= 1 / max_weight`` bounds every weight.

CBDP's scores (`fold_scores`): a region's loss is divided by the expected loss of its (organ, behaviour)
cell, so a loose box on the liver and a centre click on the pancreas are judged against their own kind; the
ratio is smoothed by an EMA over epochs. The cell's expected loss is organ mean x behaviour factor (the
behaviour's mean loss over the overall mean; the organ mean taken over behaviour-adjusted losses): an
epoch's regions spread over organs x behaviours cells, most of which hold one region or none on a small
set, where a per-cell mean would make every ratio 1. A region not seen in an epoch (its slice was dropped,
or the collator did not draw it) decays toward 1, its cell's mean, so an old low score cannot keep a slice
dropped for ever. Means are importance-weighted by the epoch's slice weights, so they estimate the whole
dataset's even when mostly hard slices were kept. Each organ's difficulty is an EMA of its
behaviour-adjusted mean loss.

CBDP's probabilities (`cbdp_probabilities`): region difficulty = organ factor x region score, where the
organ factor is the organ's difficulty over the mean organ's (at least ``organ_floor``); a slice's is the
maximum over its organs, so a slice with a hard organ on it is kept as that organ needs. ``p_i = clip(t x
difficulty_i, 1 / max_weight, 1)``, with the one scale ``t`` that makes ``sum(p) = budget``.
"""
from __future__ import annotations

import numpy as np

STRATEGIES = ("none", "random", "infobatch", "cbdp")
BUDGETS = ("pool", "dataset")
MAX_WEIGHT = 5.0
ORGAN_FLOOR = 0.5


def fold_scores(
    scores: np.ndarray, organ_loss: np.ndarray, ids: np.ndarray, organs: np.ndarray, behaviours: np.ndarray,
    losses: np.ndarray, sample_weights: np.ndarray, ema: float,
) -> tuple[np.ndarray, np.ndarray]:
    """New (scores, organ_loss) after one epoch's region losses; the inputs are not changed.

    scores: (N, K) normalised region scores, NaN where never scored. organ_loss: (K,) EMA of each organ's
    mean loss, NaN where never scored. ids, organs, behaviours (-1: unknown), losses: one entry per region
    observation. sample_weights: (N,) loss weights of the epoch the losses come from (0 or missing: 1).
    ema: weight on the old value. Repeats of a region are averaged in a canonical order, so the result does
    not depend on the order the observations arrived in.
    """
    scores, organ_loss = scores.copy(), organ_loss.copy()
    finite = np.isfinite(losses)
    ids, organs, behaviours, losses = ids[finite], organs[finite], behaviours[finite], losses[finite]
    if not len(ids):
        return scores, organ_loss
    k = scores.shape[1]
    nb = int(behaviours.max()) + 2  # behaviour -1 gets cell column 0
    order = np.lexsort((losses, behaviours, organs, ids))
    ids, organs, behaviours, losses = ids[order], organs[order], behaviours[order], losses[order]
    # one value per (slice, organ, behaviour): the mean of its repeats
    key = (ids * k + organs) * nb + behaviours + 1
    unique, inverse = np.unique(key, return_inverse=True)
    loss = np.bincount(inverse, weights=losses) / np.bincount(inverse)
    region, behaviour = unique // nb, unique % nb
    organ = region % k
    w = sample_weights[region // k]
    w = np.where(w > 0, w, 1.0)
    overall = np.average(loss, weights=w)
    factor = _weighted_means(behaviour, loss, w, nb)[behaviour] / overall if overall > 0 else np.ones_like(loss)
    adjusted = np.divide(loss, factor, out=loss.copy(), where=factor > 0)
    organ_mean = _weighted_means(organ, adjusted, w, k)
    z = np.divide(adjusted, organ_mean[organ], out=np.ones_like(loss), where=organ_mean[organ] > 0)
    # one normalised score per region: the mean over the behaviours it was seen with
    regions, inverse = np.unique(region, return_inverse=True)
    z = np.bincount(inverse, weights=z) / np.bincount(inverse)
    new = np.full(scores.size, np.nan)
    new[regions] = z
    new = new.reshape(scores.shape)
    seen = ~np.isnan(new)
    stale = ~seen & ~np.isnan(scores)
    scores[seen] = np.where(np.isnan(scores[seen]), new[seen], ema * scores[seen] + (1 - ema) * new[seen])
    scores[stale] = ema * scores[stale] + (1 - ema)  # decay toward the cell mean
    observed = np.bincount(organ, minlength=k) > 0
    organ_loss[observed] = np.where(np.isnan(organ_loss[observed]), organ_mean[observed],
                                    ema * organ_loss[observed] + (1 - ema) * organ_mean[observed])
    return scores, organ_loss


def _weighted_means(group: np.ndarray, values: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    total = np.bincount(group, weights=weights * values, minlength=size)
    mass = np.bincount(group, weights=weights, minlength=size)
    return np.divide(total, mass, out=np.zeros(size), where=mass > 0)


def slice_difficulty(scores: np.ndarray, organ_loss: np.ndarray, members: np.ndarray,
                     organ_floor: float = ORGAN_FLOOR) -> np.ndarray:
    """(N,) max over a slice's organs of organ factor x region score; NaN for slices with no scored region.

    An unscored region of a scored slice counts as its cell's mean (score 1); an organ never scored as the
    mean organ (factor 1).
    """
    known = ~np.isnan(organ_loss)
    mean = organ_loss[known].mean() if known.any() else np.nan
    factor = np.ones(len(organ_loss))
    if known.any() and mean > 0:
        factor[known] = np.maximum(organ_floor, organ_loss[known] / mean)
    region = np.where(np.isnan(scores), 1.0, scores) * factor
    difficulty = np.where(members, region, -np.inf).max(1, initial=-np.inf)
    scored = (members & ~np.isnan(scores)).any(1)
    return np.where(scored, difficulty, np.nan)


def cbdp_probabilities(difficulty: np.ndarray, budget: float, max_weight: float = MAX_WEIGHT) -> np.ndarray:
    """Keep probabilities in [1 / max_weight, 1] proportional to `difficulty` where not clipped, summing to
    `budget` (as near as the bounds allow); slices with NaN difficulty (never scored) are kept (p = 1)."""
    p = np.ones(len(difficulty))
    scored = ~np.isnan(difficulty)
    d = np.maximum(difficulty[scored], 0.0)
    target = budget - (~scored).sum()
    low = 1.0 / max_weight
    if not scored.any() or target >= len(d):
        return p
    if target <= low * len(d) or not (d > 0).any():
        p[scored] = np.clip(target / len(d), low, 1.0) if not (d > 0).any() else low
        return p
    lo, hi = 0.0, 1.0 / d[d > 0].min()  # sum(clip(t d)) is non-decreasing in t, = len(d) at hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.clip(mid * d, low, 1.0).sum() < target:
            lo = mid
        else:
            hi = mid
    p[scored] = np.clip(hi * d, low, 1.0)
    return p


def infobatch_probabilities(raw: np.ndarray, members: np.ndarray, ratio: float) -> np.ndarray:
    """InfoBatch: a slice whose mean region loss is below the mean over scored slices is kept with
    probability 1 - ratio; every other slice (and every never-scored one) is kept."""
    scored = members & ~np.isnan(raw)
    count = scored.sum(1)
    mean_loss = np.where(scored, raw, 0.0).sum(1) / np.maximum(count, 1)
    has = count > 0
    p = np.ones(len(raw))
    if has.any():
        p[has & (mean_loss < mean_loss[has].mean())] = 1 - ratio
    return p


def draw(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Kept mask with P(kept_i) = p_i exactly and a kept count of floor or ceil of sum(p).

    Systematic sampling over a random order: the slices' probabilities are laid end to end on a line in a
    random order and every integer offset of one uniform start picks the slice it falls in. Independent
    Bernoulli draws have the same marginals but a kept count that varies by about sqrt(sum p(1-p)) (a whole
    batch per epoch on small datasets); this keeps the epoch's length at its budget.
    """
    order = rng.permutation(len(p))
    ends = np.cumsum(p[order])
    starts = ends - p[order]
    u = rng.random()
    # slice j is kept when some u + m (m integer) lies in [starts_j, ends_j)
    kept = np.floor(ends - u) - np.floor(starts - u) >= 1
    mask = p >= 1  # guards against rounding in the sums
    mask[order[kept]] = True
    return mask
