"""Batched MC ensembles and EOT gradients: n noisy passes as one (ARCHITECTURE.md section 3).

Replicas are laid out replica-major, (n*B, ...), and run inside noisekernels.replicas(n) so batch
statistics (Random Spiking's min/max) and batch-shared draws (A2SNN) are taken per replica. Every
noise layer reserves counters per call, so replica r of a layer always draws the counters a loop's
r-th pass would: a batched pass, a chunked pass and a loop of n passes see the same noise.

How a model is batched is planned once per (model, input shape) by a probe on two rows:
- "deterministic": no noise layer is active; one pass, repeated.
- "shared": layers before the first noise layer run once on B rows and that layer's input is
  expanded to n*B (prefix sharing; an A2SNN backbone runs once for all draws). Used only when the
  probe gives the same logits as full replication.
- "replicate": the input is replicated (a skip connection around a noise layer, for example).
- "loop": n separate passes (weight noise draws one weight per pass, which replicas cannot share).
Chunks of replicas keep the working set in cache on CPU and within a memory budget on GPU.
"""

import contextlib
import weakref

import torch
from torch import nn

from . import replicas
from .nn.anisotropic import AnisotropicNoise
from .nn.noise import AdditiveNoise, WeightNoise, _NoiseLayer
from .nn.random_spike import RandomSpike
from .ops.replica_reduce import MODES, replica_reduce
from .stream import Stream

# Activation working set per chunk on CPU: about the L2 caches of this class of machine.
CPU_CACHE_BYTES = 2 << 20
GPU_MEMORY_FRACTION = 0.25
_NOISE_LAYERS = (RandomSpike, _NoiseLayer, AnisotropicNoise)
_plans = weakref.WeakKeyDictionary()


class Plan:
    """How a model is batched: mode, the first noise layer (shared mode), and the largest
    activation of one replica in bytes (for chunking)."""

    def __init__(self, mode, first=None, replica_bytes=0):
        self.mode, self.first, self.replica_bytes = mode, first, replica_bytes

    def __repr__(self):
        return f"Plan(mode={self.mode!r}, first={type(self.first).__name__ if self.first is not None else None})"


def _active_noise(model):
    return [m for m in model.modules() if isinstance(m, _NOISE_LAYERS) and not isinstance(m, WeightNoise)
            and (m.training or m.mc)]


def _check_batch_statistics(model):
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
            raise ValueError(f"{name or type(m).__name__} uses batch statistics, which would mix replicas; "
                             "call model.eval() (or run the loop yourself)")


def _repeat(x, n):
    return x if n == 1 else x.repeat(n, *([1] * (x.dim() - 1)))


@contextlib.contextmanager
def _restored_streams(model):
    """Runs a probe and puts every stream back where it was."""
    saved = [(s, s.offset.clone()) for s in model.modules() if isinstance(s, Stream)]
    try:
        yield
    finally:
        for s, offset in saved:
            s.offset.copy_(offset)


def _probe_input(x):
    if x.shape[0] >= 2:
        return x[:2]
    return torch.cat([x, x.flip(-1) * 0.5])  # two different rows, so rows that mix are seen


