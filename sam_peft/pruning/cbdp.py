"""CBDP: class-balanced dynamic data pruning, as a plain ``torch.utils.data.Sampler``.

Each epoch drops a share of the samples that are already well learned, judged per organ class, and
up-weights the kept ones: every group samples were dropped from keeps its total weight (its kept members
weigh its size over its kept count), so an epoch's weights sum to the dataset's size and, where the drops
within a group are random (the well-learned pool), the expected gradient is the full group's. Per-organ
thresholds and a per-organ cap keep small, hard, rare organs from being starved, which a single global
threshold (InfoBatch) allows.

Decisions depend only on (seed, epoch) and the scores, and scores are gathered from every process before
they are used, so all processes of a distributed run prune identically and shard one common order.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

STRATEGIES = ("none", "random", "infobatch", "cbdp")
BUDGETS = ("pool", "dataset")
SCORES = ("latest", "ema")

# Random streams, one per purpose; seeds are always (seed, epoch, purpose), since numpy's SeedSequence
# treats a trailing zero as absent and [s, e] would collide with [s, e, 0].
_PRUNE, _ORDER, _STATIC = 0, 1, 2

# `random` drops this share of prune_ratio * N: what the dynamic strategies drop when half of the samples
# are below the mean score (the mean splits a symmetric loss distribution in two).
_RANDOM_POOL_FRACTION = 0.5

Updates = tuple[np.ndarray, np.ndarray, np.ndarray]  # sample ids, organ indices, losses
_PENDING_KEYS = ("sample_ids", "organs", "losses")


def gather_updates(local: Updates) -> list[Updates]:
    """This process's pending updates followed by every other process's, in rank order.

    Collective under ``torch.distributed`` with more than one process: all processes must call it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    gathered: list[Updates | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def _empty_updates() -> Updates:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)


def _concat(parts: Sequence[Updates]) -> Updates:
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def _shard(order: list[int], num_replicas: int, rank: int) -> list[int]:
    """Pad by repeating from the start to a multiple of num_replicas (as DistributedSampler does), then slice."""
    if not order:
        return []
    total = math.ceil(len(order) / num_replicas) * num_replicas
    padded = (order * math.ceil(total / len(order)))[:total]
    return padded[rank::num_replicas]


