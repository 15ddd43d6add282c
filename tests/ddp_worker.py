"""Run by test_ddp.py under torchrun: trains RS-1 for 2 epochs with DDP, then writes this rank's
weights and a noise sample of its spike layer to OUT/rank<r>.safetensors."""

import os
import sys

import torch
from safetensors.torch import save_file

from noisekernels import data, nn
from noisekernels.train import TrainConfig, Trainer

torch.set_num_threads(1)
run_dir, out = sys.argv[1], sys.argv[2]
d = data.digits()
ds = data.Dataset("digits", d.x_train[:128], d.y_train[:128], d.x_test[:32], d.y_test[:32], 10, d.mean, d.std)
config = TrainConfig(defense="rs1", model="mnist-cnn", model_options={"widths": (4, 8), "dense": 16}, epochs=2,
                     batch_size=32, progress=False)
trainer = Trainer(config, run_dir, dataset=ds)
model = trainer.fit()
spike = next(m for m in model.modules() if isinstance(m, nn.RandomSpike))
with torch.no_grad():
    noise = spike(torch.arange(4000.0).view(40, 100))  # this rank's next draw from its stream
state = {f"param.{k}": v.detach().clone() for k, v in model.named_parameters()}
state["noise"] = noise
state["world"] = torch.tensor(trainer.world)
save_file(state, os.path.join(out, f"rank{trainer.rank}.safetensors"))
