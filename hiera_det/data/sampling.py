"""Deterministic, resumable training: a run killed at iteration k and restarted with ``--resume``
sees the same data, augmentations and model randomness from the checkpoint on as a run that was
never stopped (exactly on the CPU; on GPUs up to their non-deterministic kernels).

Detectron2 checkpoints the model, optimizer, scheduler and iteration, but not where the data stream
was, nor any RNG state: a resumed run restarts `TrainingSampler` from its first index and its
augmentation and drop-path draws from wherever `default_setup` seeded them. Here every random draw
is a pure function of ``(seed, iteration, ...)`` instead of a stream's history:

1. `ResumableTrainingSampler` yields the global batch of iteration ``i`` as a pure function of
   ``(seed, i)``: epochs are permutations seeded by ``(seed, epoch)``, so it starts at any
   iteration by skipping ``i * total_batch_size`` indices without producing them; aspect-ratio
   grouping is done here, on the global stream (Detectron2 groups per process, after mapping).
   With repeat factors (LVIS) each epoch's stochastic rounding is seeded by ``(seed, epoch)`` as
   well, so epochs differ in length and a start position is found by adding up their lengths.
   Process ``r`` of ``W`` takes slots ``[r*B/W, (r+1)*B/W)`` of each global batch, so a run on W
   processes sees the same images per step as one process with the same total batch.
2. Each index comes with a sample seed derived from ``(seed, iteration, slot)``;
   `SeededMapDataset` loads and maps the sample under RNGs seeded with it (Python, NumPy, torch:
   Detectron2's augmentations and torchvision's draw from these), whatever process or loader
   worker runs it.
3. `DeterministicSteps` (a hook, `hiera_det.engine.hooks`) seeds the RNGs before every step from
   ``(seed, iteration, rank)`` (drop path, MAE masking, RPN/RoI sampling), points the loader at
   the trainer's start iteration, and stores the seed in the checkpoint, so that a run started
   with a random seed (``train.seed=-1``) also resumes on its own stream.

The same loader serves detection (`build_resumable_train_loader`, a drop-in for Detectron2's
`build_detection_train_loader` without its `sampler` argument) and MAE (its image folder).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import random
import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from detectron2.data.build import build_batch_data_loader
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler

from ..utils import signals

__all__ = [
    "ResumableDataLoader",
    "ResumableTrainingSampler",
    "SeededMapDataset",
    "aspect_ratio_groups",
    "build_resumable_train_loader",
    "derive_seed",
    "preserved_rngs",
    "seeded_rngs",
    "shared_seed",
    "step_seed",
]

logger = logging.getLogger(__name__)

# Domains of derived seeds, so that e.g. epoch 3 and iteration 3 never share a seed.
_EPOCH, _SAMPLE, _RETRY, _STEP = 1, 2, 3, 4


def derive_seed(*keys: int) -> int:
    """A 31-bit seed that is a pure function of `keys` (non-negative ints), well mixed
    (NumPy's `SeedSequence`), e.g. ``derive_seed(seed, iteration, slot)``."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0]) & 0x7FFFFFFF


@contextlib.contextmanager
def preserved_rngs():
    """Restore Python's, NumPy's and torch's (CPU) global RNG states on exit."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Seed Python's, NumPy's and torch's (CPU) global RNGs; restore their states on exit."""
    with preserved_rngs():
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        yield


def step_seed(seed: int, iteration: int, rank: int) -> int:
    """The seed of the model's random draws at `iteration` on process `rank`
    (`hiera_det.engine.hooks.DeterministicSteps`)."""
    return derive_seed(seed, _STEP, iteration, rank)


def shared_seed(seed: int | None) -> int:
    """`seed` if it is given and >= 0, else a random seed that all processes share."""
    return int(seed) if seed is not None and seed >= 0 else int(comm.shared_random_seed())


class ResumableTrainingSampler(Sampler):
    """Infinite ``(index, sample_seed)`` stream of this process, a pure function of
    ``(seed, iteration)``; see the module docstring.

    Args:
        size: dataset length.
        total_batch_size: images per iteration over all processes (a multiple of their number).
        seed: shared by all processes; None or < 0: a random one, shared.
        shuffle: a new permutation each epoch (else ``range(size)`` repeated).
        group_ids: per image, a group (e.g. 0 = landscape, 1 = portrait): every global batch then
            holds one group only, filled in stream order (Detectron2's aspect-ratio grouping).
        repeat_factors: per image, how often an epoch holds it (1-D, finite, >= 0, not all 0),
            e.g. `RepeatFactorTrainingSampler.repeat_factors_from_category_frequency`. As in
            Detectron2's `RepeatFactorTrainingSampler`, each epoch rounds every factor ``r`` to
            ``floor(r)`` or ``floor(r) + 1`` (the latter with probability ``r - floor(r)``), repeats
            the images that often and shuffles them; rounding and permutation are drawn from
            ``(seed, epoch)``. None: every image once per epoch.
    """

    def __init__(
        self,
        size: int,
        total_batch_size: int,
        seed: int | None = None,
        shuffle: bool = True,
        group_ids: Sequence[int] | None = None,
        repeat_factors: torch.Tensor | np.ndarray | Sequence[float] | None = None,
    ):
        world = comm.get_world_size()
        if size <= 0:
            raise ValueError(f"cannot sample from an empty dataset (size={size})")
        if total_batch_size <= 0 or total_batch_size % world:
            raise ValueError(
                f"total_batch_size={total_batch_size} must be a positive multiple of the number "
                f"of processes ({world})"
            )
        if group_ids is not None and len(group_ids) != size:
            raise ValueError(f"{len(group_ids)} group ids for {size} images")
        self.size, self.total_batch_size, self.shuffle = size, total_batch_size, shuffle
        self.group_ids = None if group_ids is None else np.asarray(group_ids)
        self.repeat_factors = self._repeat_floor = self._repeat_fraction = None
        if repeat_factors is not None:
            self.repeat_factors = _check_repeat_factors(repeat_factors, size)  # float64 tensor
            self._repeat_floor = torch.trunc(self.repeat_factors)
            self._repeat_fraction = self.repeat_factors - self._repeat_floor
        self.seed = shared_seed(seed)
        self.start_iter = 0
        self.batch_size = total_batch_size // world  # per process
        self._first_slot = comm.get_rank() * self.batch_size

    def set_position(self, seed: int, start_iter: int) -> None:
        """Produce the batches of iterations ``start_iter, start_iter + 1, ...`` of `seed`'s
        stream (call before iterating: a DataLoader copies the sampler when iteration starts)."""
        self.seed, self.start_iter = int(seed), int(start_iter)

    def _epoch(self, epoch: int) -> np.ndarray:
        if self._repeat_floor is not None:
            return self._repeated_epoch(epoch)
        if not self.shuffle:
            return np.arange(self.size)
        g = torch.Generator().manual_seed(derive_seed(self.seed, _EPOCH, epoch))
        return torch.randperm(self.size, generator=g).numpy()

    def _repeats(self, epoch: int) -> tuple[torch.Tensor, torch.Generator]:
        """Per image, how often `epoch` holds it (stochastic rounding of the repeat factors), and
        the epoch's generator, to draw the permutation from next."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, _EPOCH, epoch))
        rands = torch.rand(self.size, generator=g, dtype=self._repeat_fraction.dtype)
        return (self._repeat_floor + (rands < self._repeat_fraction)).long(), g

    def _repeated_epoch(self, epoch: int) -> np.ndarray:
        repeats, g = self._repeats(epoch)
        indices = torch.repeat_interleave(torch.arange(self.size), repeats)
        if self.shuffle:
            indices = indices[torch.randperm(len(indices), generator=g)]
        return indices.numpy()

    def _stream(self, position: int) -> Iterator[int]:
        """The concatenated epochs from `position` on."""
        if self._repeat_floor is None:
            epoch, offset = divmod(position, self.size)
        else:  # epochs differ in length: add them up (rounding only, no permutations)
            epoch, offset = 0, position
            while offset >= (length := int(self._repeats(epoch)[0].sum())):
                epoch, offset = epoch + 1, offset - length
        for e in itertools.count(epoch):
            yield from self._epoch(e)[offset:].tolist()
            offset = 0

    def global_batches(self) -> Iterator[list[int]]:
        """Index lists of the global batches of iterations ``start_iter, start_iter + 1, ...``."""
        if self.group_ids is None:
            stream = self._stream(self.start_iter * self.total_batch_size)
            while True:
                yield list(itertools.islice(stream, self.total_batch_size))
        # Grouped batches depend on the whole stream before them: replay it (cheap, no images).
        buckets: dict[int, list[int]] = {}
        iteration = 0
        for index in self._stream(0):
            bucket = buckets.setdefault(int(self.group_ids[index]), [])
            bucket.append(index)
            if len(bucket) == self.total_batch_size:
                if iteration >= self.start_iter:
                    yield list(bucket)
                bucket.clear()
                iteration += 1

    def __iter__(self) -> Iterator[tuple[int, int]]:
        slots = range(self._first_slot, self._first_slot + self.batch_size)
        for iteration, batch in enumerate(self.global_batches(), start=self.start_iter):
            for slot in slots:
                yield batch[slot], derive_seed(self.seed, _SAMPLE, iteration, slot)


class SeededMapDataset(Dataset):
    """``dataset[(index, seed)]``: ``map_func(dataset[index])`` under RNGs seeded with `seed`.

    When `map_func` returns None (e.g. `RobustDatasetMapper` skipping an unreadable image),
    another index drawn from `seed` is tried, so the replacement is reproducible too.
    """

    def __init__(self, dataset, map_func: Callable | None = None):
        self.dataset = dataset
        self.map_func = map_func

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        for attempt in itertools.count():
            with seeded_rngs(derive_seed(seed, attempt)):
                data = self.dataset[index]
                if self.map_func is not None:
                    data = self.map_func(data)
            if data is not None:
                return data
            index = derive_seed(seed, _RETRY, attempt) % len(self.dataset)
            if attempt == 2:
                logger.warning(f"3 samples in a row failed to map (the last index {index})")


def _check_repeat_factors(repeat_factors, size: int) -> torch.Tensor:
    """`repeat_factors` as a float64 CPU tensor, or a ValueError naming what is wrong."""
    if isinstance(repeat_factors, torch.Tensor):
        factors = repeat_factors.detach().cpu().to(torch.float64)
    else:
        factors = torch.as_tensor(np.asarray(repeat_factors, dtype=np.float64))
    if factors.ndim != 1:
        raise ValueError(f"repeat factors must be 1-D (one per image), not {tuple(factors.shape)}")
    if len(factors) != size:
        raise ValueError(f"{len(factors)} repeat factors for {size} images")
    bad = (~torch.isfinite(factors)).nonzero().flatten()
    if len(bad):
        raise ValueError(
            f"repeat factors must be finite: {len(bad)} are not (e.g. image {int(bad[0])}: "
            f"{float(factors[bad[0]])})"
        )
    bad = (factors < 0).nonzero().flatten()
    if len(bad):
        raise ValueError(
            f"repeat factors must be >= 0: {len(bad)} are negative (e.g. image {int(bad[0])}: "
            f"{float(factors[bad[0]])})"
        )
    if not bool((factors > 0).any()):
        raise ValueError("all repeat factors are 0: no image would ever be sampled")
    return factors


def aspect_ratio_groups(dataset_dicts: Sequence[dict]) -> list[int]:
    """0 for landscape (width > height), 1 otherwise: Detectron2's `AspectRatioGroupedDataset`."""
    return [0 if d["width"] > d["height"] else 1 for d in dataset_dicts]


class ResumableDataLoader:
    """An iterable of per-process batches (lists of mapped samples, or what `collate_fn` makes of
    them) with `set_position`.

    Built by `build_resumable_train_loader`; ``sampler`` is its `ResumableTrainingSampler`. Its
    loader workers never receive a cluster's stop signals (`hiera_det.utils.signals`), so they
    cannot be ended by SIGTERM either, as Python ends a process's daemonic children when it
    exits: `close` ends them (shutting each iterator down as PyTorch does), and is called when
    the process exits and by train_net.py when training ends.
    """

    def __init__(self, loader, sampler: ResumableTrainingSampler):
        self.loader = loader
        self.sampler = sampler
        self._iterators: weakref.WeakSet = weakref.WeakSet()
        atexit.register(_close_if_alive, weakref.ref(self))

    def set_position(self, seed: int, start_iter: int) -> None:
        self.sampler.set_position(seed, start_iter)

    def __iter__(self) -> Iterator:
        # A DataLoader iterator draws its workers' base seed from torch's global RNG when created:
        # at the first step of a run, which a resumed run does not share with the original one.
        # It forks the workers: they must never act on a cluster's stop signals.
        with preserved_rngs(), signals.blocked():
            batches = _closable(iter(self.loader))
        self._iterators.add(batches)
        return batches

    def close(self) -> None:
        """Shut down the loader workers of every iterator (iterating again starts new ones)."""
        for batches in list(self._iterators):
            batches.close()


def _closable(batches: Iterator) -> Iterator:
    """`batches` in a generator: closing it drops the DataLoader iterator, whose finalizer stops
    the workers with PyTorch's own shutdown."""
    yield from batches


def _close_if_alive(loader: weakref.ref) -> None:
    if loader() is not None:
        loader().close()


def _check_no_sampler(sampler) -> None:
    """Refuse `sampler=`: the stream must be a function of ``(seed, iteration)`` to resume, and
    another sampler's state is its own (Detectron2's keep their factors and order private)."""
    if sampler is None:
        return
    raise ValueError(
        f"build_resumable_train_loader takes no sampler= (got {type(sampler).__name__}): it "
        "samples itself, resumably. For repeat-factor sampling pass repeat_factors=... (e.g. "
        "Detectron2's RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, "
        "thresh)) or repeat_thresh=thresh; for a sampler of your own use Detectron2's "
        "build_detection_train_loader (not resumable)"
    )


def _as_dataset(dataset, aspect_ratio_grouping: bool) -> tuple[Dataset, list[int] | None]:
    """``(map-style dataset, aspect-ratio group per image or None)``."""
    if isinstance(dataset, list):
        groups = aspect_ratio_groups(dataset) if aspect_ratio_grouping else None
        return DatasetFromList(dataset, copy=False), groups
    if aspect_ratio_grouping:
        raise ValueError("aspect_ratio_grouping needs a list of dataset dicts with width/height")
    return dataset, None


def _resolve_repeat_factors(dataset, repeat_factors, repeat_thresh: float | None):
    """`repeat_factors`, or those Detectron2 computes from `dataset` at `repeat_thresh`."""
    if repeat_thresh is None:
        return repeat_factors
    if repeat_factors is not None:
        raise ValueError("pass repeat_factors or repeat_thresh, not both")
    if not isinstance(dataset, list):
        raise ValueError("repeat_thresh needs a list of dataset dicts with annotations")
    return RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
        dataset, repeat_thresh
    )


