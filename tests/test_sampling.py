"""The resumable data stream (hiera_det.data.sampling): the sampler and loader start at any
iteration of the same stream, with or without repeat factors and aspect-ratio groups, on any
number of processes and loader workers. End-to-end kill/resume runs: test_train_net.py."""

from __future__ import annotations

import itertools
from unittest import mock

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler

from hiera_det.data.sampling import (
    ResumableTrainingSampler,
    SeededMapDataset,
    build_resumable_train_loader,
    derive_seed,
)


def _take(iterable, n):
    return list(itertools.islice(iterable, n))


@pytest.mark.parametrize("grouped", [False, True])
def test_sampler_starts_anywhere_in_the_same_stream(grouped):
    groups = [i % 3 == 0 for i in range(10)] if grouped else None
    full = ResumableTrainingSampler(10, 4, seed=7, group_ids=groups)
    stream = _take(full, 4 * 9)  # 9 iterations: several epochs of 10 images
    for start in (1, 2, 5, 8):
        resumed = ResumableTrainingSampler(10, 4, seed=0, group_ids=groups)
        resumed.set_position(7, start)
        assert _take(resumed, 4 * (9 - start)) == stream[4 * start :]
    indices = [i for i, _ in stream]
    assert sorted(indices[:8]) != sorted(range(8))  # shuffled
    if grouped:
        for b in range(9):
            assert len({groups[i] for i in indices[4 * b : 4 * b + 4]}) == 1
    else:
        assert sorted(indices[:10]) == list(range(10))  # the first epoch is a permutation
    assert len({s for _, s in stream}) == len(stream)  # a distinct seed per sample
    other = ResumableTrainingSampler(10, 4, seed=8, group_ids=groups)
    assert _take(other, 8) != stream[:8]


def test_sampler_without_repeat_factors_is_unchanged():
    """The plain stream's draws are those before repeat factors existed: hard-coded, and an epoch
    is ``torch.randperm`` seeded by ``(seed, epoch)``."""
    plain = _take(ResumableTrainingSampler(10, 4, seed=7), 12)
    assert [i for i, _ in plain] == [7, 3, 2, 6, 5, 9, 1, 4, 8, 0, 8, 6]
    assert [s for _, s in plain[:4]] == [1009178997, 929790713, 641981542, 1947347544]
    groups = [i % 3 == 0 for i in range(10)]
    grouped = _take(ResumableTrainingSampler(10, 4, seed=7, group_ids=groups), 12)
    assert [i for i, _ in grouped] == [7, 2, 5, 1, 3, 6, 9, 0, 4, 8, 8, 4]
    resumed = ResumableTrainingSampler(10, 4, seed=0)
    resumed.set_position(7, 5)
    assert [i for i, _ in _take(resumed, 8)] == [7, 0, 6, 4, 5, 8, 9, 2]
    replay = [
        i
        for epoch in range(5)
        for i in torch.randperm(
            10, generator=torch.Generator().manual_seed(derive_seed(7, 1, epoch))
        ).tolist()
    ]
    assert [i for i, _ in _take(ResumableTrainingSampler(10, 4, seed=7), 48)] == replay[:48]


FACTORS = [0.3, 1.0, 2.5, 0.5, 1.7, 1.0, 0.0, 3.2, 0.0, 0.8]


@pytest.mark.parametrize("grouped", [False, True])
def test_repeat_factor_sampler_starts_anywhere_in_the_same_stream(grouped):
    groups = [i % 3 == 0 for i in range(10)] if grouped else None
    full = ResumableTrainingSampler(10, 4, seed=7, group_ids=groups, repeat_factors=FACTORS)
    iters = 14
    stream = _take(full, 4 * iters)
    starts = (1, 2, 3, 5, 7, 10, 13)
    for start in starts:
        resumed = ResumableTrainingSampler(10, 4, seed=0, group_ids=groups, repeat_factors=FACTORS)
        resumed.set_position(7, start)
        assert _take(resumed, 4 * (iters - start)) == stream[4 * start :]
    # Epochs differ in length, and some starts lie inside a later epoch: _stream found them by
    # adding up the lengths.
    lengths = [len(full._epoch(e)) for e in range(20)]
    assert len(set(lengths)) > 1
    ends = np.cumsum(lengths)
    if not grouped:
        inside = [k for k in starts if 4 * k not in ends and 4 * k > ends[0]]
        assert len(inside) >= 3
        flat = [i for e in range(20) for i in full._epoch(e).tolist()]
        assert [i for i, _ in stream] == flat[: 4 * iters]
    indices = [i for i, _ in stream]
    assert not {6, 8} & set(indices)
    if grouped:
        for b in range(iters):
            assert len({groups[i] for i in indices[4 * b : 4 * b + 4]}) == 1
    assert len({s for _, s in stream}) == len(stream)  # a distinct seed per sample
    other = ResumableTrainingSampler(10, 4, seed=8, group_ids=groups, repeat_factors=FACTORS)
    assert _take(other, 4 * iters) != stream


