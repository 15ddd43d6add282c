"""Datasets: the bundled digits and the readers of local MNIST-family (IDX) and CIFAR-10 (pickle)
files, checked against files written here in those formats; bad files give clear errors."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from noisekernels import data


def write_idx(path, array, gz=False):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    (gzip.open if gz else open)(path, "wb").write(header + array.tobytes())


def write_mnist(root, n_train=20, n_test=10, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        suffix = ".gz" if gz else ""
        write_idx(os.path.join(root, f"{split}-images-idx3-ubyte{suffix}"), images, gz)
        write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte{suffix}"), labels, gz)
        arrays[split] = (images, labels)
    return arrays


def write_cifar(root, n=6, seed=0, protocol=2):
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        batches[name] = batch
    return batches


def test_digits_in_unit_range_fixed_split():
    a, b = data.digits(), data.digits()
    assert a.x_train.shape[1:] == (1, 8, 8) and len(a.y_train) + len(a.y_test) == 1797
    assert 0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1 and float(a.x_train.max()) == 1
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert sorted(a.y_test.unique().tolist()) == list(range(10))
    assert a.mean[0] == pytest.approx(float(a.x_train.mean()), rel=1e-5)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    ds = data.load("fashion-mnist", str(tmp_path))
    images, labels = arrays["train"]
    assert ds.name == "fashion-mnist" and ds.x_train.shape == (20, 1, 28, 28)
    assert torch.equal(ds.x_train[:, 0], torch.tensor(images / 255.0, dtype=torch.float32))
    assert ds.y_test.tolist() == arrays["t10k"][1].tolist() and ds.y_train.tolist() == labels.tolist()


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_pickle_round_trip(tmp_path, protocol):
    batches = write_cifar(tmp_path, protocol=protocol)
    ds = data.load("cifar10", str(tmp_path))
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32) / 255.0
    assert torch.equal(ds.x_train[0], torch.tensor(first, dtype=torch.float32))
    assert ds.y_test.tolist() == batches["test_batch"][b"labels"]


def test_missing_files_name_the_file_and_format(tmp_path):
    with pytest.raises(data.DatasetError, match=r"train-images-idx3-ubyte.*IDX"):
        data.load("mnist", str(tmp_path))
    with pytest.raises(data.DatasetError, match=r"data_batch_1.*CIFAR-10 python batch"):
        data.load("cifar10", str(tmp_path))
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.load("mnist", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="--data-root"):
        data.load("mnist")
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load("imagenet")


def test_malformed_idx(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = path.read_bytes()
    path.write_bytes(raw[:-5])  # truncated data
    with pytest.raises(data.DatasetError, match=r"train-images-idx3-ubyte: header says \[20, 28, 28\]"):
        data.load("mnist", str(tmp_path))
    path.write_bytes(b"\x00\x00\x08\x01" + raw[4:])  # wrong number of dimensions
    with pytest.raises(data.DatasetError, match="bad header.*3 dimension"):
        data.load("mnist", str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(data.DatasetError, match=r"\.gz: cannot be read as an IDX file \(gzip\)"):
        data.load("mnist", str(tmp_path))


def test_malformed_cifar_never_runs_code(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(data.DatasetError, match=r"data_batch_3: data uint8 \(2, 100\)"):
        data.load("cifar10", str(tmp_path))

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(data.DatasetError, match="refusing to load"):
        data.load("cifar10", str(tmp_path))
    assert not (tmp_path / "pwned").exists()
