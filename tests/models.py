"""Small models of each defense, written with plain torch.nn plus noisekernels' noise layers."""

import torch
from torch import nn

import noisekernels as nk


class RS1(nn.Module):
    """Random Spiking after the first conv, before pooling (random-spiking.txt 4.2)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.spike = nn.Conv2d(1, 8, 3), nk.nn.RandomSpike(0.8, mc=True)
        self.conv2, self.fc = nn.Conv2d(8, 16, 3), nn.Linear(16 * 5 * 5, 10)

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.spike(self.conv1(x))), 2)
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        return self.fc(h.flatten(1))


class RSE(nn.Module):
    """Noise at the input (init 0.2) and before the inner conv (0.1)."""

    def __init__(self):
        super().__init__()
        self.n0, self.conv1 = nk.nn.GaussianNoise(0.2, mc=True), nn.Conv2d(1, 8, 3)
        self.n1, self.conv2 = nk.nn.GaussianNoise(0.1, mc=True), nn.Conv2d(8, 16, 3)
        self.fc = nn.Linear(16 * 5 * 5, 10)

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.conv1(self.n0(x))), 2)
        h = nn.functional.max_pool2d(torch.relu(self.conv2(self.n1(h))), 2)
        return self.fc(h.flatten(1))


class PNI(nn.Module):
    """Learnable channel-wise noise on activations."""

    def __init__(self):
        super().__init__()
        self.conv1, self.noise = nn.Conv2d(1, 8, 3), nk.nn.LearnableNoise((8,), init=0.3, mc=True)
        self.conv2, self.fc = nn.Conv2d(8, 16, 3), nn.Linear(16 * 5 * 5, 10)

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.noise(self.conv1(x))), 2)
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        return self.fc(h.flatten(1))


class A2SNN(nn.Module):
    """Anisotropic noise at the penultimate features: the backbone is deterministic."""

    def __init__(self, draw="sample", width=16):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, width), nn.ReLU())
        self.noise = nk.nn.AnisotropicNoise(width, init_std=0.5, draw=draw)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.noise(self.backbone(x)))


class SkipNet(nn.Module):
    """A residual block whose noisy branch is skipped around: prefix sharing is unsafe."""

    def __init__(self):
        super().__init__()
        self.stem, self.spike = nn.Conv2d(1, 8, 3, padding=1), nk.nn.RandomSpike(0.7, mc=True)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.bn(self.conv(self.spike(h))) + h)
        return self.fc(h.mean((2, 3)))


def weight_noise_net():
    model = nk.nn.inject(RS1(), "weight_noise", init=0.1)
    for m in model.modules():
        if isinstance(m, nk.nn.WeightNoise):
            m.mc = True
    return model


MODELS = {"rs1": RS1, "rse": RSE, "pni": PNI, "a2snn": A2SNN, "a2snn-batch": lambda: A2SNN("batch"),
          "skip": SkipNet, "weight-noise": weight_noise_net}
