"""The noise layers as a researcher meets them: test-time defaults that follow the papers,
RandomSpike's keep probability, reprs, and edge cases (one-element weights, empty batches)."""

import pytest
import torch
from torch import nn

import noisekernels as nk


@pytest.mark.parametrize("make", [lambda: nk.nn.GaussianNoise(0.2), lambda: nk.nn.UniformNoise(0.2),
                                  lambda: nk.nn.LaplaceNoise(0.2), lambda: nk.nn.LearnableNoise((3,)),
                                  lambda: nk.nn.AnisotropicNoise(3)],
                         ids=["gaussian", "uniform", "laplace", "learnable", "anisotropic"])
def test_model_noise_is_on_at_test_time_by_default(make):
    layer = make().eval()  # RSE, PNI, A2SNN: the noise belongs to the model at test time
    x = torch.rand(4, 3)
    assert layer.mc and not torch.equal(layer(x), layer(x))
    layer.mc = False
    assert torch.equal(layer(x), x)


def test_weight_noise_is_on_at_test_time_by_default():
    layer = nn.Linear(3, 2)
    nk.nn.add_weight_noise(layer)
    layer.eval()
    x = torch.rand(4, 3)
    assert not torch.equal(layer(x), layer(x))


def test_random_spike_takes_the_keep_probability():
    layer = nk.nn.RandomSpike(keep=0.9, mc=True, seed=1)
    assert "keep=0.9" in repr(layer)
    x = torch.rand(1000, 10)
    kept = (layer(x) == x).double().mean().item()
    assert 0.88 < kept < 0.93  # 90% kept (a spiked unit equals x with probability ~0)
    with pytest.raises(TypeError, match="takes keep=, the probability a unit is KEPT .* not p="):
        nk.nn.RandomSpike(p=0.8)
    with pytest.raises(TypeError, match=r"unexpected arguments \['rate'\]"):
        nk.nn.RandomSpike(rate=0.8)
    with pytest.raises(ValueError, match=r"keep must be in \[0, 1\]"):
        nk.nn.RandomSpike(keep=1.5)
    assert not nk.nn.RandomSpike().mc  # dropout-like: off in eval mode unless mc=True


def test_reprs_name_each_layers_own_argument():
    assert "sigma=0.2" in repr(nk.nn.GaussianNoise(0.2))
    assert "b=0.3" in repr(nk.nn.LaplaceNoise(0.3)) and "b=0.3" in repr(nk.nn.UniformNoise(0.3))
    assert "alpha_shape=()" in repr(nk.nn.WeightNoise())


def test_weight_noise_on_a_one_element_weight_is_a_clear_error():
    layer = nn.Linear(1, 1)
    with pytest.raises(ValueError, match=r"WeightNoise needs a weight with at least 2 elements .* got shape \(1, 1\)"):
        nk.nn.add_weight_noise(layer)
        layer(torch.rand(2, 1))


@pytest.mark.parametrize("draw", ["sample", "batch"])
def test_anisotropic_noise_on_an_empty_batch(draw):
    layer = nk.nn.AnisotropicNoise(4, draw=draw)
    assert layer(torch.rand(0, 4)).shape == (0, 4)
    with nk.replicas(2):
        assert layer(torch.rand(0, 4)).shape == (0, 4)
