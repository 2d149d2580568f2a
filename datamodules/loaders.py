"""Loaders whose behaviour does not depend on how a run was started or stopped.

- ``ResumableLoader``: the training DataLoader. Its order is a function of (seed, epoch, rank), and
  its position in the epoch is saved in checkpoints through Lightning's hook for stateful loaders
  (a loader with ``state_dict``/``load_state_dict`` is saved by the fit loop and restored when a
  fit resumes mid-epoch), so a resumed fit sees exactly the batches the interrupted one had not
  reached, in the same order.
- ``PredictBatches``: the predict set in batches of consecutive examples tagged with their global
  indices, dealt to the ranks whole, so that a batch holds the same examples (and, seeded by its
  first index, draws the same samples) whatever the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.device import BatchTransform, check_batching


def fit_progress(datamodule) -> Callable[[], int] | None:
    """The number of training batches the attached Trainer has processed in the current epoch
    (None without a Trainer). It is read when a checkpoint is saved: after the last processed
    batch, not after the batch the loop has already fetched ahead."""
    trainer = getattr(datamodule, "trainer", None)
    if trainer is None:
        return None
    return lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed


class EpochSampler(DistributedSampler):
    """torch's DistributedSampler (the permutation of epoch e drawn from ``seed + e``, rank r of W
    taking positions r, r + W, ...), able to start an epoch part-way. Being a DistributedSampler,
    Lightning keeps it under DDP (instead of injecting its own) and calls ``set_epoch`` on it."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int,
                 drop_last: bool) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._resume: tuple[int, int] | None = None  # (epoch, examples of it already seen)

    def resume_at(self, epoch: int, examples_seen: int) -> None:
        self._resume = (epoch, examples_seen)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        resume, self._resume = self._resume, None
        if resume is not None and resume[0] == self.epoch:
            indices = indices[resume[1]:]
        return iter(indices)


class ResumableLoader(DataLoader):
    """A shuffling training DataLoader (drop_last) over ``EpochSampler`` whose position is part of
    the checkpoint. Its own generator seeds the iterator, so starting an epoch draws nothing from
    the global RNG (which the model's noise comes from, and which checkpoints restore).

    Args:
        dataset: the training set.
        batch_size: examples per batch (per rank).
        seed: the permutation of epoch e is drawn from ``seed + e``.
        rank / num_replicas: which shard this process iterates, of how many.
        progress: returns the batches processed in the current epoch (``fit_progress``).
        num_workers, persistent_workers: as DataLoader's.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, rank: int = 0,
                 num_replicas: int = 1, progress: Callable[[], int] | None = None,
                 num_workers: int = 0, persistent_workers: bool = False) -> None:
        if len(dataset) // num_replicas < batch_size:
            raise ValueError(
                f"{len(dataset)} training examples over {num_replicas} process(es) give less than "
                f"one batch of {batch_size}; lower batch_size or train on more examples"
            )
        self.seed, self.rank, self.num_replicas, self.progress = seed, rank, num_replicas, progress
        sampler = EpochSampler(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                         num_workers=num_workers, persistent_workers=persistent_workers,
                         generator=torch.Generator().manual_seed(seed))

    def state_dict(self) -> dict[str, int]:
        done = self.progress() if self.progress is not None else 0
        return {"epoch": self.sampler.epoch, "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume_at(int(state["epoch"]), int(state["batches_done"]) * self.batch_size)


class PredictBatches:
    """The predict set cut into batches of ``batch_size`` consecutive examples, each yielded as
    ``(*transform(tensors[start:end]), index)`` with ``index`` the examples' global indices
    ``start .. end - 1``. Rank r of W takes batches r, r + W, r + 2W, ...; a rank left without a
    batch yields one empty batch, so that every rank takes part in gathering the predictions.

    Args:
        tensors: the predict set (e.g. images and labels), all of the same length.
        batch_size: examples per batch.
        rank / world_size: which batches this process takes, of how many.
        transform: maps the sliced tensors to the batch (e.g. uint8 images to float in [0, 1]).
    """

    def __init__(self, tensors: Sequence[Tensor], batch_size: int, rank: int = 0, world_size: int = 1,
                 transform: BatchTransform | None = None) -> None:
        check_batching(tensors, batch_size, rank, world_size)
        self.tensors = tuple(tensors)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.transform = transform

    @property
    def num_examples(self) -> int:
        return len(self.tensors[0])

    def batch_starts(self) -> range:
        return range(self.rank * self.batch_size, self.num_examples, self.world_size * self.batch_size)

    def __len__(self) -> int:
        return max(len(self.batch_starts()), 1)

    def _batch(self, start: int, end: int) -> tuple[Tensor, ...]:
        parts = tuple(tensor[start:end] for tensor in self.tensors)
        parts = self.transform(parts) if self.transform is not None else parts
        return (*parts, torch.arange(start, end))

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        starts = self.batch_starts()
        if len(starts) == 0:
            yield self._batch(0, 0)
            return
        for start in starts:
            yield self._batch(start, min(start + self.batch_size, self.num_examples))
