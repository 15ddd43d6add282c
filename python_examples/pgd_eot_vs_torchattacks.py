"""Attack a noisy model with PGD-EOT and compare with torchattacks' EOTPGD (same budget): robust
accuracy judged by the MC mean on fresh noise, and the time of each.

    python python_examples/pgd_eot_vs_torchattacks.py [RUN_DIR]   # default: trains a small RS-1 model

torchattacks is installed by `make setup` (without its dependencies; pip install --no-deps torchattacks).
"""

import os
import sys
import time

import torch
import torchattacks

from noisekernels import data, metrics
from noisekernels.attacks import PGD
from noisekernels.train import TrainConfig, Trainer, load_model

torch.set_num_threads(1)
if len(sys.argv) > 1:
    model, _, _ = load_model(sys.argv[1])
else:
    run = "runs/example-rs1"
    config = TrainConfig(defense="rs1", model_options={"widths": (16, 32), "dense": 128}, epochs=10)
    model = load_model(run)[0] if os.path.exists(run) else Trainer(config, run).fit()

ds = data.digits()
x, y = ds.x_test[:200], ds.y_test[:200]
eps, steps, eot = 0.1, 10, 10

start = time.perf_counter()
ours = PGD(model, eps=eps, alpha=eps / 4, steps=steps, eot=eot, seed=0)(x, y)  # EOT draws in one batched pass
t_ours = time.perf_counter() - start
start = time.perf_counter()
theirs = torchattacks.EOTPGD(model, eps=eps, alpha=eps / 4, steps=steps, eot_iter=eot)(x, y)  # a loop of passes
t_theirs = time.perf_counter() - start

judge = dict(mode="mean", n=20)  # fresh noise: independent of the draws either attack selected with
print(f"clean: {metrics.accuracy(model, x, y, **judge):.3f}")
print(f"noisekernels PGD-EOT: robust accuracy {metrics.accuracy(model, ours, y, **judge):.3f} in {t_ours:.2f} s")
print(f"torchattacks EOTPGD:  robust accuracy {metrics.accuracy(model, theirs, y, **judge):.3f} in {t_theirs:.2f} s")
