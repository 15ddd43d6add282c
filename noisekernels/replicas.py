"""The replica count of the current pass (ARCHITECTURE.md section 3).

Inside `with replicas(n):` a batch of n*B rows holds n replicas of B inputs, replica-major, and
noise layers take their batch-wide statistics per replica. The count is per thread, so one
thread's replica pass never changes another thread's plain calls. It lives in a threading.local
read with getattr and a default: torch.compile guards on that read (per thread) instead of
breaking the graph, which it does on ContextVar.get; a threading.local subclass with a class-level
default is not guarded correctly, so the default stays in the getattr.
"""

import contextlib
import threading

_state = threading.local()
_DEFAULTS = {"count": 1, "expand_layer": None, "expand_n": 1, "noise_off": False}


def current():
    """Replicas in the batch being run by this thread (1 outside any `replicas` block)."""
    return getattr(_state, "count", 1)


def repeat_rows(x, n):
    """x repeated n times along dim 0 (replica-major); x itself when n == 1."""
    return x if n == 1 else x.repeat(n, *([1] * (x.dim() - 1)))


def expansion(layer):
    """How many replicas `layer` makes of its B input rows in this thread: the engine's prefix
    sharing lets the first noise layer expand its input (1 otherwise). Per thread, like the count."""
    return getattr(_state, "expand_n", 1) if getattr(_state, "expand_layer", None) is layer else 1


@contextlib.contextmanager
def expanding(layer, n):
    """Runs this thread's enclosed passes with `layer` expanding its input to n replicas."""
    before = getattr(_state, "expand_layer", None), getattr(_state, "expand_n", 1)
    _state.expand_layer, _state.expand_n = layer, n
    try:
        yield
    finally:
        _state.expand_layer, _state.expand_n = before


def layer_settings(layer):
    """(expansion(layer), current(), noise_is_off()) in one call: an additive noise layer's call is
    a few microseconds, and each of the three calls costs a tenth of one."""
    n = getattr(_state, "expand_n", 1) if getattr(_state, "expand_layer", None) is layer else 1
    return n, getattr(_state, "count", 1), getattr(_state, "noise_off", False)


def noise_is_off():
    """True inside this thread's noise_off() block: every noise layer is the identity."""
    return getattr(_state, "noise_off", False)


@contextlib.contextmanager
def noise_off():
    """Runs this thread's enclosed passes with every noise layer (weight noise too) switched off,
    without touching any module, so other threads' passes keep their noise."""
    before = noise_is_off()
    _state.noise_off = True
    try:
        yield
    finally:
        _state.noise_off = before


@contextlib.contextmanager
def replicas(n):
    """Runs this thread's enclosed passes with batches of `n` replicas."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    before = current()
    _state.count = n
    try:
        yield
    finally:
        _state.count = before


def settings():
    """This thread's replica settings (count, expansion, noise off), to rerun a pass later under the
    same ones: noisekernels.checkpoint's recomputation runs in the backward, outside their blocks."""
    return {name: getattr(_state, name, default) for name, default in _DEFAULTS.items()}


@contextlib.contextmanager
def restored(saved):
    """Runs this thread's enclosed passes under replica settings that settings() returned."""
    before = settings()
    _state.__dict__.update(saved)
    try:
        yield
    finally:
        _state.__dict__.update(before)
