"""Your own model class, named as timm's --model does: "path/to/file.py:ClassName" or
"package.module:ClassName" (an nn.Module subclass: nothing else named there is ever called, so a
run's config.json cannot make the loader call an arbitrary function).

It is built inside UserNet, the frame of the library's Net without its classifier: input_noise
(an identity slot a preset fills) -> normalize (the training set's mean and std) -> body (your
model, which maps (B, C, H, W) inputs to (B, num_classes) logits). Its constructor gets the
--model-option values and, where its signature names them and no option gives them, the data's
num_classes, in_channels / in_chans (C) and input_shape ((C, H, W)).

Building it imports its file or module (running its code): a run records the file's SHA-256
(provenance()) so that loading refuses a file changed since training, and the directory a module
was imported from, so that it imports again from any working directory.
"""

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import os
import site
import sys
import sysconfig

import torch
from torch import nn

from .layers import Normalize

FROM_DATA = ("num_classes", "in_channels", "in_chans", "input_shape")
FORMS = "path/to/file.py:ClassName or package.module:ClassName (an nn.Module subclass)"


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


@contextlib.contextmanager
def first_on_path(directory):
    """directory first on sys.path while the block imports (None: sys.path as it is), then taken
    off again: a model file's sibling modules, or the root a run recorded for package.module."""
    if directory is None:
        yield
        return
    sys.path.insert(0, directory)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # the first occurrence: the one inserted here
            sys.path.remove(directory)


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
            with first_on_path(os.path.dirname(path)):  # its sibling modules import from any directory
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


def _model_class(spec):
    """The nn.Module subclass spec names, checked before anything of it is called."""
    where, attr = _parts(spec)
    module = _module(where, spec)
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        found = sorted(k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module)
                       and v.__module__ == module.__name__)
        what = "nothing" if cls is None else f"a {type(cls).__name__}"
        raise ValueError(f"model {spec!r}: {attr!r} in {where} is {what}, not an nn.Module class (nn.Module "
                         f"classes there: {found})")
    return cls


# ----------------------------------------------------------------------------- provenance

def _installed(directory):
    """Whether directory is where Python finds installed packages or the standard library."""
    places = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    places |= {*site.getsitepackages(), site.getusersitepackages()}
    return os.path.realpath(directory) in {os.path.realpath(p) for p in places}


def import_root(spec):
    """For package.module:ClassName, the directory its top package (or module) is imported from,
    unless that is an installed location; None for a file, an installed or unfindable module."""
    where, _ = _parts(spec)
    if _is_path(where):
        return None
    try:
        found = importlib.util.find_spec(where.split(".")[0])
    except (ImportError, ValueError):  # a module without a spec (__main__...)
        return None
    if found is None:
        return None
    if found.submodule_search_locations:  # a package: its root holds the package's directory
        root = os.path.dirname(os.path.abspath(list(found.submodule_search_locations)[0]))
    elif found.has_location:
        root = os.path.dirname(os.path.abspath(found.origin))
    else:  # builtin, frozen
        return None
    return None if _installed(root) else root


def source_file(spec, root=None):
    """The file of the module that defines spec's class (the file itself, or where package.module
    is found, importing its parent packages, with root first on sys.path); None where there is none."""
    where, _ = _parts(spec)
    if _is_path(where):
        path = os.path.abspath(where)
        return path if os.path.isfile(path) else None
    with first_on_path(root):
        try:
            found = importlib.util.find_spec(where)
        except (ImportError, ValueError):
            return None
    return found.origin if found is not None and found.has_location else None


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def provenance(spec):
    """What a run records of its model: model_sha256, the SHA-256 of the file defining the class
    (only that file, not what it imports), and model_import_root (import_root); both None for a
    library architecture."""
    if not is_spec(spec):
        return {"model_sha256": None, "model_import_root": None}
    path = source_file(spec)
    return {"model_sha256": _sha256(path) if path else None, "model_import_root": import_root(spec)}


def source_change(spec, recorded, root=None):
    """None where the file defining spec's class has the SHA-256 `recorded` (or nothing was recorded,
    or no file is found: building says why); else what differs, naming the file."""
    path = source_file(spec, root) if recorded is not None and is_spec(spec) else None
    if path is None:
        return None
    found = _sha256(path)
    if found == recorded:
        return None
    return f"the model file {path} (sha256 {found}) is not the one the run was trained with (sha256 {recorded})"


# ----------------------------------------------------------------------------- building

def _from_data(cls, shape, num_classes):
    """The data's values for the constructor parameters FROM_DATA that cls's signature names."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to read: nothing to fill
        return {}
    values = {"num_classes": num_classes, "in_channels": shape[0], "in_chans": shape[0], "input_shape": tuple(shape)}
    return {k: v for k, v in values.items() if k in params}


def _first_forward(body, spec, shape, num_classes):
    """One forward of two zero inputs in eval mode without gradients, on the model itself: lazy
    modules (nn.LazyLinear...) take their shapes, so a checkpoint's can be checked against them,
    and a wrong head is an error here, not a raw one in the first step."""
    training = body.training
    try:
        with torch.no_grad():
            out = body.eval()(torch.zeros(2, *shape))
    except Exception as e:
        raise ValueError(f"model {spec!r}: a forward of inputs of shape {(2, *shape)} failed: "
                         f"{type(e).__name__}: {e}") from e
    finally:
        body.train(training)
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
    """UserNet around the nn.Module class `spec` names, constructed with options (plus FROM_DATA
    values its signature asks for) for inputs of `shape` (C, H, W) and num_classes classes, after
    one forward (_first_forward) under the caller's RNG."""
    cls = _model_class(spec)
    kwargs = {**_from_data(cls, shape, num_classes), **options}
    try:
        body = cls(**kwargs)
    except Exception as e:  # the user's constructor: any error is about the spec or its options
        raise ValueError(f"model {spec!r}: {cls.__name__}(**{kwargs}) failed: {type(e).__name__}: {e} "
                         f"(model options given: {sorted(options)})") from e
    _first_forward(body, spec, tuple(shape), num_classes)
    return UserNet(body, mean, std)
