"""The one endless loader of both training stages: shuffled batches of this rank's share, forever, reseeded each
epoch, resuming in the epoch that the start step falls in."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from monai.data import DataLoader

from engine.runtime.distributed import DistInfo, ShardSampler


def endless_batches(dataset, batch_size: int, seed: int, start_step: int, info: DistInfo, *, drop_last: bool,
                    workers: int = 0) -> Iterator:
    """Each epoch a fresh permutation dealt out rank by rank (every item once per epoch over all ranks)."""
    sampler = ShardSampler(len(dataset), info.rank, info.world_size, seed=seed)
    generator = torch.Generator().manual_seed(seed + info.rank)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers,
                        generator=generator, persistent_workers=workers > 0)
    return cycle(loader, seed, start_epoch=start_step // max(1, len(loader)))


def cycle(loader: Iterable, seed: int, start_epoch: int = 0) -> Iterator:
    """Endless batches; each epoch reseeds MONAI's random transforms and the shuffling (reproducible runs)."""
    epoch = start_epoch
    while True:
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        generator = getattr(loader, "generator", None)
        if generator is not None:
            generator.manual_seed(seed + epoch)
        yield from loader
        epoch += 1
