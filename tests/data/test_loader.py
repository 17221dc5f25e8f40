"""Batch order with exact resume, and rank-consistent evaluation batches."""

from __future__ import annotations

import datasets
import pytest
import torch

from tide_ds.data.loader import StatefulBatchSampler, TrainBatches, collate, eval_batches


def _global_stream(num_samples: int, *, micro_batch_size: int, world_size: int, seed: int, steps: int) -> list[int]:
    """The indices of ``steps`` steps, rank 0's slice first, as the ranks read them together."""
    samplers = [
        StatefulBatchSampler(num_samples, micro_batch_size=micro_batch_size, rank=r, world_size=world_size, seed=seed)
        for r in range(world_size)
    ]
    return [i for _ in range(steps) for s in samplers for i in s.next_indices()]


def _dataset(num_samples: int, length: int = 6) -> datasets.Dataset:
    """Row ``i`` holds ``i`` in every input id and label, so batches say which rows they hold."""
    rows = {"input_ids": [[i] * length for i in range(num_samples)], "labels": [[i] * length for i in range(num_samples)]}
    return datasets.Dataset.from_dict(rows)


@pytest.mark.parametrize(("num_samples", "micro_batch_size", "world_size"), [(10, 2, 2), (7, 3, 2), (12, 4, 3), (5, 5, 1)])
def test_ranks_cover_every_index_once_per_epoch(num_samples: int, micro_batch_size: int, world_size: int) -> None:
    epochs = 4
    steps = epochs * num_samples // (micro_batch_size * world_size) + 1
    stream = _global_stream(num_samples, micro_batch_size=micro_batch_size, world_size=world_size, seed=0, steps=steps)
    # Straddling global batches drop nothing: the stream is a concatenation of whole permutations.
    for e in range(epochs):
        assert sorted(stream[e * num_samples : (e + 1) * num_samples]) == list(range(num_samples))
    assert stream[:num_samples] != stream[num_samples : 2 * num_samples]  # a new order each epoch


def test_ranks_read_disjoint_contiguous_slices() -> None:
    r0 = StatefulBatchSampler(20, micro_batch_size=3, rank=0, world_size=2, seed=5)
    r1 = StatefulBatchSampler(20, micro_batch_size=3, rank=1, world_size=2, seed=5)
    whole = StatefulBatchSampler(20, micro_batch_size=6, rank=0, world_size=1, seed=5)
    for _ in range(9):
        assert r0.next_indices() + r1.next_indices() == whole.next_indices()


def test_epoch_property_and_state() -> None:
    sampler = StatefulBatchSampler(10, micro_batch_size=2, rank=1, world_size=2, seed=3)
    assert sampler.epoch == 0
    for _ in range(3):
        sampler.next_indices()
    assert sampler.epoch == 1
    assert sampler.state_dict() == {"consumed": 12, "epoch": 1, "num_samples": 10, "seed": 3}


def test_state_dict_round_trip_continues_the_stream() -> None:
    kwargs = dict(micro_batch_size=3, rank=1, world_size=2, seed=11)
    a = StatefulBatchSampler(17, **kwargs)
    for _ in range(4):
        a.next_indices()
    state = a.state_dict()
    expected = [a.next_indices() for _ in range(10)]
    b = StatefulBatchSampler(17, **kwargs)
    b.load_state_dict(dict(state))
    assert [b.next_indices() for _ in range(10)] == expected


def test_seeds_give_different_orders() -> None:
    same = [_global_stream(50, micro_batch_size=5, world_size=2, seed=s, steps=5) for s in (1, 1, 2)]
    assert same[0] == same[1] and same[0] != same[2]


def test_too_few_samples_is_explained() -> None:
    with pytest.raises(ValueError, match=r"7 samples.*train.micro_batch_size \* world size = 4 \* 2"):
        StatefulBatchSampler(7, micro_batch_size=4, rank=0, world_size=2, seed=0)


def test_load_state_dict_rejects_other_dataset_or_seed() -> None:
    sampler = StatefulBatchSampler(10, micro_batch_size=2, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="12 samples.*now has 10"):
        sampler.load_state_dict({"consumed": 4, "epoch": 0, "num_samples": 12, "seed": 0})
    with pytest.raises(ValueError, match="--train.seed=9"):
        sampler.load_state_dict({"consumed": 4, "epoch": 0, "num_samples": 10, "seed": 9})


