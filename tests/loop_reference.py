"""The reference every engine test compares with: the loop of n separate passes, from the same
stream offsets (snapshot the streams, run one side, restore them, run the other)."""

import torch
from torch import nn

import noisekernels as nk


def streams(model):
    return [s for s in model.modules() if isinstance(s, nk.Stream)]


def snapshot(model):
    return [s.offset.clone() for s in streams(model)]


def restore(model, offsets):
    for s, o in zip(streams(model), offsets):
        s.offset.copy_(o)


def loop_logits(model, x, n):
    with torch.no_grad():
        return torch.stack([model(x) for _ in range(n)])


def loop_eot(model, x, y, n, loss_fn=nn.functional.cross_entropy):
    """The mean over n passes of loss_fn's input gradient, and the mean loss."""
    grads, losses = [], []
    for _ in range(n):
        xi = x.detach().requires_grad_()
        loss = loss_fn(model(xi), y)
        grads.append(torch.autograd.grad(loss, xi)[0])
        losses.append(loss.detach())
    return torch.stack(grads).mean(0), torch.stack(losses).mean()
