"""Dataset mixing: concatenate the ``data.train`` datasets and draw from them by ``weight``.

The sampler is a pure function of ``(seed, position)``: position ``p`` of the global sample
stream belongs to block ``p // block_size`` whose draws come from a generator seeded with
``(seed, block)``. Every rank computes the same stream and takes its own micro-batches from it,
so a resumed run starts exactly where the checkpoint left off (its stream position) without
replaying data, and on any number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from mllm_ris.config import DatasetSpec
from mllm_ris.data.registry import build_dataset
from mllm_ris.data.sample import ReferringDataset
from mllm_ris.errors import ConfigError

__all__ = ["MixtureSampler", "build_mixture", "mixture_loader", "open_dataset"]


def open_dataset(spec: DatasetSpec) -> ReferringDataset:
    """Open one dataset of a mixture; a missing root is a :class:`ConfigError`."""
    if spec.root is None:
        raise ConfigError(
            f"data: dataset {spec.name!r} needs a root (set data.train.N.root / data.val.N.root)"
        )
    return build_dataset(spec.name, spec.root, spec.split, split_by=spec.split_by)


def build_mixture(specs: list[DatasetSpec]) -> tuple[ConcatDataset, torch.Tensor]:
    """Concatenate datasets; per-sample weights so dataset ``i`` is drawn with probability ∝ ``weight_i``."""
    if not specs:
        raise ConfigError("data.train: no training dataset")
    datasets = [open_dataset(s) for s in specs]
    weights = []
    for spec, ds in zip(specs, datasets, strict=True):
        if len(ds) == 0:
            raise ConfigError(f"data: dataset {spec.name!r} ({spec.root}, split {spec.split}) is empty")
        weights.append(torch.full((len(ds),), spec.weight / len(ds), dtype=torch.double))
    return ConcatDataset(datasets), torch.cat(weights)


class MixtureSampler(Sampler[int]):
    """An endless, resumable weighted sample stream, sharded by micro-batch across ranks.

    The global stream draws indices with replacement, ``P(i) ∝ weights[i]``, in blocks of
    ``block_size`` (default: one block per dataset length, i.e. an "epoch"). Global micro-batch
    ``g`` covers stream positions ``start + g * batch_size ... + batch_size - 1``; rank ``r`` of
    ``world_size`` takes micro-batches ``g = r, r + W, r + 2W, ...``. Use it with a DataLoader
    of the same ``batch_size``.

    Args:
        weights: ``(N,)`` non-negative per-sample weights.
        batch_size: micro-batch size per rank.
        seed: stream seed.
        start: global stream position to begin at (samples already consumed by all ranks).
        rank, world_size: this process and the number of processes.
        block_size: draws per seeded block (default ``N``).
    """

    def __init__(
        self,
        weights: torch.Tensor,
        *,
        batch_size: int,
        seed: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        block_size: int | None = None,
    ) -> None:
        if weights.ndim != 1 or len(weights) == 0:
            raise ValueError(f"weights must be a non-empty 1-D tensor, got shape {tuple(weights.shape)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if batch_size < 1 or start < 0:
            raise ValueError(f"batch_size must be >= 1 and start >= 0, got {batch_size}, {start}")
        self.weights = weights.double()
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.block_size = block_size or len(weights)
        self._cache: tuple[int, torch.Tensor] | None = None

    def _block(self, block: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != block:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + block)
            draws = torch.multinomial(self.weights, self.block_size, replacement=True, generator=gen)
            self._cache = (block, draws)
        return self._cache[1]

    def index_at(self, position: int) -> int:
        """Dataset index at global stream position ``position``."""
        block, offset = divmod(position, self.block_size)
        return int(self._block(block)[offset])

    def __iter__(self) -> Iterator[int]:
        g = self.rank
        while True:  # endless: the trainer decides when to stop
            first = self.start + g * self.batch_size
            for position in range(first, first + self.batch_size):
                yield self.index_at(position)
            g += self.world_size


def mixture_loader(
    dataset: Dataset,
    weights: torch.Tensor,
    collate: Callable[[list[Any]], Any],
    *,
    batch_size: int,
    seed: int,
    start: int,
    rank: int,
    world_size: int,
    num_workers: int = 0,
) -> DataLoader:
    """An endless DataLoader over this rank's share of the :class:`MixtureSampler` stream.

    The loader has its own seeded generator (worker seeds), so creating its iterator never
    draws from the global torch RNG that a resumed run restores.
    """
    sampler = MixtureSampler(
        weights, batch_size=batch_size, seed=seed, start=start, rank=rank, world_size=world_size
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed + start),
    )
