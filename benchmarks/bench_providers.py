"""Every op's providers side by side in one run (issue 14): this library's kernel ("noisekernels",
the dispatcher's kernel for the device), the eager composite a user would write ("eager"),
torch.compile of that composite ("compile"), and the copy floor ("copy-floor": the memory traffic
no implementation of the op can avoid); on a GPU also the CUDA and Triton kernels by name. Modes:
forward (no autograd), backward (the backward pass alone, on a retained graph), forward+backward.

Before any timing, every provider's result is checked against the op's reference (the
pure-PyTorch spec of the stream contract) within the contract's tolerance. The composites are then
fed the contract's draws of the same (seed, offset) (the reference fills), so they must compute
the kernel's values; timed, they draw from torch's generator as a user's code would. Gradients
are checked against autograd through the reference (plain PyTorch ops).

Sizes and rounds come from the suite's mode (conftest.MODE: smoke, quick or full)."""

import functools
import math
import types
from dataclasses import dataclass

import pytest
import torch
from noisekernels.benchmarking.harness import DEVICES, HAS_CUDA, MODE, saved_bytes_per_element, sync

from noisekernels import philox
from noisekernels import random as nkr
from noisekernels.functional import gaussian_augment, noise_add, noise_add_foreach, random_spike
from noisekernels.ops.replica_reduce import replica_reduce

P, SIGMA, N_AUG = 0.8, 0.1, 10
SEED, OFFSET = 1234, 2**32 - 100  # an offset whose low word wraps inside the call
CHECK_NUMEL = 2**16  # beyond every vector width and with several threads' chunks


def _stream(device):
    return torch.tensor(SEED, device=device), torch.tensor(OFFSET, device=device)


