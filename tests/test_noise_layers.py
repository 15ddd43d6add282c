"""The noise layers as a researcher meets them: test-time defaults that follow the papers,
RandomSpike's keep probability, reprs, and edge cases (one-element weights, empty batches)."""

import pytest
import torch
from torch import nn

import noisekernels as nk
from noisekernels.replicas import expanding


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


@pytest.mark.parametrize("make", [lambda: nk.nn.GaussianNoise(0.2, seed=4), lambda: nk.nn.LaplaceNoise(0.2, seed=4)],
                         ids=["gaussian", "laplace"])
def test_additive_layers_check_scale_and_dist_when_set(make):
    """Setting a layer's scale or dist checks it then (the forward does not again); a bad value
    leaves the layer as it was, a good one applies from the next call."""
    layer, x = make(), torch.rand(4, 3)
    with pytest.raises(ValueError, match="must be a finite float >= 0, got -1"):
        layer.scale = -1.0
    for bad in ("cauchy", ["gaussian"]):
        with pytest.raises(ValueError, match="dist must be one of"):
            layer.dist = bad
    assert layer.scale == 0.2 and layer.dist in ("gaussian", "laplace")
    layer(x)  # caches the scale's tensor
    layer.scale, layer.dist = 0.5, "uniform"
    start = layer.stream.offset.clone()
    expected = nk.ops.noise_add.noise_add(x, 0.5, layer.stream.seed, start, dist="uniform")
    assert torch.equal(layer(x), expected)


def test_additive_layer_refuses_bad_input_before_drawing():
    layer = nk.nn.GaussianNoise(0.2, seed=4)
    with pytest.raises(TypeError, match="x.dtype must be one of float32"):
        layer(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="the layer's stream is on cpu but x is on meta"):
        layer(torch.ones(4, 3, device="meta"))
    with pytest.raises(TypeError, match="x must be a tensor, got list"):
        layer([1.0, 2.0])
    with expanding(layer, 2), pytest.raises(ValueError, match="replicas > 1 needs x with a batch"):
        layer(torch.tensor(1.0))  # the engine's prefix sharing expanding a 0-dim x (one segment)
    assert layer.stream.offset.item() == 0  # nothing reserved
    assert not layer._scale_tensors  # nor any scale tensor made for the refused calls


def test_additive_layer_data_parallel_copy_refuses_before_any_change():
    """nn.DataParallel's copies share the layer's attributes (a shallow copy of its __dict__): the
    refused copy must leave the layer as it was, its stream and its scale tensors."""
    layer = nk.nn.GaussianNoise(0.2, seed=4)
    copy = layer._replicate_for_data_parallel()
    copy.stream = layer.stream._replicate_for_data_parallel()
    with pytest.raises(RuntimeError, match="DataParallel"):
        copy(torch.rand(4, 3))
    assert layer.stream.offset.item() == 0 and not layer._scale_tensors


def test_additive_layer_run_under_a_fake_tensor_mode_stays_real():
    """A forward under FakeTensorMode (shape propagation, memory estimates) makes fake tensors; the
    layer's scale tensor made there must not serve later real calls, nor a real one fake calls."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer, x = nk.nn.GaussianNoise(0.2, seed=4), torch.rand(4, 3)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # the stream's buffers are real
        assert layer(mode.from_tensor(x)).shape == (4, 3)
    start = layer.stream.offset.clone()
    out = layer(x)
    assert type(out) is torch.Tensor
    assert torch.equal(out, nk.ops.noise_add.noise_add(x, 0.2, layer.stream.seed, start))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        assert type(layer(mode.from_tensor(x))) is not torch.Tensor
