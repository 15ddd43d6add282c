"""Batched MC ensembles and EOT gradients: n noisy passes as one (ARCHITECTURE.md section 3).

Replicas are laid out replica-major, (n*B, ...), and run inside noisekernels.replicas(n) so batch
statistics (Random Spiking's min/max) and batch-shared draws (A2SNN) are taken per replica. Every
noise layer reserves counters per call, so replica r always draws the counters a loop's r-th pass
would: one batched pass, chunks of k replicas and the loop of n passes see the same noise.

How a call runs is decided on its first occurrence, per (model state, input shape, n, device, with
or without gradient), on the real batch and inside a stream Sandbox (trial draws never move a
stream, whatever other threads do; the real call then draws exactly what a loop would):
1. One loop pass is watched: an op that draws from torch's own generators (nn.Dropout in training
   mode and the like: noise that cannot be reproduced per replica) means the loop, naming the
   module. Active weight noise (one weight per pass) means the loop.
2. If two passes agree and no noise layer or random op is active: "deterministic", one pass.
3. Candidates run chunks of k replicas, k = 1 (the loop), 2, 4, ... and n, within a memory budget:
   each is timed, and verified on the same replicas against the candidate before it (hence, step
   by step, against the loop): its outputs and, with gradient, the input gradient of a fixed
   linear function of them. At k = 2 the structure is picked: prefix sharing ("shared": layers
   before the first noise layer run once on B rows and that layer writes the replicas) if it
   verifies, else the input replicated ("replicate"). A candidate that differs or raises (code
   that depends on the batch size, noise on a parameter) ends the search; past the optimum the
   search stops.
4. The fastest verified candidate is kept (Plan.chunk), with every candidate's time (Plan.times),
   as cuDNN's benchmark mode and Triton's autotuner keep theirs.
The cache key holds every module's identity, train/eval mode and plain Python attributes (flags,
hooks, parameter identities), so a model changed under a plan is tuned again.
"""

import os
import threading
import time
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .nn.anisotropic import AnisotropicNoise
from .nn.noise import WeightNoise, _NoiseLayer
from .nn.random_spike import RandomSpike
from .ops.replica_reduce import MODES, replica_reduce
from .replicas import expanding, noise_is_off, noise_off, repeat_rows, replicas as replica_pass
from .stream import Sandbox

# A candidate's activations (estimated from the watched pass) may take this share of the device's
# free memory (CPU: of physical memory).
MEMORY_FRACTION = 0.25
# The search stops at a candidate this much slower per replica than the best so far.
_PAST_OPTIMUM = 1.3
_NOISE_LAYERS = (RandomSpike, _NoiseLayer, AnisotropicNoise)
_plans = weakref.WeakKeyDictionary()
_plans_lock = threading.Lock()


class Plan:
    """How a model runs n replicas of a batch.

    mode: "deterministic" (one pass stands for all), "shared" (prefix sharing), "replicate" (the
    input replicated) or "loop" (one replica per pass); chunk: replicas per pass; times: seconds per
    replica of every measured chunk size (1 is the loop); reason: why; verified: what was checked.
    """

    def __init__(self, mode, chunk=1, first=None, times=None, reason="", verified="", out_shape=None, draws=()):
        self.mode, self.chunk, self.first = mode, chunk, first
        self.times, self.reason, self.verified = dict(times or {}), reason, verified
        self.out_shape = out_shape  # one replica's output shape, (B, ...)
        self.draws = tuple(draws)  # (stream, counters one replica reserves): to undo a refused call

    def __repr__(self):
        first = type(self.first).__name__ if self.first is not None else None
        times = ", ".join(f"{k}: {t * 1e3:.3g} ms" for k, t in self.times.items())
        return (f"Plan(mode={self.mode!r}, chunk={self.chunk}, first={first}, seconds per replica by chunk "
                f"{{{times}}}, reason={self.reason!r}, verified={self.verified!r})")


def _is_active(m):
    return m.training or m.mc


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


# ---- the cache key: what a plan depends on ------------------------------------------------------

_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device})


