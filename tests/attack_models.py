"""A synthetic 4-class image task and small models trained on it in a second or two, so attack
tests run against models with real decision boundaries."""

import functools

import torch
from torch import nn

import noisekernels as nk

CLASSES, SIZE = 4, 12


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    patterns = torch.zeros(CLASSES, 1, SIZE, SIZE)
    for k in range(CLASSES):
        r, c = divmod(k, 2)
        patterns[k, 0, r * 6 + 1:r * 6 + 5, c * 6 + 1:c * 6 + 5] = 1
    x = (0.25 * torch.rand(n, 1, SIZE, SIZE, generator=g) + 0.5 * patterns[y]).clamp(0, 1)
    return x, y


class SmallNet(nn.Module):
    def __init__(self, spike=False, width=8):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3)
        self.spike = nk.nn.RandomSpike(0.8, mc=True) if spike else nn.Identity()
        self.fc = nn.Linear(width * 5 * 5, CLASSES)

    def forward(self, x):
        return self.fc(nn.functional.max_pool2d(torch.relu(self.spike(self.conv(x))), 2).flatten(1))


@functools.lru_cache(maxsize=None)
def trained(seed=0, spike=False, width=8):
    torch.manual_seed(seed)
    model = SmallNet(spike, width)
    x, y = make_data(2048, seed + 100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(120):
        idx = slice((step * 64) % 2048, (step * 64) % 2048 + 64)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def coin_flip_model():
    """A noisy model whose MC-mean decision at x = 0.5 is a coin flip between classes 0 and 1
    (f0 - f1 = sum(x + noise) - 8, the noise's sum N(0, 1)), and which x - 0.1 fools: there the
    mean softmax of class 0 is E[sigmoid(N(-1.6, 1))] ~ 0.23, far below 1/2, so a judgement of 20
    passes says fooled almost surely. Class 2 is never predicted."""
    conv, lin = nn.Conv2d(1, 1, 1, bias=False), nn.Linear(16, 3)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        lin.weight.zero_()
        lin.weight[0].fill_(1.0)
        lin.bias.copy_(torch.tensor([-8.0, 0.0, -50.0]))
    return nk.nn.inject(nn.Sequential(conv, nn.Flatten(), lin), "rse", init_sigma=0.25).eval()
