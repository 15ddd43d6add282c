"""Your own model class, named as timm's --model does: "path/to/file.py:ClassName" or
"package.module:ClassName" (a class or a function returning an nn.Module).

It is built inside UserNet, the frame of the library's Net without its classifier: input_noise
(an identity slot a preset fills) -> normalize (the training set's mean and std) -> body (your
model, which maps (B, C, H, W) inputs to (B, num_classes) logits). Its constructor gets the
--model-option values and, where its signature names them and no option gives them, the data's
num_classes, in_channels / in_chans (C) and input_shape ((C, H, W)).
"""

import copy
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys

import torch
from torch import nn

from .layers import Normalize

FROM_DATA = ("num_classes", "in_channels", "in_chans", "input_shape")
FORMS = "path/to/file.py:ClassName or package.module:ClassName"


def is_spec(name):
    """Whether the model `name` names a user's class (it holds a colon) rather than a zoo architecture."""
    return isinstance(name, str) and ":" in name


def _parts(spec):
    where, _, attr = spec.rpartition(":")
    if not where or not attr.isidentifier():
        raise ValueError(f"model {spec!r}: expected {FORMS}")
    return where, attr


def _is_path(where):
    return where.endswith(".py") or os.sep in where


def absolute(spec):
    """spec with a file path made absolute, so a run's config.json rebuilds it from any directory."""
    where, attr = _parts(spec)
    return f"{os.path.abspath(where)}:{attr}" if _is_path(where) else spec


def _module(where, spec):
    if _is_path(where):
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise ValueError(f"model {spec!r}: the file {path} does not exist (expected {FORMS})")
        # One module name per file, registered so code in it that looks itself up (dataclasses) works.
        name = "noisekernels_user_model_" + hashlib.sha1(path.encode()).hexdigest()[:12]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise ValueError(f"model {spec!r}: running {path} failed: {type(e).__name__}: {e}") from e
        return module
    try:
        return importlib.import_module(where)
    except ImportError as e:
        raise ValueError(f"model {spec!r}: cannot import module {where!r} ({e}); it must be installed or on "
                         f"PYTHONPATH, or name a file: {FORMS}") from e


def _constructor(spec):
    where, attr = _parts(spec)
    module = _module(where, spec)
    factory = getattr(module, attr, None)
    if not callable(factory):
        found = sorted(k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module)
                       and v.__module__ == module.__name__)
        raise ValueError(f"model {spec!r}: {where} has no class or function {attr!r} (nn.Module classes there: "
                         f"{found})")
    return factory


def _from_data(factory, shape, num_classes):
    """The data's values for the constructor parameters FROM_DATA that factory's signature names."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to fill
        return {}
    values = {"num_classes": num_classes, "in_channels": shape[0], "in_chans": shape[0], "input_shape": tuple(shape)}
    return {k: v for k, v in values.items() if k in params}


def _check_output(body, spec, shape, num_classes):
    """A forward of two zero inputs on a copy (the model's state is left alone) must give
    (2, num_classes) logits: a wrong head is an error here, not a raw one in the first step."""
    probe = copy.deepcopy(body).eval()
    try:
        with torch.no_grad():
            out = probe(torch.zeros(2, *shape))
    except Exception as e:
        raise ValueError(f"model {spec!r}: a forward of inputs of shape {(2, *shape)} failed: "
                         f"{type(e).__name__}: {e}") from e
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model {spec!r} maps inputs of shape {(2, *shape)} to {got}; expected logits of shape "
                         f"(2, {num_classes}) (num_classes from the data)")


class UserNet(nn.Module):
    """body(normalize(input_noise(x))): a user's model with the library's input slot and
    normalisation in front, so attacks and noise see [0, 1] inputs."""

    def __init__(self, body, mean, std):
        super().__init__()
        self.input_noise = nn.Identity()
        self.normalize = Normalize(mean, std)
        self.body = body

    def forward(self, x):
        return self.body(self.normalize(self.input_noise(x)))


def build(spec, shape, num_classes, mean, std, /, **options):
    """UserNet around the model `spec` names, constructed with options (plus FROM_DATA values its
    signature asks for) for inputs of `shape` (C, H, W) and num_classes classes."""
    factory = _constructor(spec)
    kwargs = {**_from_data(factory, shape, num_classes), **options}
    try:
        body = factory(**kwargs)
    except TypeError as e:
        raise ValueError(f"model {spec!r}: {getattr(factory, '__name__', spec)}(**{kwargs}) failed: {e} "
                         f"(model options given: {sorted(options)})") from e
    if not isinstance(body, nn.Module):
        raise ValueError(f"model {spec!r} built a {type(body).__name__}, not a torch.nn.Module")
    _check_output(body, spec, tuple(shape), num_classes)
    return UserNet(body, mean, std)
