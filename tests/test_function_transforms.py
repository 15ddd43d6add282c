"""torch.func transforms over noise, refused where they would be silently wrong: forward-mode AD
(the ops have no jvp, and a plain pass would drop the tangents: a zero derivative) and torch.vmap
(one draw for all of vmap's samples: every sample the same noise). Torch's own random ops refuse
vmap by default too. A refused call leaves the streams where they were."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import noisekernels as nk
from noisekernels.functional import noise_add, noise_add_foreach, random_spike

X = torch.randn(3, 4)
NO_JVP = "has no forward-mode derivative"
NO_VMAP = "noise under torch.vmap.*every sample would get the same noise"

OPS = {
    "noise_add": lambda x: noise_add(x, 0.1, 1, 0),
    "noise_add_scale": lambda x: noise_add(x, torch.tensor(0.1), 1, 0),
    "random_spike": lambda x: random_spike(x, 0.5, 1, 0),
    "noise_add_foreach": lambda x: noise_add_foreach([x, x], 0.1, 1, 0)[1],
}


@pytest.mark.parametrize("name", OPS)
def test_forward_mode_ad_is_refused(name):
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match=NO_JVP):
            OPS[name](fwAD.make_dual(X, torch.ones_like(X)))


def test_func_jvp_is_refused():
    with pytest.raises(RuntimeError, match=NO_JVP):
        torch.func.jvp(OPS["noise_add"], (X,), (torch.ones_like(X),))


@pytest.mark.parametrize("name", OPS)
def test_inputs_without_tangents_run_as_usual_inside_a_dual_level(name):
    expected = OPS[name](X)
    with fwAD.dual_level():
        assert torch.equal(OPS[name](X), expected)


LAYERS = {
    "gaussian": lambda: nk.nn.GaussianNoise(0.1, seed=1),
    "learnable": lambda: nk.nn.LearnableNoise((), seed=1),
    "spike": lambda: nk.nn.RandomSpike(keep=0.5, mc=True, seed=1),
    "anisotropic": lambda: nk.nn.AnisotropicNoise(4, seed=1),
}


@pytest.mark.parametrize("name", LAYERS)
def test_vmap_over_a_noise_layer_is_refused(name):
    layer = LAYERS[name]()
    offsets = [s.offset.clone() for s in layer.modules() if isinstance(s, nk.Stream)]
    with pytest.raises(RuntimeError, match=NO_VMAP):
        torch.vmap(layer)(X.unsqueeze(1))  # each sample a batch of one row
    assert [s.offset for s in layer.modules() if isinstance(s, nk.Stream)] == offsets


@pytest.mark.parametrize("name", OPS)
def test_vmap_over_explicit_seed_and_offset_is_refused(name):
    with pytest.raises(RuntimeError, match=NO_VMAP):
        torch.vmap(OPS[name])(X)


def test_vmap_over_a_stream_draw_is_refused():
    stream = nk.Stream(seed=1)
    with pytest.raises(RuntimeError, match=NO_VMAP):
        torch.vmap(lambda x: x + nk.random.normal(x.shape, stream=stream))(X)
    assert stream.offset.item() == 0


def test_vmap_without_noise_still_runs():
    linear = torch.nn.Linear(4, 2)
    assert torch.allclose(torch.vmap(linear)(X), linear(X))
