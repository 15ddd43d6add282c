"""MC ensembles and EOT gradients (issue 5): the batched engine against the loop of n passes on the
same model, n and batch (100 inputs in full mode, 25 in quick). Goals on CPU: MC (n = 50, batch
100): A2SNN-style (noise at the penultimate layer) >= 20x (prefix sharing), RS-1 and RSE >= 1.0x
(never slower); EOT (n = 20): the same models, same goals. On a GPU: RS-1 and RSE >= 3x.

These runs take about a second each and the machine is shared, so the ratio against the loop is
measured in paired rounds (loop, then batched, back to back; the median of the per-round ratios;
how many: the suite's mode). Peak memory of both is measured in fresh processes by bench_memory."""

import pytest
import torch
from conftest import DEVICES, MODE, full_size_goal, paired_ratio, sync
from torch import nn

import noisekernels as nk
from noisekernels import ensemble

class Net(nn.Module):
    """An MNIST CNN (32 and 64 3x3 convs, 128-unit dense layer) with a defense's noise layers."""

    def __init__(self, defense):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3)
        self.fc1, self.fc2 = nn.Linear(64 * 5 * 5, 128), nn.Linear(128, 10)
        self.spike = nk.nn.RandomSpike(0.8, mc=True) if defense == "rs1" else nn.Identity()
        self.n_in = nk.nn.GaussianNoise(0.2, mc=True) if defense == "rse" else nn.Identity()
        self.n_inner = nk.nn.GaussianNoise(0.1, mc=True) if defense == "rse" else nn.Identity()
        self.aniso = nk.nn.AnisotropicNoise(128, init_std=0.3) if defense == "a2snn" else nn.Identity()

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.spike(self.conv1(self.n_in(x)))), 2)
        h = nn.functional.max_pool2d(torch.relu(self.conv2(self.n_inner(h))), 2)
        return self.fc2(self.aniso(torch.relu(self.fc1(h.flatten(1)))))


GOALS = {"cpu": {"rs1": 1.0, "rse": 1.0, "a2snn": 20.0}, "cuda": {"rs1": 3.0, "rse": 3.0}}



def _bench(benchmark, group, defense, device, batched, loop):
    wait = lambda: sync(device)  # noqa: E731
    benchmark.group = group
    benchmark.extra_info["impl"] = "batched"
    batched(), loop()  # warm up (and plan the model)
    benchmark.extra_info["paired"] = {"loop": (paired_ratio(batched, loop, MODE.paired_rounds, wait),
                                                full_size_goal(GOALS[device].get(defense)))}
    benchmark.pedantic(lambda: (batched(), wait()), rounds=3, iterations=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("defense", ["rs1", "rse", "a2snn"])
def test_mc_predict_n50(benchmark, defense, device):
    torch.manual_seed(0)
    model = Net(defense).to(device).eval()
    x = torch.rand(MODE.engine_batch, 1, 28, 28, device=device)

    @torch.no_grad()
    def loop():
        return torch.stack([torch.softmax(model(x), -1) for _ in range(50)]).mean(0)

    _bench(benchmark, f"mc_predict-n50-B{MODE.engine_batch}-{defense}-{device}", defense, device,
           lambda: ensemble.mc_predict(model, x, 50), loop)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("defense", ["rs1", "rse", "a2snn"])
def test_eot_grad_n20(benchmark, defense, device):
    torch.manual_seed(0)
    model = Net(defense).to(device).eval()
    x = torch.rand(MODE.engine_batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (MODE.engine_batch,), device=device)

    def loop():
        xi = x.clone().requires_grad_()
        total = 0
        for _ in range(20):
            total = total + nn.functional.cross_entropy(model(xi), y) / 20
        return torch.autograd.grad(total, xi)[0]

    _bench(benchmark, f"eot_grad-n20-B{MODE.engine_batch}-{defense}-{device}", defense, device,
           lambda: ensemble.eot_grad(model, nn.functional.cross_entropy, x, y, 20), loop)
