"""Noise injection (issue 4), side by side in one run:
- Gaussian add forward on (128, 32, 28, 28) float32 against x + sigma * randn_like(x) and its
  torch.compile (goals: 5x and 3x);
- PNI (learnable alpha) forward+backward against the eager version that saves eps (goal: 4x,
  issue 11);
- multi-tensor weight noise over a ResNet-18-sized parameter list against a loop of single calls;
- the fixed cost of one noise layer call (forward+backward of GaussianNoise on 8 x 16 values, where
  the kernel is nothing) against the eager composite: what a small layer or an MC loop pays per call;
- Gaussian augmentation N=10 against x.repeat + randn_like + clamp."""

import pytest
import torch
from conftest import DEVICES, paired_ratio, sync

import noisekernels as nk
from noisekernels.functional import gaussian_augment, noise_add, noise_add_foreach

SHAPE = (128, 32, 28, 28)
SIGMA = 0.1
# The parameter shapes of torchvision's resnet18 (11.7M values in 62 tensors).
RESNET18_SHAPES = [(64, 3, 7, 7), (64,), (64,), (64, 64, 3, 3), (64,), (64,), (64, 64, 3, 3), (64,), (64,), (64, 64, 3, 3), (64,), (64,), (64, 64, 3, 3), (64,), (64,), (128, 64, 3, 3), (128,), (128,), (128, 128, 3, 3), (128,), (128,), (128, 64, 1, 1), (128,), (128,), (128, 128, 3, 3), (128,), (128,), (128, 128, 3, 3), (128,), (128,), (256, 128, 3, 3), (256,), (256,), (256, 256, 3, 3), (256,), (256,), (256, 128, 1, 1), (256,), (256,), (256, 256, 3, 3), (256,), (256,), (256, 256, 3, 3), (256,), (256,), (512, 256, 3, 3), (512,), (512,), (512, 512, 3, 3), (512,), (512,), (512, 256, 1, 1), (512,), (512,), (512, 512, 3, 3), (512,), (512,), (512, 512, 3, 3), (512,), (512,), (1000, 512), (1000,)]




def _record(benchmark, impl, group, goals=None):
    benchmark.group = group
    benchmark.extra_info["impl"] = impl
    if impl == "noisekernels":
        benchmark.extra_info["ours"] = True
        benchmark.extra_info["goals"] = goals or {}


def _run(benchmark, fn, device, rounds=20):
    def run():
        out = fn()
        sync(device)
        return out

    benchmark.pedantic(run, rounds=rounds, warmup_rounds=3, iterations=1)


def gaussian_eager(x, sigma):
    return x + sigma * torch.randn_like(x)


_gaussian_compiled = torch.compile(gaussian_eager)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["noisekernels", "eager", "compile"])
def test_gaussian_add_forward(benchmark, impl, device):
    x = torch.randn(SHAPE, device=device)
    stream = nk.Stream(seed=1).to(device)
    _record(benchmark, impl, f"gaussian_add-forward-{device}", {"eager": 5.0, "compile": 3.0})
    fns = {"noisekernels": lambda: noise_add(x, SIGMA, stream=stream),
           "eager": lambda: gaussian_eager(x, SIGMA), "compile": lambda: _gaussian_compiled(x, SIGMA)}
    with torch.no_grad():
        if impl == "noisekernels":
            benchmark.extra_info["paired"] = {"eager": (paired_ratio(fns[impl], fns["eager"], 21, lambda: sync(device)), 5.0)}
        _run(benchmark, fns[impl], device)


def pni_eager(x, alpha):
    eps = torch.randn_like(x)  # autograd keeps eps for alpha's gradient
    return x + alpha * eps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["noisekernels", "eager"])
def test_pni_forward_backward(benchmark, impl, device):
    x = torch.randn(SHAPE, device=device, requires_grad=True)
    alpha = torch.full((SHAPE[1],), 0.25, device=device, requires_grad=True)
    g = torch.randn(SHAPE, device=device)
    stream = nk.Stream(seed=1).to(device)
    _record(benchmark, impl, f"pni_channel-forward+backward-{device}", {"eager": 4.0})
    if impl == "noisekernels":
        fn = lambda: noise_add(x, alpha, stream=stream).backward(g)  # noqa: E731
        eager = lambda: pni_eager(x, alpha.view(1, -1, 1, 1)).backward(g)  # noqa: E731
        benchmark.extra_info["paired"] = {"eager": (paired_ratio(fn, eager, 21, lambda: sync(device)), 4.0)}
    else:
        fn = lambda: pni_eager(x, alpha.view(1, -1, 1, 1)).backward(g)  # noqa: E731
    _run(benchmark, fn, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["noisekernels", "eager"])
def test_layer_call_overhead(benchmark, impl, device):
    x = torch.randn(8, 16, device=device, requires_grad=True)
    layer = nk.nn.GaussianNoise(SIGMA).to(device) if impl == "noisekernels" else (lambda t: gaussian_eager(t, SIGMA))
    _record(benchmark, impl, f"noise_layer-call-overhead-{device}")
    benchmark.pedantic(lambda: (layer(x).sum().backward(), sync(device)), rounds=20, warmup_rounds=3, iterations=100)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["noisekernels", "loop"])
def test_weight_noise_resnet18(benchmark, impl, device):
    params = [torch.randn(s, device=device) for s in RESNET18_SHAPES]
    stream = nk.Stream(seed=1).to(device)
    _record(benchmark, impl, f"weight_noise-resnet18-{device}")
    fns = {"noisekernels": lambda: noise_add_foreach(params, SIGMA, stream=stream),
           "loop": lambda: [noise_add(p, SIGMA, stream=stream) for p in params]}
    with torch.no_grad():
        _run(benchmark, fns[impl], device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["noisekernels", "eager"])
def test_gaussian_augment_n10(benchmark, impl, device):
    x = torch.rand(128, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    stream = nk.Stream(seed=1).to(device)
    _record(benchmark, impl, f"gaussian_augment-N10-{device}")

    def eager():
        xs = x.repeat(10, 1, 1, 1)
        return (xs + 0.1 * torch.randn_like(xs)).clamp(0, 1), y.repeat(10)

    fns = {"noisekernels": lambda: gaussian_augment(x, y, 10, 0.1, stream=stream), "eager": eager}
    with torch.no_grad():
        _run(benchmark, fns[impl], device)
