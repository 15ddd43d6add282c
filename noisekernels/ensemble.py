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
Every plan but the loop is then checked once against a loop of two passes on the probe rows, and
the loop is used where they differ (noise the engine cannot see: functional ops, a Stream of the
model's own, a noise layer applied where dim 0 is not the batch). Plan.reason says why.
The plan is cached per input shape and per model state: the identity of every module and the
on/off state of every noise layer, so swapping or switching a layer (weight noise too) replans.
Chunks of replicas keep the working set in cache on CPU and within a memory budget on GPU.
"""

import contextlib
import weakref

import torch
from torch import nn

from .replicas import expanding, noise_off, repeat_rows, replicas as replica_pass
from .nn.anisotropic import AnisotropicNoise
from .nn.noise import WeightNoise, _NoiseLayer
from .nn.random_spike import RandomSpike
from .ops.replica_reduce import MODES, replica_reduce
from .stream import Stream, unrecorded

# Activation working set per chunk on CPU: about the L2 caches of this class of machine.
CPU_CACHE_BYTES = 2 << 20
GPU_MEMORY_FRACTION = 0.25
_NOISE_LAYERS = (RandomSpike, _NoiseLayer, AnisotropicNoise)
_plans = weakref.WeakKeyDictionary()


class Plan:
    """How a model is batched: mode, the first noise layer (shared mode), the largest activation of
    one replica in bytes (for chunking), and why this mode was chosen."""

    def __init__(self, mode, first=None, replica_bytes=0, reason=""):
        self.mode, self.first, self.replica_bytes, self.reason = mode, first, replica_bytes, reason

    def __repr__(self):
        first = type(self.first).__name__ if self.first is not None else None
        return f"Plan(mode={self.mode!r}, first={first}, reason={self.reason!r})"


def _is_active(m):
    return m.training or m.mc


def _active_noise(model):
    return [m for m in model.modules() if isinstance(m, _NOISE_LAYERS) and not isinstance(m, WeightNoise)
            and _is_active(m)]


def _check_batch_statistics(model):
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        where = f"{type(m).__name__} at {name!r}" if name else type(m).__name__
        if m.training:
            raise ValueError(f"{where} is in training mode: its batch statistics would mix replicas; "
                             "call model.eval() first (or run the n passes yourself)")
        if not m.track_running_stats:
            raise ValueError(f"{where} has track_running_stats=False, so it uses batch statistics even in eval "
                             "mode, which would mix replicas; the engine cannot batch it")


@contextlib.contextmanager
def _restored_streams(model):
    """Runs a probe and puts every stream back where it was (its draws are not part of a
    checkpointed region's record: the recomputation finds the plan cached and does not probe)."""
    saved = [(s, s.offset.clone()) for s in model.modules() if isinstance(s, Stream)]
    try:
        with unrecorded():
            yield
    finally:
        for s, offset in saved:
            s.offset.copy_(offset)


def _probe_input(x):
    if x.shape[0] >= 2:
        return x[:2]
    return torch.cat([x, x.flip(-1) * 0.5])  # two different rows, so rows that mix are seen


def _same(a, b):
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True))


def _candidate(model, probe):
    """The fastest plan the visible noise layers allow (not yet verified against the loop)."""
    if any(isinstance(m, WeightNoise) and _is_active(m) for m in model.modules()):
        return Plan("loop", reason="weight noise draws one weight per pass, which replicas cannot share")
    noise = _active_noise(model)
    if not noise:
        return Plan("deterministic", reason="no active noise layer")
    order, sizes = [], []
    hooks = [m.register_forward_pre_hook(lambda mod, args: order.append(mod)) for m in noise]
    # (bytes, after the first noise layer): shared mode replicates only the layers after it.
    hooks += [m.register_forward_hook(lambda mod, args, out: sizes.append((out.numel() * out.element_size(), bool(order)))
                                      if isinstance(out, torch.Tensor) else None)
              for m in model.modules() if not list(m.children())]
    try:
        with _restored_streams(model), replica_pass(2):
            replicated = model(repeat_rows(probe, 2))
    finally:
        for h in hooks:
            h.remove()
    rows = 2 * probe.shape[0]
    all_bytes = max((b for b, _ in sizes), default=0) // rows
    after_bytes = max((b for b, after in sizes if after), default=0) // rows
    first = order[0] if order else None
    if first is None:
        return Plan("replicate", None, all_bytes, "no noise layer ran on the probe")
    try:
        with _restored_streams(model), replica_pass(2), expanding(first, 2):
            shared = model(probe)
        same = _same(shared, replicated)
    except RuntimeError:  # rows of B and n*B met: a tensor from before the noise layer is used after it
        same = False
    if same:
        return Plan("shared", first, after_bytes, "layers before the first noise layer run once")
    return Plan("replicate", first, all_bytes, "prefix sharing changes the result (e.g. a skip around noise)")


def _make_plan(model, x):
    """The candidate plan, kept only if two batched replicas of the probe equal a loop of two
    passes from the same streams; otherwise the loop. This catches what the engine cannot see:
    noise drawn through functional ops or a Stream of the model's own, a noise layer where dim 0 is
    not the batch, outputs whose rows are not one per input."""
    probe = _probe_input(x)
    with torch.no_grad():
        plan_ = _candidate(model, probe)
        if plan_.mode == "loop":
            return plan_
        with _restored_streams(model):
            loop = [model(probe) for _ in range(2)]
        with _restored_streams(model):
            batched = (repeat_rows(model(probe), 2) if plan_.mode == "deterministic" else
                       _pass(model, probe, 2, plan_))
        if not all(isinstance(t, torch.Tensor) for t in loop) or not _same(batched, torch.cat(loop)):
            return Plan("loop", reason=f"a batched {plan_.mode!r} pass differed from the loop of passes on the probe "
                                       "(noise the engine cannot see, or rows that are not one per input)")
    return plan_