def _fingerprint(value):
    """A hashable summary of a module attribute, cheap (every call computes the key): plain values
    as they are; containers by their keys and their items' identities (a flag flipped inside a list
    or dict is a new object); anything else by identity."""
    kind = type(value)
    if kind in _ATOMS:
        return value
    if isinstance(value, dict):  # parameters, buffers, submodules, hooks, user dicts
        return (*value, *map(id, value.values()))
    if isinstance(value, (tuple, list)):
        return (kind, id(value), *map(id, value))
    return id(value)


def _state(model):
    """Every module's identity and attributes: train/eval mode, noise switches, flags, hooks,
    parameters and buffers by identity. A layer's caches (its class's _plan_ignores) are left out."""
    key = []
    for m in model.modules():
        ignores = getattr(type(m), "_plan_ignores", ())
        key.append(id(m))
        key += [(k, _fingerprint(v)) for k, v in vars(m).items() if k not in ignores]
    return tuple(key)


# ---- running replicas ---------------------------------------------------------------------------

def _pass(model, x, m, mode, first):
    """Outputs of one pass over m replicas of x, (m*B, ...)."""
    with replica_pass(m):
        if mode == "shared" and m > 1:
            # The first noise layer expands its B input rows to m*B itself (additive noise in one
            # fused op); per thread, so no module is touched.
            with expanding(first, m):
                return model(x)
        return model(repeat_rows(x, m))


def _per_replica(out, m, batch):
    """(m*B, ...) outputs as (m, B, ...); outputs must have one row per input."""
    if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != m * batch:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return a tensor with one row per input ({m * batch} rows), got {shape}")
    return out.reshape(m, batch, *out.shape[1:])


def _chunks(n, k):
    return [min(k, n - start) for start in range(0, n, k)]


# ---- tuning: the watched pass, the candidates, the measurement ----------------------------------

class _RandomOps(TorchDispatchMode):
    """Records the ops that draw from torch's generators (tagged nondeterministic_seeded) and the
    module running each."""

    def __init__(self, where):
        super().__init__()
        self.where, self.seen = where, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.seen.append((func, self.where[-1] if self.where else "the model's forward"))
        return func(*args, **(kwargs or {}))


class _Watch:
    """One loop pass watched by hooks on every module (this thread's calls only): torch's random
    ops and where they ran, the active noise layers in call order, whether the first one took the
    model's input itself, and the activation bytes of one replica (sum and largest)."""

    def __init__(self, model):
        self.model, self.where, self.noise, self.sizes = model, [], [], []
        self.input, self.first_takes_input = None, False
        self.random = _RandomOps(self.where)

    def run(self, x):
        me, hooks = threading.get_ident(), []

        def enter(name):
            def hook(module, args):
                if threading.get_ident() != me:
                    return
                self.where.append(f"{type(module).__name__} at {name!r}" if name else type(module).__name__)
                if (isinstance(module, _NOISE_LAYERS) and not isinstance(module, WeightNoise) and _is_active(module)
                        and not noise_is_off()):
                    if not self.noise:
                        self.first_takes_input = bool(args) and args[0] is self.input
                    self.noise.append(module)
            return hook

        def leave(module, args, out):
            if threading.get_ident() != me:
                return
            self.where.pop()
            if isinstance(out, torch.Tensor) and not list(module.children()):
                self.sizes.append(out.numel() * out.element_size())

        for name, module in self.model.named_modules():
            hooks += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
        self.input = x
        try:
            with self.random:
                return self.model(x)
        finally:
            for h in hooks:
                h.remove()


def _weights(out):
    """A fixed direction for the trial gradients: cos(0.7 i) over one replica's outputs."""
    flat = torch.cos(torch.arange(out[0].numel(), device=out.device, dtype=torch.float64) * 0.7)
    return flat.to(out.dtype).reshape(out.shape[1:])


def _trial(model, x, m, mode, first, grad):
    """One chunk of m replicas: outputs (m, B, ...) and, with grad, the input gradient of
    sum(outputs * _weights) (a fixed linear function: the backward of every candidate is compared,
    without calling the user's loss, whose side effects must happen once per real call)."""
    if not grad:
        with torch.no_grad():
            return _per_replica(_pass(model, x, m, mode, first), m, x.shape[0]), None
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = _per_replica(_pass(model, xg, m, mode, first), m, x.shape[0])
        if not out.requires_grad:
            return out.detach(), torch.zeros_like(x)
        return out.detach(), torch.autograd.grad((out * _weights(out)).sum(), xg)[0]


