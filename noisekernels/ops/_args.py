"""Argument checks shared by the ops: clear errors that name the argument and its accepted range."""

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_U64 = 2**64


def check_floating_dtype(dtype, name="dtype"):
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of float32, float64, float16, bfloat16, got {dtype}")


def check_size(size):
    """A shape as a tuple of non-negative ints; an int means a 1-D shape."""
    if isinstance(size, (int, torch.SymInt)):
        dims = (size,)
    elif isinstance(size, (tuple, list, torch.Size)):
        dims = tuple(size)
    else:
        raise TypeError(f"size must be an int or a sequence of ints, got {size!r}")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, torch.SymInt)):
            raise TypeError(f"size must be an int or a sequence of ints, got {size!r}")
        if isinstance(d, int) and d < 0:
            raise ValueError(f"size must be non-negative, got {size!r}")
    return dims


def _word64_tensor(value, name, device):
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.int64:
            raise TypeError(f"{name} must be an int in [0, 2**64) or a one-element int64 tensor, got a {value.dtype} tensor")
        if value.numel() != 1:
            raise ValueError(f"{name} must hold exactly one element, got shape {tuple(value.shape)}")
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in [0, 2**64) or a one-element int64 tensor, got {type(value).__name__}")
    if not 0 <= value < _U64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    # The 64-bit pattern as a signed int64.
    return torch.tensor(value - _U64 if value >= 2**63 else value, dtype=torch.int64, device=device)


def stream_tensors(seed, offset, device=None):
    """(seed, offset) as 0-dim int64 tensors on one device: the tensors' device, else `device`."""
    tensors = [t for t in (seed, offset) if isinstance(t, torch.Tensor)]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"seed and offset must be on one device, got {sorted(map(str, devices))}")
    if devices:
        (found,) = devices
        if device is not None and torch.device(device) != found:
            raise ValueError(f"device is {torch.device(device)} but seed/offset tensors are on {found}")
        device = found
    device = torch.device("cpu") if device is None else torch.device(device)
    return _word64_tensor(seed, "seed", device), _word64_tensor(offset, "offset", device)


def check_probability(p, name="p"):
    """A probability as a float in [0, 1]."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(p).__name__}")
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {p}")
    return float(p)


def check_floating_tensor(x, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    check_floating_dtype(x.dtype, f"{name}.dtype")


def compute_dtype(dtype):
    """The arithmetic dtype of the noise kernels: float64 for float64 tensors, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
