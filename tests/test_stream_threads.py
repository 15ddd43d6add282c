"""Stream reservations under threads (ARCHITECTURE.md section 2): a reservation is one atomic step,
so threads drawing from one Stream, or from the default stream, never share a counter and never
skip one. Threads switch every microsecond here, so a reservation made of separate steps (a copy of
the offset, then an add) interleaves with another's in almost every run."""

import sys
import threading

import pytest
import torch

import noisekernels as nk
from noisekernels import _extension, random
from noisekernels.ops._streams import default_stream

THREADS = 4
CALLS = 2000


@pytest.fixture(autouse=True)
def fast_thread_switches():
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _in_threads(work, threads=THREADS):
    """[work(k) for k in range(threads)], each in its own thread, all started together."""
    barrier = threading.Barrier(threads)
    results = [None] * threads

    def run(k):
        barrier.wait()
        results[k] = work(k)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return results


def _sizes(k):
    """Thread k's reservation sizes: varied, zero included."""
    return [(7 * k + 13 * i) % 50 for i in range(CALLS)]


def _assert_tiled(reservations, first, end):
    """The (start, n) reservations cover [first, end) exactly: disjoint and no counter left out."""
    position = first
    for start, n in sorted(reservations):
        assert start == position, f"reservation at {start} overlaps or skips counters (expected {position})"
        position += n
    assert position == end


@pytest.mark.parametrize("threads", [2, THREADS])
def test_threads_reserving_from_one_stream_never_share_a_counter(threads):
    stream = nk.Stream(seed=3)
    first = 2**63 - 2**15  # the offsets cross 2**63: int64 values turn negative, counters go on
    stream.offset.fill_(first)

    def work(k):
        return [(stream.reserve(n)[1].item() % 2**64, n) for n in _sizes(k)]

    reservations = [r for part in _in_threads(work, threads) for r in part]
    end = first + sum(sum(_sizes(k)) for k in range(threads))
    _assert_tiled(reservations, first, end)
    assert stream.offset.item() % 2**64 == end


def test_threads_drawing_from_the_default_stream_never_share_a_counter():
    """Functional ops without a stream reserve from the default stream: all threads' draws together
    are exactly the uniforms of the counters the default stream advanced over, each once."""
    stream = default_stream()
    first = stream.offset.item()

    def work(k):
        return [random.uniform(4 * n) for n in _sizes(k)]  # n counters each

    draws = torch.cat([u for part in _in_threads(work) for u in part])
    counters = sum(sum(_sizes(k)) for k in range(THREADS))
    assert stream.offset.item() == first + counters
    expected = random.uniform(4 * counters, stream.seed, first)
    mismatched = (draws.sort().values != expected.sort().values).sum().item()
    assert mismatched == 0, "the draws are not the uniforms of the counters reserved, each used once"


def test_threads_creating_the_default_stream_get_one_stream(monkeypatch):
    from noisekernels.ops import _streams

    for _ in range(20):  # from scratch, as at the first draw of a process (restored afterwards)
        monkeypatch.setattr(_streams, "_default_streams", {})
        monkeypatch.setattr(_streams, "_root_seed", None)
        streams = _in_threads(lambda k: default_stream())
        assert all(s is streams[0] for s in streams)


def test_reference_mode_reservations_are_atomic():
    """The reference mode's kernel (NOISEKERNELS_BACKEND=reference), called as its dispatcher would."""
    reserve = _extension._python_kernel("offset_reserve", "reference")
    offset = torch.tensor(0)

    def work(k):
        return [(reserve(offset, n).item(), n) for n in _sizes(k)]

    reservations = [r for part in _in_threads(work) for r in part]
    _assert_tiled(reservations, 0, offset.item())
    assert offset.item() == sum(sum(_sizes(k)) for k in range(THREADS))


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_reserve_returns_the_offset_and_advances_it_modulo_2_pow_64(backend):
    reserve = torch.ops.noisekernels.offset_reserve if backend == "cpu" else _extension._python_kernel(
        "offset_reserve", backend)
    offset = torch.tensor(-700)  # 2**64 - 700
    before = offset._version
    assert reserve(offset, 1000).item() == -700 and offset.item() == 300
    assert reserve(offset, 2**40).item() == 300 and offset.item() == 2**40 + 300
    assert offset._version > before  # changed in place, as add_ does
    with pytest.raises(RuntimeError, match="n must be non-negative"):
        reserve(offset, -1)
    assert offset.item() == 2**40 + 300


def test_compiled_and_eager_reservations_interleave():
    """Under torch.compile a reservation is the snapshot and add_ in the graph (stream.py: inductor
    must keep the snapshot); eager calls use the atomic op. Both advance the one offset."""
    stream = nk.Stream(seed=4)
    step = torch.compile(lambda: stream.reserve(5)[1], fullgraph=True)
    assert [step().item(), stream.reserve(3)[1].item(), step().item()] == [0, 5, 8]
    assert stream.offset.item() == 13
