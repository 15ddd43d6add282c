"""Batched MC ensembles and EOT gradients: n noisy passes as one (ARCHITECTURE.md section 3).

Replicas are laid out replica-major, (n*B, ...), and run inside noisekernels.replicas(n) so batch
statistics (Random Spiking's min/max) and batch-shared draws (A2SNN) are taken per replica. Every
noise layer reserves counters per call, so replica r always draws the counters a loop's r-th pass
would: one batched pass, chunks of k replicas and the loop of n passes see the same noise.

How a call runs is decided on its first occurrence, per (model state, input shape, n, device, with
or without gradient), on the real batch and inside a stream Sandbox (trial draws never move a
stream, whatever other threads do) with torch's generators forked (the real call then draws exactly
what a loop would):
1. One loop pass is watched: if torch's own generators move (nn.Dropout in training mode and the
   like: noise that cannot be reproduced per replica), the loop, naming the innermost module; if
   the model changes itself (buffers, attributes, its input), the loop, its state put back; active
   weight noise (one weight per pass), the loop. A torch.compile'd model runs as the loop.
2. If two passes agree, no stream is drawn from and no noise layer is active: "deterministic".
3. Candidates run chunks of k replicas, k = 1 (the loop), then each about twice the last (divisors
   of n where they fit) up to n, within a memory budget.
   Every replica draws the same counters, so replica r starts at a known stream position: each
   candidate is checked against loop passes of its first two and last replicas (outputs and, with
   gradient, the input gradient of a fixed linear function of them) and must draw the loop's
   counters; the real call's last, smaller chunk is checked too. At k = 2 the structure is picked:
   prefix sharing ("shared": layers before the first noise layer run once on B rows and that layer
   writes the replicas) if it verifies, else the input replicated ("replicate"). A candidate that
   differs or raises (code that depends on the batch size, noise on a parameter) ends the search,
   and so does one of 4 or more replicas 25% slower per replica than the best so far.
4. The fastest verified candidate is kept (Plan.chunk), with every candidate's time (Plan.times),
   as cuDNN's benchmark mode and Triton's autotuner keep theirs. Where the two fastest are within
   30%, the next two real calls run one each and their times decide (Plan.call_times): every
   candidate gives the same values, so a real call is a sample that costs no extra pass.
The cache key holds every module's class, identity and attributes (flags, also in containers and
config objects; hooks; buffers by version; parameters by identity), so a model changed under a plan
is tuned again.
"""

import contextlib
import math
import os
import sys
import threading
import time
import weakref

import torch
from torch import nn

from .nn.anisotropic import AnisotropicNoise
from .nn.noise import WeightNoise, _NoiseLayer
from .nn.random_spike import RandomSpike
from .ops._streams import default_stream
from .ops.replica_reduce import MODES, replica_reduce
from .replicas import expanding, noise_is_off, noise_off, repeat_rows, replicas as replica_pass
from .stream import Sandbox, Stream

# A candidate's activations (estimated from the watched pass) may take this share of the device's
# free memory (CPU: of physical memory).
MEMORY_FRACTION = 0.25
# The search stops at a candidate this much slower per replica than the best so far.
_PAST_OPTIMUM = 1.25
# Trial times this close to the fastest are settled by timing real calls.
_CLOSE = 1.3
_NOISE_LAYERS = (RandomSpike, _NoiseLayer, AnisotropicNoise)
NO_CLASS = -1  # what decide() returns where the scores say nothing
_plans = weakref.WeakKeyDictionary()
_plans_lock = threading.Lock()
_fixed = threading.local()  # fixed_chunk's chunk, per thread


