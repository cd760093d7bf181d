"""CBDP: class-balanced dynamic data pruning, as a plain ``torch.utils.data.Sampler``.

The mechanics live here: scores buffered per step and gathered from every process, one plan per epoch,
sharding, resume. What to keep is decided by the pure functions of `policy`: a keep probability per slice,
an exact-marginal draw, and weights ``1 / p`` (at most ``max_weight``), so every strategy's weighted epoch
is an unbiased estimate of the full epoch.

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

from ..prompts.behaviours import BEHAVIOURS
from .policy import (BUDGETS, MAX_WEIGHT, ORGAN_FLOOR, STRATEGIES, cbdp_probabilities, draw, fold_scores,
                     infobatch_probabilities, slice_difficulty)

# Random streams, one per purpose; seeds are always (seed, epoch, purpose), since numpy's SeedSequence
# treats a trailing zero as absent and [s, e] would collide with [s, e, 0].
_PRUNE, _ORDER = 0, 1

# The pool budget's share of the slices where the pool is unknown (random; planning ahead): the mean
# splits a symmetric loss distribution in two.
_POOL_FRACTION = 0.5

Updates = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # sample ids, organ and behaviour indices, losses
_PENDING_KEYS = ("sample_ids", "organs", "behaviours", "losses")


def gather_updates(local: Updates) -> list[Updates]:
    """Every process's pending updates, in rank order (the same list on every process).

    Collective under ``torch.distributed`` with more than one process: all processes must call it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    gathered: list[Updates | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def _empty_updates() -> Updates:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)


