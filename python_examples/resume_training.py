"""Resume a training run: checkpoints after every epoch hold the weights (safetensors, noise streams
included), the optimiser, scheduler, epoch and the shuffling generator, so an interrupted run
continues exactly as if it had never stopped.

    python python_examples/resume_training.py
The same from the command line:
    noisekernels train --defense rs1 --epochs 2 --run-dir runs/r
    noisekernels train --defense rs1 --epochs 4 --run-dir runs/r --resume
"""

import shutil

import torch
from safetensors.torch import load_file

from noisekernels.train import TrainConfig, Trainer

torch.set_num_threads(1)
for run in ("runs/example-straight", "runs/example-resumed"):
    shutil.rmtree(run, ignore_errors=True)
config = TrainConfig(defense="rs1", model_options={"widths": (8, 16), "dense": 32}, epochs=4, progress=False)

Trainer(config, "runs/example-straight").fit()  # 4 epochs in one go

short = TrainConfig(**{**config.__dict__, "epochs": 2})
Trainer(short, "runs/example-resumed").fit()  # stops after 2 epochs (as if killed after the 2nd checkpoint)
Trainer(config, "runs/example-resumed", resume=True).fit()  # continues with epochs 3 and 4

a = load_file("runs/example-straight/checkpoint/weights.safetensors")
b = load_file("runs/example-resumed/checkpoint/weights.safetensors")
print("bit-identical to the uninterrupted run:", all(torch.equal(a[k], b[k]) for k in a))