class Plan:
    """How a model runs n replicas of a batch.

    mode: "deterministic" (one pass stands for all), "shared" (prefix sharing), "replicate" (the
    input replicated) or "loop" (one replica per pass); chunk: replicas per pass; times: seconds per
    replica of every chunk size tried while tuning (1 is the loop); call_times: seconds per replica
    of real calls, where the two fastest trials were close and real calls settled the choice;
    reason: why; verified: what was checked.
    """

    def __init__(self, mode, chunk=1, first=None, times=None, reason="", verified="", out_shape=None, draws=(),
                 contenders=(), describe=None):
        self.structure, self.chunk, self.first = mode, chunk, first  # structure: how chunks of k > 1 run
        self.times, self.reason, self.verified = dict(times or {}), reason, verified
        self.out_shape = out_shape  # one replica's output shape, (B, ...)
        self.draws = tuple(draws)  # (stream, counters one replica reserves): a failing call gives them back
        self.call_times = {}
        # Chunk sizes still to be timed on real calls (every candidate gives the same values, so a real
        # call is a free sample), and how the reason reads for a chosen chunk.
        self._contenders, self._describe = list(contenders), describe
        self._lock = threading.Lock()

    @property
    def mode(self):
        return "loop" if self.chunk == 1 and self.structure in ("shared", "replicate") else self.structure

    def _take_chunk(self):
        """(chunk for this call, whether the call is a timing sample)."""
        with self._lock:
            return (self._contenders.pop(), True) if self._contenders else (self.chunk, False)

    def _record(self, k, seconds):
        with self._lock:
            self.call_times[k] = min(seconds, self.call_times.get(k, seconds))
            if not self._contenders:
                self.chunk = min(self.call_times, key=self.call_times.get)
                self.reason = self._describe(self.chunk)

    def __repr__(self):
        first = type(self.first).__name__ if self.first is not None else None
        times = ", ".join(f"{k}: {t * 1e3:.3g} ms" for k, t in self.times.items())
        calls = ", ".join(f"{k}: {t * 1e3:.3g} ms" for k, t in self.call_times.items())
        return (f"Plan(mode={self.mode!r}, chunk={self.chunk}, first={first}, seconds per replica by chunk "
                f"{{{times}}}" + (f", in real calls {{{calls}}}" if calls else "") +
                f", reason={self.reason!r}, verified={self.verified!r})")


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


def _fingerprint(value, depth=0):
    """A hashable summary of a module attribute, cheap (every call computes the key): plain values
    as they are; containers and plain objects (a config namespace) by their contents, three levels
    down; tensors by identity and version (a flag buffer that load_state_dict overwrote); modules,
    functions and other objects by identity."""
    kind = type(value)
    if kind in _ATOMS:
        return value
    if isinstance(value, torch.Tensor):
        return id(value), value._version
    if depth < 3:
        if isinstance(value, dict):  # buffers, submodules, hooks, user dicts
            return (kind, *value, *(_fingerprint(v, depth + 1) for v in value.values()))
        if isinstance(value, (tuple, list, set, frozenset)):
            return (kind, *(_fingerprint(v, depth + 1) for v in value))
        if hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type)) and not callable(value):
            return (kind, id(value), _fingerprint(vars(value), depth + 1))
    return kind, id(value)


def _parameters_by_identity(params):
    # An optimizer step changes every parameter in place: a plan does not depend on their values.
    return tuple((name, id(p)) for name, p in params.items())


def _module_key(m):
    """One module's class, identity and attributes: train/eval mode, noise switches, flags (also
    inside containers and config objects), hooks, buffers by identity and version, parameters by
    identity. A layer's caches and counters (its class's _plan_ignores) are left out."""
    ignores = getattr(type(m), "_plan_ignores", ())
    key = [type(m), id(m)]
    for k, v in vars(m).items():
        if ignores and k in ignores:
            continue
        if type(v) in _ATOMS:  # the common cases first: the key is computed on every call
            key += (k, v)
        elif k == "_parameters":
            key += (k, _parameters_by_identity(v))
        elif isinstance(v, dict) and not v:  # most of a module's hook and buffer dicts
            key += (k, type(v))
        else:
            key += (k, _fingerprint(v))
    return tuple(key)


def _state(model):
    """What a plan depends on: every module's key."""
    return tuple(map(_module_key, model.modules()))


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