def _same(a, b):
    scale = max(1.0, float(b.abs().nan_to_num(0, 0, 0).max())) if b.numel() else 1.0
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale, equal_nan=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _budget(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] * MEMORY_FRACTION
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * MEMORY_FRACTION


def _sizes(n, chunk):
    """Candidate chunk sizes: 1, 2, 4, ... below n, then n; or 1 and the chunk a caller fixed."""
    if chunk is not None:
        return sorted({1, min(chunk, n)})
    sizes = [1]
    while sizes[-1] * 2 < n:
        sizes.append(sizes[-1] * 2)
    return sizes + [n] if n > 1 else sizes


class _Tuner:
    """The trial runs of one tuning, each from the sandbox position of its first replica."""

    def __init__(self, model, x, n, grad, box):
        self.model, self.x, self.n, self.grad, self.box = model, x, n, grad, box
        self.positions = {0: box.position()}

    def run(self, start, m, mode, first):
        self.box.rewind(self.positions[start])
        _sync(self.x.device)
        t0 = time.perf_counter()
        out, g = _trial(self.model, self.x, m, mode, first, self.grad)
        _sync(self.x.device)
        seconds = time.perf_counter() - t0
        self.positions.setdefault(start + m, self.box.position())
        return out, g, seconds


def _tune(model, x, n, grad, chunk):
    batch, device = x.shape[0], x.device
    # Trial passes keep their saved tensors to themselves: inside a checkpointed region the region's
    # hooks would count them, and its recomputation (plan cached) would not make them.
    with Sandbox() as box, torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        tuner = _Tuner(model, x, n, grad, box)
        watch = _Watch(model)
        with torch.enable_grad() if grad else torch.no_grad():
            first_out = _per_replica(watch.run(x.detach().requires_grad_(grad) if grad else x), 1, batch)
        tuner.positions[1] = box.position()
        draws = [(s, int(tuner.positions[1][s] - box.start[s])) for s in box.start]
        out_shape = (batch, *first_out.shape[2:])
        if watch.random.seen:
            func, where = watch.random.seen[0]
            return Plan("loop", reason=(
                f"{where} draws from torch's own generator ({func}), noise the engine cannot reproduce per "
                "replica: the loop of n passes. Use the library's layers for noise that stays on "
                "(noisekernels.nn.RandomSpike(mc=True), GaussianNoise), or call model.eval() if it should be "
                "off at test time"), verified="torch random ops looked for in one watched pass",
                out_shape=out_shape, draws=draws)
        if any(isinstance(m, WeightNoise) and _is_active(m) for m in model.modules()):
            return Plan("loop", reason="weight noise draws one weight per pass, which replicas cannot share",
                        out_shape=out_shape, draws=draws)
        # Replica 0 again (warm, timed: it must repeat the watched pass) and replica 1: the loop's
        # time and the reference.
        out0, g0, t0 = tuner.run(0, 1, "loop", None)
        if not _same(out0, first_out.detach()):
            return Plan("loop", reason="a pass repeated from the same stream state gave other outputs: noise the "
                        "engine cannot see or replay (not from the library's streams)", out_shape=out_shape,
                        draws=draws)
        out1, g1, t1 = tuner.run(1, 1, "loop", None) if n > 1 else (out0, g0, t0)
        if not watch.noise and n > 1 and _same(out1, out0) and (g0 is None or _same(g1, g0)):
            return Plan("deterministic", reason="no noise: two passes agree and no noise layer or random op is "
                        "active, so one pass stands for all n", verified=f"two loop passes on the real batch "
                        f"({batch} rows)", out_shape=out_shape, draws=draws)
        samples = {1: [t0, t1]}
        outs, gsum, covered = [out0] + ([out1] if n > 1 else []), {0: 0, 1: g0}, min(n, 2)
        if n > 1 and grad:
            gsum[2] = g0 + g1
        first = watch.noise[0] if watch.noise else None
        mode, prev, budget = None, 1, _budget(device)
        per_replica_bytes = max(1, sum(watch.sizes) if grad else 3 * max(watch.sizes, default=0))
        stop = None
        for k in _sizes(n, chunk)[1:]:
            if k * per_replica_bytes > budget:
                stop = f"chunks of {k} replicas would pass the memory budget ({MEMORY_FRACTION:.0%} of free memory)"
                break
            # The previous candidate's chunks extend the reference to k replicas.
            while covered < k:
                m = min(prev, n - covered)
                o, g, t = tuner.run(covered, m, mode or "loop", first)
                if m == prev:
                    samples[prev].append(t / m)
                outs.append(o)
                if grad:
                    gsum[covered + m] = gsum[covered] + g
                covered += m
            reference = torch.cat(outs)[:k]
            options = [mode] if mode else (["shared", "replicate"] if first is not None else ["replicate"])
            accepted, failure = None, None
            for option in options:
                try:
                    o, g, t = tuner.run(0, k, option, first)
                except Exception as e:  # noqa: BLE001 - a batched pass the loop does not make: the loop is kept
                    failure = f"raised {type(e).__name__}: {e}"
                    continue
                if _same(o, reference) and (not grad or _same(g, gsum[k])):
                    accepted = option
                    break
                failure = "differ from the loop's"
            if accepted is None:
                stop = (f"chunks of {k} replicas {failure} on this batch (code that depends on the batch size, "
                        "noise on a tensor that is not the batch, or noise the engine cannot see)")
                break
            mode, prev, samples[k] = accepted, k, [t / k]
            outs, covered = [o], k
            if grad:
                gsum = {0: 0, k: g}
            if k == n:
                samples[k].append(tuner.run(0, k, mode, first)[2] / k)
            best = min(min(s) for s in samples.values())
            if min(samples[k]) > _PAST_OPTIMUM * best and k >= 4:
                stop = f"past the optimum at chunks of {k}"
                break
    times = {k: min(s) for k, s in samples.items()}
    # A chunk the caller fixed is used once verified (reproducible timing); else the fastest.
    chunk_k = min(chunk, n) if chunk is not None and mode else min(times, key=times.get)
    verified = (f"on the real batch ({batch} rows): chunks of {', '.join(str(k) for k in times)} replicas "
                f"{'(and their input gradients) ' if grad else ''}equal the loop's; no torch random op")
    if mode is None or chunk_k == 1:
        why = "the loop measured fastest" if mode else "the loop: " + (stop or "n = 1")
        return Plan("loop", 1, None, times, why + (f"; {stop}" if stop and mode else ""), verified, out_shape, draws)
    if mode == "shared":
        where = ("the first noise layer takes the input itself: nothing before it to share, it writes the "
                 "replicas in one fused pass" if watch.first_takes_input else
                 f"layers before the first noise layer ({type(first).__name__}) run once on {batch} rows")
    else:
        where = "the input is replicated (prefix sharing differs from the loop: e.g. a skip around noise)"
    how = "fixed by the caller" if chunk is not None else "measured fastest"
    why = f"{where}; chunks of {chunk_k} replicas {how}" + (f"; {stop}" if stop else "")
    return Plan(mode, chunk_k, first, times, why, verified, out_shape, draws)


