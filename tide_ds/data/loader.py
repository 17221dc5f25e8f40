"""Training and evaluation batches from a pre-tokenized dataset, with exact resume (docs/design.md decision 9).

The training order is one endless stream: the concatenation of per-epoch permutations of the sample
indices, each seeded from ``(seed, epoch)``. Step ``s`` takes the next ``micro_batch_size *
world_size`` indices of the stream and rank ``r`` its ``r``-th contiguous slice, so no sample is
dropped at an epoch end (a global batch may straddle two epochs) and the position in the stream,
one integer, is the whole data state of a checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tide_ds.diffusion.masking import IGNORE_INDEX

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed fixed by ``(seed, epoch)``."""
    digest = hashlib.sha256(f"tide_ds-data:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class StatefulBatchSampler:
    """Indices of one rank's micro-batches, resumable from :meth:`state_dict`.

    Memory: one permutation of ``num_samples`` indices (the epoch being read).
    """

    def __init__(self, num_samples: int, *, micro_batch_size: int, rank: int, world_size: int, seed: int) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"train.micro_batch_size={micro_batch_size} must be a positive integer")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the world of size {world_size}")
        if num_samples < micro_batch_size * world_size:
            raise ValueError(
                f"the training split has {num_samples} samples, fewer than one global micro-batch of "
                f"train.micro_batch_size * world size = {micro_batch_size} * {world_size}; lower "
                "train.micro_batch_size, use fewer ranks or a larger dataset"
            )
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self._consumed = 0  # indices of the global stream taken by all ranks together
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def epoch(self) -> int:
        """Epoch of the next index to be read (0-based)."""
        return self._consumed // self.num_samples

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._perm = torch.randperm(self.num_samples, generator=gen).numpy()
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def next_indices(self) -> list[int]:
        """This rank's ``micro_batch_size`` sample indices of the next step; advances the stream."""
        first = self._consumed + self.rank * self.micro_batch_size
        indices = []
        for pos in range(first, first + self.micro_batch_size):  # spans at most two epochs
            epoch, offset = divmod(pos, self.num_samples)
            indices.append(int(self._permutation(epoch)[offset]))
        self._consumed += self.micro_batch_size * self.world_size
        return indices

    def state_dict(self) -> dict[str, int]:
        """The stream position (``consumed`` global indices) and what the stream depends on."""
        return {"consumed": self._consumed, "epoch": self.epoch, "num_samples": self.num_samples, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream at ``state["consumed"]``; the dataset size and seed must be unchanged.

        The position is global, so it stays valid when ``micro_batch_size * world_size`` keeps its value;
        other changes continue the same stream from the same position, with different step boundaries.
        """
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise ValueError(
                f"the checkpoint's data position is for a training split of {state['num_samples']} samples, but the "
                f"split now has {self.num_samples}; resume with the dataset the run started with (data.dataset)"
            )
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"the checkpoint's data order was drawn with train.seed={state['seed']}, but train.seed={self.seed} "
                f"now; resume with --train.seed={state['seed']}"
            )
        self._consumed = int(state["consumed"])


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack every integer array column of ``samples`` into int64 tensors ``[B, ...]``.

    The columns are those the dataset's format selects (``input_ids`` and ``labels`` always; the
    teacher ids, attention mask and chunk ids of pipeline A; ...); string columns such as ``source``
    are dropped. All samples of a column have one fixed length (the preprocessing pads them).
    """
    out = {}
    for key, value in samples[0].items():
        first = np.asarray(value)
        if first.dtype.kind not in "iub":
            continue
        out[key] = torch.as_tensor(np.stack([np.asarray(s[key]) for s in samples]), dtype=torch.long)
    return out


class TrainBatches:
    """Endless iterator of this rank's training micro-batches ``{"input_ids", "labels"}: [B, L]`` int64.

    ``dataset`` is a pre-tokenized ``datasets.Dataset`` (any format); nothing is tokenized here.
    """

    def __init__(self, dataset: datasets.Dataset, *, micro_batch_size: int, rank: int, world_size: int, seed: int) -> None:
        self.dataset = dataset
        self.sampler = StatefulBatchSampler(
            len(dataset), micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, seed=seed
        )

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return collate([self.dataset[i] for i in self.sampler.next_indices()])

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def eval_batches(
    dataset: datasets.Dataset, *, micro_batch_size: int, rank: int, world_size: int, max_samples: int | None
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's evaluation micro-batches over the first ``max_samples`` samples (all if None).

    Rank ``r`` reads samples ``r, r + world_size, ...`` in order; ``batch["sample_index"]`` names each row's
    sample (-1 for padding rows). Every rank yields the same number
    of full batches, ``ceil(n / (micro_batch_size * world_size))``, because evaluation all-reduces
    once per batch: the missing rows repeat a real sample with every label set to -100, so they
    add nothing to any loss or count.
    """
    if micro_batch_size < 1:
        raise ValueError(f"train.micro_batch_size={micro_batch_size} must be a positive integer")
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    if n == 0:
        return
    mine = list(range(rank, n, world_size))
    num_batches = -(-n // (micro_batch_size * world_size))
    filler = mine[0] if mine else 0
    for b in range(num_batches):
        rows = mine[b * micro_batch_size : (b + 1) * micro_batch_size]
        batch = collate([dataset[i] for i in rows + [filler] * (micro_batch_size - len(rows))])
        batch["labels"][len(rows) :] = IGNORE_INDEX
        # Which sample each row is (-1: padding): evaluation seeds its noise per sample, not per rank.
        batch["sample_index"] = torch.tensor(rows + [-1] * (micro_batch_size - len(rows)), dtype=torch.long)
        yield batch