def _generator_states(device):
    """The states of torch's generators that a forward on `device` may draw from."""
    states = [torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _moved(states, device):
    return any(not torch.equal(a, b) for a, b in zip(states, _generator_states(device)))


class _Watch:
    """One loop pass watched by hooks on every module (this thread's calls only): the innermost
    module during which torch's generators moved (noise the library does not draw: nn.Dropout,
    torch.randn in a forward), the active noise layers in call order, whether the first one took
    the model's input itself, and the activation bytes of one replica (sum and largest)."""

    def __init__(self, model):
        self.model, self.noise, self.sizes = model, [], []
        self.input, self.first_takes_input, self.random = None, False, None

    def run(self, x):
        me, hooks, entered = threading.get_ident(), [], []

        def enter(name):
            def hook(module, args):
                if threading.get_ident() != me:
                    return
                entered.append((f"{type(module).__name__} at {name!r}" if name else type(module).__name__,
                                _generator_states(x.device)))
                if (isinstance(module, _NOISE_LAYERS) and not isinstance(module, WeightNoise) and _is_active(module)
                        and not noise_is_off()):
                    if not self.noise:
                        self.first_takes_input = bool(args) and args[0] is self.input
                    self.noise.append(module)
            return hook

        def leave(module, args, out):
            if threading.get_ident() != me:
                return
            where, states = entered.pop()
            if self.random is None and _moved(states, x.device):  # modules end inside out: the first is innermost
                self.random = where
            if isinstance(out, torch.Tensor) and not list(module.children()):
                self.sizes.append(out.numel() * out.element_size())

        for name, module in self.model.named_modules():
            hooks += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
        self.input = x
        states = _generator_states(x.device)
        try:
            with replica_pass(1):
                return self.model(x)
        finally:
            for h in hooks:
                h.remove()
            if self.random is None and _moved(states, x.device):
                self.random = "the model's forward"


class _ModelState:
    """What a forward may change in its own model: buffers (restored from copies), parameters
    and plain attributes. The watched pass must leave them as they were: the engine runs a model
    more often than the loop would, so a model that changes itself runs as the loop."""

    def __init__(self, model):
        self.tensors = [(m, name, t, t._version) for m in model.modules() if not isinstance(m, Stream)
                        for name, t in (*m._buffers.items(), *m._parameters.items()) if t is not None]
        self.copies = {id(t): t.detach().clone() for m, name, t, _ in self.tensors if name in m._buffers}
        self.attrs = [(m, dict(vars(m)), _module_key(m)) for m in model.modules()]

    def changed(self):
        """Where the model changed itself (a description), or None; puts back what it can."""
        where = None
        for m, name, t, version in self.tensors:
            if t._version != version:
                where = where or f"{type(m).__name__}.{name}"
                if id(t) in self.copies:
                    with torch.no_grad():
                        t.copy_(self.copies[id(t)])
        for m, attrs, key in self.attrs:
            if _module_key(m) != key:
                where = where or next((f"{type(m).__name__}.{k}" for k in vars(m) if vars(m)[k] is not attrs.get(k)),
                                      type(m).__name__)
                vars(m).clear()
                vars(m).update(attrs)
        return where


def _weights(out, replicas):
    """A fixed direction for the trial gradients, cos(0.7 i) over one replica's outputs, on the
    replicas compared only (the gradient is then theirs)."""
    flat = torch.cos(torch.arange(out[0].numel(), device=out.device, dtype=torch.float64) * 0.7)
    mask = torch.zeros(out.shape[0], dtype=torch.float64, device=out.device)
    mask[list(replicas)] = 1
    return (mask[:, None] * flat).to(out.dtype).reshape(out.shape)


def _trial(model, x, m, mode, first, grad, compared):
    """One chunk of m replicas: outputs (m, B, ...) and, with grad, the input gradient of a fixed
    linear function of the compared replicas' outputs (every candidate's backward is checked without
    calling the user's loss, whose side effects must happen once per real call)."""
    if not grad:
        with torch.no_grad():
            return _per_replica(_pass(model, x, m, mode, first), m, x.shape[0]), None
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = _per_replica(_pass(model, xg, m, mode, first), m, x.shape[0])
        if not out.requires_grad:
            return out.detach(), torch.zeros_like(x)
        return out.detach(), torch.autograd.grad((out * _weights(out, compared)).sum(), xg)[0]


def _same(a, b):
    """Equal up to float32 rounding of a reordered computation, element by element."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)


def _same_grad(a, b):
    """Gradients: their scale may be anything, so the absolute tolerance follows their mean size."""
    atol = 1e-5 * float(b.abs().nan_to_num(0, 0, 0).mean()) if b.numel() else 0.0
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=atol, equal_nan=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _budget(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] * MEMORY_FRACTION
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * MEMORY_FRACTION


def _sizes(n, chunk):
    """Candidate chunk sizes from 1 to n, each about twice the last: a divisor of n where one lies
    within 2-4x (equal chunks, no remainder chunk to verify), else twice the last; or 1 and the
    chunk a caller fixed."""
    if chunk is not None:
        return sorted({1, min(chunk, n)})
    sizes = [1]
    while sizes[-1] < n:
        last = sizes[-1]
        divisor = next((d for d in range(2 * last, min(4 * last, n) + 1) if n % d == 0), None)
        sizes.append(divisor or min(2 * last, n))
    return sizes


class _Unbatchable(Exception):
    """A candidate that is not the loop's: why."""


class _Tuner:
    """Trial runs from any replica's position: every replica draws the same counters (checked), so
    replica r starts at start + r * (counters of one replica) on every stream."""

    def __init__(self, model, x, grad, box, per_replica):
        self.model, self.x, self.grad, self.box, self.per_replica = model, x, grad, box, per_replica
        self.loop_runs = {}  # replica -> (outputs, gradient): the loop's, the reference

    def position(self, r):
        return {s: start + r * self.per_replica[s] for s, start in self.box.start.items()}

    def run(self, start, m, mode, first, compared):
        """Outputs, gradient and seconds of one chunk of m replicas from replica `start`."""
        self.box.rewind(self.position(start))
        _sync(self.x.device)
        t0 = time.perf_counter()
        out, g = _trial(self.model, self.x, m, mode, first, self.grad, compared)
        _sync(self.x.device)
        seconds = time.perf_counter() - t0
        met, end = set(self.box.start), self.position(start + m)
        if met != set(self.per_replica) or any(not torch.equal(self.box.offsets[s], end[s]) for s in met):
            raise _Unbatchable(f"drew other counters than {m} loop passes (noise the engine cannot see, or noise "
                               "that depends on the replica)")
        return out, g, seconds

    def loop(self, r):
        """Replica r run alone: the loop's outputs and gradient (cached) and the seconds it took."""
        out, g, seconds = self.run(r, 1, "loop", None, [0])
        self.loop_runs[r] = (out[0], g)
        return seconds

    def verify(self, m, mode, first):
        """Seconds per replica of a chunk of m replicas, after checking it against the loop on its
        first two and last replicas (outputs, and their summed input gradients)."""
        compared = sorted({0, 1, m - 1} & set(range(m)))
        for r in compared:
            if r not in self.loop_runs:
                self.loop(r)
        out, g, seconds = self.run(0, m, mode, first, compared)
        if not all(_same(out[r], self.loop_runs[r][0]) for r in compared):
            raise _Unbatchable("differ from the loop's")
        if self.grad and not _same_grad(g, sum(self.loop_runs[r][1] for r in compared)):
            raise _Unbatchable("differ from the loop's in the input gradient")
        return seconds / m


def _tune(model, x, n, grad, chunk):
    batch, device = x.shape[0], x.device
    # Trials keep torch's generators as they were (the real call draws what the loop would) and their
    # saved tensors to themselves: inside a checkpointed region the region's hooks would count them,
    # and its recomputation (plan cached) would not make them.
    with (torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), Sandbox() as box,
          torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)):
        default_stream(device)  # made before the watch if new: its seed's draw is not the model's randomness
        watch, state = _Watch(model), _ModelState(model)
        xw = x.detach().clone()  # an in-place op on the input changes this copy, never the caller's x
        with torch.enable_grad() if grad else torch.no_grad():
            first_out = _per_replica(watch.run(xw.requires_grad_(grad)), 1, batch)
        out_shape = (batch, *first_out.shape[2:])
        per_replica = {s: int(box.offsets[s] - box.start[s]) for s in box.start}
        draws = list(per_replica.items())
        changed = state.changed() or ("its input" if xw._version else None)
        if changed:
            return Plan("loop", reason=f"the model changes {changed} in its forward, which the engine would run more "
                        "often than the loop: the loop", verified="the watched pass changed the model (undone)",
                        out_shape=out_shape, draws=draws)
        if watch.random:
            return Plan("loop", reason=(
                f"{watch.random} draws from torch's own generator, noise the engine cannot reproduce per "
                "replica: the loop of n passes. Use the library's layers for noise that stays on "
                "(noisekernels.nn.RandomSpike(mc=True), GaussianNoise), or call model.eval() if it should be "
                "off at test time"), verified="torch's generators compared around every module of one watched pass",
                out_shape=out_shape, draws=draws)
        if any(isinstance(m, WeightNoise) and _is_active(m) and not noise_is_off() for m in model.modules()):
            return Plan("loop", reason="weight noise draws one weight per pass, which replicas cannot share",
                        out_shape=out_shape, draws=draws)
        tuner = _Tuner(model, x, grad, box, per_replica)
        try:
            times = {1: tuner.loop(0)}  # the watched pass again, warm and timed: it must repeat
            if not _same(tuner.loop_runs[0][0], first_out[0].detach()):
                raise _Unbatchable("repeat differently from the same stream state")
            if n > 1:
                times[1] = min(times[1], tuner.loop(1))
        except _Unbatchable as e:
            return Plan("loop", reason=f"the loop: passes {e}", out_shape=out_shape, draws=draws)
        if (n > 1 and not watch.noise and not any(per_replica.values())
                and _same(tuner.loop_runs[1][0], tuner.loop_runs[0][0])
                and (not grad or _same_grad(tuner.loop_runs[1][1], tuner.loop_runs[0][1]))):
            return Plan("deterministic", reason="no noise: two passes agree, no stream is drawn from and torch's "
                        "generators do not move, so one pass stands for all n", verified=f"two loop passes on the real batch "
                        f"({batch} rows)", out_shape=out_shape, draws=draws)
        first = watch.noise[0] if watch.noise else None
        mode, budget, stop, checked = None, _budget(device), None, set()  # checked: (chunk, structure) verified
        per_replica_bytes = max(1, sum(watch.sizes) if grad else 3 * max(watch.sizes, default=0))
        for k in _sizes(n, chunk)[1:]:
            if k * per_replica_bytes > budget:
                stop = f"chunks of {k} replicas would pass the memory budget ({MEMORY_FRACTION:.0%} of free memory)"
                break
            failure = None
            for option in [mode] if mode else (["shared", "replicate"] if first is not None else ["replicate"]):
                try:
                    seconds = tuner.verify(k, option, first)
                    if n % k and (n % k, option) not in checked:  # the real call's last chunk
                        tuner.verify(n % k, option, first)
                        checked.add((n % k, option))
                except _Unbatchable as e:
                    failure = str(e)
                    continue
                except Exception as e:  # noqa: BLE001 - a batched pass the loop does not make: the loop is kept
                    failure = f"raised {type(e).__name__}: {e}"
                    continue
                mode, times[k] = option, seconds
                checked.add((k, option))
                break
            else:
                stop = (f"chunks of {k} replicas {failure} on this batch (code that depends on the batch size, "
                        "noise on a tensor that is not the batch, or noise the engine cannot see)")
                break
            # Larger chunks only grow slower once past the cache's optimum; small ones are too quick to
            # judge by one sample on a shared machine.
            if k >= 4 and times[k] > _PAST_OPTIMUM * min(times.values()):
                stop = f"past the optimum at chunks of {k}"
                break
    # A chunk the caller fixed is used once verified (reproducible timing); else the fastest.
    chunk_k = min(chunk, n) if chunk is not None and mode else min(times, key=times.get)
    verified = (f"on the real batch ({batch} rows): chunks of {', '.join(str(k) for k in times)} replicas "
                f"{'(and their input gradients) ' if grad else ''}equal the loop's on their first two and last "
                "replicas and draw its counters; torch's generators untouched; the model does not change itself")
    if mode is None:
        return Plan("loop", 1, None, times, "the loop: " + (stop or "n = 1"), verified, out_shape, draws)
    if mode == "shared":
        where = ("the first noise layer takes the input itself: nothing before it to share, it writes the "
                 "replicas in one fused pass" if watch.first_takes_input else
                 f"layers before the first noise layer ({type(first).__name__}) run once on {batch} rows")
    else:
        where = "the input is replicated (prefix sharing differs from the loop: e.g. a skip around noise)"

    def describe(k):
        how = "fixed by the caller" if chunk is not None else "measured fastest"
        why = "the loop measured fastest" if k == 1 else f"{where}; chunks of {k} replicas {how}"
        return why + (f"; {stop}" if stop else "")

    # One sample per candidate is noisy on a shared machine: where the two fastest are close, the next
    # two real calls run one each and their times decide (a real call is a sample that costs nothing).
    best = sorted(times, key=times.get)[:2] if chunk is None else [chunk_k]
    contenders = best[::-1] if len(best) == 2 and times[best[1]] < _CLOSE * times[best[0]] else ()
    return Plan(mode, chunk_k, first, times, describe(chunk_k), verified, out_shape, draws, contenders, describe)