def _activation(numel, device):
    """An NCHW activation of about numel elements: 32 channels of 28x28 maps (fewer for tiny sizes)."""
    c, hw = (32, 28) if numel >= 32 * 28 * 28 else (4, 8)
    return torch.randn(max(1, numel // (c * hw * hw)), c, hw, hw, device=device)


# ---------------------------------------------------------------- the contract's draws, for checks

def contract_uniform(shape, device, segments=1, counter=0):
    seed, offset = _stream(device)
    return nkr.uniform(shape, seed, offset + counter, segments=segments, backend="reference")


def contract_normal(shape, device, segments=1, counter=0):
    """counter: where the draws start, in counters after OFFSET."""
    seed, offset = _stream(device)
    return nkr.normal(shape, seed, offset + counter, segments=segments, backend="reference")


def contract_spike_draws(x):
    """Random Spiking's (keep, value) uniforms: words (w0, w1) of a counter for even elements,
    (w2, w3) for odd ones, i.e. the even and odd elements of the uniform fill of 2 * numel."""
    u = contract_uniform((2 * x.numel(),), x.device)
    return u[0::2].view(x.shape), u[1::2].view(x.shape)


# ---------------------------------------------------------------- the ops

@dataclass
class Op:
    """One op: make(numel, device) -> (tensors, grad_inputs); ours(tensors, backend) -> output;
    composite(tensors, draws) -> output, draws from torch_draws(tensors) (timed) or
    contract_draws(tensors) (checked); floor(tensors) -> the unavoidable traffic of the forward
    (floor_bytes counts it), backward_floor(tensors, grad) that of the backward (backward_bytes).
    The reference is ours on the "reference" backend."""

    make: object
    ours: object
    composite: object
    torch_draws: object
    contract_draws: object
    floor: object
    floor_bytes: object
    backward_floor: object = None
    backward_bytes: object = None
    modes: tuple = ("forward",)
    atol: float = 0.0  # the contract's tolerance (normals agree to a few ulp; uniforms exactly)
    gpu_backends: tuple = ("cuda", "triton")


def _spike_composite(x, draws):
    keep_u, value_u = draws
    lo, hi = torch.aminmax(x.detach())
    return torch.where(keep_u < P, x, lo + value_u * (hi - lo))


def _noise_composite(dist):
    def composite(x, draws):
        (u,) = draws
        if dist == "gaussian":
            eps = u
        elif dist == "uniform":
            eps = 2 * u - 1
        else:  # Laplace(0, 1) by inversion
            c = u - 0.5
            eps = -torch.sign(c) * torch.log((1 - 2 * c.abs()).clamp_min(1e-7))
        return x + SIGMA * eps
    return composite


def _noise_draws(dist):
    if dist == "gaussian":
        return (lambda t: (torch.randn_like(t[0]),)), (lambda t: (contract_normal(t[0].shape, t[0].device),))
    return (lambda t: (torch.rand_like(t[0]),)), (lambda t: (contract_uniform(t[0].shape, t[0].device),))


def _noise_op(dist):
    torch_draws, contract_draws = _noise_draws(dist)
    return Op(
        make=lambda n, d: ((_activation(n, d),), (0,)),
        ours=lambda t, backend: noise_add(t[0], SIGMA, *_stream(t[0].device), dist=dist, backend=backend),
        composite=lambda t, draws: _noise_composite(dist)(t[0], draws),
        torch_draws=torch_draws, contract_draws=contract_draws,
        floor=lambda t: t[0].clone(), floor_bytes=lambda t: 2 * _bytes(t[0]),
        backward_floor=lambda t, g: g.clone(), backward_bytes=lambda t: 2 * _bytes(t[0]),
        modes=("forward", "backward", "forward+backward"),
        atol=1e-5 if dist != "uniform" else 1e-6)


def _bytes(t):
    return t.numel() * t.element_size()


def _resnet_like(numel, device):
    """Weights shaped like a ResNet's (conv stacks, biases, a classifier), about numel values."""
    width = max(4, int(math.sqrt(numel / 60)))
    shapes = [(width, 3, 3, 3), (width,)] + [(width, width, 3, 3), (width,)] * 6 + [(10, width), (10,)]
    return [torch.randn(s, device=device) for s in shapes]


def _pni_make(n, d):
    x = _activation(n, d)
    return (x, torch.full((x.shape[1],), 0.25, device=d)), (0, 1)


def _fill_op(ours, torch_fill, contract, **extra):
    """A random fill against torch's generator; the floor writes the tensor once."""
    return Op(make=lambda n, d: ((torch.empty(n, device=d),), ()),
              ours=lambda t, backend: ours(t[0].shape, *_stream(t[0].device), backend=backend),
              composite=lambda t, draws: draws[0],
              torch_draws=lambda t: (torch_fill(t[0].shape, device=t[0].device),),
              contract_draws=lambda t: (contract(t[0].shape, t[0].device),),
              floor=lambda t: torch.zeros_like(t[0]), floor_bytes=lambda t: _bytes(t[0]), **extra)


OPS = {
    "random_spike": Op(
        make=lambda n, d: ((_activation(n, d),), (0,)),
        ours=lambda t, backend: random_spike(t[0], P, *_stream(t[0].device), backend=backend),
        composite=lambda t, draws: _spike_composite(t[0], draws),
        torch_draws=lambda t: (torch.rand_like(t[0]), torch.rand_like(t[0])),
        contract_draws=lambda t: contract_spike_draws(t[0]),
        floor=lambda t: (t[0].clone(), torch.aminmax(t[0])), floor_bytes=lambda t: 3 * _bytes(t[0]),
        backward_floor=lambda t, g: g.clone(), backward_bytes=lambda t: 2 * _bytes(t[0]),
        modes=("forward", "backward", "forward+backward"), atol=1e-6),
    "gaussian_add": _noise_op("gaussian"),
    "uniform_add": _noise_op("uniform"),
    "laplace_add": _noise_op("laplace"),
    # PNI: a learnable per-channel scale alpha; the composite keeps eps for alpha's gradient.
    "learnable_noise": Op(
        make=_pni_make,
        ours=lambda t, backend: noise_add(t[0], t[1], *_stream(t[0].device), backend=backend),
        composite=lambda t, draws: t[0] + t[1].view(1, -1, 1, 1) * draws[0],
        torch_draws=lambda t: (torch.randn_like(t[0]),),
        contract_draws=lambda t: (contract_normal(t[0].shape, t[0].device),),
        floor=lambda t: t[0].clone(), floor_bytes=lambda t: 2 * _bytes(t[0]),
        backward_floor=lambda t, g: (g.clone(), g.sum((0, 2, 3))), backward_bytes=lambda t: 3 * _bytes(t[0]),
        modes=("forward", "backward", "forward+backward"), atol=1e-5),
    # Weight noise over a whole model: one call for every tensor against a loop of composites.
    "multi_tensor_injection": Op(
        make=lambda n, d: (tuple(_resnet_like(n, d)), ()),
        ours=lambda t, backend: noise_add_foreach(list(t), SIGMA, *_stream(t[0].device), backend=backend),
        composite=lambda t, draws: [w + SIGMA * e for w, e in zip(t, draws)],
        torch_draws=lambda t: [torch.randn_like(w) for w in t],
        contract_draws=lambda t: _foreach_contract_draws(t),
        floor=lambda t: torch._foreach_mul(list(t), 1.0), floor_bytes=lambda t: 2 * sum(_bytes(w) for w in t),
        atol=1e-5),
    # Gaussian data augmentation: N_AUG noisy copies, clipped to [0, 1], replica-major.
    "augmentation": Op(
        make=lambda n, d: ((torch.rand(max(1, n // (3 * 32 * 32 * N_AUG)), 3, 32, 32, device=d),), ()),
        ours=lambda t, backend: gaussian_augment(t[0], None, N_AUG, SIGMA, *_stream(t[0].device), backend=backend)[0],
        composite=lambda t, draws: (t[0].repeat(N_AUG, 1, 1, 1) + SIGMA * draws[0]).clamp(0, 1),
        torch_draws=lambda t: (torch.randn((N_AUG * t[0].shape[0], *t[0].shape[1:]), device=t[0].device),),
        contract_draws=lambda t: (contract_normal((N_AUG * t[0].shape[0], *t[0].shape[1:]), t[0].device, N_AUG),),
        floor=lambda t: t[0].repeat(N_AUG, 1, 1, 1), floor_bytes=lambda t: (1 + N_AUG) * _bytes(t[0]), atol=1e-5),
    # The MC reductions of (n, B, C) logits: mean of softmax ("MC Avg") and majority vote.
    "replica_reduce_mean": Op(
        make=lambda n, d: ((torch.randn(50, max(1, n // 500), 10, device=d),), ()),
        ours=lambda t, backend: replica_reduce(t[0], "mean", backend=backend),
        composite=lambda t, draws: torch.softmax(t[0], -1).mean(0),
        torch_draws=lambda t: (), contract_draws=lambda t: (),
        floor=lambda t: t[0].sum(0), floor_bytes=lambda t: _bytes(t[0]), atol=1e-6),
    "replica_reduce_vote": Op(
        make=lambda n, d: ((torch.randn(50, max(1, n // 500), 10, device=d),), ()),
        ours=lambda t, backend: replica_reduce(t[0], "vote", backend=backend),
        composite=lambda t, draws: torch.nn.functional.one_hot(t[0].argmax(-1), 10).sum(0).float(),
        torch_draws=lambda t: (), contract_draws=lambda t: (),
        floor=lambda t: t[0].sum(0), floor_bytes=lambda t: _bytes(t[0])),
    "uniform_fill": _fill_op(nkr.uniform, torch.rand, contract_uniform),
    "normal_fill": _fill_op(nkr.normal, torch.randn, contract_normal, atol=1e-5),
}


def _foreach_contract_draws(ts):
    """Tensor k of a multi-tensor call draws what a single call on the counters after the
    tensors before it would (philox.counters of each)."""
    draws, start = [], 0
    for w in ts:
        draws.append(contract_normal(w.shape, w.device, counter=start))
        start += philox.counters(w.numel())
    return draws


# ---------------------------------------------------------------- providers and the check

def _providers(op, device):
    names = ["noisekernels", "eager", "compile", "copy-floor"]
    if device == "cuda":
        names += [f"noisekernels-{b}" for b in op.gpu_backends]
    return names


def _own_code(fn, name):
    """fn with a code object of its own: dynamo caches compiled frames per code object (at most 8
    each), so one shared lambda for every op would run later ops uncompiled."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


@functools.lru_cache(maxsize=None)
def _compiled(name, with_draws):
    """torch.compile of an op's composite: drawing inside the graph (timed), or of given draws (checked)."""
    op = OPS[name]
    if with_draws:
        fn = _own_code(lambda t, draws: op.composite(t, draws), f"{name}_composite_on_draws")
    else:
        fn = _own_code(lambda t: op.composite(t, op.torch_draws(t)), f"{name}_composite")
    return torch.compile(fn, backend=MODE.compile_backend)


def _fn(name, provider, tensors):
    """The zero-argument call that provider runs for op `name` on `tensors` (timed)."""
    op = OPS[name]
    if provider == "noisekernels":
        return lambda: op.ours(tensors, None)
    if provider.startswith("noisekernels-"):
        return lambda: op.ours(tensors, provider.split("-", 1)[1])
    if provider == "eager":
        return lambda: op.composite(tensors, op.torch_draws(tensors))
    if provider == "compile":
        return lambda: _compiled(name, False)(tensors)
    return lambda: op.floor(tensors)


def _check_fn(name, provider, tensors):
    """The same provider computing on the contract's draws (composites) for the agreement check."""
    op = OPS[name]
    if provider == "eager":
        return lambda: op.composite(tensors, op.contract_draws(tensors))
    if provider == "compile":
        return lambda: _compiled(name, True)(tensors, op.contract_draws(tensors))
    return _fn(name, provider, tensors)


def _flat(out):
    if isinstance(out, (list, tuple)):
        return torch.cat([o.reshape(-1) for o in out])
    return out.reshape(-1)


def _grads(fn, tensors, grad_inputs, seed_grad=0):
    inputs = [tensors[i] for i in grad_inputs]
    out = fn()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed_grad)).to(out.device)
    return torch.autograd.grad(out, inputs, g)


def check_agrees(name, provider, device, numel):
    """(max abs difference of provider's result from the reference, the same of its gradients or
    None); asserts the contract's tolerance."""
    op = OPS[name]
    tensors, grad_inputs = op.make(numel, device)
    with torch.no_grad():
        expected = _flat(op.ours(tensors, "reference")).double()
        got = _flat(_check_fn(name, provider, tensors)()).double()
    worst = (got - expected).abs().max().item() if got.numel() else 0.0
    assert got.shape == expected.shape and worst <= op.atol, f"{name}/{provider}: max |diff| {worst} > {op.atol}"
    worst_grad = None
    if "forward+backward" in op.modes:
        grad_tensors = tuple(t.detach().clone().requires_grad_(i in grad_inputs) for i, t in enumerate(tensors))
        mine = _grads(_check_fn(name, provider, grad_tensors), grad_tensors, grad_inputs)
        spec = _grads(lambda: op.ours(grad_tensors, "reference"), grad_tensors, grad_inputs)  # autograd of the spec
        for a, b in zip(mine, spec):
            diff = (a.double() - b.double()).abs().max().item()
            # Gradients of a scale are sums over many elements: float32 order differences scale with them.
            tol = op.atol + 1e-5 * b.double().abs().max().item()
            assert diff <= tol, f"{name}/{provider}: gradient max |diff| {diff} > {tol}"
            worst_grad = max(worst_grad or 0.0, diff)
    return worst, worst_grad


# ---------------------------------------------------------------- the benchmarks

def _cases():
    for name, op in OPS.items():
        for mode in op.modes:
            for device in ("cpu", "cuda"):
                for provider in _providers(op, device):
                    marks = [pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")] if device == "cuda" else []
                    yield pytest.param(name, mode, provider, device, id=f"{name}-{mode}-{provider}-{device}", marks=marks)


@pytest.mark.parametrize("name,mode,provider,device", list(_cases()))
def test_provider(benchmark, name, mode, provider, device):
    op = OPS[name]
    numel = MODE.provider_numel
    if provider != "copy-floor":  # the reference is slow: checked on up to CHECK_NUMEL elements
        diff, grad_diff = check_agrees(name, provider, device, min(numel, CHECK_NUMEL))
        benchmark.extra_info.update(max_abs_diff=diff, max_abs_grad_diff=grad_diff)
    tensors, grad_inputs = op.make(numel, device)
    forward_bytes = op.floor_bytes(tensors)
    backward_bytes = op.backward_bytes(tensors) if op.backward_bytes else 0
    if mode != "forward":
        tensors = tuple(t.requires_grad_(i in grad_inputs) for i, t in enumerate(tensors))
    inputs = [tensors[i] for i in grad_inputs]
    if provider == "copy-floor":
        detached = tuple(t.detach() for t in tensors)
        g = torch.randn_like(detached[0])
        fwd = lambda: op.floor(detached)  # noqa: E731
        bwd = lambda: op.backward_floor(detached, g)  # noqa: E731
        run = {"forward": fwd, "backward": bwd, "forward+backward": lambda: (fwd(), bwd())}[mode]
    elif mode == "forward":
        fn = _fn(name, provider, tensors)

        def run():
            with torch.no_grad():
                return fn()
    else:
        fn = _fn(name, provider, tensors)
        out = fn()
        g = torch.randn_like(out)
        if mode == "backward":
            run = lambda: torch.autograd.grad(out, inputs, g, retain_graph=True)  # noqa: E731
        else:
            run = lambda: torch.autograd.grad(fn(), inputs, g)  # noqa: E731
            benchmark.extra_info["saved_bytes_per_element"] = saved_bytes_per_element(fn, tensors[0].numel())
    benchmark.group = f"{name}-{mode}-{device}"
    benchmark.extra_info.update(
        impl=provider, op=name, mode=mode, device=device, section="providers", numel=sum(t.numel() for t in tensors),
        floor_bytes={"forward": forward_bytes, "backward": backward_bytes,
                     "forward+backward": forward_bytes + backward_bytes}[mode])
    if provider == "noisekernels":
        benchmark.extra_info["ours"] = True
    benchmark.pedantic(lambda: (run(), sync(device)), rounds=MODE.rounds, warmup_rounds=MODE.warmup, iterations=1)


@pytest.mark.parametrize("device", DEVICES)
def test_device_copy(benchmark, device):
    """The device's memory bandwidth in this run: a copy of the providers' tensor size into a
    preallocated tensor (bytes read and written), the limit every kernel's GB/s is a fraction of."""
    src = torch.randn(MODE.provider_numel, device=device)
    dst = torch.empty_like(src)
    benchmark.group = f"device-copy-{device}"
    benchmark.extra_info.update(impl="copy", device=device, section="device-copy", numel=src.numel(),
                                floor_bytes=2 * _bytes(src))
    benchmark.pedantic(lambda: (dst.copy_(src), sync(device)), rounds=MODE.rounds, warmup_rounds=MODE.warmup,
                       iterations=1)
