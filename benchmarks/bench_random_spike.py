"""Random Spiking on a (128, 32, 28, 28) float32 activation: the fused op against the eager
composite a user would write (aminmax, rand_like, where; a bool mask saved for backward), that
composite under torch.compile, and the copy floor (x.clone() plus torch.aminmax(x)).
Goals (issues 3 and 11): forward+backward at least 10x faster than eager and 5x faster than compile;
forward within 2.5x of the copy floor (copy-floor time / ours at least 0.4). The backward alone
(ours: a masked copy under the forward's packed mask) is reported beside eager's (where on its
bool mask) and its copy floor (grad.clone())."""

import pytest
import torch
from conftest import DEVICES, paired_ratio, sync

import noisekernels as nk
from noisekernels.ops.random_spike import random_spike, random_spike_backward

SHAPE = (128, 32, 28, 28)
P = 0.8


def composite(x, p):
    lo, hi = torch.aminmax(x.detach())
    keep = torch.rand_like(x) < p
    noise = lo + torch.rand_like(x) * (hi - lo)
    return torch.where(keep, x, noise)


_compiled = torch.compile(composite)


def fused(x, p, stream=nk.Stream(seed=1)):
    return nk.functional.random_spike(x, p, stream=stream)


IMPLS = {"noisekernels": fused, "eager": composite, "compile": _compiled}


def saved_bytes_per_element(fn, x):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(x.detach().requires_grad_(), P)
    return sum(t.numel() * t.element_size() for t in saved) / x.numel()


def _record(benchmark, impl, group, goals):
    benchmark.group = group
    benchmark.extra_info["impl"] = impl
    if impl == "noisekernels":
        benchmark.extra_info["ours"] = True
        benchmark.extra_info["goals"] = goals


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["noisekernels", "eager", "compile", "copy-floor"])
def test_forward(benchmark, impl, device):
    x = torch.randn(SHAPE, device=device)
    _record(benchmark, impl, f"random_spike-forward-{device}", {"copy-floor": 0.4})
    if impl == "copy-floor":
        fn = lambda: (x.clone(), torch.aminmax(x))  # noqa: E731
    else:
        fn = lambda: IMPLS[impl](x, P)  # noqa: E731
    if impl == "noisekernels":
        with torch.no_grad():
            benchmark.extra_info["paired"] = {
                "copy-floor": (paired_ratio(fn, lambda: (x.clone(), torch.aminmax(x)), 21, lambda: sync(device)), 0.4),
                "eager": (paired_ratio(fn, lambda: composite(x, P), 21, lambda: sync(device)), None)}

    def run():
        with torch.no_grad():
            out = fn()
        sync(device)
        return out

    benchmark.pedantic(run, rounds=20, warmup_rounds=3, iterations=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["noisekernels", "eager", "compile"])
def test_forward_backward(benchmark, impl, device):
    x = torch.randn(SHAPE, device=device, requires_grad=True)
    g = torch.randn(SHAPE, device=device)
    _record(benchmark, impl, f"random_spike-forward+backward-{device}", {"eager": 10.0, "compile": 5.0})
    if impl != "compile":
        benchmark.extra_info["saved_bytes_per_element"] = saved_bytes_per_element(IMPLS[impl], x)
    fn = IMPLS[impl]
    if impl == "noisekernels":
        benchmark.extra_info["paired"] = {"eager": (paired_ratio(lambda: fn(x, P).backward(g), lambda: composite(x, P).backward(g),
                                                                 21, lambda: sync(device)), 10.0)}

    def run():
        fn(x, P).backward(g)
        sync(device)

    benchmark.pedantic(run, rounds=20, warmup_rounds=3, iterations=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["noisekernels", "eager", "copy-floor"])
def test_backward(benchmark, impl, device):
    x = torch.randn(SHAPE, device=device)
    g = torch.randn(SHAPE, device=device)
    _record(benchmark, impl, f"random_spike-backward-{device}", {})
    _, mask = random_spike(x, P, stream=nk.Stream(seed=1), return_mask=True)
    keep = torch.rand_like(x) < P  # eager's saved mask
    fns = {"noisekernels": lambda: random_spike_backward(g, mask),
           "eager": lambda: torch.where(keep, g, torch.zeros((), device=device)),
           "copy-floor": lambda: g.clone()}
    if impl == "noisekernels":
        benchmark.extra_info["paired"] = {
            "copy-floor": (paired_ratio(fns[impl], fns["copy-floor"], 21, lambda: sync(device)), None)}

    def run():
        out = fns[impl]()
        sync(device)
        return out

    benchmark.pedantic(run, rounds=20, warmup_rounds=3, iterations=1)