def _compiled(model):
    """Whether model holds a torch.compile'd module. Without torch._dynamo imported none can be, and
    importing it here would start machinery (worker threads) a plain eager process never had."""
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo is not None and any(isinstance(m, dynamo.eval_frame.OptimizedModule) for m in model.modules())


@contextlib.contextmanager
def fixed_chunk(k):
    """Every engine call of this thread inside (mc_predict, eot_grad, replica_logits, MCClassifier,
    and the attacks and the audit built on them) runs chunks of k replicas, verified as
    always, instead of the chunk measured fastest: a candidate's values differ from another's only by
    float rounding, but an attack's sign step can turn on that rounding, so this is how a run repeats
    bit for bit whatever the machine's load (as torch.backends.cudnn.deterministic). A chunk= given
    to a call wins."""
    _check_count(k, "k")
    before = getattr(_fixed, "chunk", None)
    _fixed.chunk = k
    try:
        yield
    finally:
        _fixed.chunk = before


def plan(model, x, n, *, grad=False, chunk=None):
    """The Plan for n replicas of x (with grad: forward and backward to x), tuned on the first call
    for this model state, input shape, n, device and grad, and cached. Moves no stream."""
    if chunk is None:
        chunk = getattr(_fixed, "chunk", None)
    _check(model, x, n, chunk)
    key = (tuple(x.shape), x.dtype, x.device, n, bool(grad), chunk, noise_is_off(), _state(model))
    with _plans_lock:
        cache = _plans.setdefault(model, {})
        found = cache.get(key)
    if found is None:
        if _compiled(model):
            found = Plan("loop", reason="a torch.compile'd model runs as the loop: the engine's checks and trials cannot "
                         "look inside compiled code (pass the model as it was before torch.compile to batch it)")
        else:
            found = _empty_batch_plan(model, x) if x.shape[0] == 0 else _tune(model, x, n, grad, chunk)
        with _plans_lock:
            cache[key] = found
    return found


