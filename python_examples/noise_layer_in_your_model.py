"""Put noisekernels' noise layers inside your own model: they are nn.Modules like nn.Dropout, and
the MC engine, the attacks and the training loop work on any model built from them.

    python python_examples/noise_layer_in_your_model.py
"""

import torch
from torch import nn

import noisekernels as nk
from noisekernels import ensemble


class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.noise_in = nk.nn.GaussianNoise(0.2, mc=True)  # RSE's init noise, kept on at test time
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.spike = nk.nn.RandomSpike(keep=0.8, mc=True)  # Random Spiking after conv1: keep is the KEEP probability
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.spike(self.conv1(self.noise_in(x)))), 2)
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        return self.fc(h.flatten(1))


torch.manual_seed(0)  # seeds the weights and every noise layer's stream
model = MyNet()
opt = torch.optim.Adam(model.parameters(), 1e-3)
x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
for _ in range(20):  # any training loop: the noise is drawn from each layer's own stream
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()

model.eval()
print("plan:", ensemble.plan(model, x[:3], 50))  # how the engine runs 50 passes: measured, verified
print("MC mean over 50 passes:", ensemble.mc_predict(model, x[:3], n=50).argmax(1).tolist())
print("noise off:", ensemble.deterministic_predict(model, x[:3]).argmax(1).tolist())
# Or add a defense's noise to an existing model without editing it:
plain = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
print(nk.nn.inject(plain, "random_spike", keep=0.8, mc=True))
