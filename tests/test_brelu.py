"""BReLU and the ReLU -> BReLU conversion."""

import pytest
import torch
from torch import nn

from noisekernels.nn import BReLU, to_brelu


def test_brelu_is_clamp_to_0_t():
    x = torch.linspace(-3, 3, 101, requires_grad=True)
    y = BReLU(1.5)(x)
    assert torch.equal(y, x.clamp(0, 1.5))
    y.sum().backward()
    assert torch.equal(x.grad, ((x > 0) & (x < 1.5)).float())


def test_to_brelu_converts_nested_relus_only():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Sequential(nn.Linear(2, 2), nn.ReLU(inplace=True)), nn.Tanh())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    to_brelu(model, 2.0)
    assert isinstance(model[1], BReLU) and isinstance(model[2][1], BReLU) and model[2][1].inplace
    assert isinstance(model[3], nn.Tanh) and model[1].max_val == 2.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bad_t():
    with pytest.raises(ValueError, match="t must be a finite float > 0"):
        BReLU(0.0)
    model = nn.Sequential(nn.ReLU())
    with pytest.raises(ValueError, match="t must be a finite float > 0"):
        to_brelu(model, -1.0)
    assert type(model[0]) is nn.ReLU