def _empty_batch_plan(model, x):
    """An empty batch runs as the loop (cheap, and weight noise still draws per pass)."""
    with Sandbox(), torch.no_grad(), replica_pass(1):
        out = model(x)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    return Plan("loop", reason="empty batch: the loop", out_shape=shape)


def _check(model, x, n, chunk=None):
    _check_count(n, "n")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a batched tensor (B, ...)")
    if chunk is not None:
        _check_count(chunk, "chunk")
    _check_batch_statistics(model)


def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _run(model, x, n, p):
    """(n, B, ...) outputs under plan p."""
    if p.mode == "deterministic":
        with replica_pass(1):
            out = _per_replica(model(x), 1, x.shape[0])
        return out.expand(n, *out.shape[1:])
    outs = []
    with _given_back_on_error(p) as drawn, _call(p, x.device, n) as k:
        for m in _chunks(n, k):
            outs.append(_per_replica(_pass(model, x, m, p.structure, p.first), m, x.shape[0]))
            drawn[0] += m
    return torch.cat(outs)


@contextlib.contextmanager
def _call(p, device, n):
    """Yields the chunk size of this call; a call that samples a contender is timed (synchronised on
    a GPU: only these few calls are) and recorded if it completes."""
    k, sample = p._take_chunk()
    if not sample:
        yield k
        return
    _sync(device)
    start = time.perf_counter()
    yield k
    _sync(device)
    p._record(k, (time.perf_counter() - start) / n)


