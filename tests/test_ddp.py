"""Two CPU processes under torchrun (gloo): weights stay synchronised, each rank's noise differs,
and rank 0's checkpoint (base stream seeds) resumes in a single process."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from noisekernels import data
from noisekernels.train import TrainConfig, Trainer

HERE = os.path.dirname(os.path.abspath(__file__))


def test_ddp_two_cpu_processes(tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(HERE, "ddp_worker.py"), str(run), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert int(r0["world"]) == 2 and int(r1["world"]) == 2
    params = [k for k in r0 if k.startswith("param.")]
    assert params and all(torch.equal(r0[k], r1[k]) for k in params)  # synchronised
    assert not torch.equal(r0["noise"], r1["noise"])  # each rank draws its own noise

    # rank 0 wrote the checkpoint with the base seeds: a single process resumes it
    d = data.digits()
    ds = data.Dataset("digits", d.x_train[:128], d.y_train[:128], d.x_test[:32], d.y_test[:32], 10, d.mean, d.std)
    config = TrainConfig(defense="rs1", model="mnist-cnn", model_options={"widths": (4, 8), "dense": 16}, epochs=3,
                         batch_size=32, progress=False)
    fresh = Trainer(config, str(tmp_path / "fresh"), dataset=ds)
    resumed = Trainer(config, str(run), dataset=ds, resume=True)
    assert resumed.epoch == 2
    seed = "body.0.random_spike.stream.seed"
    assert torch.equal(resumed.model.state_dict()[seed], fresh.model.state_dict()[seed])
    assert all(torch.equal(v, r0[f"param.{k}"]) for k, v in resumed.model.named_parameters())
    resumed.fit()
    assert resumed.epoch == 3
