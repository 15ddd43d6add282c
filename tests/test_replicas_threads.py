"""`with nk.replicas(n):` is per thread: another thread's plain calls keep whole-batch statistics,
eager and compiled (fullgraph), and compiled layers follow the block they run in."""

import contextlib
import importlib
import threading

import pytest
import torch

import noisekernels as nk
from noisekernels.functional import random_spike

REPLICAS = importlib.import_module("noisekernels.replicas")  # the package's `replicas` is the function


def _batch():
    """Two rows with disjoint ranges, so per-row min/max differs from the batch's."""
    return torch.stack([torch.linspace(0.0, 1.0, 40), torch.linspace(10.0, 30.0, 40)])


def _expected(x, replicas, seed=7, offset=0):
    return random_spike(x, 0.5, seed, offset, replicas=replicas)


def _run_in_other_thread_while(block, fn):
    """fn() in a second thread while this thread is inside `block` (a context manager); returns
    fn's result."""
    result, errors = {}, []
    entered, done = threading.Event(), threading.Event()

    def worker():
        try:
            assert entered.wait(timeout=60)
            result["value"] = fn()
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    with block:
        entered.set()
        assert done.wait(timeout=300)
    thread.join()
    if errors:
        raise errors[0]
    return result["value"]


def _run_while_other_thread_in_replicas(fn):
    """fn() in a second thread while this thread is inside replicas(2); returns fn's result."""
    seen = []

    @contextlib.contextmanager
    def block():
        with nk.replicas(2):
            yield
            seen.append(_current())

    value = _run_in_other_thread_while(block(), fn)
    assert seen == [2] and _current() == 1
    return value


def _current():
    return REPLICAS.current()


def test_other_threads_plain_call_takes_batch_min_max():
    x = _batch()
    got = _run_while_other_thread_in_replicas(lambda: nk.nn.RandomSpike(0.5, mc=True, seed=7)(x))
    assert torch.equal(got, _expected(x, 1))
    assert not torch.equal(got, _expected(x, 2))  # the input tells the two apart


def test_other_threads_block_does_not_leak_into_this_thread():
    x = _batch()
    layer = nk.nn.RandomSpike(0.5, mc=True, seed=7)

    def in_block():
        with nk.replicas(2):
            return layer(x)

    got = _run_while_other_thread_in_replicas(lambda: (_current(), in_block(), _current()))
    assert got[0] == 1 and got[2] == 1
    assert torch.equal(got[1], _expected(x, 2))


@pytest.fixture
def compiled_spike():
    torch._dynamo.reset()
    layer = nk.nn.RandomSpike(0.5, mc=True, seed=7)
    yield layer, torch.compile(layer, fullgraph=True)
    torch._dynamo.reset()


def _spike_counters(x, replicas):
    return nk.philox.counters(x.numel(), replicas, nk.philox.TWO_DRAWS)


def test_compiled_layer_follows_the_replicas_block(compiled_spike):
    layer, step = compiled_spike
    x = _batch()
    one, two = _spike_counters(x, 1), _spike_counters(x, 2)
    assert torch.equal(step(x), _expected(x, 1, offset=0))
    with nk.replicas(2):
        assert torch.equal(step(x), _expected(x, 2, offset=one))
    assert torch.equal(step(x), _expected(x, 1, offset=one + two))
    assert layer.stream.offset.item() == 2 * one + two


def test_compiled_layer_in_other_thread_ignores_this_threads_block(compiled_spike):
    layer, step = compiled_spike
    x = _batch()
    with nk.replicas(2):
        inside = step(x)  # compiled for 2 replicas in this thread first
    got = _run_while_other_thread_in_replicas(lambda: step(x))
    assert torch.equal(inside, _expected(x, 2, offset=0))
    assert torch.equal(got, _expected(x, 1, offset=_spike_counters(x, 2)))


def test_the_engines_expansion_of_a_layer_is_per_thread():
    layer = nk.nn.GaussianNoise(0.1, seed=3)
    x = torch.rand(2, 5)

    @contextlib.contextmanager
    def expanding():
        with REPLICAS.expanding(layer, 3), nk.replicas(3):
            assert layer(x).shape == (6, 5)  # this thread: B rows in, 3 * B replicas out
            yield

    assert _run_in_other_thread_while(expanding(), lambda: layer(x).shape) == (2, 5)
    assert layer(x).shape == (2, 5)


def test_noise_off_and_expansion_of_one_thread_leave_the_other_threads_noise_alone():
    layer = nk.nn.RandomSpike(keep=0.5, mc=True, seed=5)
    x = _batch()

    @contextlib.contextmanager
    def engine_work():
        with REPLICAS.noise_off():
            assert torch.equal(layer(x), x)  # this thread: noise off
            with REPLICAS.expanding(layer, 3), nk.replicas(3):
                yield

    got = _run_in_other_thread_while(engine_work(), lambda: layer(x))
    assert got.shape == x.shape and not torch.equal(got, x)  # the other thread: one noisy pass
