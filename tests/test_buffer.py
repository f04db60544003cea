"""training/buffer.py: every row read once, refill at half, seeded order, exact state round trip, end of data.

The harvest is a counter: row r holds the value r at every position (and -r at a second hook), so every
check can see which rows were read in which order.
"""

from __future__ import annotations

import torch

from training.buffer import ActivationBuffer


class Counter:
    """A harvest of `chunk` rows per call, numbered from 0, at two hooks of widths 3 and 2; `limit` rows in all."""

    def __init__(self, chunk: int = 7, limit: int | None = None):
        self.next, self.chunk, self.limit, self.calls = 0, chunk, limit, 0

    def __call__(self):
        m = self.chunk if self.limit is None else min(self.chunk, self.limit - self.next)
        if m <= 0:
            return None
        self.calls += 1
        ids = torch.arange(self.next, self.next + m, dtype=torch.float32)
        self.next += m
        return [ids[:, None].repeat(1, 3), -ids[:, None].repeat(1, 2)]


def _ids(batch):
    return batch[0][:, 0].long().tolist()


def test_rows_are_read_once_and_hooks_stay_aligned():
    buf = ActivationBuffer(Counter(), [3, 2], capacity=40, seed=0)
    seen = []
    for _ in range(30):
        batch = buf.next_batch(8)
        assert torch.equal(batch[0][:, :2], -batch[1])  # row i is the same token at both hooks
        seen += _ids(batch)
    assert len(seen) == len(set(seen)) == 240
    assert max(seen) < 240 + 40  # nothing read is far ahead of what was harvested


def test_refill_happens_when_half_is_used():
    harvest = Counter(chunk=5)
    buf = ActivationBuffer(harvest, [3, 2], capacity=40, seed=0)
    buf.next_batch(8)
    assert buf.refills == 1
    assert harvest.next == 40                          # initial fill only
    buf.next_batch(8)
    buf.next_batch(4)                                    # 20 rows read = half
    assert buf.refills == 1
    buf.next_batch(8)                                    # the next read refills the 20 read rows first
    assert buf.refills == 2
    assert harvest.next == 60
    assert buf.pos == 8
    assert buf.unread == 32


def test_batches_mix_across_contexts():
    """A batch is not a run of consecutive rows: the permutation spreads it over the buffer."""
    batch = _ids(ActivationBuffer(Counter(), [3, 2], capacity=64, seed=0).next_batch(16))
    assert sorted(batch) != list(range(min(batch), min(batch) + 16))


def test_seed_decides_the_order():
    def read(seed):
        buf = ActivationBuffer(Counter(), [3, 2], capacity=40, seed=seed)
        return [_ids(buf.next_batch(8)) for _ in range(10)]

    assert read(1) == read(1)
    assert read(1) != read(2)


def test_state_round_trip_reads_the_same_batches():
    harvest = Counter()
    whole = ActivationBuffer(Counter(), [3, 2], capacity=40, seed=0)
    expected = [whole.next_batch(6) for _ in range(25)]

    first = ActivationBuffer(harvest, [3, 2], capacity=40, seed=0)
    got = [first.next_batch(6) for _ in range(11)]
    state = first.state_dict()
    resumed_harvest = Counter()
    resumed_harvest.next = harvest.next  # the stream continues where the harvest stopped
    second = ActivationBuffer(resumed_harvest, [3, 2], capacity=40, seed=0)
    second.load_state_dict(state)
    got += [second.next_batch(6) for _ in range(14)]
    for a, b in zip(got, expected):
        assert torch.equal(a[0], b[0])
        assert torch.equal(a[1], b[1])


def test_end_of_data_serves_what_is_left_then_stops():
    buf = ActivationBuffer(Counter(chunk=7, limit=100), [3, 2], capacity=40, seed=0)
    seen = []
    while (batch := buf.next_batch(8)) is not None:
        seen += _ids(batch)
    assert len(seen) == len(set(seen)) == 96  # 12 full batches of the 100 rows; 4 rows cannot make a batch
    assert buf.unread == 4


def test_sample_draws_unread_rows_with_its_own_generator():
    buf = ActivationBuffer(Counter(), [3, 2], capacity=40, seed=0)
    buf.next_batch(8)
    unread = set(buf.order[buf.pos:].tolist())
    rows = buf.sample(50, hook=1, generator=torch.Generator().manual_seed(0))
    assert rows.shape == (50, 2)
    assert {int(-v) for v in rows[:, 0]} <= unread
    after = ActivationBuffer(Counter(), [3, 2], capacity=40, seed=0)
    after.next_batch(8)
    after.sample(50, hook=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(buf.next_batch(8)[0], after.next_batch(8)[0])  # sampling leaves the batch order alone