def replica_logits(model, x, n, *, chunk=None):
    """The (n, B, ...) outputs of n noisy passes over x (model outputs of shape (B, ...)), run as
    the plan says (differentiable). chunk: fix the replicas per pass instead of measuring (still
    verified; same values)."""
    return _run(model, x, n, plan(model, x, n, grad=_records_graph(model, x), chunk=chunk))


def _records_graph(model, x):
    """Whether autograd records this call (a gradient to the input or to a parameter): the plan's
    memory budget then counts every saved activation, and its trials check the input gradient."""
    return torch.is_grad_enabled() and isinstance(x, torch.Tensor) and (
        x.requires_grad or any(p.requires_grad for p in model.parameters()))


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
    if reduce == "none":
        return _run(model, x, n, p)
    return replica_reduce(_run_logits(model, x, n, p, f"reduce={reduce!r}", "; use reduce='none' for other outputs"),
                          reduce)


def _run_logits(model, x, n, p, needs, hint=""):
    """_run's (n, B, C) logits, refused before any draw where the plan knows the outputs are not
    (B, C), and after the run where it does not (a compiled model's plan)."""
    if p.out_shape is not None:
        _check_logits(needs, p.out_shape, hint)
    logits = _run(model, x, n, p)
    _check_logits(needs, logits.shape[1:], hint)
    return logits


