"""Streams: where every noise op takes its (seed, offset) from (ARCHITECTURE.md section 2).

A Stream is a module with two int64 buffers, so a model's state_dict restores its exact noise
sequence and .to(device) moves it with the model. reserve(n) hands out a disjoint counter range
and advances the offset in place on the device: no host sync, and under torch.compile the
advance happens inside the graph, so compiled steps never freeze their noise.
"""

import contextlib
import threading

import torch
import torch.utils.checkpoint
from torch import nn

from . import philox, replicas
from ._extension import REFERENCE_ONLY, batched_here, refuse_vmap, register_op, triton_kernel, under_vmap
from .ops._args import stream_tensors

if not REFERENCE_ONLY:
    from . import _C

# Counter word c2 of seed derivation; data counters always have c2 = 0, so the two never meet.
_DERIVE_TAG = 0x6E6B7264

# reserve's start offset is a copy made by an op of its own. A plain clone of the offset buffer, which
# the step then advances in place, is not safe under torch.compile: inductor drops it as a no-op and
# the partitioners recompute it in the backward, both reading the buffer after the advance, so the
# backward regenerated the next call's noise. Custom ops are never dropped or recomputed. Its kernel is
# C++ (csrc/bindings/stream.cpp); this is the reference mode's.
def _offset_snapshot(offset):
    _refuse_in_backward()  # a snapshot in a backward pass is a recomputed forward's draw (see checkpoint below)
    return offset.clone()


register_op("offset_snapshot", "offset_snapshot(Tensor offset) -> Tensor", reference=_offset_snapshot)
torch.library.register_fake("noisekernels::offset_snapshot", lambda offset: torch.empty_like(offset))
_SNAPSHOT = torch.ops.noisekernels.offset_snapshot.default

# In eager mode a reservation is one op instead, offset_reserve: it returns the start offset and
# advances the offset in one atomic step on the offset's device (std::atomic_ref on CPU, atomicAdd on
# CUDA, whatever CUDA stream a thread runs on), so two threads drawing from one stream never share a
# counter. Its kernels are C++ (csrc/bindings/stream.cpp, csrc/cuda/stream.cu) and Triton; this is the
# reference mode's, atomic by a lock every reservation of the process takes (on a GPU that orders the
# copy and add of threads on one CUDA stream only).
_reserve_lock = threading.Lock()


def _offset_reserve(offset, n):
    _refuse_in_backward()
    if n < 0:
        raise RuntimeError(f"offset_reserve: n must be non-negative, got {n}")
    with _reserve_lock:
        start = offset.clone()
        offset.add_(n)
    return start


register_op("offset_reserve", "offset_reserve(Tensor(a!) offset, int n) -> Tensor", reference=_offset_reserve,
            triton=triton_kernel("stream", "offset_reserve"))
torch.library.register_fake("noisekernels::offset_reserve", lambda offset, n: torch.empty_like(offset))
_RESERVE = torch.ops.noisekernels.offset_reserve.default


def _random_seed():
    """A 64-bit seed from torch's default generator, as an int64 tensor (torch.manual_seed
    reproduces it)."""
    lo, hi = torch.randint(0, 2**32, (2,), dtype=torch.int64)
    return (hi - (hi >= 2**31).long() * 2**32) * 2**32 + lo