class CBDPSampler(Sampler[int]):
    """Yields this epoch's kept sample indices (this process's shard); `weight` gives their loss weights.

    Args:
        sample_organs: ``sample_organs[i]`` lists the organ names of sample ``i`` (the dataset's ``organs``).
        num_epochs: length of the run; pruning stops from epoch ``anneal * num_epochs`` on.
        prune_ratio: share dropped per pruned epoch, in [0, 1): of the well-learned samples, or of all
            samples (see ``budget``).
        anneal: fraction of the epochs that may prune, in [0, 1].
        seed: non-negative seed; with the epoch it fixes every random choice.
        strategy: ``"none"``, ``"random"`` (a static random subset of ``floor(prune_ratio * N / 2)``
            samples, ``floor(prune_ratio * N)`` with ``budget="dataset"``, dropped before the anneal point,
            weight 1), ``"infobatch"`` (class-agnostic: a sample's
            score is the mean of its regions' scores, one global mean threshold) or ``"cbdp"`` (per-organ
            mean thresholds, a per-organ cap).
        num_replicas, rank: the shard to yield; default to torch.distributed's world size and rank.
        shuffle: shuffle the kept samples each epoch (else ascending order).
        score: a region's score is its ``"latest"`` loss or an ``"ema"`` of its losses.
        ema: the EMA's weight on the old score, in [0, 1).
        budget: what ``prune_ratio`` is a share of. ``"pool"`` (InfoBatch's rule): of the well-learned
            samples, so an epoch saves at most ``prune_ratio`` of the data and in practice much less, as few
            multi-organ slices have every region below its organ's threshold. ``"dataset"`` (the paper's
            iteration budget, 56.25% of full training at ratio 0.5 and anneal 0.875): of all samples; once
            the pool is used up, the next drops are the samples learned best relative to their organs
            (lowest worst-region score / organ threshold under cbdp, lowest score / global mean under
            infobatch). Never-scored samples are never dropped.

    A sample is well learned when at least one of its regions is scored and every scored region is below
    the threshold (regions the collator never emits, e.g. organs under its ``min_pixels``, do not block
    it). Of the well-learned pool ``floor(prune_ratio * len(pool))`` samples are dropped (``budget="pool"``;
    ``floor(prune_ratio * N)`` with ``"dataset"``), the pool's members first, chosen at random. Under
    ``cbdp`` candidates are tried in that order and one whose drop would take any of its organs past
    ``floor(prune_ratio * n_organ)`` dropped samples is kept instead.

    Weights: dropped samples 0; a kept sample weighs its group's size over the group's kept count, so the
    kept weights of every group sum to its size and all kept weights to N. The groups are the pool and,
    under ``"dataset"``, the scored samples outside it; under ``cbdp`` each is split by organ set (the
    samples with the same organs), since the cap treats those alike: within one, the dropped samples are a
    uniformly random share of the pool's members, whatever the cap did. A drop that would leave a group
    with no kept sample is skipped (its weight would have nowhere to go). ``random`` is a smaller static
    dataset, not an estimate of the full one: its kept samples weigh 1. Every strategy prunes nothing from
    the anneal point on.
    """

    def __init__(
        self,
        sample_organs: Iterable[Sequence[str]],
        num_epochs: int,
        prune_ratio: float = 0.5,
        anneal: float = 0.875,
        seed: int = 0,
        strategy: str = "cbdp",
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        score: str = "latest",
        ema: float = 0.9,
        budget: str = "pool",
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        num_replicas = num_replicas if num_replicas is not None else dist.get_world_size() if distributed else 1
        rank = rank if rank is not None else dist.get_rank() if distributed else 0
        _check_args(num_epochs, prune_ratio, anneal, seed, strategy, num_replicas, rank, score, ema, budget)
        self.num_epochs, self.prune_ratio, self.anneal, self.seed = num_epochs, prune_ratio, anneal, seed
        self.strategy, self.num_replicas, self.rank, self.shuffle = strategy, num_replicas, rank, shuffle
        self.score, self.ema, self.budget = score, ema, budget

        self._sample_organs, self.organs = _index_organs(sample_organs)
        self._organ_index = {name: o for o, name in enumerate(self.organs)}
        n, k = len(self._sample_organs), len(self.organs)
        self._members = np.zeros((n, k), dtype=bool)
        for i, organs in enumerate(self._sample_organs):
            self._members[i, list(organs)] = True
        organ_sets = {organs: s for s, organs in enumerate(sorted(set(self._sample_organs)))}
        self._organ_set = np.array([organ_sets[organs] for organs in self._sample_organs], dtype=np.int64)
        self._scores = np.full((n, k), np.nan)
        self._merged = _empty_updates()  # pending updates already gathered from every process
        self._local: list[tuple[np.ndarray, np.ndarray, torch.Tensor]] = []  # this process's, not yet gathered
        self._pruned_per_epoch: dict[int, int] = {}
        self.epoch = 0
        self._plan()

    @property
    def num_samples(self) -> int:
        return len(self._sample_organs)

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[int]:
        return iter(self._order)  # `_plan` replaces the list, so a running iteration is never changed

    def set_epoch(self, epoch: int) -> None:
        """Fold in every process's losses since the last call, then plan `epoch`. Collective when distributed."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"set_epoch: epoch must be a non-negative int, got {epoch!r}")
        self._apply(self._collect())
        self.epoch = int(epoch)
        self._plan()

    def update(self, sample_ids, organs: Sequence[str], losses) -> None:
        """Record per-region losses after a step: region j is organ ``organs[j]`` of sample ``sample_ids[j]``.

        Buffered until the next `set_epoch`. Sample ids are checked here, so pass them on the CPU; losses
        may stay on the accelerator (detached here, copied once per epoch, so a step never waits on them).
        Non-finite losses are ignored: a diverged step says nothing about what is learned.
        """
        ids = self._ids(sample_ids, "update").reshape(-1)
        losses = losses.detach() if isinstance(losses, torch.Tensor) else torch.as_tensor(losses, dtype=torch.float64)
        losses = losses.reshape(-1)
        if isinstance(organs, str) or not len(ids) == len(organs) == len(losses):
            count = "a str" if isinstance(organs, str) else len(organs)
            raise ValueError(
                f"update: sample_ids, organs and losses must be equal-length sequences, "
                f"got {len(ids)}, {count}, {len(losses)}"
            )
        ids = ids.cpu().numpy()
        organ_idx = np.array([self._organ_of(i, name) for i, name in zip(ids.tolist(), organs)], dtype=np.int64)
        self._local.append((ids, organ_idx, losses))

    def weight(self, sample_id: int) -> float:
        """Loss weight of a sample this epoch: 0 when dropped, else its group's size over the group's kept
        count (1 when nothing of its group was dropped; see the class docstring)."""
        return float(self._weights[int(self._ids(sample_id, "weight"))])

    def weights(self, sample_ids) -> torch.Tensor:
        """`weight` for a batch of ids, as a float32 tensor on the ids' device (no device sync for device ids)."""
        ids = self._ids(sample_ids, "weights")
        if self._weight_table.device != ids.device:
            self._weight_table = self._weight_table.to(ids.device)
        return self._weight_table[ids]

    def epoch_summary(self) -> dict:
        """What this epoch keeps and drops, per organ, and the samples saved by all epochs planned so far."""
        pruned = self._weights == 0
        planned = self.num_samples * len(self._pruned_per_epoch)
        saved = sum(self._pruned_per_epoch.values())
        return {
            "epoch": self.epoch,
            "strategy": self.strategy,
            "budget": self.budget,
            "kept": int((~pruned).sum()),
            "pruned": int(pruned.sum()),
            "kept_fraction": float((~pruned).mean()) if self.num_samples else 1.0,
            "kept_per_organ": dict(zip(self.organs, self._members[~pruned].sum(0).tolist())),
            "pruned_per_organ": dict(zip(self.organs, self._members[pruned].sum(0).tolist())),
            "samples_saved": saved,
            "saved_fraction": saved / planned if planned else 0.0,
        }

    def state_dict(self) -> dict:
        """Scores, epoch, pending losses and totals; random choices are re-derived from (seed, epoch).

        Collective when distributed (pending losses of every process are gathered): call it on every process,
        as ``accelerator.save_state`` does.
        """
        self._merged = self._collect()
        return {
            **self._settings(),
            "epoch": self.epoch,
            "scores": torch.from_numpy(self._scores.copy()),
            "pending": {key: torch.from_numpy(a.copy()) for key, a in zip(_PENDING_KEYS, self._merged)},
            "pruned_per_epoch": dict(self._pruned_per_epoch),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`: the same epoch plan, and the same plans after it.

        Refuses a state saved under other settings (a resume with a changed ratio, anneal, epoch count, ...
        would silently follow another plan); the number of processes may differ.
        """
        for key, mine in self._settings().items():
            if key not in state:
                raise ValueError(f"load_state_dict: state has no {key!r}; not a CBDPSampler state of this version")
            if state[key] != mine:
                raise ValueError(f"load_state_dict: the state was saved with {key}={state[key]!r}, this sampler "
                                 f"has {key}={mine!r}; resume with the same setting or start a new run")
        scores = state["scores"].numpy()
        if scores.shape != self._scores.shape:
            raise ValueError(f"load_state_dict: scores have shape {tuple(scores.shape)}, expected {self._scores.shape}")
        self._scores = scores.astype(np.float64)
        pending = state["pending"]
        self._merged = tuple(pending[key].numpy().copy() for key in _PENDING_KEYS)
        self._local = []
        self._pruned_per_epoch = {int(e): int(n) for e, n in state["pruned_per_epoch"].items()}
        self.epoch = int(state["epoch"])
        self._plan()

    # -- internals ---------------------------------------------------------------------------------------

    def _settings(self) -> dict:
        """What fixes the plans besides the scores: a resume must match all of it."""
        return {"num_samples": self.num_samples, "organs": list(self.organs), "num_epochs": self.num_epochs,
                "prune_ratio": self.prune_ratio, "anneal": self.anneal, "seed": self.seed,
                "strategy": self.strategy, "budget": self.budget, "score": self.score, "ema": self.ema,
                "shuffle": self.shuffle}

    def _ids(self, sample_ids, where: str) -> torch.Tensor:
        """Sample ids as an int64 tensor; range-checked when on the CPU (a device check would sync)."""
        ids = torch.as_tensor(sample_ids)
        if ids.numel() == 0:
            return ids.long()
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{where}: sample ids must be integers, got dtype {ids.dtype}")
        if ids.device.type == "cpu":
            bad = ids[(ids < 0) | (ids >= self.num_samples)]
            if bad.numel():
                raise ValueError(f"{where}: unknown sample id {bad.reshape(-1)[0].item()} "
                                 f"(dataset has {self.num_samples} samples)")
        return ids.long()

    def _organ_of(self, sample_id: int, name: str) -> int:
        organ = self._organ_index.get(name)
        if organ is None or not self._members[sample_id, organ]:
            names = [self.organs[o] for o in self._sample_organs[sample_id]]
            raise ValueError(f"update: sample {sample_id} has no organ {name!r} (its organs: {names})")
        return organ

    def _collect(self) -> Updates:
        """Every process's pending updates, the same on all processes; empties the buffers."""
        local = _empty_updates()
        if self._local:
            ids, organs, losses = zip(*self._local)
            local = (np.concatenate(ids), np.concatenate(organs),
                     torch.cat([x.to("cpu", torch.float64) for x in losses]).numpy())
        self._local = []
        merged = _concat([self._merged, *gather_updates(local)])
        self._merged = _empty_updates()
        return merged

    def _apply(self, updates: Updates) -> None:
        """Fold updates into the scores. A region seen several times counts with its mean loss, summed in a
        canonical order, so the result does not depend on which process or checkpoint delivered what."""
        ids, organs, losses = updates
        finite = np.isfinite(losses)
        keys, losses = ids[finite] * len(self.organs) + organs[finite], losses[finite]
        if not len(keys):
            return
        order = np.lexsort((losses, keys))
        unique, inverse = np.unique(keys[order], return_inverse=True)
        mean = np.bincount(inverse, weights=losses[order]) / np.bincount(inverse)
        rows, cols = np.divmod(unique, len(self.organs))
        old = self._scores[rows, cols]
        if self.score == "ema":
            mean = np.where(np.isnan(old), mean, self.ema * old + (1 - self.ema) * mean)
        self._scores[rows, cols] = mean

    def _rng(self, purpose: int, epoch: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, purpose])

    def _share(self, count: float) -> int:
        """floor(prune_ratio * count), robust to float rounding (0.29 * 100 is 28.999...)."""
        return int(self.prune_ratio * count + 1e-9)

    def _plan(self) -> None:
        """Decide this epoch's kept samples, their weights and this process's shard of their order."""
        n = self.num_samples
        weights = np.ones(n)
        dropped: np.ndarray | list[int] = []
        if self.strategy != "none" and self.epoch < self.anneal * self.num_epochs:
            if self.strategy == "random":
                share = n if self.budget == "dataset" else n * _RANDOM_POOL_FRACTION
                dropped = self._rng(_STATIC).choice(n, self._share(share), replace=False)
                weights[dropped] = 0
            else:
                relative = self._relative_scores()
                pool = np.flatnonzero(relative < 1)
                candidates = self._rng(_PRUNE, self.epoch).permutation(pool)
                quota = self._share(len(pool))
                group = np.where(relative < 1, 0, -1)
                if self.budget == "dataset":
                    rest = np.flatnonzero((relative >= 1) & np.isfinite(relative))
                    candidates = np.concatenate([candidates, rest[np.argsort(relative[rest], kind="stable")]])
                    quota = self._share(n)
                    group[rest] = 1
                if self.strategy == "cbdp":  # the cap treats samples with the same organs alike
                    group = np.where(group >= 0, group + 2 * self._organ_set, -1)
                dropped = self._choose_drops(candidates, quota, group)
                weights = _group_weights(group, dropped)
        kept = np.flatnonzero(weights > 0)
        if self.shuffle:
            kept = self._rng(_ORDER, self.epoch).permutation(kept)
        self._weights = weights
        self._weight_table = torch.from_numpy(weights.astype(np.float32))
        self._order = _shard(kept.tolist(), self.num_replicas, self.rank)
        self._pruned_per_epoch[self.epoch] = len(dropped)

    def _relative_scores(self) -> np.ndarray:
        """Per sample, how its scores compare with their thresholds: below 1 means well learned, lower means
        learned better; never-scored samples get inf. Under cbdp the worst region's score over its organ's
        mean score; under infobatch the sample's mean region score over the mean of those."""
        scored = ~np.isnan(self._scores)
        filled = np.where(scored, self._scores, 0.0)
        any_scored = scored.any(1)
        relative = np.full(self.num_samples, np.inf)
        if not any_scored.any():
            return relative
        if self.strategy == "infobatch":
            sample_score = filled.sum(1) / np.maximum(scored.sum(1), 1)
            ratio = _ratio(sample_score, sample_score[any_scored].mean())
        else:
            thresholds = filled.sum(0) / np.maximum(scored.sum(0), 1)
            ratio = np.where(scored, _ratio(filled, thresholds), -np.inf).max(1)
        relative[any_scored] = ratio[any_scored]
        return relative

    def _choose_drops(self, candidates: np.ndarray, quota: int, group: np.ndarray) -> list[int]:
        """The first `quota` candidates, skipping any whose drop would leave its group (`group[i]`, -1 for
        none) with no kept sample or (under cbdp) take one of its organs past floor(prune_ratio * that
        organ's sample count)."""
        cap = self.strategy == "cbdp"
        room = [self._share(c) for c in self._members.sum(0).tolist()]
        left = np.bincount(group[group >= 0]).tolist()  # kept members per group
        dropped: list[int] = []
        for i in candidates.tolist():
            if len(dropped) == quota:
                break
            organs = self._sample_organs[i] if cap else ()
            if left[group[i]] > 1 and all(room[o] > 0 for o in organs):
                for o in organs:
                    room[o] -= 1
                left[group[i]] -= 1
                dropped.append(i)
        return dropped


def _group_weights(group: np.ndarray, dropped: Sequence[int]) -> np.ndarray:
    """0 for dropped samples; a kept sample of group g (>= 0) weighs size(g) / kept(g), others 1."""
    weights = np.ones(len(group))
    weights[list(dropped)] = 0
    member = group >= 0
    if member.any():
        size = np.bincount(group[member])
        kept = np.bincount(group[member], weights=weights[member])
        scale = np.divide(size, kept, out=np.ones(len(size)), where=kept > 0)
        weights[member] *= scale[group[member]]
    return weights


def _ratio(score: np.ndarray, threshold) -> np.ndarray:
    """score / threshold, where "below the threshold" stays "below 1" for any sign and a zero threshold."""
    threshold = np.asarray(threshold, dtype=np.float64)
    below = score < threshold
    safe = np.where(threshold > 0, threshold, 1.0)
    ratio = np.where(threshold > 0, score / safe, np.where(below, 0.0, np.inf))
    return np.where(below, np.minimum(ratio, np.nextafter(1.0, 0.0)), np.maximum(ratio, 1.0))


def _index_organs(sample_organs: Iterable[Sequence[str]]) -> tuple[list[tuple[int, ...]], tuple[str, ...]]:
    """Organ indices per sample, and the sorted organ vocabulary they index. Reads the rows once (a
    ``datasets`` column is read from Arrow on every pass)."""
    if isinstance(sample_organs, str) or not isinstance(sample_organs, Iterable):
        raise TypeError(f"sample_organs must be a sequence of organ-name lists, got {type(sample_organs).__name__}")
    rows = list(sample_organs)
    for i, organs in enumerate(rows):
        if isinstance(organs, str) or not all(isinstance(name, str) for name in organs):
            raise TypeError(f"sample_organs[{i}] must be a list of organ names (str), got {organs!r}")
    vocabulary = tuple(sorted({name for organs in rows for name in organs}))
    index = {name: o for o, name in enumerate(vocabulary)}
    return [tuple(sorted({index[name] for name in organs})) for organs in rows], vocabulary


def _check_args(num_epochs, prune_ratio, anneal, seed, strategy, num_replicas, rank, score, ema, budget) -> None:
    if not isinstance(num_epochs, int) or num_epochs < 1:
        raise ValueError(f"num_epochs must be a positive int, got {num_epochs!r}")
    if not 0 <= prune_ratio < 1:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio!r}")
    if not 0 <= anneal <= 1:
        raise ValueError(f"anneal must be in [0, 1], got {anneal!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
    if not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be an int in [0, {num_replicas}), got {rank!r}")
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; valid: {', '.join(BUDGETS)}")
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; valid: {', '.join(SCORES)}")
    if not 0 <= ema < 1:
        raise ValueError(f"ema must be in [0, 1), got {ema!r}")
