"""Evaluation across processes: two CPU processes under torchrun (gloo) gather exactly the result
of one process with the same seeds, for a sharded attack and a sharded certification."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attack_models import trained
from distributed_worker import evaluate, load
from noisekernels import distributed

TESTS = Path(__file__).parent


def test_shards_cover_the_dataset_once():
    batches = [distributed.shard(23, 4, rank=r, world=3) for r in range(3)]
    assert [b for b, _, _ in batches[1]] == [1, 4]
    covered = sorted(i for part in batches for _, start, stop in part for i in range(start, stop))
    assert covered == list(range(23))
    assert distributed.shard(23, 4) == distributed.shard(23, 4, rank=0, world=1)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
        distributed.shard(10, 2, rank=2, world=2)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        distributed.shard(10, 0)


def test_gather_sorts_by_index_in_one_process():
    out = distributed.gather({"index": torch.tensor([2, 0, 1]), "v": torch.tensor([20, 0, 10])})
    assert out["index"].tolist() == [0, 1, 2] and out["v"].tolist() == [0, 10, 20]
    with pytest.raises(ValueError, match="must hold an 'index' tensor"):
        distributed.gather({"v": torch.zeros(2)})


def test_two_torchrun_processes_equal_one(tmp_path, threads):
    state = tmp_path / "model.pt"
    torch.save(trained(spike=True).state_dict(), state)
    out = tmp_path / "result.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "distributed_worker.py"), str(state), str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(out)
    assert result["world"] == 2
    threads(1)
    model = load(state)
    attacked, certified = evaluate(model)
    for name, single in (("attack", attacked), ("certify", certified)):
        assert single["index"].tolist() == list(range(10))
        for key, value in single.items():
            assert torch.equal(result[name][key], value), (name, key)
    assert attacked["robust"].sum() < attacked["clean"].sum()  # the attack did something
