"""Loads noisekernels._C, checks it matches the sources and torch, and picks a backend per call.

NOISEKERNELS_BACKEND=reference skips the extension: the pure-PyTorch reference ops are then
registered under the same torch.ops.noisekernels schemas, so every layer above ops/ runs
unchanged. Nothing falls back to the reference silently.
"""

import importlib
import os

import torch
import torch.autograd.forward_ad as fwAD

from ._source_hash import source_hash

BACKENDS = ("reference", "cpu", "cuda", "triton")
BUILD_HELP = (
    "build it from the repository root with `make build` "
    "(python setup.py build_ext --inplace), or set NOISEKERNELS_BACKEND=reference "
    "to run the pure-PyTorch reference ops instead"
)

_mode = os.environ.get("NOISEKERNELS_BACKEND", "auto")
if _mode not in ("auto", "reference"):
    raise ImportError(f"NOISEKERNELS_BACKEND must be 'auto' or 'reference', got {_mode!r}")
REFERENCE_ONLY = _mode == "reference"


def _load():
    try:
        ext = importlib.import_module("noisekernels._C")
    except ImportError as e:
        raise ImportError(f"noisekernels._C could not be loaded ({e}); {BUILD_HELP}") from e
    info = ext.build_info()
    if info["torch_version"] != torch.__version__:
        raise ImportError(
            f"noisekernels._C is stale: built against torch {info['torch_version']}, "
            f"running torch {torch.__version__}; {BUILD_HELP}"
        )
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    if os.path.isdir(csrc) and source_hash(csrc) != info["source_hash"]:
        raise ImportError(f"noisekernels._C is stale: csrc/ changed since it was built; {BUILD_HELP}")
    return info


BUILD_INFO = {"source_hash": None, "torch_version": None, "cuda": False, "avx512": False}
if not REFERENCE_ONLY:
    BUILD_INFO = _load()

# Schemas come from C++ (TORCH_LIBRARY); Python adds fake kernels, autograd, and the reference or
# Triton kernels where C++ has none.
LIB = torch.library.Library("noisekernels", "DEF" if REFERENCE_ONLY else "IMPL")


def _triton_available():
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


_PYTHON_KERNELS = {}
_SCHEMAS = {}  # what reference mode defines; a test checks it against the C++ schemas


def triton_kernel(module, name):
    """A loader of noisekernels.triton.<module>.<name>, imported on first use (Triton is optional)."""
    return lambda: getattr(importlib.import_module(f"noisekernels.triton.{module}"), name)


def register_op(name, schema, *, reference, triton=None, noise=False):
    """Registers Python kernels for op `name`: the reference everywhere when the extension is not
    loaded (defining the schema), and Triton for CUDA tensors when C++ CUDA kernels are not built.
    `triton` is a zero-argument callable returning the Triton kernel, imported on first use.
    noise: the op applies the noise of its (seed, offset) to a data tensor, so torch.vmap with one
    (seed, offset) for all samples is refused (every sample would get the same noise); vmap over
    per-sample seeds or offsets runs the op once per sample, as a loop over them would."""
    _PYTHON_KERNELS[name] = (reference, triton)
    _SCHEMAS[name] = schema
    if REFERENCE_ONLY:
        LIB.define(schema)
        LIB.impl(name, reference, "CompositeExplicitAutograd")
    elif not BUILD_INFO["cuda"] and triton is not None and _triton_available():
        LIB.impl(name, lambda *args: triton()(*args), "CUDA")
    if noise:
        torch.library.register_vmap(f"noisekernels::{name}", _per_sample_noise(name), lib=LIB)


def _per_sample_noise(name):
    """The vmap rule of noise op `name`: one (seed, offset) shared by all samples (explicit values;
    a shared Stream's draw is refused by the Stream) is refused, per-sample ones run the op once per
    sample."""
    names = [a.name for a in _OPS[name]._schema.arguments]
    seed, offset = names.index("seed"), names.index("offset")

    def rule(info, in_dims, *args):
        if in_dims[seed] is None and in_dims[offset] is None:
            refuse_vmap()
        outs = [_OPS[name](*(_sample(a, d, i) for a, d in zip(args, in_dims))) for i in range(info.batch_size)]
        if isinstance(outs[0], torch.Tensor):
            return torch.stack(outs), 0
        stacked = [torch.stack(parts) for parts in zip(*outs)]
        return (tuple(stacked), (0,) * len(stacked)) if isinstance(outs[0], tuple) else (stacked, [0] * len(stacked))
    return rule