def _check_logits(needs, shape, hint=""):
    if len(shape) != 2:
        raise ValueError(f"{needs} needs (B, C) logits from the model, got outputs of shape "
                         f"{tuple(shape[1:])}{hint}")


def decide(scores, *, votes=False):
    """The class of each row of (B, C) scores (ties to the smaller index; NaN entries never
    win), NO_CLASS where the row is all NaN or, for vote counts, holds no vote."""
    silent = (scores.sum(1) == 0) if votes else scores.isnan().all(1)
    pred = torch.where(scores.isnan(), -torch.inf, scores.double()).argmax(1)
    return torch.where(silent, torch.full_like(pred, NO_CLASS), pred)


@torch.no_grad()
def deterministic_predict(model, x):
    """The single prediction (logits) with every noise layer switched off."""
    with noise_off():  # this thread's passes only: no module is touched
        return model(x)


def eot_grad(model, loss_fn, x, y, n, *, chunk=None):
    """EOT: the gradient with respect to x of the mean loss over n noise draws, and that loss.

    loss_fn(logits, labels) is called once per draw, on that draw's (B, ...) outputs, and must
    return a scalar (any reduction over the rows: the result is the loop's whatever it is). One
    forward and one backward per chunk of replicas; model parameters get no gradient. A call that
    fails (a loss refused for not being a scalar, an error in the loss) gives its draws back.
    """
    _check(model, x, n, chunk)
    if not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]:
        raise ValueError(f"y must be a tensor with x's batch size {x.shape[0]}")
    x = x.detach().requires_grad_(True)
    p = plan(model, x, n, grad=True, chunk=chunk)
    if p.mode == "deterministic":
        with replica_pass(1):
            loss = _scalar_loss(loss_fn, model(x), y)
        return torch.autograd.grad(loss, x)[0], loss.detach()
    grad, total = torch.zeros_like(x), x.new_zeros(())
    with _given_back_on_error(p) as drawn, _call(p, x.device, n) as k:
        for m in _chunks(n, k):
            out = _per_replica(_pass(model, x, m, p.structure, p.first), m, x.shape[0])
            drawn[0] += m
            loss = sum(_scalar_loss(loss_fn, out[r], y) for r in range(m)) / n
            grad += torch.autograd.grad(loss, x)[0]
            total = total + loss.detach()
    return grad, total