def _signature(model):
    """What a plan depends on, cheap to compute: every module's identity and train/eval mode and
    every noise layer's on/off state. Swapping, adding or switching a layer (weight noise, or a
    dropout that draws from torch's RNG, too) makes a new plan."""
    return tuple((id(m), m.training, _is_active(m) if isinstance(m, _NOISE_LAYERS) else None) for m in model.modules())


def plan(model, x):
    """The Plan used for model on inputs shaped like x (probed once per model, structure, noise
    state and input shape)."""
    key = (tuple(x.shape[1:]), x.dtype, x.device, _signature(model))
    cache = _plans.setdefault(model, {})
    if key not in cache:
        cache[key] = _make_plan(model, x)
    return cache[key]


def _chunk(p, x, n, chunk):
    """Replicas per batched pass. A loop plan runs one replica per pass whatever `chunk` says:
    batching it is what the plan found unsafe."""
    if chunk is not None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    if p.mode == "loop":
        return 1
    if chunk is not None:
        return min(chunk, n)
    per_replica = max(1, p.replica_bytes * x.shape[0])
    if x.device.type == "cuda":
        budget = torch.cuda.get_device_properties(x.device).total_memory * GPU_MEMORY_FRACTION
    else:
        budget = CPU_CACHE_BYTES
    return int(max(1, min(n, budget // per_replica)))


def _pass(model, x, m, p):
    """Outputs of m replicas of x, (m*B, ...), for the noisy plans."""
    with replica_pass(m):
        if p.mode == "shared" and m > 1:
            # The first noise layer expands its B input rows to m*B itself (additive noise in one
            # fused op); per thread, so no module is touched.
            with expanding(p.first, m):
                return model(x)
        return model(repeat_rows(x, m))


def _check(model, x, n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a batched tensor (B, ...)")
    _check_batch_statistics(model)


def _chunks(n, m):
    return [min(m, n - start) for start in range(0, n, m)]


def _per_replica(out, m, batch):
    """(m*B, ...) outputs as (m, B, ...); outputs must have one row per input."""
    if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != m * batch:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return a tensor with one row per input ({m * batch} rows), got {shape}")
    return out.reshape(m, batch, *out.shape[1:])


def replica_logits(model, x, n, *, chunk=None):
    """The (n, B, ...) outputs of n noisy passes over x (model outputs of shape (B, ...)),
    batched where the plan allows (differentiable)."""
    _check(model, x, n)
    p = Plan("deterministic", reason="empty batch") if x.shape[0] == 0 else plan(model, x)
    if p.mode == "deterministic":
        out = _per_replica(model(x), 1, x.shape[0])
        return out.expand(n, *out.shape[1:])
    return torch.cat([_per_replica(_pass(model, x, m, p), m, x.shape[0]) for m in _chunks(n, _chunk(p, x, n, chunk))])


@torch.no_grad()
def mc_predict(model, x, n, reduce="mean", *, chunk=None):
    """Monte-Carlo prediction over n noisy passes, run as batched passes.

    reduce="mean": (B, C) mean softmax probabilities ("MC Avg"); "vote": (B, C) vote counts, each
    replica voting for its argmax with ties to the smaller index ("Voting"; argmax of the counts
    breaks ties the same way); both need (B, C) logits. "none": the (n, B, ...) outputs, whatever
    their shape. chunk: replicas per batched pass (default: sized to the cache on CPU and to a
    quarter of the memory on GPU; same result; a loop plan always runs one per pass).
    """
    if reduce not in (*MODES, "none"):
        raise ValueError(f"reduce must be one of {(*MODES, 'none')}, got {reduce!r}")
    logits = replica_logits(model, x, n, chunk=chunk)
    if reduce == "none":
        return logits
    if logits.dim() != 3:
        raise ValueError(f"reduce={reduce!r} needs (B, C) logits from the model, got outputs of shape "
                         f"{tuple(logits.shape[1:])}; use reduce='none' for other outputs")
    return replica_reduce(logits, reduce)


@torch.no_grad()
def deterministic_predict(model, x):
    """The single prediction (logits) with every noise layer switched off."""
    with noise_off():  # this thread's passes only: no module is touched
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
        loss = _scalar_loss(loss_fn, model(x), y)
        return torch.autograd.grad(loss, x)[0], loss.detach()
    grad, total = torch.zeros_like(x), x.new_zeros(())
    for m in _chunks(n, _chunk(p, x, n, chunk)):
        loss = _scalar_loss(loss_fn, _pass(model, x, m, p), repeat_rows(y, m)) * (m / n)
        grad += torch.autograd.grad(loss, x)[0]
        total = total + loss.detach()
    return grad, total


def _scalar_loss(loss_fn, logits, y):
    loss = loss_fn(logits, y)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar averaged over its rows (like F.cross_entropy with "
                         f"reduction='mean'), got {shape}")
    return loss


__all__ = ["Plan", "deterministic_predict", "eot_grad", "mc_predict", "noise_off", "plan", "replica_logits"]