def test_repeat_factors_round_stochastically_per_epoch():
    """Per epoch an image with factor r appears floor(r) or floor(r) + 1 times, and over E epochs
    about ``E * r`` times: within 5 binomial standard deviations (a 1 in a million miss), where
    rounding down, up or with the fraction's complement would be 20 or more off."""
    factors = np.array([0.25, 1.0, 2.75, 0.5, 2.5, 1.0, 0.0])
    sampler = ResumableTrainingSampler(7, 2, seed=11, repeat_factors=torch.tensor(factors))
    epochs = 2000
    counts = np.stack([np.bincount(sampler._epoch(e), minlength=7) for e in range(epochs)])
    floor = np.floor(factors).astype(np.int64)
    assert ((counts == floor) | (counts == floor + 1)).all()
    assert (counts[:, 6] == 0).all() and (counts[:, [1, 5]] == 1).all()
    frac = factors - floor
    spread = 5 * np.sqrt(epochs * frac * (1 - frac))  # <= 112 draws; 0.25 -> 500 expected
    assert (np.abs(counts.sum(0) - epochs * factors) <= spread).all(), counts.sum(0)
    # The images round independently (not one draw per epoch for all of them).
    assert (counts[:, 3] != counts[:, 4] - 2).any()
    assert len({int(n) for n in counts.sum(1)}) > 1  # epochs differ in length
    # The stream is the concatenated epochs.
    total = int(counts[:50].sum())
    assert [i for i, _ in _take(sampler, total)] == [
        i for e in range(50) for i in sampler._epoch(e).tolist()
    ]


@pytest.mark.parametrize(
    "factors, message",
    [
        ([1.0] * 9, "9 repeat factors for 10 images"),
        ([[1.0] * 10], r"must be 1-D .*\(1, 10\)"),
        ([1.0] * 9 + [float("nan")], "must be finite: 1 are not .*image 9: nan"),
        ([float("inf")] + [1.0] * 9, "must be finite: 1 are not .*image 0: inf"),
        ([1.0, -0.5] + [1.0] * 8, "must be >= 0: 1 are negative .*image 1: -0.5"),
        ([0.0] * 10, "all repeat factors are 0"),
    ],
)
def test_sampler_rejects_bad_repeat_factors(factors, message):
    with pytest.raises(ValueError, match=message):
        ResumableTrainingSampler(10, 2, seed=0, repeat_factors=factors)


def test_loader_takes_repeat_factors_and_resumes_and_refuses_a_sampler():
    """Repeat factors come in as `repeat_factors=` (or `repeat_thresh=`) and resume; a `sampler=`
    of any kind is refused, saying what to pass instead."""
    dicts = [{"value": v, "width": 8 + v % 2, "height": 8} for v in range(10)]
    factors = torch.tensor(FACTORS)
    loader = build_resumable_train_loader(
        dicts, mapper=_augmented, total_batch_size=3, seed=5, repeat_factors=factors
    )
    assert hasattr(loader, "set_position")
    expected = _take(loader, 6)
    direct = build_resumable_train_loader(
        dicts, mapper=_augmented, total_batch_size=3, seed=1, repeat_factors=factors
    )
    direct.set_position(5, 2)
    assert _take(direct, 4) == expected[2:]
    values = [d["value"] for batch in expected for d in batch]
    assert not {6, 8} & set(values)
    for sampler in (RepeatFactorTrainingSampler(factors, seed=0), TrainingSampler(10, seed=0)):
        with pytest.raises(ValueError, match=r"no sampler=.*repeat_factors=.*repeat_thresh=") as e:
            build_resumable_train_loader(
                dicts, mapper=_augmented, total_batch_size=3, sampler=sampler
            )
        assert type(sampler).__name__ in str(e.value)
        assert "build_detection_train_loader" in str(e.value)


