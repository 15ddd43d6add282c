"""torch.func transforms over noise, refused where they would be silently wrong: forward-mode AD
(the ops have no jvp, and a plain pass would drop the tangents: a zero derivative) and torch.vmap
(one draw for all of vmap's samples: every sample the same noise). Torch's own random ops refuse
vmap by default too. A refused call leaves the streams where they were."""

import copy
import functools

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import noisekernels as nk
from noisekernels.functional import noise_add, noise_add_foreach, random_spike

X = torch.randn(3, 4)
NO_JVP = "has no forward-mode derivative"
NO_VMAP = "noise under torch.vmap.*every sample would get the same noise"


def _seeded(name, x, seed, offset):
    if name == "noise_add":
        return noise_add(x, 0.1, seed, offset)
    if name == "noise_add_scale":
        return noise_add(x, torch.tensor(0.1), seed, offset)
    if name == "random_spike":
        return random_spike(x, 0.5, seed, offset)
    return noise_add_foreach([x, x], 0.1, seed, offset)[1]


OPS = {name: functools.partial(_seeded, name, seed=1, offset=0)
       for name in ("noise_add", "noise_add_scale", "random_spike", "noise_add_foreach")}


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


SEEDS, OFFSETS = torch.tensor([1, 2, 3]), torch.tensor([0, 100, 200])


@pytest.mark.parametrize("name", OPS)
def test_vmap_over_per_sample_seeds_and_offsets_equals_a_loop(name):
    """Each sample has its own (seed, offset), so each draws its own noise: vmap runs the op per sample."""
    for in_dims, seeds, offsets in (((None, 0, None), SEEDS, torch.tensor(0)),
                                    ((None, None, 0), torch.tensor(1), OFFSETS),
                                    ((0, 0, 0), SEEDS, OFFSETS)):
        xs = X if in_dims[0] == 0 else X[0]
        expected = torch.stack([_seeded(name, xs[i] if in_dims[0] == 0 else xs, seeds[i] if seeds.dim() else seeds,
                                        offsets[i] if offsets.dim() else offsets) for i in range(3)])
        assert not torch.equal(expected[0], expected[1])
        assert torch.equal(torch.vmap(functools.partial(_seeded, name), in_dims=in_dims)(xs, seeds, offsets), expected)


def test_gradients_through_vmap_over_seeds_equal_a_loop():
    scale = torch.tensor(0.3, requires_grad=True)
    x = X.clone().requires_grad_()
    (torch.vmap(lambda s: noise_add(x, scale, s, torch.tensor(0)))(SEEDS) ** 2).sum().backward()
    loop_scale, loop_x = scale.detach().clone().requires_grad_(), X.clone().requires_grad_()
    sum((noise_add(loop_x, loop_scale, s, torch.tensor(0)) ** 2).sum() for s in SEEDS).backward()
    torch.testing.assert_close(x.grad, loop_x.grad)
    torch.testing.assert_close(scale.grad, loop_scale.grad)


@pytest.mark.parametrize("name", ["anisotropic", "gaussian"])
def test_vmap_inside_torch_compile_is_refused(name):
    """torch.compile traces vmap's body: a Stream draw there was compiled as one draw for all samples
    (AnisotropicNoise draws through nk.random, whose ops see no batched input, so nothing refused it)."""
    layer = LAYERS[name]()
    with pytest.raises(RuntimeError, match=NO_VMAP):
        torch.compile(lambda x: torch.vmap(layer)(x))(X.unsqueeze(1))
    with pytest.raises(torch._dynamo.exc.Unsupported):  # the check's level query stops fullgraph tracing
        torch.compile(lambda x: torch.vmap(layer)(x), fullgraph=True)(X.unsqueeze(1))
    assert all(s.offset.item() == 0 for s in layer.modules() if isinstance(s, nk.Stream))


@pytest.mark.parametrize("name", LAYERS)
def test_vmap_over_an_ensemble_with_stacked_streams_equals_a_loop(name):
    """torch.func's model ensembling (stack_module_state, functional_call, vmap) stacks every model's
    stream state too: one noise source per model, so vmap draws each model's own noise."""
    models = [torch.nn.Sequential(torch.nn.Linear(4, 4), LAYERS[name]()) for _ in range(3)]
    for k, m in enumerate(models):
        for s in m.modules():
            if isinstance(s, nk.Stream):
                s.seed.fill_(k + 1)
    params, buffers = torch.func.stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    ensemble = torch.vmap(lambda p, b, x: torch.func.functional_call(skeleton, (p, b), (x,)), in_dims=(0, 0, None))
    for _ in range(2):  # the stacked streams advance: the second call draws new noise, as the loop's does
        out = ensemble(params, buffers, X)
        torch.testing.assert_close(out, torch.stack([m(X) for m in models]))  # vmap's batched Linear rounds apart
