"""Stream generation: noisekernels' uniform/normal against torch.rand/randn and numpy's Philox on
3.2M float32 values. Goals (issue 11, stream contract v2): the CPU C++ uniform at least 10x faster
than torch.rand, the normal at least 6x faster than torch.randn."""

import numpy as np
import pytest
import torch

from conftest import HAS_CUDA, paired_ratio, sync
from noisekernels import random

N = 3_200_000

def _ours(backend, device, fill):
    seed, offset = torch.tensor(1234, device=device), torch.tensor(2**32 - 100, device=device)
    return lambda: fill(N, seed, offset, backend=backend)


CASES = {
    "uniform": (random.uniform, lambda d: torch.rand(N, device=d), lambda g: g.random(N, dtype=np.float32)),
    "normal": (random.normal, lambda d: torch.randn(N, device=d), lambda g: g.standard_normal(N, dtype=np.float32)),
}

IMPLS = [
    pytest.param("noisekernels-cpu", "cpu", id="noisekernels-cpu"),
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("numpy-philox", "cpu", id="numpy-philox"),
    pytest.param("noisekernels-cuda", "cuda", id="noisekernels-cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="GPU")),
    pytest.param("noisekernels-triton", "cuda", id="noisekernels-triton", marks=pytest.mark.skipif(not HAS_CUDA, reason="GPU")),
    pytest.param("torch", "cuda", id="torch-cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="GPU")),
]


@pytest.mark.parametrize("dist", list(CASES))
@pytest.mark.parametrize("impl,device", IMPLS)
def test_generate(benchmark, dist, impl, device):
    ours_fill, torch_fill, numpy_fill = CASES[dist]
    benchmark.group = f"{dist}-3.2M-float32-{device}"
    benchmark.extra_info["impl"] = f"{impl}-{device}" if impl == "torch" else impl
    if impl.startswith("noisekernels"):
        fn = _ours(impl.split("-")[1], device, ours_fill)
        benchmark.extra_info["ours"] = True
        if impl == "noisekernels-cpu":
            goal = 10.0 if dist == "uniform" else 6.0
            benchmark.extra_info["goals"] = {"torch-cpu": goal}
            # Back to back in each round, so both see the same load on a shared machine.
            benchmark.extra_info["paired"] = {"torch-cpu": (paired_ratio(fn, lambda: torch_fill("cpu"), 21), goal)}
    elif impl == "torch":
        fn = lambda: torch_fill(device)  # noqa: E731
    else:
        g = np.random.Generator(np.random.Philox(1234))
        fn = lambda: numpy_fill(g)  # noqa: E731

    def run():
        out = fn()
        sync(device)
        return out

    out = benchmark.pedantic(run, rounds=30, warmup_rounds=3, iterations=1)
    assert out.shape[0] == N