def derive_seed(seed, index):
    """A seed for sub-stream `index` of `seed`: Philox of (index, DERIVE_TAG) under key seed."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 2**64:
        raise ValueError(f"index must be an int in [0, 2**64), got {index!r}")
    lo = torch.tensor(index & philox.MASK32, dtype=torch.int64, device=seed.device)
    hi = torch.tensor(index >> 32, dtype=torch.int64, device=seed.device)
    k0, k1 = philox.key_words(seed)
    w0, w1, _, _ = philox.philox4x32_10(lo, hi, torch.full_like(lo, _DERIVE_TAG), torch.zeros_like(lo), k0, k1)
    return (w1 - (w1 >= 2**31).long() * 2**32) * 2**32 + w0


class Stream(nn.Module):
    """A Philox stream: a 64-bit seed and the next unused counter, both int64 buffers.

    seed: an int in [0, 2**64), or None to draw one from torch's default generator.
    """

    _plan_ignores = ("_buffers",)  # the offset moves at every draw: the engine's plans do not depend on it

    def __init__(self, seed=None):
        super().__init__()
        if seed is None:
            value = _random_seed()
        else:
            value, _ = stream_tensors(seed, 0)
        self.register_buffer("seed", value.clone())
        self.register_buffer("offset", torch.zeros((), dtype=torch.int64, device=value.device))

    def reserve(self, n):
        """Reserves counters [offset, offset + n) and returns (seed, start offset) for an op call.
        The start offset is a new tensor, so later reservations never change it. Inside the
        recomputation of noisekernels.checkpoint it returns the forward's reservation instead."""
        if isinstance(n, int) and n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        if self.__dict__.get("_is_replica", False):  # set on every module copy nn.DataParallel makes
            raise RuntimeError("nn.DataParallel copies a Stream to every device with its seed and offset, so every "
                               "device would draw the same noise; train with DistributedDataParallel and "
                               "nk.for_rank (one noise sequence per rank)")
        # A draw here would be one for all of vmap's samples, unless the stream's state is itself
        # stacked per sample. Checked under torch.compile too, which traces torch.vmap's body with
        # vmap's level set and would otherwise compile the shared draw.
        if under_vmap() and not batched_here(self.seed, self.offset):
            refuse_vmap()
        if not torch.compiler.is_compiling() and _checkpoints.stack:
            return _checkpoint_reserve(self, n)
        return self._advance(n)

    def plain_eager(self):
        """Whether a reservation now is a plain atomic one (the extension is loaded; no torch.compile,
        vmap, checkpointed region or engine sandbox; not a DataParallel copy), which a layer may make
        inside its own C++ call (csrc/bindings/noise_layer.cpp)."""
        return not (REFERENCE_ONLY or _checkpoints.stack or torch.compiler.is_compiling() or under_vmap()
                    or self.__dict__.get("_is_replica", False))

    def release(self, start, n):
        """Gives back the reservation [start, start + n) (a refused call's draws) if no reservation
        came after it; returns whether it did. Atomic against other reservations on CPU; on other
        devices a reservation racing with it is not seen (it then may be handed out again)."""
        offset = self.offset
        if offset.device.type == "cpu" and not REFERENCE_ONLY:
            return _C.offset_release(offset, int(start), n)
        with _reserve_lock:  # reference mode reserves under this lock
            if int(offset) != (int(start) + n + 2**63) % 2**64 - 2**63:
                return False
            with torch.no_grad():
                offset.copy_(start)
            return True

    def _advance(self, n):
        # Traced code keeps the snapshot and an in-place add, both in the graph: torch.compile needs
        # the snapshot op (above), and vmap over stacked stream states batches add_ per sample.
        if torch.compiler.is_compiling() or under_vmap():
            start = _SNAPSHOT(self.offset)
            self.offset.add_(n)
            return self.seed, start
        return self.seed, _RESERVE(self.offset, n)

    def fork(self, index):
        """A new Stream for sub-stream `index` (e.g. a data-loader worker), starting at offset 0."""
        child = Stream(0).to(self.seed.device)
        child.seed.copy_(derive_seed(self.seed, index))
        return child

    def extra_repr(self):
        return f"device={self.seed.device}"


# Activation checkpointing recomputes a forward during the backward. A Stream's offset has moved on
# by then, so a plain recomputation would draw new noise and the gradient would belong to noise the
# forward never used. noisekernels.checkpoint records the forward's reservations and replays them
# in the recomputation. Any other reservation during a backward pass is refused by offset_snapshot
# itself, so the refusal also covers torch.compile's recomputation of a checkpointed region (its
# backward graph reruns the snapshot on the advanced offset).
class _Checkpoints(threading.local):
    def __init__(self):
        self.stack = []  # the checkpointed regions this thread is running, innermost last
        self.fresh_in_backward = False  # inside fresh_noise_in_backward(), for the reference mode's kernel


_checkpoints = _Checkpoints()


class _Record:
    """The forward of a checkpointed region: keeps every reservation (stream, n, seed, start) and the
    thread's replica settings, which the recomputation runs under again."""

    def __init__(self):
        self.reservations, self.replicas = [], None

    def __enter__(self):
        self.replicas = replicas.settings()
        _checkpoints.stack.append(self)

    def __exit__(self, *exc):
        _checkpoints.stack.remove(self)


class _Replay:
    """The recomputation of a checkpointed region: hands out its forward's reservations in order
    (from the first again at each recomputation: a second backward recomputes again)."""

    def __init__(self, record):
        self.record, self.next, self.settings = record, 0, None

    def __enter__(self):
        self.next = 0
        self.settings = replicas.restored(self.record.replicas)
        self.settings.__enter__()
        _checkpoints.stack.append(self)

    def __exit__(self, *exc):
        _checkpoints.stack.remove(self)
        self.settings.__exit__(*exc)

    def take(self, stream, n):
        reservations = self.record.reservations
        if self.next >= len(reservations):
            raise RuntimeError("noisekernels.checkpoint: the recomputation drew noise the forward did not draw "
                               "(the checkpointed function must make the same noise calls each time it runs)")
        owner, count, seed, start = reservations[self.next]
        if owner is not stream or count != n:
            raise RuntimeError("noisekernels.checkpoint: the recomputation's noise calls differ from the forward's "
                               "(another stream or size); the checkpointed function must make the same calls each time")
        self.next += 1
        return seed, start