def plan(model, x, n, *, grad=False, chunk=None):
    """The Plan for n replicas of x (with grad: forward and backward to x), tuned on the first call
    for this model state, input shape, n, device and grad, and cached. Moves no stream."""
    _check(model, x, n, chunk)
    key = (tuple(x.shape), x.dtype, x.device, n, bool(grad), chunk, noise_is_off(), _state(model))
    with _plans_lock:
        cache = _plans.setdefault(model, {})
        found = cache.get(key)
    if found is None:
        found = _empty_batch_plan(model, x) if x.shape[0] == 0 else _tune(model, x, n, grad, chunk)
        with _plans_lock:
            cache[key] = found
    return found


def _empty_batch_plan(model, x):
    with Sandbox(), torch.no_grad():
        out = model(x)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    return Plan("deterministic", reason="empty batch", out_shape=shape)


def _check(model, x, n, chunk=None):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a batched tensor (B, ...)")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    _check_batch_statistics(model)


def _run(model, x, n, p):
    """(n, B, ...) outputs under plan p."""
    if p.mode == "deterministic":
        out = _per_replica(model(x), 1, x.shape[0])
        return out.expand(n, *out.shape[1:])
    return torch.cat([_per_replica(_pass(model, x, m, p.mode, p.first), m, x.shape[0]) for m in _chunks(n, p.chunk)])


