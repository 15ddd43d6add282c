"""Train RSE (random-self-ensemble.txt: Gaussian noise on the input and before every inner conv,
on at test time) on the bundled digits, then evaluate it with the MC ensemble.

    python python_examples/train_rse_mc.py
"""

import torch

from noisekernels import data, ensemble
from noisekernels.evaluate import accuracy_vs_n, clean_accuracy
from noisekernels.train import TrainConfig, Trainer

torch.set_num_threads(1)  # small models: one thread is fastest
config = TrainConfig(defense="rse", model="mnist-cnn", model_options={"widths": (16, 32), "dense": 128},
                     options={"init_sigma": 0.2, "inner_sigma": 0.1}, epochs=10)
model = Trainer(config, "runs/example-rse").fit()  # rerunning needs another run dir (or resume=True)

ds = data.digits()
x, y = ds.x_test, ds.y_test
print("clean accuracy:", clean_accuracy(model, x, y, n=20))  # noise off / one pass / MC mean / vote
print("accuracy against n:", accuracy_vs_n(model, x, y, ns=(1, 5, 20, 50)))
probs = ensemble.mc_predict(model, x[:4], n=50)  # (4, 10) mean softmax of 50 noisy passes, one batched pass
print("MC mean probabilities of 4 digits:", probs.argmax(1).tolist(), "labels:", y[:4].tolist())
