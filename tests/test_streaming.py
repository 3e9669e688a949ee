"""Splits larger than memory: streamed from real HDF5 files in blocks, in the same order as in memory."""

import numpy as np
import pytest
import torch

from stagewise.data import EpochOrder, EventBank, StreamedEventBank, event_bank
from stagewise.events import write_event_file

SIZES = [130, 70, 101]  # files of uneven length: the last block of each file is short
LABELS, DATA = ["a", "b"], ["inputs"]
EVENT_BYTES = 2 * 8 + 5 * 4
SHUFFLE = {"block_events": 16, "buffer_mb": 4 * 16 * EVENT_BYTES / 2**20}  # buffers of 4 blocks


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("streaming")
    rng = np.random.default_rng(0)
    paths = []
    for i, n in enumerate(SIZES):
        paths.append(folder / f"events_{i}.h5")
        write_event_file(paths[-1], {"a": rng.normal(size=n), "b": rng.normal(size=n)},
                         {"inputs": rng.normal(size=(n, 5))}, "observations")
    return paths


def banks(files):
    in_memory = event_bank(files, LABELS, DATA, SHUFFLE, memory_limit_mb=1.0, device="cpu")
    streamed = event_bank(files, LABELS, DATA, SHUFFLE, memory_limit_mb=1e-4, device="cpu")
    return in_memory, streamed


def take(bank):
    return lambda index, generator: bank.take(index)


def assert_same_batch(ours, theirs):
    for part, other in zip(ours, theirs, strict=True):
        assert part.keys() == other.keys()
        for key in part:
            assert torch.equal(part[key], other[key]), key


def test_the_memory_limit_decides_between_memory_and_streaming(files):
    in_memory, streamed = banks(files)
    assert type(in_memory) is EventBank and type(streamed) is StreamedEventBank
    assert len(in_memory) == len(streamed) == sum(SIZES)
    assert streamed.capacity == 4


def test_streamed_epochs_equal_in_memory_epochs_holding_at_most_two_buffers(files):
    in_memory, streamed = banks(files)
    num_blocks = len(streamed.order.blocks)
    for epoch in range(3):
        ours = streamed.epoch(32, torch.Generator().manual_seed(epoch), take(streamed))
        theirs = in_memory.epoch(32, torch.Generator().manual_seed(epoch), take(in_memory))
        reads_before, seen = streamed.reads, []
        for batch, reference in zip(ours, theirs, strict=True):
            assert_same_batch(batch, reference)
            assert len(streamed.cache) <= 2 * streamed.capacity
            seen.append(batch[0]["a"])
        assert torch.sort(torch.cat(seen)).values.equal(torch.sort(in_memory.labels["a"]).values)  # each event once
        assert streamed.reads - reads_before <= num_blocks + num_blocks // streamed.capacity + 1  # contiguous blocks


def test_buffers_shuffle_blocks_within_and_across_files(files):
    order = EpochOrder(SIZES, 16, 4)
    batches = order.batches(1000, torch.Generator().manual_seed(3))
    index = batches[0]
    assert sorted(index.tolist()) == list(range(sum(SIZES)))
    block = torch.searchsorted(order.starts, index, right=True) - 1
    first_buffer = set(block[:64].tolist())
    assert len(first_buffer) == 4  # the first 64 events come from 4 whole blocks
    assert first_buffer != {0, 1, 2, 3}
    assert not torch.equal(index[:64].sort().values, index[:64])  # and are shuffled within the buffer
    whole = EpochOrder(SIZES, 16, 100).batches(1000, torch.Generator().manual_seed(3))[0]
    assert torch.equal(whole, torch.randperm(sum(SIZES), generator=torch.Generator().manual_seed(3)))


def test_a_new_streamed_bank_resumes_an_epoch_mid_way(files):
    _, streamed = banks(files)
    generator = torch.Generator().manual_seed(11)
    epoch = streamed.epoch(20, generator, take(streamed))
    batches = iter(epoch)
    for _ in range(6):
        next(batches)
    position = epoch.position()
    rest = list(batches)
    _, fresh = banks(files)
    resumed = fresh.epoch(20, torch.Generator().manual_seed(11), take(fresh))
    resumed.resume(position)
    for batch, reference in zip(resumed, rest, strict=True):
        assert_same_batch(batch, reference)