def replica_logits(model, x, n, *, chunk=None):
    """The (n, B, ...) outputs of n noisy passes over x (model outputs of shape (B, ...)), run as
    the plan says (differentiable). chunk: fix the replicas per pass instead of measuring (still
    verified; same values)."""
    grad = torch.is_grad_enabled() and x.requires_grad if isinstance(x, torch.Tensor) else False
    return _run(model, x, n, plan(model, x, n, grad=grad, chunk=chunk))


@torch.no_grad()
def mc_predict(model, x, n, reduce="mean", *, chunk=None):
    """Monte-Carlo prediction over n noisy passes, run as the plan says.

    reduce="mean": (B, C) mean softmax probabilities ("MC Avg", summed in float64); "vote": (B, C)
    vote counts, each replica voting for its argmax with ties to the smaller index ("Voting");
    both need (B, C) logits. "none": the (n, B, ...) outputs, whatever their shape. chunk: fix the
    replicas per pass instead of measuring (same values). Every check runs before any draw.
    """
    if reduce not in (*MODES, "none"):
        raise ValueError(f"reduce must be one of {(*MODES, 'none')}, got {reduce!r}")
    p = plan(model, x, n, chunk=chunk)
    if reduce != "none" and (p.out_shape is None or len(p.out_shape) != 2):  # known from the plan: refused before any draw
        shape = "not a tensor" if p.out_shape is None else f"of shape {p.out_shape[1:]}"
        raise ValueError(f"reduce={reduce!r} needs (B, C) logits from the model, got outputs {shape}; "
                         "use reduce='none' for other outputs")
    logits = _run(model, x, n, p)
    return logits if reduce == "none" else replica_reduce(logits, reduce)


@torch.no_grad()
def deterministic_predict(model, x):
    """The single prediction (logits) with every noise layer switched off."""
    with noise_off():  # this thread's passes only: no module is touched
        return model(x)


def eot_grad(model, loss_fn, x, y, n, *, chunk=None):
    """EOT: the gradient with respect to x of the mean loss over n noise draws, and that loss.

    loss_fn(logits, labels) is called once per draw, on that draw's (B, ...) outputs, and must
    return a scalar (any reduction over the rows: the result is the loop's whatever it is). One
    forward and one backward per chunk of replicas; model parameters get no gradient. A loss that
    is refused (not a scalar) leaves the streams where they were.
    """
    _check(model, x, n, chunk)
    if not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]:
        raise ValueError(f"y must be a tensor with x's batch size {x.shape[0]}")
    x = x.detach().requires_grad_(True)
    p = plan(model, x, n, grad=True, chunk=chunk)
    if p.mode == "deterministic":
        loss = _scalar_loss(loss_fn, model(x), y)
        return torch.autograd.grad(loss, x)[0], loss.detach()
    grad, total = torch.zeros_like(x), x.new_zeros(())
    for i, m in enumerate(_chunks(n, p.chunk)):
        before = [(s, s.offset.clone(), count * m) for s, count in p.draws] if i == 0 else None
        out = _per_replica(_pass(model, x, m, p.mode, p.first), m, x.shape[0])
        try:
            loss = sum(_scalar_loss(loss_fn, out[r], y) for r in range(m)) / n
        except ValueError:
            if before is not None:
                _undo(before)
            raise
        grad += torch.autograd.grad(loss, x)[0]
        total = total + loss.detach()
    return grad, total


def _undo(before):
    """Puts streams back before a refused call's draws, where no other thread drew since."""
    with torch.no_grad():
        for s, offset, count in before:
            if int(s.offset) == int(offset) + count:
                s.offset.copy_(offset)


def _scalar_loss(loss_fn, logits, y):
    loss = loss_fn(logits, y)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar (like F.cross_entropy with reduction='mean'), got {shape}")
    return loss


__all__ = ["Plan", "deterministic_predict", "eot_grad", "mc_predict", "noise_off", "plan", "replica_logits"]
