"""Streams: disjoint reservations, state_dict restores the sequence, torch.manual_seed reproduces
seeds, per-rank and forked streams differ, 64-bit offsets, and torch.compile keeps noise fresh."""

import pytest
import torch
from torch import nn

import noisekernels as nk
from noisekernels import random
from noisekernels.philox import MASK32, uniform_from_word


def test_reservations_are_consecutive_and_disjoint():
    s = nk.Stream(seed=11)
    _, a = s.reserve(100)
    _, b = s.reserve(0)
    _, c = s.reserve(7)
    assert (a.item(), b.item(), c.item(), s.offset.item()) == (0, 100, 100, 107)


def test_reserved_start_is_not_changed_by_later_reservations():
    s = nk.Stream(seed=11)
    seed, start = s.reserve(10)
    first = random.uniform(10, seed, start)
    s.reserve(1000)
    assert start.item() == 0
    assert torch.equal(random.uniform(10, seed, start), first)


def test_reservations_draw_the_contiguous_sequence():
    s = nk.Stream(seed=2**64 - 1)
    parts = [random.uniform(n, stream=s) for n in (4, 8, 300, 0, 16)]  # whole counters
    assert torch.equal(torch.cat(parts), random.uniform(328, 2**64 - 1, 0))
    tail = random.uniform(5, stream=s)  # a call starts on a fresh counter: 5 elements use 2
    assert torch.equal(tail, random.uniform(8, 2**64 - 1, 82)[:5]) and s.offset.item() == 84


def test_state_dict_restores_the_exact_sequence():
    a = nk.Stream()
    random.uniform(50, *a.reserve(50))
    saved = {k: v.clone() for k, v in a.state_dict().items()}
    expected = random.normal(64, *a.reserve(64))
    b = nk.Stream()
    b.load_state_dict(saved)
    assert torch.equal(random.normal(64, *b.reserve(64)), expected)


def test_manual_seed_reproduces_seeds():
    torch.manual_seed(123)
    first = [nk.Stream().seed.clone() for _ in range(3)]
    torch.manual_seed(123)
    again = [nk.Stream().seed.clone() for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert len({int(x) for x in first}) == 3


def test_seed_argument_validated():
    with pytest.raises(TypeError, match="seed must be an int"):
        nk.Stream(seed=0.5)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        nk.Stream(seed=-3)
    with pytest.raises(ValueError, match="n must be non-negative"):
        nk.Stream(seed=1).reserve(-1)


def test_offsets_cross_2_pow_32_exactly():
    """A reservation straddling 2**32 matches Philox on the explicit (lo, hi, 0, 0) counters."""
    s = nk.Stream(seed=0xDEADBEEFCAFE)
    s.offset.fill_(2**32 - 2)
    got = random.uniform(16, stream=s)  # four words of each of 4 counters
    counters = torch.arange(2**32 - 2, 2**32 + 2)
    words = random.philox4x32(
        torch.stack([counters & MASK32, counters >> 32, torch.zeros_like(counters), torch.zeros_like(counters)], -1),
        torch.tensor([0xDEADBEEFCAFE & MASK32, 0xDEADBEEFCAFE >> 32]),
    )
    assert torch.equal(got, uniform_from_word(words.reshape(-1)))
    assert s.offset.item() == 2**32 + 2


def test_forked_streams_differ_and_are_deterministic():
    s = nk.Stream(seed=5)
    f0, f1, f0_again = s.fork(0), s.fork(1), s.fork(0)
    assert torch.equal(f0.seed, f0_again.seed)
    assert len({int(s.seed), int(f0.seed), int(f1.seed)}) == 3
    assert f0.offset.item() == 0
    assert not torch.equal(random.uniform(100, *f0.reserve(100)), random.uniform(100, *f1.reserve(100)))


class TwoStreams(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nk.Stream(seed=1)
        self.b = nk.Stream(seed=2)


def test_for_rank_gives_each_rank_and_stream_its_own_seed():
    ranks = [nk.for_rank(TwoStreams(), rank=r) for r in range(3)]
    seeds = {int(m.a.seed) for m in ranks} | {int(m.b.seed) for m in ranks}
    assert len(seeds) == 6 and not seeds & {1, 2}
    again = nk.for_rank(TwoStreams(), rank=1)
    assert torch.equal(again.a.seed, ranks[1].a.seed)


def test_for_rank_bad_rank_changes_nothing():
    m = TwoStreams()
    with pytest.raises(ValueError, match="index must be an int"):
        nk.for_rank(m, rank=-1)
    assert (int(m.a.seed), int(m.b.seed)) == (1, 2)
    with pytest.raises(RuntimeError, match="pass rank="):
        nk.for_rank(m)


class NoisyAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.stream = nk.Stream(seed=9)

    def forward(self, x):
        return x + random.uniform(x.shape, *self.stream.reserve(x.numel()))


def test_compiled_draws_advance_like_eager():
    eager, compiled = NoisyAdd(), NoisyAdd()
    step = torch.compile(compiled, fullgraph=True)
    x = torch.zeros(4, 6)
    outs = [step(x) for _ in range(3)]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    for out in outs:
        assert torch.equal(out, eager(x))
    assert compiled.stream.offset.item() == eager.stream.offset.item() == 72


def test_data_parallel_copies_refuse_to_draw():
    """nn.DataParallel makes every module's per-device copy with Module._replicate_for_data_parallel;
    each copy of a Stream holds the same seed and offset, so every device would draw device 0's noise."""
    stream = nk.Stream(seed=1)
    with pytest.raises(RuntimeError, match="DataParallel.*same noise.*DistributedDataParallel"):
        stream._replicate_for_data_parallel().reserve(4)
    assert stream.reserve(4)[1].item() == 0  # the stream itself still draws