def _concat(parts: Sequence[Updates]) -> Updates:
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))  # type: ignore[return-value]


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
        prune_ratio: share dropped per pruned epoch, in [0, 1): of all samples or of the below-mean pool
            (see ``budget``).
        anneal: fraction of the epochs that may prune, in [0, 1].
        seed: non-negative seed; with the epoch it fixes every random choice.
        strategy: ``"none"``; ``"random"`` (every slice kept with the same probability, the budget over N);
            ``"infobatch"`` (InfoBatch: a slice whose mean latest region loss is below the mean over slices
            is dropped with probability ``prune_ratio``, one global threshold; kept ones weigh
            ``1 / (1 - prune_ratio)``); or ``"cbdp"`` (class-balanced, difficulty-weighted; see `policy`).
        num_replicas, rank: the shard to yield; default to torch.distributed's world size and rank when
            ``shard`` is on, else 1 and 0.
        shard: shard by torch.distributed when num_replicas/rank are not given. Off for a DataLoader that
            `accelerate` shards again.
        shuffle: shuffle the kept samples each epoch (else ascending order).
        ema: weight of the old score in cbdp's EMA of normalised region scores and organ losses, in [0, 1)
            (0: the latest epoch only).
        budget: expected number of kept slices in a pruned epoch. ``"dataset"`` (the paper's iteration
            budget): ``N - floor(prune_ratio * N)``; at ratio 0.5 and anneal 0.875 a run uses 56.25% of full
            training's iterations. ``"pool"``: ``N - floor(prune_ratio * pool)``, the pool being the slices
            below the mean difficulty (half of N for random). InfoBatch's budget is its pool by definition
            (``"pool"`` only).
        organ_floor: cbdp's least organ factor (organ loss over the mean organ's), in (0, 1].
        max_weight: the largest loss weight; keep probabilities are at least its inverse (> 1).

    Epoch 0 prunes only if `update` was given scores before ``set_epoch(0)`` (a warm start,
    `sam_peft.training.warm_start`); a slice none of whose regions was ever scored is always kept (weight 1).
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
        ema: float = 0.5,
        budget: str = "pool",
        organ_floor: float = ORGAN_FLOOR,
        max_weight: float = MAX_WEIGHT,
        shard: bool = True,
    ) -> None:
        distributed = shard and dist.is_available() and dist.is_initialized()
        num_replicas = num_replicas if num_replicas is not None else dist.get_world_size() if distributed else 1
        rank = rank if rank is not None else dist.get_rank() if distributed else 0
        _check_args(num_epochs, prune_ratio, anneal, seed, strategy, num_replicas, rank, ema, budget, organ_floor,
                    max_weight)
        self.num_epochs, self.prune_ratio, self.anneal, self.seed = num_epochs, prune_ratio, anneal, seed
        self.strategy, self.num_replicas, self.rank, self.shuffle = strategy, num_replicas, rank, shuffle
        self.ema, self.budget, self.organ_floor, self.max_weight = ema, budget, organ_floor, max_weight

        self._sample_organs, self.organs = _index_organs(sample_organs)
        self._organ_index = {name: o for o, name in enumerate(self.organs)}
        n, k = len(self._sample_organs), len(self.organs)
        self._members = np.zeros((n, k), dtype=bool)
        for i, organs in enumerate(self._sample_organs):
            self._members[i, list(organs)] = True
        self._scores = np.full((n, k), np.nan)  # cbdp: EMA of the loss over its (organ, behaviour) cell mean
        self._latest = np.full((n, k), np.nan)  # infobatch: the latest raw loss
        self._organ_loss = np.full(k, np.nan)  # cbdp: EMA of each organ's mean loss
        self._merged = _empty_updates()  # pending updates already gathered from every process
        self._local: list[tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]] = []  # not yet gathered
        self._pruned_per_epoch: dict[int, int] = {}
        self.epoch = 0
        self._weights = np.ones(n)
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

    def prunes(self, epoch: int) -> bool:
        """Whether `epoch` is before the anneal point of a pruning strategy."""
        return self.strategy != "none" and self.prune_ratio > 0 and epoch < self.anneal * self.num_epochs

    def planned_num_samples(self, epoch: int) -> int:
        """The number of samples the policy aims to keep in `epoch`, known before any score: N where nothing
        is pruned, else the budget (for ``"pool"``, with the pool taken as half of N: an estimate)."""
        n = self.num_samples
        if not self.prunes(epoch):
            return n
        return n - self._share(n if self.budget == "dataset" else n * _POOL_FRACTION)

    def update(self, sample_ids, organs: Sequence[str], losses, behaviours: Sequence[str] | None = None) -> None:
        """Record per-region losses: region j is organ ``organs[j]`` of sample ``sample_ids[j]``, prompted by
        behaviour ``behaviours[j]`` (a name from `BEHAVIOURS`; None: all regions in one cell per organ).

        Buffered until the next `set_epoch`. Sample ids are checked here, so pass them on the CPU; losses
        may stay on the accelerator (detached here, copied once per epoch, so a step never waits on them).
        Non-finite losses are ignored: a diverged step says nothing about what is learned.
        """
        ids = self._ids(sample_ids, "update").reshape(-1)
        losses = losses.detach() if isinstance(losses, torch.Tensor) else torch.as_tensor(losses, dtype=torch.float64)
        losses = losses.reshape(-1)
        lengths = [len(ids), len(losses)]
        for name, seq in (("organs", organs), ("behaviours", behaviours)):
            if isinstance(seq, str):
                raise ValueError(f"update: {name} must be a sequence of names, got a str")
            if seq is not None:
                lengths.append(len(seq))
        if len(set(lengths)) > 1:
            raise ValueError(f"update: sample_ids, losses, organs (and behaviours) must have equal lengths, "
                             f"got {lengths}")
        ids = ids.cpu().numpy()
        organ_idx = np.array([self._organ_of(i, name) for i, name in zip(ids.tolist(), organs)], dtype=np.int64)
        behaviour_idx = np.full(len(ids), -1, dtype=np.int64)
        if behaviours is not None:
            unknown = [b for b in behaviours if b not in BEHAVIOURS]
            if unknown:
                raise ValueError(f"update: unknown behaviour {unknown[0]!r}; valid: {', '.join(BEHAVIOURS)}")
            behaviour_idx = np.array([BEHAVIOURS.index(b) for b in behaviours], dtype=np.int64)
        self._local.append((ids, organ_idx, behaviour_idx, losses))

    def weight(self, sample_id: int) -> float:
        """Loss weight of a sample this epoch: 0 when dropped, else 1 / its keep probability (1 when kept
        for sure; at most `max_weight`)."""
        return float(self._weights[int(self._ids(sample_id, "weight"))])

    def weights(self, sample_ids) -> torch.Tensor:
        """`weight` for a batch of ids, as a float32 tensor on the ids' device (no device sync for device ids)."""
        ids = self._ids(sample_ids, "weights")
        if self._weight_table.device != ids.device:
            self._weight_table = self._weight_table.to(ids.device)
        return self._weight_table[ids]

    def keep_probabilities(self) -> np.ndarray:
        """(N,) this epoch's keep probability per sample (1 where nothing is pruned)."""
        return self._p.copy()

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
            "max_weight": float(self._weights.max(initial=0.0)),
            "kept_per_organ": dict(zip(self.organs, self._members[~pruned].sum(0).tolist())),
            "pruned_per_organ": dict(zip(self.organs, self._members[pruned].sum(0).tolist())),
            "samples_saved": saved,
            "saved_fraction": saved / planned if planned else 0.0,
        }

    def state_dict(self) -> dict:
        """Scores, epoch, pending losses and totals; random choices are re-derived from (seed, epoch).

        Collective when distributed (pending losses of every process are gathered): call it on every process,
        as ``accelerate.save_state`` does.
        """
        self._merged = self._collect()
        return {
            **self._settings(),
            "epoch": self.epoch,
            "scores": torch.from_numpy(self._scores.copy()),
            "latest": torch.from_numpy(self._latest.copy()),
            "organ_loss": torch.from_numpy(self._organ_loss.copy()),
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
        for key, shape in (("scores", self._scores.shape), ("latest", self._latest.shape),
                           ("organ_loss", self._organ_loss.shape)):
            if key not in state or tuple(state[key].shape) != shape:
                raise ValueError(f"load_state_dict: {key} missing or not of shape {shape}")
        self._scores = state["scores"].numpy().astype(np.float64)
        self._latest = state["latest"].numpy().astype(np.float64)
        self._organ_loss = state["organ_loss"].numpy().astype(np.float64)
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
                "strategy": self.strategy, "budget": self.budget, "ema": self.ema,
                "organ_floor": self.organ_floor, "max_weight": self.max_weight, "shuffle": self.shuffle}

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
            ids, organs, behaviours, losses = zip(*self._local)
            local = (np.concatenate(ids), np.concatenate(organs), np.concatenate(behaviours),
                     torch.cat([x.to("cpu", torch.float64) for x in losses]).numpy())
        self._local = []
        merged = _concat([self._merged, *gather_updates(local)])
        self._merged = _empty_updates()
        return merged

    def _apply(self, updates: Updates) -> None:
        """Fold one epoch's updates into the scores, weighted by the plan they were trained under."""
        ids, organs, behaviours, losses = updates
        finite = np.isfinite(losses)
        if not finite.any():
            return
        self._scores, self._organ_loss = fold_scores(self._scores, self._organ_loss, ids, organs, behaviours,
                                                     losses, self._weights, self.ema)
        # InfoBatch's score: the latest loss of each region (repeats averaged, in a canonical order)
        k = len(self.organs)
        keys, values = ids[finite] * k + organs[finite], losses[finite]
        order = np.lexsort((values, keys))
        unique, inverse = np.unique(keys[order], return_inverse=True)
        self._latest.reshape(-1)[unique] = np.bincount(inverse, weights=values[order]) / np.bincount(inverse)

    def _rng(self, purpose: int, epoch: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, purpose])

    def _share(self, count: float) -> int:
        """floor(prune_ratio * count), robust to float rounding (0.29 * 100 is 28.999...)."""
        return int(self.prune_ratio * count + 1e-9)

    def _probabilities(self) -> np.ndarray:
        """This epoch's keep probability per sample."""
        n = self.num_samples
        if not self.prunes(self.epoch):
            return np.ones(n)
        if self.strategy == "infobatch":
            return infobatch_probabilities(self._latest, self._members, self.prune_ratio)
        if self.strategy == "random":
            return cbdp_probabilities(np.ones(n), self.planned_num_samples(self.epoch), self.max_weight)
        difficulty = slice_difficulty(self._scores, self._organ_loss, self._members, self.organ_floor)
        scored = ~np.isnan(difficulty)
        pool = int((difficulty[scored] < difficulty[scored].mean()).sum()) if scored.any() else 0
        budget = n - self._share(n if self.budget == "dataset" else pool)
        return cbdp_probabilities(difficulty, budget, self.max_weight)

    def _plan(self) -> None:
        """Decide this epoch's kept samples, their weights and this process's shard of their order."""
        p = self._probabilities()
        kept = draw(p, self._rng(_PRUNE, self.epoch)) if (p < 1).any() else np.ones(len(p), dtype=bool)
        weights = np.where(kept, 1.0 / p, 0.0)
        order = np.flatnonzero(kept)
        if self.shuffle:
            order = self._rng(_ORDER, self.epoch).permutation(order)
        self._p = p
        self._weights = weights
        self._weight_table = torch.from_numpy(weights.astype(np.float32))
        self._order = _shard(order.tolist(), self.num_replicas, self.rank)
        self._pruned_per_epoch[self.epoch] = int((~kept).sum())


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


def _check_args(num_epochs, prune_ratio, anneal, seed, strategy, num_replicas, rank, ema, budget, organ_floor,
                max_weight) -> None:
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
    if strategy == "infobatch" and budget != "pool":
        raise ValueError(f"budget {budget!r} does not apply to infobatch, which drops prune_ratio of its below-mean "
                         "pool; use budget 'pool'")
    if not 0 <= ema < 1:
        raise ValueError(f"ema must be in [0, 1), got {ema!r}")
    if not 0 < organ_floor <= 1:
        raise ValueError(f"organ_floor must be in (0, 1], got {organ_floor!r}")
    if not max_weight > 1:
        raise ValueError(f"max_weight must be > 1, got {max_weight!r}")