@contextlib.contextmanager
def _given_back_on_error(p):
    """A call that fails (a refused loss, an error of the loss or the model) gives its draws back:
    each stream returns to where the call found it, unless another reservation came since (then it
    stays: a counter is never handed out twice). Yields the count of replicas drawn so far."""
    starts, drawn = [(s, s.offset.clone(), count) for s, count in p.draws if count], [0]
    try:
        yield drawn
    except BaseException:
        for s, start, count in starts:
            s.release(start, count * drawn[0])
        raise


def _scalar_loss(loss_fn, logits, y):
    loss = loss_fn(logits, y)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar (like F.cross_entropy with reduction='mean'), got {shape}")
    return loss


OUTPUTS = ("log_prob", "prob", "logits")


class MCClassifier(nn.Module):
    """The MC-averaged classifier the papers deploy, as a module: forward(x) runs n noisy passes of
    the wrapped model through the engine (batched where it verified that equals the loop) and
    returns (B, C) scores, differentiable to the input and to the model's parameters, so tools
    that know nothing of randomness (torchattacks, auto-attack, ART, foolbox) evaluate it as it is.

    output="log_prob": the log of the mean of the n replicas' softmax (computed as logsumexp of
    their log_softmax minus log n, finite where a probability underflows); cross-entropy on it is
    the loss of the MC-mean prediction. "prob": that mean itself. "logits": the mean of the
    logits, a different classifier (its argmax need not be the mean softmax's): for tools that need
    logits.

    Each forward draws fresh noise: every noise layer's stream advances by what n calls of
    model(x) would draw, so the values equal the loop of n passes from the same stream state (save
    and restore the streams, or their state_dict, to repeat a forward). Calls from several threads
    never share a counter, but their passes may interleave: each then equals no single loop. The model is a submodule:
    .to(), .eval() and state_dict() reach it.
    """

    def __init__(self, model, n, output="log_prob"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_count(n, "n")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.model, self.n, self.output = model, n, output

    def forward(self, x):
        p = plan(self.model, x, self.n, grad=_records_graph(self.model, x))
        logits = _run_logits(self.model, x, self.n, p, "MCClassifier")
        if self.output == "logits":
            return logits.mean(0)
        if self.output == "prob":
            return logits.softmax(-1).mean(0)
        return torch.logsumexp(logits.log_softmax(-1), 0) - math.log(self.n)

    def extra_repr(self):
        return f"n={self.n}, output={self.output!r}"


__all__ = ["MCClassifier", "NO_CLASS", "Plan", "decide", "deterministic_predict", "eot_grad", "fixed_chunk", "mc_predict", "noise_off", "plan", "replica_logits"]
