"""Batches drawn from tensors that already live on the training device.

A DataLoader over an in-memory data set pays, every step, for Python indexing of single examples,
collation, and a host-to-device copy. MNIST is 47 MB as uint8, so the whole set fits on any GPU:
``DeviceBatches`` holds it there and cuts a batch with one index operation, so a step launches no
worker processes and copies nothing from the host.

Under DDP each rank iterates its own shard of one shared permutation, as DistributedSampler does:
the permutation is drawn from ``seed + epoch`` (the same on every rank, different every epoch),
rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W, ...``, and every rank yields the same number
of batches (training drops the remainder; evaluation repeats the first examples to fill the last
shard, as DistributedSampler pads).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

BatchTransform = Callable[[Sequence[Tensor]], tuple[Tensor, ...]]


def check_batching(tensors: Sequence[Tensor], batch_size: int, rank: int, world_size: int) -> None:
    """The arguments every batch iterable of the data modules shares: tensors of one length, a
    positive batch size, a rank among world_size processes."""
    if not tensors or any(len(tensor) != len(tensors[0]) for tensor in tensors):
        raise ValueError("tensors must be a non-empty sequence of tensors of the same length")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")


class DeviceBatches:
    """An iterable of batches cut from ``tensors`` (all of the same length, on one device).

    Args:
        tensors: the data set, e.g. (images, labels); moved to ``device``.
        batch_size: examples per batch (per rank).
        shuffle: draw a new permutation every epoch (training) or keep the order (evaluation).
        drop_last: drop the last incomplete batch (training) or yield it (evaluation).
        seed: the permutation of epoch ``e`` is drawn from ``seed + e``.
        rank / world_size: which shard this process iterates, of how many.
        device: where the tensors live and the batches are made.
        transform: maps the indexed tensors to the batch (e.g. uint8 images to float in [0, 1]).
        epoch: returns the current epoch when an iteration starts (the Trainer's
            ``current_epoch``); without it, the epoch counts the iterations started so far.
        progress: returns the batches processed in the current epoch (``loaders.fit_progress``):
            saved in checkpoints (``state_dict``), so that a fit resumed mid-epoch continues with
            the batches it had not reached.
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        transform: BatchTransform | None = None,
        epoch: Callable[[], int] | None = None,
        progress: Callable[[], int] | None = None,
    ) -> None:
        check_batching(tensors, batch_size, rank, world_size)
        if drop_last and len(tensors[0]) // world_size < batch_size:
            raise ValueError(
                f"{len(tensors[0])} examples over {world_size} ranks give less than one batch of "
                f"{batch_size} per rank; lower batch_size"
            )
        self.device = torch.device(device)
        self.tensors = tuple(tensor.to(self.device) for tensor in tensors)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.transform = transform
        self.epoch = epoch
        self.progress = progress
        self._iterations_started = 0
        self._current_epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches of it already processed)

    @property
    def num_examples(self) -> int:
        return len(self.tensors[0])

    @property
    def shard_size(self) -> int:
        """Examples per rank: the floor when dropping the remainder, else the ceiling (padded)."""
        divide = math.floor if self.drop_last else math.ceil
        return divide(self.num_examples / self.world_size)

    def __len__(self) -> int:
        divide = math.floor if self.drop_last else math.ceil
        return divide(self.shard_size / self.batch_size)

    def shard_indices(self, epoch: int) -> Tensor:
        """The indices this rank iterates in ``epoch``, in order, on the device."""
        n, total = self.num_examples, self.shard_size * self.world_size
        if self.shuffle:
            # Drawn on the CPU with a seeded generator, so every rank (whatever its device) gets
            # the same permutation; it is n int64s once per epoch, not a per-step copy.
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        if total > n:  # evaluation: repeat the first examples so every rank has a full shard
            order = torch.cat([order, order[: total - n]])
        return order[:total][self.rank :: self.world_size].to(self.device)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        epoch = self.epoch() if self.epoch is not None else self._iterations_started
        self._iterations_started += 1
        self._current_epoch = epoch
        indices = self.shard_indices(epoch)
        resume, self._resume = self._resume, None
        first = resume[1] if resume is not None and resume[0] == epoch else 0
        for start in range(first * self.batch_size, len(self) * self.batch_size, self.batch_size):
            batch_indices = indices[start : start + self.batch_size]
            batch = tuple(tensor[batch_indices] for tensor in self.tensors)
            yield self.transform(batch) if self.transform is not None else batch


    def state_dict(self) -> dict[str, int]:
        done = self.progress() if self.progress is not None else 0
        return {"epoch": self._current_epoch, "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches_done"]))


def trainer_placement(datamodule) -> tuple[torch.device, int, int, Callable[[], int] | None]:
    """(device, rank, world size, epoch source) of the Trainer a data module is attached to; the
    CPU, rank 0 of 1 and no epoch source when it has none (a data module used on its own)."""
    trainer = getattr(datamodule, "trainer", None)
    if trainer is None:
        return torch.device("cpu"), 0, 1, None
    return (trainer.strategy.root_device, trainer.global_rank, trainer.world_size,
            lambda: trainer.current_epoch)
