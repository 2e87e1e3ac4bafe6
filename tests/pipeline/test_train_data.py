"""A worker's train shard is streamed once and replayed, in orders a resumed run reproduces."""

from __future__ import annotations

import numpy as np
import pytest
import ray.data

from pipeline.train_data import EpochBatches

ROWS, BATCH = 30, 4  # 7 full batches per epoch; 2 rows dropped


class CountingShard:
    """A real Ray dataset as a worker's shard, counting how often it is streamed."""

    def __init__(self, dataset):
        self.dataset, self.streams = dataset, 0

    def iter_batches(self, **kwargs):
        self.streams += 1
        return self.dataset.iter_batches(**kwargs)


@pytest.fixture
def shard(ray_local):
    items = [{"key": f"k{i:02d}", "image": np.full((2, 2, 3), i, np.uint8)} for i in range(ROWS)]
    return CountingShard(ray.data.from_items(items))


def _keys(batches) -> list[list[str]]:
    return [[str(k) for k in batch["key"]] for batch in batches]


def _source(shard, cache_bytes=1 << 20) -> EpochBatches:
    return EpochBatches(shard, BATCH, shuffle_buffer=8, seed=3, prefetch_batches=1,
                        cache_bytes=cache_bytes)


def test_the_shard_is_streamed_once_and_each_epoch_is_a_fresh_permutation(shard):
    source = _source(shard)
    epochs = [_keys(source.epoch(e)) for e in range(3)]
    assert shard.streams == 1 and source.cached
    for batches in epochs:
        assert [len(b) for b in batches] == [BATCH] * (ROWS // BATCH)
        flat = [k for b in batches for k in b]
        assert len(set(flat)) == len(flat)  # no row twice in an epoch
    assert epochs[1] != epochs[2] and epochs[0] != epochs[1]
    # Replayed rows carry their columns along: the image of k07 is filled with 7.
    batch = next(source.epoch(4))
    for key, image in zip(batch["key"], batch["image"], strict=True):
        assert (image == int(str(key)[1:])).all()


def test_a_resumed_run_sees_what_an_uninterrupted_one_does(shard):
    straight = _source(shard)
    expected = [_keys(straight.epoch(e)) for e in range(3)]
    resumed = _source(shard)  # a fresh worker after a restart, checkpointed in epoch 2
    assert _keys(resumed.epoch(2)) == expected[2]
    mid_epoch0 = _source(shard)  # restarted in epoch 0: skips what was consumed, keeps it
    batches = mid_epoch0.epoch(0)
    for _ in range(3):
        next(batches)
    assert _keys(batches) == expected[0][3:]
    assert _keys(mid_epoch0.epoch(1)) == expected[1]


@pytest.mark.parametrize("cache_bytes", [0, 100])  # never, and a shard over the limit
def test_without_room_every_epoch_streams(shard, cache_bytes):
    source = _source(shard, cache_bytes)
    first, second = _keys(source.epoch(0)), _keys(source.epoch(1))
    assert shard.streams == 2 and not source.cached
    assert [len(b) for b in second] == [BATCH] * (ROWS // BATCH)
    assert first == _keys(_source(shard, 0).epoch(0))  # the stream's order either way
