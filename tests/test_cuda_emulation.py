"""The CPU emulation of CUDA that runs csrc/cuda in the tests (tests/cuda_emulation), checked on its
own kernels (tests/cuda_emulation/selftest.cu) against CUDA's documented semantics: shared memory
and barriers over 1-3 dimensional grids and blocks, the schedule switch exposing a missing barrier,
warp shuffles, atomics, half/bfloat16 rounding, and the launch failures it must report."""

import ctypes

import pytest
import torch

from emulated_cuda import SCHEDULES, Emulated

_LIB = {}


@pytest.fixture(scope="module")
def emu():
    if "lib" not in _LIB:
        _LIB["lib"] = Emulated("gpu")
    return _LIB["lib"]


def _p(t):
    return ctypes.c_void_p(t.data_ptr())


def _call(emu, name, *args):
    return getattr(emu.lib, name)(*args)


@pytest.mark.parametrize("mode", list(SCHEDULES))
def test_barrier_orders_shared_memory_in_every_schedule(emu, mode):
    emu.set_schedule(mode, 3)
    blocks, threads = 3, 100
    out = torch.empty(blocks * threads, dtype=torch.int32)
    assert _call(emu, "nk_test_neighbour", _p(out), blocks, threads, 1) == 0
    t = torch.arange(threads)
    expected = (torch.arange(blocks)[:, None] * threads + (t + 1) % threads).reshape(-1)
    assert torch.equal(out.long(), expected)


def test_missing_barrier_changes_the_result_with_the_schedule(emu):
    blocks, threads = 3, 100
    results = []
    for mode in SCHEDULES:
        emu.set_schedule(mode, 3)
        out = torch.empty(blocks * threads, dtype=torch.int32)
        assert _call(emu, "nk_test_neighbour", _p(out), blocks, threads, 0) == 0
        results.append(out)
    assert not all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("mode", list(SCHEDULES))
@pytest.mark.parametrize("grid,block", [((2, 3, 1), (7, 5, 3)), ((1, 1, 2), (1024, 1, 1)), ((4, 1, 1), (33, 1, 1))])
def test_block_sum_over_3d_grids(emu, mode, grid, block):
    emu.set_schedule(mode, 11)
    n_blocks, n_threads = grid[0] * grid[1] * grid[2], block[0] * block[1] * block[2]
    x = torch.randint(-1000, 1000, (n_blocks, n_threads), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    out = torch.empty(n_blocks, dtype=torch.int32)
    assert _call(emu, "nk_test_block_sum", _p(x), _p(out), *grid, *block) == 0
    assert torch.equal(out, x.sum(1, dtype=torch.int32))


def _shuffle_sources(lane, arg, width):
    """Source lane of each mode (idx, up, down, xor) as the CUDA programming guide states it."""
    base = lane - lane % width
    idx = base + arg % width
    up = lane - arg if lane % width >= arg else lane
    down = lane + arg if lane % width + arg < width else lane
    xor = lane ^ arg
    xor = xor if xor < base + width else lane  # a later segment's value is not readable
    return idx, up, down, xor


@pytest.mark.parametrize("arg,width", [(1, 32), (5, 32), (16, 32), (3, 8), (9, 8), (1, 2), (0, 32), (12, 16)])
def test_shuffles(emu, arg, width):
    emu.set_schedule("shuffled", 5)
    blocks, threads = 2, 64
    out = torch.empty(blocks * threads * 4, dtype=torch.int32)
    assert _call(emu, "nk_test_shuffle", _p(out), blocks, threads, arg, width) == 0
    expected = []
    for b in range(blocks):
        for t in range(threads):
            warp0 = t - t % 32
            expected += [1000 * b + warp0 + src for src in _shuffle_sources(t % 32, arg, width)]
    assert out.tolist() == expected


def test_atomics(emu):
    emu.set_schedule("shuffled", 7)
    blocks, threads = 5, 96
    n = blocks * threads
    ints = torch.zeros(4, dtype=torch.int32)
    uints = torch.tensor([0, 1000, 0], dtype=torch.int32)
    f, d = torch.zeros(1), torch.zeros(1, dtype=torch.float64)
    assert _call(emu, "nk_test_atomics", _p(ints), _p(uints), _p(f), _p(d), blocks, threads) == 0
    assert ints.tolist() == [n, -(n - 1), n - 1, 2 * n]
    assert uints.tolist() == [3 * n, 5, n - 1]
    assert f.item() == 0.5 * n and d.item() == 0.25 * n


def test_half_and_bfloat16_round_to_nearest_even(emu):
    g = torch.Generator().manual_seed(0)
    special = [0.0, -0.0, 1.0, -2.5, 65504.0, 65519.99, 65520.0, 1e6, -1e6, float("inf"), float("-inf"),
               6e-8, 2.98e-8, 2.9802322387695312e-08, 5.9604644775390625e-08 * 1.5, 6.1035156e-05, 6.09e-05,
               1.0 + 2**-11, 1.0 + 3 * 2**-11, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38, 1e-40, float("nan")]
    scales = torch.logspace(-45, 38, 4000, dtype=torch.float64)
    rand = (torch.rand(4000, generator=g, dtype=torch.float64) - 0.5) * scales
    x = torch.cat([torch.tensor(special, dtype=torch.float64), rand]).float()
    n = x.numel()
    half_bits, bf16_bits = torch.empty(n, dtype=torch.int16), torch.empty(n, dtype=torch.int16)
    back = torch.empty(n, 2)
    assert _call(emu, "nk_test_convert", _p(x), _p(half_bits), _p(bf16_bits), _p(back), n) == 0
    finite = ~x.isnan()
    assert torch.equal(half_bits[finite], x[finite].half().view(torch.int16))
    assert torch.equal(bf16_bits[finite], x[finite].bfloat16().view(torch.int16))
    assert half_bits[~finite].view(torch.float16).isnan().all() and bf16_bits[~finite].view(torch.bfloat16).isnan().all()
    assert torch.equal(back[finite, 0], x[finite].half().float())
    assert torch.equal(back[finite, 1], x[finite].bfloat16().float())


@pytest.mark.parametrize("kind,message", [(0, "divergent barrier"), (1, "exited"), (2, "deadlock")])
def test_broken_kernels_fail_the_launch(emu, kind, message):
    emu.set_schedule("in_order")
    out = torch.zeros(32, dtype=torch.int32)
    err = _call(emu, "nk_test_broken", kind, _p(out), 32)
    assert err == 719  # cudaErrorLaunchFailure
    buf = ctypes.create_string_buffer(1024)
    emu.lib.nk_emu_last_failure(buf, len(buf))
    assert message in buf.value.decode()
    # The fibers the failure abandoned are rebuilt: the next launch runs normally.
    test_barrier_orders_shared_memory_in_every_schedule(emu, "in_order")


def test_invalid_launch_configuration(emu):
    out = torch.zeros(1, dtype=torch.int32)
    x = torch.zeros(1025, dtype=torch.int32)
    assert _call(emu, "nk_test_block_sum", _p(x), _p(out), 1, 1, 1, 1025, 1, 1) == 9  # cudaErrorInvalidConfiguration
    assert _call(emu, "nk_test_block_sum", _p(x), _p(out), 0, 1, 1, 32, 1, 1) == 9
