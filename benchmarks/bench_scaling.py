"""Scaling (issue 14): how cost grows with the work, and where cache effects set in.
- Time against tensor size (the mode's sizes, 1e3 to 1e8 elements in full mode) for Random
  Spiking and Gaussian noise forward: the kernel, the eager composite and the copy floor on the
  same tensor; the report plots time and effective GB/s (the copy floor's bytes over the time).
- Time against n replicas (1 to 100) of MC prediction on a small CNN with RSE's noise layers: the
  batched engine against the loop of n passes."""

import pytest
import torch
from bench_providers import OPS, _fn
from noisekernels.benchmarking.harness import MODE
from torch import nn

import noisekernels as nk
from noisekernels import ensemble


@pytest.mark.parametrize("numel", MODE.scaling_sizes)
@pytest.mark.parametrize("impl", ["noisekernels", "eager", "copy-floor"])
@pytest.mark.parametrize("name", ["random_spike", "gaussian_add"])
def test_size(benchmark, name, impl, numel):
    x = torch.randn(numel)  # flat: the op's cost depends on the element count only
    fn = _fn(name, impl, (x,))
    benchmark.group = f"scaling-size-{name}-{numel}"
    benchmark.extra_info.update(impl=impl, op=name, numel=numel, section="scaling-size",
                                floor_bytes=OPS[name].floor_bytes((x,)), ours=impl == "noisekernels")
    rounds = max(3, min(MODE.rounds * 4, 10**8 // (numel * 50) or 1))

    def run():
        with torch.no_grad():
            fn()

    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)


class SmallCNN(nn.Module):
    """A 28x28 CNN (16 and 32 3x3 convs, 64-unit dense layer) with RSE's input and inner noise."""

    def __init__(self):
        super().__init__()
        self.noise_in, self.noise_inner = nk.nn.GaussianNoise(0.2), nk.nn.GaussianNoise(0.1)
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3), nn.Conv2d(16, 32, 3)
        self.fc1, self.fc2 = nn.Linear(32 * 5 * 5, 64), nn.Linear(64, 10)

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.conv1(self.noise_in(x))), 2)
        h = nn.functional.max_pool2d(torch.relu(self.conv2(self.noise_inner(h))), 2)
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


@pytest.mark.parametrize("n", MODE.replicas)
@pytest.mark.parametrize("impl", ["batched", "loop"])
def test_replicas(benchmark, impl, n):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.rand(MODE.batch, 1, 28, 28)

    @torch.no_grad()
    def loop():
        return torch.stack([torch.softmax(model(x), -1) for _ in range(n)]).mean(0)

    fn = (lambda: ensemble.mc_predict(model, x, n)) if impl == "batched" else loop
    fn()  # plans the model
    benchmark.group = f"scaling-replicas-mc_predict-rse-B{MODE.batch}-n{n}"
    benchmark.extra_info.update(impl=impl, n=n, batch=MODE.batch, section="scaling-replicas", ours=impl == "batched")
    benchmark.pedantic(fn, rounds=max(2, MODE.rounds // 2), warmup_rounds=0, iterations=1)
