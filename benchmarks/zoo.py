"""A zoo of user-style models for 1x28x28 inputs and 10 classes, written the way users write them
(plain nn.Module classes, functional ReLU, a residual add, noise added with inject or as layers
wherever the author thought of it), not shaped for the engine. Each builder returns the model in
eval mode, its noise on at test time. The presets' models come from their own constructors
(defenses.build), at the smaller documented sizes where the default is too large for a CPU
benchmark: RSE's VGG16 at width 0.125 (default 1), PNI's ResNet-18 at width 8 (default 64),
A2SNN's LeNet++ at widths (8, 16, 32) (REPRODUCTION.md's; default (32, 64, 128)); GDA's MNIST
CNN at its default size."""

import types

import torch
from torch import nn
from torch.nn import functional as F

import noisekernels as nk
from noisekernels import defenses

MNIST = types.SimpleNamespace(shape=(1, 28, 28), num_classes=10, mean=(0.1307,), std=(0.3081,))


class ResidualCNN(nn.Module):
    """The issue's user model: four 3x3 convs (16-32 channels), one residual block."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv4 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        x = F.relu(x + self.conv4(F.relu(self.conv3(x))))
        return self.fc(F.max_pool2d(x, 2).flatten(1))


class SpikeCNN(nn.Module):
    """A plain MNIST CNN with Random Spiking (RS-1) after its first conv, MC at test time."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3)
        self.spike = nk.nn.RandomSpike(0.8, mc=True)
        self.fc1, self.fc2 = nn.Linear(64 * 5 * 5, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.spike(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class NoisyMLP(nn.Module):
    """784-256-128-10 with Gaussian noise after each hidden layer."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 256), nn.Linear(256, 128), nn.Linear(128, 10)
        self.noise1, self.noise2 = nk.nn.GaussianNoise(0.1), nk.nn.GaussianNoise(0.1)

    def forward(self, x):
        x = self.noise1(F.relu(self.fc1(x.flatten(1))))
        return self.fc3(self.noise2(F.relu(self.fc2(x))))


class PlainCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3)
        self.fc1, self.fc2 = nn.Linear(64 * 5 * 5, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def residual_rse():
    return nk.nn.inject(ResidualCNN(), "rse").eval()


def weight_noise():
    model = PlainCNN()
    for layer in (model.conv1, model.conv2, model.fc1, model.fc2):
        nk.nn.add_weight_noise(layer)
    return model.eval()


def _preset(name, **model_options):
    return lambda: defenses.build(name, MNIST, model_options=model_options)[0].eval()


# name -> (builder, noise only at the penultimate layer: the engine's prefix sharing is bounded by n)
ZOO = {
    "residual-rse": (residual_rse, False),
    "rs1-cnn": (lambda: SpikeCNN().eval(), False),
    "noisy-mlp": (lambda: NoisyMLP().eval(), False),
    "rse": (_preset("rse", width=0.125), False),
    "pni": (_preset("pni", width=8), False),
    "a2snn": (_preset("a2snn", widths=(8, 16, 32)), True),
    "gda": (_preset("gda"), False),
    "weight-noise": (weight_noise, False),
}


def build(name, seed=0):
    """The zoo model `name`, its weights from `seed` (torch's generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ZOO[name][0]()
