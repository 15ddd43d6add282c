"""torch.compile a noisy model: the noise layers trace without graph breaks and the compiled
model draws fresh noise every call (the stream's offset advances inside the graph).

    python python_examples/compile_noisy_model.py
"""

import time

import torch

from noisekernels import data, defenses
from noisekernels.train import model_info

torch.set_num_threads(1)
ds = data.digits()
model, _, _ = defenses.build("rse", model_info(ds), model="mnist-cnn")  # RSE noise, on at test time
model.eval()
compiled = torch.compile(model, fullgraph=True)
x = ds.x_test[:256]

a, b = compiled(x), compiled(x)
print("fresh noise on every compiled call:", not torch.equal(a, b))


def timed(fn, reps=20):
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


print(f"eager {1e3 * timed(lambda: model(x)):.2f} ms, compiled {1e3 * timed(lambda: compiled(x)):.2f} ms per batch")
# Training: TrainConfig(compile=True) (or `noisekernels train --compile`) compiles the model the loop runs.