def _make_plan(model, x):
    if any(isinstance(m, WeightNoise) and (m.training or m.mc) for m in model.modules()):
        return Plan("loop")
    noise = _active_noise(model)
    if not noise:
        return Plan("deterministic")
    probe = _probe_input(x)
    order, sizes = [], []
    hooks = [m.register_forward_pre_hook(lambda mod, args: order.append(mod)) for m in noise]
    # (bytes, after the first noise layer): shared mode replicates only the layers after it.
    hooks += [m.register_forward_hook(lambda mod, args, out: sizes.append((out.numel() * out.element_size(), bool(order)))
                                      if isinstance(out, torch.Tensor) else None)
              for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad(), _restored_streams(model), replicas.replicas(2):
            replicated = model(_repeat(probe, 2))
    finally:
        for h in hooks:
            h.remove()
    rows = 2 * probe.shape[0]
    all_bytes = max((b for b, _ in sizes), default=0) // rows
    after_bytes = max((b for b, after in sizes if after), default=0) // rows
    first = order[0] if order else None
    if first is None:
        return Plan("replicate", None, all_bytes)
    hook = first.register_forward_pre_hook(lambda mod, args: (_repeat(args[0], 2), *args[1:]))
    try:
        with torch.no_grad(), _restored_streams(model), replicas.replicas(2):
            shared = model(probe)
        same = shared.shape == replicated.shape and torch.allclose(shared, replicated, rtol=1e-4, atol=1e-5)
    except RuntimeError:  # rows of B and n*B met: a tensor from before the noise layer is used after it
        same = False
    finally:
        hook.remove()
    return Plan("shared", first, after_bytes) if same else Plan("replicate", first, all_bytes)


def plan(model, x):
    """The Plan used for model on inputs shaped like x (probed once per model and input shape)."""
    key = (tuple(x.shape[1:]), x.dtype, x.device, tuple(m.training or m.mc for m in _active_noise(model)))
    cache = _plans.setdefault(model, {})
    if key not in cache:
        cache[key] = _make_plan(model, x)
    return cache[key]


def _chunk(p, x, n, chunk):
    if chunk is not None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
        return min(chunk, n)
    if p.mode == "loop":
        return 1
    per_replica = max(1, p.replica_bytes * x.shape[0])
    if x.device.type == "cuda":
        budget = torch.cuda.get_device_properties(x.device).total_memory * GPU_MEMORY_FRACTION
    else:
        budget = CPU_CACHE_BYTES
    return int(max(1, min(n, budget // per_replica)))


def _pass(model, x, m, p):
    """Logits of m replicas of x, (m*B, ...), for the noisy plans."""
    with replicas.replicas(m):
        if p.mode == "shared" and m > 1:
            if isinstance(p.first, AdditiveNoise):  # input noise: the replicas come out of one fused op
                p.first.expand = m
                try:
                    return model(x)
                finally:
                    p.first.expand = 1
            hook = p.first.register_forward_pre_hook(lambda mod, args: (_repeat(args[0], m), *args[1:]))
            try:
                return model(x)
            finally:
                hook.remove()
        return model(_repeat(x, m))


def _check(model, x, n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a batched tensor (B, ...)")
    _check_batch_statistics(model)


def _chunks(n, m):
    return [min(m, n - start) for start in range(0, n, m)]


def replica_logits(model, x, n, *, chunk=None):
    """The (n, B, C) logits of n noisy passes over x, batched (differentiable)."""
    _check(model, x, n)
    p = plan(model, x)
    if p.mode == "deterministic":
        out = model(x)
        return out.unsqueeze(0).expand(n, *out.shape)
    outs = [_pass(model, x, m, p).reshape(m, x.shape[0], -1) for m in _chunks(n, _chunk(p, x, n, chunk))]
    return torch.cat(outs)


@torch.no_grad()
def mc_predict(model, x, n, reduce="mean", *, chunk=None):
    """Monte-Carlo prediction over n noisy passes, run as batched passes.

    reduce="mean": (B, C) mean softmax probabilities ("MC Avg"); "vote": (B, C) vote counts, each
    replica voting for its argmax with ties to the smaller index ("Voting"; argmax of the counts
    breaks ties the same way); "none": the (n, B, C) logits. chunk: replicas per batched pass
    (default: sized to the cache on CPU and to a quarter of the memory on GPU; same result).
    """
    if reduce not in (*MODES, "none"):
        raise ValueError(f"reduce must be one of {(*MODES, 'none')}, got {reduce!r}")
    logits = replica_logits(model, x, n, chunk=chunk)
    return logits if reduce == "none" else replica_reduce(logits, reduce)


@contextlib.contextmanager
def noise_off(model):
    """Switches every noise layer of model (weight noise too) off for the enclosed block."""
    layers = [m for m in model.modules() if isinstance(m, _NOISE_LAYERS)]
    saved = [(m, m.training, m.mc) for m in layers]
    for m in layers:
        m.training, m.mc = False, False
    try:
        yield model
    finally:
        for m, training, mc in saved:
            m.training, m.mc = training, mc


@torch.no_grad()
def deterministic_predict(model, x):
    """The single prediction (logits) with every noise layer switched off."""
    with noise_off(model):
        return model(x)


def eot_grad(model, loss_fn, x, y, n, *, chunk=None):
    """EOT: the gradient with respect to x of the mean loss over n noise draws, and that loss.

    loss_fn(logits, labels) must average over its rows (like F.cross_entropy), so the result is the
    mean over draws of the batch-mean loss. One forward and one backward per chunk of replicas;
    model parameters get no gradient.
    """
    _check(model, x, n)
    if not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]:
        raise ValueError(f"y must be a tensor with x's batch size {x.shape[0]}")
    x = x.detach().requires_grad_(True)
    p = plan(model, x)
    if p.mode == "deterministic":
        loss = loss_fn(model(x), y)
        return torch.autograd.grad(loss, x)[0], loss.detach()
    grad, total = torch.zeros_like(x), x.new_zeros(())
    for m in _chunks(n, _chunk(p, x, n, chunk)):
        loss = loss_fn(_pass(model, x, m, p), _repeat(y, m)) * (m / n)
        grad += torch.autograd.grad(loss, x)[0]
        total = total + loss.detach()
    return grad, total


__all__ = ["Plan", "deterministic_predict", "eot_grad", "mc_predict", "noise_off", "plan", "replica_logits"]