class Sandbox:
    """This thread's draws on private copies of the streams' offsets (the engine's trial passes):
    each stream is first met at its current offset and never moves, so other threads' draws are
    untouched. position() and rewind(position) replay a run from a point of its draws."""

    def __init__(self):
        self.start, self.offsets = {}, {}  # stream -> offset tensor (where first met, where it is now)

    def __enter__(self):
        _checkpoints.stack.append(self)
        return self

    def __exit__(self, *exc):
        _checkpoints.stack.remove(self)

    def take(self, stream, n):
        if stream not in self.offsets:
            self.start[stream] = stream.offset.clone()
            self.offsets[stream] = self.start[stream].clone()
        start = self.offsets[stream]
        self.offsets[stream] = start + n
        return stream.seed.clone(), start

    def position(self):
        return dict(self.offsets)

    def rewind(self, position):
        """Back to `position` (streams first met after it: back to where they were met)."""
        self.offsets = {s: position.get(s, start) for s, start in self.start.items()}


def _checkpoint_reserve(stream, n):
    """A reservation inside checkpointed regions or a sandbox: the innermost replay's or sandbox's,
    else a fresh one; every region being recorded inside it keeps it for its own recomputation."""
    stack = _checkpoints.stack
    sources = [i for i, c in enumerate(stack) if isinstance(c, (_Replay, Sandbox))]
    if sources:
        seed, start = stack[sources[-1]].take(stream, n)
    else:  # the seed buffer as it is now: one changed in place before the backward (reseeding) must not leak in
        seed, start = stream._advance(n)
        seed = seed.clone()
    for context in stack[sources[-1] + 1 if sources else 0:]:
        context.reservations.append((stream, n, seed, start))
    return seed, start


def _refuse_in_backward():
    if torch._C._current_graph_task_id() != -1 and not _checkpoints.fresh_in_backward:
        raise RuntimeError(
            "a noise layer drew new noise during a backward pass: torch.utils.checkpoint recomputes a forward "
            "there, and its recomputation would use other noise than the forward did (a wrong gradient). "
            "Checkpoint noisy code with noisekernels.checkpoint, which replays the forward's noise (eager mode; "
            "under torch.compile, leave noise layers outside checkpointed regions). Noise meant to be new in "
            "the backward (added to gradients in a hook, a BPDA surrogate's backward) is drawn inside "
            "noisekernels.fresh_noise_in_backward()")


@contextlib.contextmanager
def fresh_noise_in_backward():
    """Lets this thread's enclosed code draw new noise during a backward pass, which is otherwise
    refused as a recomputation of a forward (torch.utils.checkpoint's): for noise that belongs to the
    backward itself, e.g. noise added to gradients in a hook or a noisy surrogate run in a custom
    backward (BPDA). Enter it inside the hook or backward, around the draws only: a recomputation
    run inside it would not be caught."""
    before = _set_fresh_in_backward(True)
    try:
        yield
    finally:
        _set_fresh_in_backward(before)


def _set_fresh_in_backward(on):
    """Sets this thread's permission where offset_snapshot's kernel reads it; returns the previous one."""
    if not REFERENCE_ONLY:
        return _C.set_fresh_noise_in_backward(on)
    before, _checkpoints.fresh_in_backward = _checkpoints.fresh_in_backward, on
    return before


def checkpoint(function, *args, **kwargs):
    """torch.utils.checkpoint.checkpoint (use_reentrant=False) whose recomputation draws exactly the
    forward's noise: every Stream reservation of the forward is recorded and handed out again, in
    order, when the backward recomputes the region. Keyword arguments go to torch's checkpoint
    (context_fn and use_reentrant are this function's own)."""
    if torch.compiler.is_compiling():
        raise RuntimeError("noisekernels.checkpoint runs in eager mode; under torch.compile, leave noise layers "
                           "outside checkpointed regions")
    for name in ("context_fn", "use_reentrant"):
        if name in kwargs:
            raise ValueError(f"noisekernels.checkpoint sets {name} itself; got {name}={kwargs[name]!r}")
    record = _Record()
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
                                             context_fn=lambda: (record, _Replay(record)), **kwargs)


def for_rank(module, rank=None):
    """Gives every Stream in `module` its own sequence for this distributed rank (call once, after
    construction and before training). rank defaults to torch.distributed's rank."""
    if rank is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("for_rank: pass rank=, or initialise torch.distributed first")
        rank = torch.distributed.get_rank()
    streams = [m for m in module.modules() if isinstance(m, Stream)]
    seeds = [derive_seed(s.seed, rank) for s in streams]  # all computed before any is changed
    with torch.no_grad():
        for s, seed in zip(streams, seeds):
            s.seed.copy_(seed)
    return module
