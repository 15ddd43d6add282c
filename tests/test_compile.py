"""torch.compile (fullgraph) runs every noise layer's forward and backward on exactly the noise eager
draws: the backward regenerates the (seed, offset) its forward used, never the advanced offset,
under the eager, aot_eager and inductor backends, and compiled steps draw fresh noise each step."""

import pytest
import torch
from torch import nn

import noisekernels as nk

COMPILE_BACKENDS = ["eager", "aot_eager", "inductor"]


class WeightNoisyLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 5)
        nk.nn.add_weight_noise(self.linear, shape=(5, 1), init=0.3, seed=4)

    def forward(self, x):
        return self.linear(x)


# name -> (module factory, input shape, output shape). Exact: the layer's output and input gradient are
# a noise op's result (the same kernel on the same counters, bit for bit); parameter gradients and the
# other layers also pass through arithmetic inductor may round differently (std, matmul, sums).
LAYERS = {
    "random_spike": (lambda: nk.nn.RandomSpike(0.5, mc=True, seed=1), (4, 3, 5), (4, 3, 5)),
    "gaussian": (lambda: nk.nn.GaussianNoise(0.7, seed=2), (4, 3, 5), (4, 3, 5)),
    "uniform": (lambda: nk.nn.UniformNoise(0.7, seed=2), (4, 3, 5), (4, 3, 5)),
    "laplace": (lambda: nk.nn.LaplaceNoise(0.7, seed=2), (4, 3, 5), (4, 3, 5)),
    "learnable": (lambda: nk.nn.LearnableNoise((3,), init=0.4, seed=3), (4, 3, 5), (4, 3, 5)),
    "weight_noise": (WeightNoisyLinear, (6, 8), (6, 5)),
    "anisotropic": (lambda: nk.nn.AnisotropicNoise(6, init_std=0.5, seed=5), (4, 6), (4, 6)),
}
EXACT = {"random_spike", "gaussian", "uniform", "laplace", "learnable"}


def _step(module, x, weight):
    """Output and gradients (input first, then parameters) of a loss weighting every output."""
    x = x.clone().requires_grad_()
    y = module(x)
    return y.detach(), torch.autograd.grad((y * weight).sum(), [x, *module.parameters()])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each case compiles from scratch (the layers share forward code objects across cases)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _streams(module):
    return [m for m in module.modules() if isinstance(m, nk.Stream)]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_forward_and_backward_match_eager(name, backend):
    make, in_shape, out_shape = LAYERS[name]
    torch.manual_seed(0)
    eager, other = make().train(), make().train()
    other.load_state_dict(eager.state_dict())
    step = torch.compile(other, backend=backend, fullgraph=True)
    x = torch.randn(in_shape)
    outputs = []
    for _ in range(3):  # each step's backward must regenerate that step's noise, not the next one's
        weight = torch.randn(out_shape)
        y_eager, grads_eager = _step(eager, x, weight)
        y, grads = _step(step, x, weight)
        if name in EXACT:
            assert torch.equal(y, y_eager)
            assert torch.equal(grads[0], grads_eager[0])
        for got, want in zip((y, *grads), (y_eager, *grads_eager)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        outputs.append(y)
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])
    assert [s.offset.item() for s in _streams(other)] == [s.offset.item() for s in _streams(eager)]


def _reference_backend_step(x, scale, weights):
    from noisekernels.functional import noise_add, noise_add_foreach

    h = noise_add(x, scale, 3, 100, dist="uniform", replicas=2, backend="reference")
    a, b = noise_add_foreach([h, x], weights, 3, 500, dist="uniform", backend="reference")
    return a.reshape(2, 4, 5).sum(0) + b * 2


def test_explicit_reference_backend_compiles_with_its_gradients():
    """An explicit Python backend runs through an autograd.Function that torch.compile traces; the
    gradients of every input must survive it (inductor would only be slow on the reference Philox)."""
    torch.manual_seed(0)
    inputs = [torch.randn(4, 5), torch.rand(5) + 0.1, torch.tensor([0.3, 0.8])]
    step = torch.compile(_reference_backend_step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (_reference_backend_step, step):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = fn(*leaves)
        results.append((y.detach(), *torch.autograd.grad((y * torch.linspace(-1, 1, 5)).sum(), leaves)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)
    assert all((g != 0).any() for g in results[1][1:])


def test_noise_layers_keep_a_dynamic_batch_size_under_compile():
    """A differentiable call does not specialize x's sizes (mark_dynamic refuses a specialized one):
    a new batch size reuses the compiled graph, with eager's output and gradients."""
    from noisekernels.functional import noise_add

    def make():
        layers = nn.Sequential(nk.nn.GaussianNoise(0.7, seed=2), nk.nn.LearnableNoise((3,), init=0.4, seed=3))
        stream = nk.Stream(5)  # replicas, clipped: the backward sums over them and recomputes from x
        return lambda x: noise_add(layers(x), 0.3, stream=stream, replicas=2, clip=(0.0, 1.0)), layers

    (eager, eager_layers), (compiled, compiled_layers) = make(), make()
    step = torch.compile(compiled, backend="aot_eager")
    for batch in (4, 6):
        x = torch.rand(batch, 3, 5)
        x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch._dynamo.mark_dynamic(x_compiled, 0)
        out_eager, out_compiled = eager(x_eager), step(x_compiled)
        assert torch.equal(out_compiled, out_eager)
        weight = torch.rand_like(out_eager)
        (out_eager * weight).sum().backward()
        (out_compiled * weight).sum().backward()
        assert torch.equal(x_compiled.grad, x_eager.grad)
        assert torch.equal(compiled_layers[1].alpha.grad, eager_layers[1].alpha.grad)