def build_resumable_train_loader(
    dataset,
    *,
    mapper: Callable | None,
    total_batch_size: int,
    aspect_ratio_grouping: bool = True,
    num_workers: int = 0,
    seed: int | None = None,
    collate_fn: Callable | None = None,
    repeat_factors: torch.Tensor | np.ndarray | Sequence[float] | None = None,
    repeat_thresh: float | None = None,
    pin_memory: bool = False,
    sampler: None = None,
) -> ResumableDataLoader:
    """Detectron2's `build_detection_train_loader` (its arguments but `sampler`, plus `seed`,
    repeat factors and `pin_memory`) made resumable and identical for any number of processes and
    loader workers; see the module docstring.

    Args:
        dataset: a list of dataset dicts (e.g. `get_detection_dataset_dicts`) or a map-style
            dataset; aspect-ratio grouping needs dicts with ``width`` and ``height``.
        mapper: applied to each item (None: the item as is); returning None takes another item.
        seed: the stream's seed (`DeterministicSteps` sets it from ``train.seed`` / the
            checkpoint before training); None: a random one, shared by all processes.
        repeat_factors: per-image repeat factors (LVIS's repeat-factor sampling, e.g.
            `RepeatFactorTrainingSampler.repeat_factors_from_category_frequency`); see
            `ResumableTrainingSampler`. Resumable like the plain stream.
        repeat_thresh: compute `repeat_factors` from `dataset` (a list of dicts) with
            `RepeatFactorTrainingSampler.repeat_factors_from_category_frequency` at this
            threshold (LVIS: 0.001), without loading the dataset a second time.
        pin_memory: torch's `DataLoader` option (faster copies to a GPU).
        sampler: refused (ValueError saying what to pass instead): the loader samples itself.
    """
    _check_no_sampler(sampler)
    repeat_factors = _resolve_repeat_factors(dataset, repeat_factors, repeat_thresh)
    dataset, groups = _as_dataset(dataset, aspect_ratio_grouping)
    sampler = ResumableTrainingSampler(
        len(dataset), total_batch_size, seed, group_ids=groups, repeat_factors=repeat_factors
    )
    if repeat_factors is not None:
        factors = sampler.repeat_factors
        logger.info(
            f"Repeat-factor sampling: {float(factors.sum()):.0f} samples per epoch of "
            f"{len(dataset)} images in expectation (factors {float(factors.min()):.2f} to "
            f"{float(factors.max()):.2f})"
        )
    loader = build_batch_data_loader(
        SeededMapDataset(dataset, mapper),
        sampler,
        total_batch_size,
        aspect_ratio_grouping=False,  # done by the sampler, on the global stream
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
    )
    return ResumableDataLoader(loader, sampler)
