"""Where a functional op's (seed, offset) comes from: explicit values, a Stream, or the library's
default stream of the device (as torch's functional dropout uses torch's default generator).

A Stream or the default stream reserves exactly what philox.counters(numel, segments, draws) says
the call uses, so no caller computes a reservation by hand. The default streams draw one root seed from torch's
default generator, once, at the first use of any of them; the stream of each device derives its
seed from the root, so devices never share noise.
"""

import threading
import zlib

import torch

from ..stream import Stream, derive_seed
from ._args import stream_tensors

_root_seed = None
_default_streams = {}
_creation_lock = threading.Lock()


def default_stream(device=None):
    """The library's default Stream of `device` (CPU when None), created on first use."""
    global _root_seed
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _default_streams.get(device)
    if stream is None:
        # Created once under a lock: threads each making their own would draw the same counters.
        with _creation_lock:
            if device not in _default_streams:
                if _root_seed is None:
                    _root_seed = Stream().seed  # the one draw from torch's default generator
                stream = Stream(0).to(device)
                with torch.no_grad():
                    stream.seed.copy_(derive_seed(_root_seed, zlib.crc32(str(device).encode())))
                _default_streams[device] = stream
            stream = _default_streams[device]
    return stream


def _same_device(a, b):
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def call_stream(seed, offset, stream, device, count):
    """(seed, offset) tensors on `device` for one op call using `count` counters (philox.counters):
    the explicit (seed, offset) if given, else a reservation of `count` from `stream` (default:
    the device's default stream)."""
    if seed is not None or offset is not None:
        if stream is not None:
            raise ValueError("pass either seed and offset or stream, not both")
        if seed is None or offset is None:
            raise ValueError("seed and offset must be given together (or neither, to draw from a stream)")
        return stream_tensors(seed, offset, device)
    if stream is None:
        stream = default_stream(device)
    elif not isinstance(stream, Stream):
        raise TypeError(f"stream must be a noisekernels.Stream, got {type(stream).__name__}")
    if device is not None and not _same_device(stream.seed.device, torch.device(device)):
        raise ValueError(f"stream is on {stream.seed.device} but the op runs on {torch.device(device)}")
    return stream.reserve(count)