def _sample(arg, dim, i):
    if isinstance(arg, list):
        return [_sample(a, d, i) for a, d in zip(arg, dim if isinstance(dim, list) else [dim] * len(arg))]
    return arg if dim is None else arg.select(dim, i)


def under_vmap():
    """Whether this thread runs inside torch.vmap (functorch's interpreter stack holds a vmap level)."""
    return torch._C._functorch.maybe_current_level() is not None and any(
        i.key() == torch._C._functorch.TransformType.Vmap for i in torch._C._functorch.get_interpreter_stack())


def batched_here(*tensors):
    """Whether one of `tensors` is batched at the innermost functorch level (under vmap: one value
    per sample, as a stream's state stacked by torch.func's model ensembling)."""
    level = torch._C._functorch.maybe_current_level()
    return any(torch._C._functorch.maybe_get_level(t) == level for t in tensors)


def refuse_vmap():
    raise RuntimeError(
        "noisekernels noise under torch.vmap: the draw is made once for the whole vmapped call, so every sample "
        "would get the same noise (torch's own random ops refuse vmap too, by default). Run the batch without "
        "vmap: noise layers and ops take batches, and nk.replicas / nk.ensemble batch noisy replicas (vmap over "
        "per-sample seeds or offsets of an op runs)")


def resolve_backend(backend, device):
    """The backend that runs a call on `device`: `backend` if given and valid there, else the
    device's native one (reference when the extension is not loaded)."""
    device = torch.device(device)
    if backend is None:
        if REFERENCE_ONLY:
            return "reference"
        if device.type == "cuda" and not BUILD_INFO["cuda"]:
            return "triton"
        return device.type if device.type in ("cpu", "cuda") else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend in ("cpu", "cuda"):
        if REFERENCE_ONLY:
            raise RuntimeError(f"backend={backend!r} needs noisekernels._C, which NOISEKERNELS_BACKEND=reference skips")
        if device.type != backend:
            raise ValueError(f"backend={backend!r} runs on {backend} tensors, got tensors on {device}")
        if backend == "cuda" and not BUILD_INFO["cuda"]:
            raise RuntimeError("backend='cuda': noisekernels._C was built without CUDA; rebuild where torch has CUDA and nvcc")
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1, set before triton is imported")
    return backend


def _dispatched(chosen, device):
    """Whether torch.ops.noisekernels runs backend `chosen` on `device` (native C++, reference mode's
    reference, or Triton registered for CUDA tensors)."""
    if REFERENCE_ONLY:
        return chosen == "reference"
    if chosen in ("cpu", "cuda"):
        return True
    return chosen == "triton" and device.type == "cuda" and not BUILD_INFO["cuda"]


def call_op(name, backend, device, *args):
    """Runs op `name` on tensors of torch.device `device` on the backend resolve_backend picks. Kernels
    the dispatcher runs go through torch.ops.noisekernels, so torch.compile sees the op; the others are
    called directly, with the op's registered autograd, so every backend is differentiable the same way."""
    if backend is None and device.type in ("cpu", "cuda"):  # always the dispatcher's: skips 3 us of resolving
        return _OPS[name](*args)
    chosen = resolve_backend(backend, device)
    if _dispatched(chosen, torch.device(device)):
        return _OPS[name](*args)
    if name not in _AUTOGRAD:
        return _python_kernel(name, chosen)(*args)
    return _differentiable(name, chosen, None, args)


def _python_kernel(name, backend):
    reference, triton = _PYTHON_KERNELS[name]
    return reference if backend == "reference" else triton()


class _Ops(dict):
    """Op name -> its OpOverload, looked up once (torch.ops attribute lookups cost microseconds a call)."""

    def __missing__(self, name):
        self[name] = getattr(torch.ops.noisekernels, name).default
        return self[name]


