"""PGD, 10 steps, EOT 20, 200 inputs (full mode; 50 in quick): noisekernels' PGD on models with its fused noise layers
against torchattacks.EOTPGD on the same weights with eager composite noise layers (what a user
has without this library). Goals on CPU: (a) RS-1 >= 1.5x, (b) A2SNN-style (noise at the
penultimate layer) >= 10x; robust accuracy within 3 points (both judged by the same MC ensemble,
mean of 20 passes of the fused model, on 800 inputs). On a GPU: (a) >= 5x. Times are paired
rounds."""

import functools

import pytest
import torch
from conftest import DEVICES, MODE, full_size_goal, needs_torchattacks, paired_ratio, sync, torchattacks
from torch import nn

import noisekernels as nk
from noisekernels.attacks import PGD

GOALS = {"cpu": {"rs1": 1.5, "a2snn": 10.0}, "cuda": {"rs1": 5.0}}


class EagerRandomSpike(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        lo, hi = torch.aminmax(x.detach())
        keep = torch.rand_like(x) < self.p
        return torch.where(keep, x, lo + torch.rand_like(x) * (hi - lo))


class EagerAnisotropic(nn.Module):
    def __init__(self, fused):
        super().__init__()
        self.L = fused.L

    def forward(self, x):
        return x + torch.randn_like(x) @ self.L.tril().T


class Net(nn.Module):
    """An MNIST CNN with Random Spiking after conv1 ("rs1") or anisotropic noise at the 128-unit
    penultimate layer ("a2snn"); eager=True swaps in the composite layers (same parameters)."""

    def __init__(self, defense):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3)
        self.fc1, self.fc2 = nn.Linear(64 * 5 * 5, 128), nn.Linear(128, 10)
        self.spike = nk.nn.RandomSpike(0.8, mc=True) if defense == "rs1" else nn.Identity()
        self.aniso = nk.nn.AnisotropicNoise(128, init_std=0.3) if defense == "a2snn" else nn.Identity()

    def eager(self):
        twin = Net("none")
        twin.load_state_dict({k: v for k, v in self.state_dict().items() if k in twin.state_dict()})
        if isinstance(self.spike, nk.nn.RandomSpike):
            twin.spike = EagerRandomSpike(self.spike.keep)
        if isinstance(self.aniso, nk.nn.AnisotropicNoise):
            twin.aniso = EagerAnisotropic(self.aniso)
        return twin.eval()

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.spike(self.conv1(x))), 2)
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        return self.fc2(self.aniso(torch.relu(self.fc1(h.flatten(1)))))


def _data(n, seed):
    """Ten 28x28 classes, each a bright bar at its own place, on noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = 0.3 * torch.rand(n, 1, 28, 28, generator=g)
    for k in range(10):
        r = 2 + (k // 5) * 13
        c = 2 + (k % 5) * 5
        x[y == k, 0, r:r + 10, c:c + 3] += 0.5
    return x.clamp(0, 1), y


@functools.lru_cache(maxsize=None)
def _trained(defense):
    torch.manual_seed(0)
    return fit(Net(defense))


def fit(model):
    """MODE.fit_steps (60) Adam steps on the synthetic task: a model with real decision boundaries, in eval mode."""
    x, y = _data(2000, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(MODE.fit_steps):
        idx = slice((step * 100) % 2000, (step * 100) % 2000 + 100)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()



@needs_torchattacks
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("defense", ["rs1", "a2snn"])
def test_eot_pgd(benchmark, defense, device):
    model = _trained(defense).to(device)
    eager = model.eager().to(device)
    x, y = (t.to(device) for t in _data(MODE.attack_batch, 2))
    eps, alpha = 0.1, 0.025  # robust accuracy mid-range on this task, so the comparison says something
    ours = PGD(model, eps=eps, alpha=alpha, steps=10, eot=20, random_start=True)
    theirs = torchattacks.EOTPGD(eager, eps=eps, alpha=alpha, steps=10, eot_iter=20)
    wait = lambda: sync(device)  # noqa: E731
    # Timing on the 200 inputs of the goal; the accuracy comparison on 800 (full mode), where one
    # standard error of the difference is about 1.8 points (3.6 on 200, too coarse for a 3-point check).
    xa, ya = (t.to(device) for t in _data(4 * MODE.attack_batch, 3))
    clean = nk.metrics.accuracy(model, xa, ya, n=20)
    acc_ours = nk.metrics.accuracy(model, ours(xa, ya), ya, n=20)
    acc_theirs = nk.metrics.accuracy(model, theirs(xa, ya), ya, n=20)
    benchmark.group = f"eot_pgd-10steps-eot20-B{MODE.attack_batch}-{defense}-{device}"
    benchmark.extra_info["impl"] = "noisekernels"
    # Crafting time on both sides: ours.perturb leaves out the MC verdict (attack.success), which
    # torchattacks does not compute.
    benchmark.extra_info["paired"] = {"torchattacks.EOTPGD": (paired_ratio(lambda: ours.perturb(x, y), lambda: theirs(x, y), 3, wait),
                                                              full_size_goal(GOALS[device].get(defense)))}
    # Reported (met / MISSED), not asserted: it is a statistical comparison.
    benchmark.extra_info["note"] = (f"clean {clean:.3f}, robust accuracy noisekernels {acc_ours:.3f}, torchattacks "
                                    f"{acc_theirs:.3f}" + ("" if full_size_goal(True) is None else  # 800 inputs: fine enough for 3 points
                                                            f": within 3 points: {'met' if abs(acc_ours - acc_theirs) <= 0.03 else 'MISSED'}"))
    benchmark.pedantic(lambda: (ours.perturb(x, y), wait()), rounds=1, iterations=1)
