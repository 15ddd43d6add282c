"""Run by test_distributed_eval.py under torchrun: a sharded APGD-EOT evaluation and a sharded
certification of the same data, gathered; rank 0 saves both."""

import sys

import torch

from attack_models import SmallNet, make_data
from noisekernels import certify, distributed
from noisekernels.attacks import APGD


def evaluate(model, rank=None, world=None):
    x, y = make_data(10, 4)
    attacked = distributed.attack_dataset(
        model, lambda seed: APGD(model, eps=0.22, steps=5, eot=4, judge_n=8, seed=seed), x, y,
        batch_size=3, seed=7, rank=rank, world=world)
    certified = certify.certify_dataset(model, x, y, 0.75, 10, 60, 0.01, inputs_per_batch=3, seed=7, rank=rank, world=world)
    return attacked, certified


def load(path):
    model = SmallNet(spike=True)
    model.load_state_dict(torch.load(path))
    return model.eval()


if __name__ == "__main__":
    torch.set_num_threads(1)
    state, out = sys.argv[1:]
    rank, world = distributed.init()
    attacked, certified = evaluate(load(state))
    result = {"world": world, "attack": distributed.gather(attacked), "certify": distributed.gather(certified)}
    if rank == 0:
        torch.save(result, out)
    torch.distributed.destroy_process_group()