def test_collate_stacks_long_tensors() -> None:
    batch = collate([{"input_ids": [1, 2], "labels": [1, -100], "source": "a.py"}, {"input_ids": [3, 4], "labels": [3, 4]}])
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].dtype == torch.long and batch["labels"].tolist() == [[1, -100], [3, 4]]


@pytest.mark.parametrize("fmt", [None, "numpy", "torch"])
def test_train_batches_follow_the_sampler_and_resume(fmt: str | None) -> None:
    ds = _dataset(9).with_format(fmt)
    batches = TrainBatches(ds, micro_batch_size=2, rank=1, world_size=2, seed=4)
    sampler = StatefulBatchSampler(9, micro_batch_size=2, rank=1, world_size=2, seed=4)
    for _ in range(3):
        batch = next(batches)
        assert batch["input_ids"].shape == (2, 6) and batch["input_ids"].dtype == torch.long
        assert batch["labels"][:, 0].tolist() == sampler.next_indices()
    state = batches.state_dict()
    expected = [next(batches)["input_ids"] for _ in range(5)]
    resumed = TrainBatches(ds, micro_batch_size=2, rank=1, world_size=2, seed=4)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed)["input_ids"], x) for x in expected)


@pytest.mark.parametrize(
    ("num_samples", "micro_batch_size", "world_size", "max_samples"),
    [(11, 2, 3, None), (12, 2, 3, None), (2, 2, 3, None), (30, 4, 2, 9), (5, 1, 2, 0)],
)
def test_eval_batches_are_rank_consistent(
    num_samples: int, micro_batch_size: int, world_size: int, max_samples: int | None
) -> None:
    ds = _dataset(num_samples).with_format("numpy")
    n = num_samples if max_samples is None else min(num_samples, max_samples)
    per_rank = [
        list(eval_batches(ds, micro_batch_size=micro_batch_size, rank=r, world_size=world_size, max_samples=max_samples))
        for r in range(world_size)
    ]
    counts = {len(b) for b in per_rank}
    assert counts == {-(-n // (micro_batch_size * world_size))}
    seen = []
    for batches in per_rank:
        for batch in batches:
            assert batch["input_ids"].shape == (micro_batch_size, 6)
            for ids, labels in zip(batch["input_ids"], batch["labels"]):
                if (labels == -100).all():
                    continue  # padding row: contributes nothing
                assert (labels == ids).all()
                seen.append(int(ids[0]))
    assert sorted(seen) == list(range(n))
    again = list(eval_batches(ds, micro_batch_size=micro_batch_size, rank=0, world_size=world_size, max_samples=max_samples))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(again, per_rank[0]))


def test_eval_noise_is_per_sample_not_per_rank() -> None:
    """Held-out noise follows the sample: the same times and masks on 1 rank or 3, any micro-batch size."""
    from tide_ds.config import build_config
    from tide_ds.diffusion.schedules import get_schedule
    from tide_ds.trainer.step import add_eval_noise

    cfg = build_config()
    ds = datasets.Dataset.from_dict({
        "input_ids": [[i + 10] * 40 for i in range(7)], "labels": [[i + 10] * 40 for i in range(7)],
    }).with_format("numpy")

    def noise_by_sample(micro_batch_size: int, world_size: int) -> dict[int, tuple]:
        out = {}
        for r in range(world_size):
            for batch in eval_batches(ds, micro_batch_size=micro_batch_size, rank=r, world_size=world_size, max_samples=None):
                nb = add_eval_noise(batch, cfg=cfg, schedule=get_schedule("linear"), mask_token_id=3, device=torch.device("cpu"))
                assert (nb.x_t[~nb.masked] == nb.x_0[~nb.masked]).all() and (nb.x_t[nb.masked] == 3).all()
                for j, index in enumerate(batch["sample_index"].tolist()):
                    if index >= 0:
                        out[index] = (float(nb.t[j]), nb.masked[j].tolist())
                    else:
                        assert not nb.maskable[j].any() and not nb.masked[j].any()
        return out

    one = noise_by_sample(2, 1)
    assert sorted(one) == list(range(7))
    assert one == noise_by_sample(3, 3) == noise_by_sample(4, 2)
    assert len({t for t, _ in one.values()}) == 7  # and the samples differ from one another