@pytest.mark.parametrize("factors", [None, FACTORS[:9] + [1.0, 2.0, 0.4, 1.5]])
def test_sampler_shards_global_batches_over_processes(factors):
    single = _take(ResumableTrainingSampler(13, 6, seed=3, repeat_factors=factors), 6 * 5)
    shards = []
    for rank in range(3):
        with (
            mock.patch("detectron2.utils.comm.get_world_size", return_value=3),
            mock.patch("detectron2.utils.comm.get_rank", return_value=rank),
        ):
            sampler = ResumableTrainingSampler(13, 6, seed=3, repeat_factors=factors)
            shards.append(_take(sampler, 2 * 5))
    merged = [shards[r][2 * b + j] for b in range(5) for r in range(3) for j in range(2)]
    assert merged == single  # same images and sample seeds per step: any world size


def test_sampler_rejects_a_batch_that_does_not_split():
    with (
        mock.patch("detectron2.utils.comm.get_world_size", return_value=4),
        pytest.raises(ValueError, match="multiple of the number of processes"),
    ):
        ResumableTrainingSampler(10, 6, seed=0)


def _augmented(d):
    """A mapper using NumPy's and torch's global RNGs, as Detectron2's augmentations do."""
    image = np.full((8, 8, 3), d["value"], np.uint8)
    transform = T.RandomFlip(prob=0.5).get_transform(image)
    return {"value": d["value"], "flip": type(transform).__name__, "noise": float(torch.rand(1))}


def _skip_odd(d):
    return None if d["value"] % 2 else _augmented(d)


def test_seeded_map_dataset_is_a_function_of_the_seed():
    dicts = [{"value": v, "width": 8, "height": 8} for v in range(6)]
    ds = SeededMapDataset(dicts, _augmented)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    a = [ds[(i, 100 + i)] for i in range(6)]
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left alone
    assert [ds[(i, 100 + i)] for i in reversed(range(6))] == list(reversed(a))
    assert ds[(0, 1)] != ds[(0, 2)] or ds[(0, 1)] != ds[(0, 3)]
    skipping = SeededMapDataset(dicts, _skip_odd)
    replaced = [skipping[(1, s)]["value"] for s in range(20)]
    assert all(v % 2 == 0 for v in replaced) and len(set(replaced)) > 1
    assert replaced == [skipping[(1, s)]["value"] for s in range(20)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_batches_do_not_depend_on_workers_or_restarts(num_workers):
    dicts = [{"value": v, "width": 8 + v % 2, "height": 8} for v in range(11)]
    reference = build_resumable_train_loader(
        dicts, mapper=_augmented, total_batch_size=3, num_workers=0, seed=5
    )
    expected = _take(reference, 6)
    loader = build_resumable_train_loader(
        dicts, mapper=_augmented, total_batch_size=3, num_workers=num_workers, seed=1
    )
    loader.set_position(5, 2)
    assert _take(loader, 4) == expected[2:]
    assert all(len({d["value"] % 2 for d in batch}) == 1 for batch in expected)  # grouped


def test_loader_computes_repeat_factors_from_its_dicts():
    """`repeat_thresh` (the LVIS configs) gives the factors Detectron2 computes from the dicts."""
    # Category 0 in every image, category 1 in one of 8: at threshold 0.5 that image repeats 2x.
    dicts = [
        {"value": v, "width": 8, "height": 8, "annotations": [{"category_id": 0}]} for v in range(8)
    ]
    dicts[3]["annotations"].append({"category_id": 1})
    loader = build_resumable_train_loader(
        dicts, mapper=lambda d: d["value"], total_batch_size=4, seed=2, repeat_thresh=0.5
    )
    expected = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, 0.5)
    assert expected.tolist() == [1, 1, 1, 2, 1, 1, 1, 1]
    sampler = loader.sampler
    assert torch.equal(sampler.repeat_factors, expected)
    values = [v for batch in _take(loader, 9) for v in batch]  # exactly 4 epochs of 9 samples
    assert values.count(3) == 8 and all(values.count(v) == 4 for v in set(values) - {3})
    with pytest.raises(ValueError, match="not both"):
        build_resumable_train_loader(
            dicts, mapper=None, total_batch_size=4, repeat_thresh=0.5, repeat_factors=expected
        )
