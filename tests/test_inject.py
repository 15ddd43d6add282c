"""inject(model, scheme): RSE, Random Spiking and PNI weight noise added to an unchanged class."""

import pytest
import torch
from torch import nn

import noisekernels as nk


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))).flatten(1))


def test_rse_noise_before_every_conv_and_on_at_test():
    torch.manual_seed(0)
    model = nk.nn.inject(SmallCNN(), "rse")
    assert type(model) is SmallCNN
    sigmas = [m.rse_noise.scale for m in (model.c1, model.c2, model.c3)]
    assert sigmas == [0.2, 0.1, 0.1]
    model.eval()
    x = torch.rand(2, 1, 8, 8)
    assert not torch.equal(model(x), model(x))
    for m in (model.c1, model.c2, model.c3):
        m.rse_noise.scale = 0.0
    clean = SmallCNN()
    clean.load_state_dict({k: v for k, v in model.state_dict().items() if "rse_noise" not in k})
    torch.testing.assert_close(model(x), clean(x))


def test_random_spike_after_the_first_conv():
    model = nk.nn.inject(SmallCNN(), "random_spike", keep=0.5)
    assert isinstance(model.c1.random_spike, nk.nn.RandomSpike) and not hasattr(model.c2, "random_spike")
    x = torch.rand(2, 1, 8, 8)
    seen = {}
    model.c2.register_forward_pre_hook(lambda m, a: seen.setdefault("in", a[0]))
    model(x)
    spiked = seen["in"]
    assert not torch.equal(spiked, model.c1._conv_forward(x, model.c1.weight, model.c1.bias))
    model.eval()
    a, b = model(x), model(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("mc", [True, False])
def test_weight_noise_on_every_conv_and_linear(mc):
    torch.manual_seed(0)
    model = nk.nn.inject(SmallCNN(), "weight_noise", init=0.1, mc=mc)
    layers = [model.c1, model.c2, model.c3, model.fc]
    assert all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    x = torch.rand(2, 1, 8, 8)
    assert not torch.equal(model(x), model(x))
    model(x).sum().backward()
    assert all(m.parametrizations.weight[0].alpha.grad is not None for m in layers)
    model.eval()
    assert torch.equal(model(x), model(x)) is not mc  # PNI's noise stays on at test unless mc=False


def test_random_spike_mc_keeps_it_on_at_test():
    model = nk.nn.inject(SmallCNN(), "random_spike", mc=True).eval()
    x = torch.rand(2, 1, 8, 8)
    assert model.c1.random_spike.keep == 0.8
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("scheme", ["rse", "random_spike", "weight_noise"])
def test_injecting_twice_is_refused_and_changes_nothing(scheme):
    model = nk.nn.inject(SmallCNN(), scheme)
    before = repr(model), len(model.state_dict())
    with pytest.raises(ValueError, match="already"):
        nk.nn.inject(model, scheme)
    assert (repr(model), len(model.state_dict())) == before


@pytest.mark.parametrize("scheme", ["rse", "random_spike", "weight_noise"])
def test_a_model_without_the_layers_a_scheme_needs_is_an_error(scheme):
    model = nn.Sequential(nn.Flatten(), nn.ReLU()) if scheme == "weight_noise" else nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="the model has none"):
        nk.nn.inject(model, scheme)


def test_bad_scheme_and_options():
    with pytest.raises(ValueError, match="scheme must be one of"):
        nk.nn.inject(SmallCNN(), "dropout")
    with pytest.raises(TypeError, match=r"unexpected options \['sigma'\] for scheme 'rse'; valid options: "
                                        r"\['init_sigma', 'inner_sigma', 'mc'\]"):
        nk.nn.inject(SmallCNN(), "rse", sigma=0.1)
    with pytest.raises(TypeError, match=r"valid options: \['keep', 'mc'\]"):
        nk.nn.inject(SmallCNN(), "random_spike", p=0.8)
    model = SmallCNN()
    with pytest.raises(ValueError, match="sigma must be a finite float >= 0"):
        nk.nn.inject(model, "rse", init_sigma=-1.0)
    assert not hasattr(model.c1, "rse_noise")