_OPS = _Ops()
_AUTOGRAD = {}  # op name -> (setup_context, backward) as registered


def register_autograd(name, backward, *, setup_context):
    """Makes op `name` differentiable by setup_context(ctx, inputs, output) and backward(ctx, *grads),
    the contract of torch.library.register_autograd, for the dispatcher's calls (the op's Autograd
    kernel) and for the kernels call_op calls directly. ctx.backend is the backend the forward ran
    on (None: the dispatcher's): the backward passes it to call_op, so it regenerates the noise with
    the forward's kernels.

    The Autograd kernel is torch.library.register_autograd's without its argument filling, which
    rebuilds the schema's argument list once per argument: 30 us of each call of an 11-argument op,
    more than the kernel of a small layer. The schemas have no defaults to fill."""
    if any(a.has_default_value() or a.kwarg_only for a in _OPS[name]._schema.arguments):
        raise ValueError(f"noisekernels::{name} has arguments with defaults or keyword-only ones, which the "
                         "Autograd kernel does not fill in")
    _AUTOGRAD[name] = (setup_context, backward)
    if not REFERENCE_ONLY and torch._C._dispatch_has_kernel_for_dispatch_key(f"noisekernels::{name}", "Autograd"):
        return  # the extension's own C++ Autograd kernel (noise_add's: csrc/bindings/noise_add_autograd.cpp)

    def autograd_kernel(keyset, *args):
        if fwAD._current_level >= 0:
            _refuse_tangents(name, args)
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return _differentiable(name, None, keyset, args)
        with torch._C._AutoDispatchBelowAutograd():
            return _OPS[name].redispatch(keyset & torch._C._after_autograd_keyset, *args)

    LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)


def _refuse_tangents(name, args):
    """Forward-mode AD would pass the op by and drop the tangents (a zero or missing derivative)."""
    tensors = [t for a in args for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor)]
    if any(fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(f"noisekernels::{name} has no forward-mode derivative (torch.func.jvp, "
                           "torch.autograd.forward_ad); differentiate it in reverse mode (backward, torch.autograd.grad)")


def _differentiable(name, backend, keyset, args):
    # apply takes the op's arguments in place, so the backward's ctx.needs_input_grad[i] is argument
    # i's (torch.compile reads it from the apply call); a tensor-list argument is None there, its
    # tensors follow, then the call's description.
    lists = tuple((k, len(a)) for k, a in enumerate(args) if isinstance(a, list))
    head = [None if isinstance(a, list) else a for a in args]
    tail = [t for k, _ in lists for t in args[k]]
    out = _Differentiable.apply(*head, *tail, (name, backend, keyset, len(args), lists))
    return list(out) if _SCHEMAS[name].endswith("-> Tensor[]") else out  # apply returns a list output as a tuple


class _Differentiable(torch.autograd.Function):
    """One call of an op, differentiated by its registered autograd: the dispatcher's kernel below
    autograd (backend None), or a Python kernel called outside the dispatcher."""

    @staticmethod
    def forward(ctx, *inputs):
        name, backend, keyset, nargs, lists = inputs[-1]
        args, i = list(inputs[:nargs]), nargs
        for k, n in lists:
            args[k], i = list(inputs[i:i + n]), i + n
        if backend is None:
            with torch._C._AutoDispatchBelowAutograd():
                out = _OPS[name].redispatch(keyset & torch._C._after_autograd_keyset, *args)
        else:
            out = _python_kernel(name, backend)(*args)
        # A Tensor[] output's backward takes one list of gradients; a tuple output's, one per output.
        ctx.name, ctx.lists, ctx.list_output = name, lists, isinstance(out, list)
        _AUTOGRAD[name][0](ctx, args, out)
        ctx.backend = backend
        return tuple(out) if ctx.list_output else out

    @staticmethod
    def backward(ctx, *grads):
        backward = _AUTOGRAD[ctx.name][1]
        result = list(backward(ctx, list(grads)) if ctx.list_output else backward(ctx, *grads))
        tail = []
        for k, n in ctx.lists:
            tail.extend([None] * n if result[k] is None else result[k])
            result[k] = None
        return (*result, *tail, None)
