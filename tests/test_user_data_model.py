"""A researcher's own data (.npz, arrays in memory) and own model class through every driver:
train with relative paths, then eval, attack and certify from another working directory; the
provenance each run records (absolute paths, SHA-256 of the data), the overrides when data moved
or was given in memory, the refusal when it changed; clear errors for malformed arrays, bad model
specs and presets that cannot apply to a user's model."""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from noisekernels import cli, data, defenses
from noisekernels.train import TrainConfig, Trainer, load_model

# A small residual CNN, as a user writes it: no library imports, the data's sizes by name.
MODEL_SOURCE = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2, self.relu = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), nn.ReLU()

    def forward(self, x):
        return self.relu(x + self.conv2(self.relu(self.conv1(x))))


class ResCNN(nn.Module):
    def __init__(self, in_channels, num_classes, width=8):
        super().__init__()
        self.stem, self.block = nn.Conv2d(in_channels, width, 3, padding=1), Block(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.block(torch.relu(self.stem(x))).mean((2, 3)))
'''
CLASSES = 3


@pytest.fixture(autouse=True)
def one_thread(threads):
    threads(1)


def arrays(layout, seed=0, n_train=48, n_test=16):
    """Digits of classes 0..2 as the user's arrays: uint8 (N, H, W) or float32 (N, 3, H, W) in [0, 1]."""
    d = data.digits()
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = getattr(d, f"x_{split}"), getattr(d, f"y_{split}")
        keep = (y < CLASSES).nonzero().flatten()[:n]
        images = x[keep, 0].numpy()
        if layout == "uint8":
            out[f"x_{split}"] = np.round(images * 255).astype(np.uint8)
        else:  # three channels, the second and third jittered so they differ
            jitter = rng.uniform(0, 0.2, (2, *images.shape)).astype(np.float32)
            out[f"x_{split}"] = np.stack([images, images * 0.8 + jitter[0], images * 0.8 + jitter[1]], 1)
        out[f"y_{split}"] = y[keep].numpy().astype(np.int64)
    return out


def reference_inputs(a, split):
    """What the model should see for a split: [0, 1] float32 (N, C, H, W), computed here."""
    x = a[f"x_{split}"]
    x = x.astype(np.float32) / 255 if x.dtype == np.uint8 else x
    return torch.from_numpy(x[:, None] if x.ndim == 3 else x)


def user_class(path):
    spec = importlib.util.spec_from_file_location("reference_user_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ResCNN


def reference_logits(run, model_file, a, x, width):
    """The user's class built here, the run's body weights loaded into it, on inputs normalised
    by the training set's per-channel mean and std computed here."""
    net = user_class(model_file)(in_channels=x.shape[1], num_classes=CLASSES, width=width)
    weights = load_file(os.path.join(run, "checkpoint", "weights.safetensors"))
    missing = net.load_state_dict({k[len("body."):]: v for k, v in weights.items() if k.startswith("body.")},
                                  strict=False).missing_keys
    assert not missing
    train = reference_inputs(a, "train")
    mean = train.mean((0, 2, 3)).view(1, -1, 1, 1)
    std = train.std((0, 2, 3)).clamp(min=1e-3).view(1, -1, 1, 1)
    with torch.no_grad():
        return net.eval()((x - mean) / std)


def sha256_of(a):
    """The content hash as Dataset.sha256 documents it, over the tensors computed here."""
    digest = hashlib.sha256()
    for t in (reference_inputs(a, "train"), torch.from_numpy(a["y_train"]), reference_inputs(a, "test"),
              torch.from_numpy(a["y_test"])):
        array = np.ascontiguousarray(t.numpy())
        digest.update(f"{array.dtype} {array.shape};".encode())
        digest.update(array)
    return digest.hexdigest()


def fraction(value):
    return value["fraction"] if isinstance(value, dict) else value


def find(results, key):
    """The first value of `key` anywhere in a results JSON."""
    if isinstance(results, dict):
        if key in results:
            return results[key]
        found = [find(v, key) for v in results.values()]
        return next((f for f in found if f is not None), None)
    return None


def usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# rse: input noise and noise before the inner convs (inside the residual block); rs1: spikes after the stem.
CASES = {"uint8": "rse", "float": "rs1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run per layout, trained from the user's directory with relative paths."""
    home = tmp_path_factory.mktemp("user")
    (home / "my_model.py").write_text(MODEL_SOURCE)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        for layout, defense in CASES.items():
            a = arrays(layout)
            np.savez(home / f"{layout}.npz", **a)
            cli.main(["train", "--defense", defense, "--dataset", f"{layout}.npz", "--model", "my_model.py:ResCNN",
                      "--model-option", "width=4", "--epochs", "1", "--batch-size", "16", "--no-progress",
                      "--run-dir", f"runs/{layout}"])
            out[layout] = (str(home / "runs" / layout), a)
    return home, out


@pytest.mark.parametrize("layout", CASES)
def test_run_records_absolute_provenance(runs, layout):
    home, trained = runs
    run, a = trained[layout]
    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["dataset"] == str(home / f"{layout}.npz") and saved["data_root"] is None
    assert saved["model"] == f"{home / 'my_model.py'}:ResCNN" and saved["model_options"] == {"width": 4}
    assert saved["dataset_name"] == layout and saved["dataset_sha256"] == sha256_of(a)
    assert saved["input_shape"] == list(reference_inputs(a, "train").shape[1:]) and saved["num_classes"] == CLASSES


@pytest.mark.parametrize("layout", CASES)
def test_eval_attack_certify_from_another_directory(runs, layout, tmp_path, monkeypatch, capsys):
    home, trained = runs
    run, a = trained[layout]
    monkeypatch.chdir(tmp_path)
    model, preset, _ = load_model(run)
    assert preset.name == CASES[layout] and defenses.noise_layers(model)  # the preset's noise is in the user model
    x, y = reference_inputs(a, "test")[:8], torch.from_numpy(a["y_test"][:8])
    expected = reference_logits(run, home / "my_model.py", a, x, width=4)
    defenses.set_test_noise(model, False)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)

    cli.main(["eval", run, "--n", "2", "--ns", "1", "2", "--limit", "8", "--out", "eval"])
    result = json.load(open(tmp_path / "eval" / "eval.json"))
    assert fraction(find(result, "noise_off")) == pytest.approx((expected.argmax(1) == y).float().mean().item())
    cli.main(["attack", run, "--eps", "0.1", "--set", "steps=1", "--judge-n", "2", "--limit", "8", "--out", "attack"])
    assert find(json.load(open(tmp_path / "attack" / "attack.json")), "robust_accuracy") is not None
    cli.main(["certify", run, "--N0", "10", "--N", "50", "--limit", "8", "--out", "certify"])
    assert find(json.load(open(tmp_path / "certify" / "certify.json")), "certified_accuracy") is not None
    assert "warning" not in capsys.readouterr().err
    # every results file says which data was tested and which model file (by hash) was run
    model_sha256 = hashlib.sha256((home / "my_model.py").read_bytes()).hexdigest()
    for results in ("eval/eval.json", "attack/attack.json", "certify/certify.json"):
        report = json.load(open(tmp_path / results))
        assert report["settings"]["data"] == {"dataset": str(home / f"{layout}.npz"), "data_root": None,
                                              "dataset_name": layout, "dataset_sha256": sha256_of(a)}
        record = report["runs"][layout]
        assert (record["model"], record["model_options"]) == (f"{home / 'my_model.py'}:ResCNN", {"width": 4})
        assert record["model_sha256"] == model_sha256


def test_moved_data_needs_the_override(runs, tmp_path, monkeypatch, capsys):
    home, trained = runs
    run, a = trained["uint8"]
    moved_run = str(tmp_path / "run")  # a copy whose data file has moved to data.npz
    shutil.copytree(run, moved_run)
    shutil.copy(home / "uint8.npz", tmp_path / "data.npz")
    config = os.path.join(moved_run, "config.json")
    json.dump({**json.load(open(config)), "dataset": str(tmp_path / "gone.npz")}, open(config, "w"))
    monkeypatch.chdir(tmp_path)
    err = usage_error(["eval", moved_run, "--n", "1", "--ns", "1", "--limit", "4"], capsys)
    assert "missing dataset file" in err and "gone.npz" in err and "--dataset" in err
    cli.main(["eval", moved_run, "--n", "1", "--ns", "1", "--limit", "4", "--dataset", "data.npz"])
    assert "warning" not in capsys.readouterr().err  # the same data: nothing to say


def test_changed_data_is_refused_unless_named(runs, tmp_path, monkeypatch, capsys):
    home, trained = runs
    run, a = trained["uint8"]
    moved_run = str(tmp_path / "run")
    shutil.copytree(run, moved_run)
    changed = dict(a, x_test=255 - a["x_test"])
    np.savez(tmp_path / "changed.npz", **changed)
    config = os.path.join(moved_run, "config.json")
    json.dump({**json.load(open(config)), "dataset": str(tmp_path / "changed.npz")}, open(config, "w"))
    err = usage_error(["eval", moved_run, "--n", "1", "--ns", "1", "--limit", "4"], capsys)
    assert f"is not the data {moved_run} was trained on" in err and sha256_of(a) in err and sha256_of(changed) in err
    cli.main(["eval", moved_run, "--n", "1", "--ns", "1", "--limit", "4", "--dataset", str(tmp_path / "changed.npz")])
    assert "warning: the data read from" in capsys.readouterr().err


def test_python_api_in_memory_data(runs, tmp_path, monkeypatch, capsys):
    home, _ = runs
    a = arrays("float", seed=1)
    ds = data.from_arrays(a["x_train"], a["y_train"], a["x_test"], a["y_test"], name="mine")
    assert ds.num_classes == CLASSES and ds.source is None
    assert torch.equal(ds.x_train, reference_inputs(a, "train"))
    assert ds.mean == pytest.approx(reference_inputs(a, "train").mean((0, 2, 3)).tolist())
    run = str(tmp_path / "run")
    config = TrainConfig(defense="pni", model=f"{home / 'my_model.py'}:ResCNN", model_options={"width": 4},
                         options={"adv_steps": 1}, epochs=1, batch_size=16, progress=False)
    Trainer(config, run, dataset=ds).fit()
    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["dataset"] is None and saved["dataset_name"] == "mine" and saved["dataset_sha256"] == sha256_of(a)
    monkeypatch.chdir(tmp_path)
    err = usage_error(["eval", run, "--n", "1", "--ns", "1", "--limit", "4"], capsys)
    assert "trained on data given in memory ('mine'" in err and "--dataset PATH.npz" in err
    np.savez(tmp_path / "mine.npz", **a)
    cli.main(["eval", run, "--n", "1", "--ns", "1", "--limit", "4", "--dataset", "mine.npz"])
    assert "warning" not in capsys.readouterr().err
    other = arrays("float", seed=2)  # other data, named: tested on with a warning
    np.savez(tmp_path / "other.npz", **other)
    cli.main(["eval", run, "--n", "1", "--ns", "1", "--limit", "4", "--dataset", "other.npz"])
    warning = capsys.readouterr().err
    assert f"warning: the data read from {tmp_path / 'other.npz'} (sha256 {sha256_of(other)})" in warning
    # data the model cannot take: refused even when named
    err = usage_error(["eval", run, "--n", "1", "--ns", "1", "--dataset", "digits"], capsys)
    assert f"has inputs [1, 8, 8] and 10 classes; {run} takes inputs [3, 8, 8] and predicts 3 classes" in err


def good_arrays():
    return arrays("uint8", n_train=8, n_test=4)  # the first 8 hold every class


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("y_test"), r"missing array\(s\) \['y_test'\]"),
    (lambda a: a.update(x_train=a["x_train"][:, 0]), r"x_train has shape \(8, 8\); expected images"),
    (lambda a: a.update(x_test=a["x_test"] / 100.0), r"x_test holds float values in \[0, 2\.55\], outside \[0, 1\]"),
    (lambda a: a.update(x_train=np.where(a["x_train"] > 200, np.nan, a["x_train"] / 255)),
     r"x_train holds \d+ NaN or infinite value"),
    (lambda a: a.update(x_train=a["x_train"].astype(np.int32)), "x_train has dtype int32"),
    (lambda a: a.update(y_train=a["y_train"].astype(np.float32)), "y_train has dtype float32; expected integer labels"),
    (lambda a: a.update(y_test=a["y_test"] - 1), "y_test holds the negative label -1"),
    (lambda a: a.update(y_train=a["y_train"][:-1]), r"y_train has shape \(7,\); expected \(8,\)"),
    (lambda a: a.update(x_test=a["x_test"][:, :7]), r"x_train images are \(1, 8, 8\) .* x_test images are \(1, 7, 8\)"),
    (lambda a: a.update(x_train=np.repeat(a["x_train"][..., None], 3, -1), x_test=np.repeat(a["x_test"][..., None], 3, -1)),
     r"x_train has shape \(8, 8, 8, 3\): channels last .* x.transpose\(0, 3, 1, 2\)"),
    (lambda a: a.update(x_test=a["x_test"][:, :0]), r"x_test has shape \(4, 0, 8\); expected .*no axis of size 0"),
    (lambda a: a.update(y_train=a["y_train"] + 1, y_test=a["y_test"] + 1),
     r"y_train has no example of 1 of the classes 0\.\.3 \(e\.g\. 0\)"),  # labels from 1
    (lambda a: a.update(y_train=np.where(a["y_train"] == 2, 10**9, a["y_train"])),  # a typo: no 1e9-class head
     r"y_train has no example of 999999998 of the classes 0\.\.1000000000 \(e\.g\. 2, 3, 4, 5, 6\)"),
    (lambda a: a.update(y_train=a["y_train"].astype(np.uint64) + np.uint64(2**63)), "y_train holds the label 92233720368547758\\d\\d; expected"),
    (lambda a: a.update(y_test=np.array(["a"] * 4, dtype=object)), "cannot be read as a .npz file"),
])
def test_malformed_arrays_name_the_file_and_array(tmp_path, capsys, change, message):
    a = good_arrays()
    change(a)
    path = tmp_path / "bad.npz"
    np.savez(path, **a)
    with pytest.raises(data.DatasetError, match=f"{path}: .*{message}"):
        data.load(str(path))
    err = usage_error(["train", "--dataset", str(path), "--run-dir", str(tmp_path / "r"), "--no-progress"], capsys)
    assert str(path) in err
    assert not (tmp_path / "r").exists()  # nothing written for a refused run


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64])
def test_labels_of_any_integer_dtype(dtype):
    a = good_arrays()
    ds = data.from_arrays(**{**a, "y_train": a["y_train"].astype(dtype), "y_test": a["y_test"].astype(dtype)})
    assert ds.y_train.dtype == torch.int64 and ds.y_train.tolist() == a["y_train"].tolist()
    assert ds.y_test.tolist() == a["y_test"].tolist() and ds.sha256() == sha256_of(a)


def test_missing_file_and_other_sources(tmp_path, monkeypatch):
    with pytest.raises(data.DatasetError, match=r"missing dataset file .*nowhere\.npz .*x_train, y_train"):
        data.load(str(tmp_path / "nowhere.npz"))
    with pytest.raises(ValueError, match="or the path of a .npz file"):
        data.load("my-data.csv")
    monkeypatch.chdir(tmp_path)
    assert TrainConfig(dataset="mnist", data_root="mnist-files").resolved().data_root == str(tmp_path / "mnist-files")
    assert TrainConfig(dataset="d.npz").resolved().dataset == str(tmp_path / "d.npz")


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(MODEL_SOURCE + "\n\ndef helper():\n    return 1\n\n\ndef factory(num_classes):\n    return "
                    "ResCNN(1, num_classes)\n\n\nclass Broken(ResCNN):\n    def __init__(self, **kwargs):\n"
                    "        raise RuntimeError('boom')\n")
    return path


@pytest.mark.parametrize("spec, options, message", [
    ("my_model", [], "model must be one of .* or a class of your own"),
    ("missing.py:ResCNN", [], r"the file .*missing\.py does not exist"),
    ("FILE:Resnet", [], r"'Resnet' in .* is nothing, not an nn.Module class \(nn.Module classes there: "
                        r"\['Block', 'Broken', 'ResCNN'\]\)"),
    ("FILE:helper", [], "'helper' in .* is a function, not an nn.Module class"),
    ("FILE:factory", [], "'factory' in .* is a function, not an nn.Module class"),  # never called
    ("FILE:Broken", [], r"Broken\(\*\*.*\) failed: RuntimeError: boom"),
    ("os:system", [], "'system' in os is a builtin_function_or_method, not an nn.Module class"),
    ("FILE:ResCNN", ["depth=3"], r"ResCNN\(\*\*.*'depth': 3.*\) failed: .*unexpected keyword argument 'depth'"),
    ("FILE:ResCNN", ["num_classes=5"], r"to \(2, 5\); expected logits of shape \(2, 3\)"),
    ("no_such_package.models:Net", [], "cannot import module 'no_such_package.models'"),
])
def test_bad_model_specs_are_usage_errors(model_file, tmp_path, capsys, spec, options, message):
    np.savez(tmp_path / "d.npz", **good_arrays())
    argv = ["train", "--dataset", str(tmp_path / "d.npz"), "--model", spec.replace("FILE", str(model_file)),
            "--run-dir", str(tmp_path / "r"), "--no-progress"]
    for option in options:
        argv += ["--model-option", option]
    assert re.search(message, usage_error(argv, capsys))


@pytest.mark.parametrize("defense, why", [("a2snn", "penultimate features"), ("dropout", "hidden dense layers"),
                                          ("rsd1-adv", "hidden dense layers")])
def test_presets_that_need_the_library_net_are_refused(model_file, defense, why):
    ds = data.from_arrays(**good_arrays())
    with pytest.raises(ValueError, match=f"defense '{defense}' cannot apply to your model .*{why}.*rs1, rse, pni"):
        Trainer(TrainConfig(defense=defense, model=f"{model_file}:ResCNN"), str(model_file.parent / "r"), dataset=ds)


def test_package_module_spec(model_file, monkeypatch):
    (model_file.parent / "userpkg").mkdir()
    shutil.copy(model_file, model_file.parent / "userpkg" / "nets.py")
    monkeypatch.syspath_prepend(str(model_file.parent))
    ds = data.from_arrays(**good_arrays())
    config = TrainConfig(defense="gda", model="userpkg.nets:ResCNN", model_options={"width": 4},
                         options={"brelu": 1.0})
    assert config.resolved().model == "userpkg.nets:ResCNN"  # a module spec stays as given
    model, _, _ = defenses.build("gda", ds, model="userpkg.nets:ResCNN", model_options={"width": 4},
                                 options={"brelu": 1.0})
    assert type(model.body).__name__ == "ResCNN" and model.body.stem.out_channels == 4
    assert not any(type(m) is torch.nn.ReLU for m in model.modules())  # BReLU replaced them all


# ----------------------------------------------------------------------------- loading runs safely


def train_tiny(spec, run, *options, dataset="d.npz"):
    """One epoch of a tiny run on `dataset` (good_arrays)."""
    argv = ["train", "--dataset", dataset, "--model", spec, "--epochs", "1", "--batch-size", "8", "--no-progress",
            "--run-dir", run]
    for option in options:
        argv += ["--model-option", option]
    cli.main(argv)


def file_sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_config_json_never_calls_a_function(runs, tmp_path, capsys):
    """The reviewer's repro: a run whose config.json names os:system with a command as its option
    (and no model hash, which an attacker would drop)."""
    _, trained = runs
    run, marker = str(tmp_path / "evil"), tmp_path / "pwned"
    shutil.copytree(trained["uint8"][0], run)
    config = os.path.join(run, "config.json")
    json.dump({**json.load(open(config)), "model": "os:system", "model_options": {"command": f"touch {marker}"},
               "model_sha256": None}, open(config, "w"))
    err = usage_error(["eval", run, "--n", "1", "--ns", "1", "--limit", "4"], capsys)
    assert f"cannot rebuild the model of {config}" in err and "'system' in os is a builtin_function_or_method" in err
    assert not marker.exists()
    # nor from the command line
    err = usage_error(["eval", trained["uint8"][0], "--model", "os:system", "--n", "1", "--ns", "1"], capsys)
    assert "not an nn.Module class" in err and not marker.exists()


def test_changed_model_file_is_refused_unless_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    np.savez("d.npz", **good_arrays())
    (tmp_path / "net.py").write_text(MODEL_SOURCE)
    train_tiny("net.py:ResCNN", "run", "width=2")
    saved = json.load(open("run/config.json"))
    original = file_sha256("net.py")
    assert (saved["model_sha256"], saved["model_import_root"]) == (original, None)
    (tmp_path / "net.py").write_text(MODEL_SOURCE.replace("nn.ReLU()", "nn.Sigmoid()"))
    changed = file_sha256("net.py")
    err = usage_error(["eval", "run", "--n", "1", "--ns", "1"], capsys)
    assert (f"the model file {tmp_path / 'net.py'} (sha256 {changed}) is not the one the run was trained with "
            f"(sha256 {original})") in err and "--model SPEC" in err
    with pytest.raises(ValueError, match="is not the one the run was trained with"):
        load_model("run")
    model, _, _ = load_model("run", model="net.py:ResCNN")  # named: built from the file as it is now
    assert any(isinstance(m, torch.nn.Sigmoid) for m in model.modules())
    cli.main(["eval", "run", "--n", "1", "--ns", "1", "--model", "net.py:ResCNN"])
    assert f"warning: run: the model file {tmp_path / 'net.py'} (sha256 {changed})" in capsys.readouterr().err
    record = json.load(open("run/eval.json"))["runs"]["run"]
    assert (record["model"], record["model_sha256"]) == (f"{tmp_path / 'net.py'}:ResCNN", changed)


@pytest.mark.parametrize("change, message", [
    (lambda c: [], "holds an array, not the object of a run's settings"),
    (lambda c: "{", None),  # written as text below: not JSON
    (lambda c: {k: v for k, v in c.items() if k != "input_shape"}, r"lacks \['input_shape'\]"),
    (lambda c: {**c, "input_shape": "abc"}, 'input_shape is "abc"; expected an array'),
    (lambda c: {**c, "input_shape": [1, 8]}, r"input_shape is \[1, 8\]; expected \[C, H, W\]"),
    (lambda c: {**c, "num_classes": True}, "num_classes is true; expected an integer"),
    (lambda c: {**c, "model_options": []}, r"model_options is \[\]; expected an object"),
    (lambda c: {**c, "defense": "nope"}, "cannot rebuild the model of .*: defense must be one of"),
])
def test_damaged_config_json_is_a_usage_error_naming_it(runs, tmp_path, capsys, change, message):
    _, trained = runs
    run = str(tmp_path / "run")
    shutil.copytree(trained["uint8"][0], run)
    config = os.path.join(run, "config.json")
    damaged = change(json.load(open(config)))
    with open(config, "w") as f:
        f.write(damaged if isinstance(damaged, str) else json.dumps(damaged))
    err = usage_error(["eval", run, "--n", "1", "--ns", "1", "--limit", "4"], capsys)
    assert config in err and re.search(message or "is not a JSON file", err)


LAZY_SOURCE = '''
from torch import nn


class LazyNet(nn.Module):
    def __init__(self, num_classes, sizes=(4,)):
        super().__init__()
        if not isinstance(sizes, tuple):  # as a type-checking model does
            raise TypeError(f"sizes must be a tuple, got {type(sizes).__name__}")
        self.f = nn.Sequential(nn.Flatten(), nn.LazyLinear(sizes[0]), nn.ReLU(), nn.Linear(sizes[0], num_classes))

    def forward(self, x):
        return self.f(x)
'''


def test_lazy_modules_and_list_options_rebuild(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez("d.npz", **good_arrays())
    (tmp_path / "lazy.py").write_text(LAZY_SOURCE)
    train_tiny("lazy.py:LazyNet", "run", "sizes=[5]")  # a JSON list on the command line and in config.json
    model, _, saved = load_model("run")
    assert saved["model_options"] == {"sizes": [5]} and model.body.f[1].weight.shape == (5, 64)
    weights = load_file("run/checkpoint/weights.safetensors")
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


SIBLING = "from torch import nn\n\n\ndef head(k):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, k))\n"
USES_SIBLING = '''
from torch import nn
from {source} import head


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.f = head(num_classes)

    def forward(self, x):
        return self.f(x)
'''


def test_sibling_imports_from_any_directory(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "nk_test_sibling.py").write_text(SIBLING)
    (tmp_path / "models" / "net.py").write_text(USES_SIBLING.format(source="nk_test_sibling"))
    package = tmp_path / "project" / "nk_test_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub.py").write_text(SIBLING)
    (package / "mod.py").write_text(USES_SIBLING.format(source=".sub"))
    (tmp_path / "work").mkdir()
    np.savez(tmp_path / "work" / "d.npz", **good_arrays())
    path_before = list(sys.path)
    with monkeypatch.context() as m:
        m.chdir(tmp_path / "work")
        train_tiny(str(tmp_path / "models" / "net.py") + ":Net", "file-run")  # the file's folder is not the cwd
        m.syspath_prepend(str(tmp_path / "project"))  # as `python -m` puts the cwd there
        m.chdir(tmp_path / "project")
        train_tiny("nk_test_pkg.mod:Net", str(tmp_path / "work" / "pkg-run"), dataset=str(tmp_path / "work" / "d.npz"))
    assert sys.path == path_before
    saved = json.load(open(tmp_path / "work" / "pkg-run" / "config.json"))
    assert saved["model"] == "nk_test_pkg.mod:Net" and saved["model_import_root"] == str(tmp_path / "project")
    assert saved["model_sha256"] == file_sha256(package / "mod.py")
    for name in [n for n in sys.modules if n == "nk_test_sibling" or n.split(".")[0] == "nk_test_pkg"]:
        del sys.modules[name]  # imported again from the recorded places, not from the cache
    monkeypatch.chdir(tmp_path)
    for run in ("file-run", "pkg-run"):
        cli.main(["eval", str(tmp_path / "work" / run), "--n", "1", "--ns", "1", "--limit", "4"])
        assert sys.path == path_before
    assert sys.modules["nk_test_pkg"].__file__ == str(package / "__init__.py")


def test_eval_of_a_model_drawing_from_torchs_generator_repeats_with_its_seed(tmp_path, monkeypatch):
    """A user's model may draw its own noise from torch's generator: --seed seeds it, so eval repeats."""
    monkeypatch.chdir(tmp_path)
    np.savez("d.npz", **good_arrays())
    noisy = "logits = self.fc(self.block(torch.relu(self.stem(x))).mean((2, 3)))\n        return logits + 3 * torch.randn_like(logits)"
    source = MODEL_SOURCE.replace("return self.fc(self.block(torch.relu(self.stem(x))).mean((2, 3)))", noisy)
    assert source != MODEL_SOURCE
    (tmp_path / "net.py").write_text(source)
    train_tiny("net.py:ResCNN", "run", "width=2")

    def counts(seed):
        cli.main(["eval", "run", "--n", "3", "--ns", "1", "3", "--seed", str(seed), "--no-progress"])
        record = json.load(open("run/eval.json"))["runs"]["run"]
        return [record[k]["count"] for k in ("single", "mean", "vote")]

    first = counts(0)
    assert counts(0) == first
    assert any(counts(seed) != first for seed in (1, 2, 3))  # the noise is real: other seeds, other counts


OWN_NOISE = """
from torch import nn
import noisekernels as nk


class NoisyNet(nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                               nn.Linear(4 * 8 * 8, num_classes))
        nk.nn.inject(self, "rse")  # the model's own noise, on at test time (mc=True)

    def forward(self, x):
        return self.f(x)
"""


@pytest.mark.parametrize("defense", ["standard", "gda"])
def test_own_noise_layers_keep_their_test_time_setting(defense, tmp_path, monkeypatch):
    # A preset without test-time noise must not switch off the noise a user's model injects itself.
    monkeypatch.chdir(tmp_path)
    np.savez("d.npz", **good_arrays())
    (tmp_path / "noisy.py").write_text(OWN_NOISE)
    cli.main(["train", "--dataset", "d.npz", "--model", "noisy.py:NoisyNet", "--defense", defense, "--epochs", "1",
              "--batch-size", "8", "--no-progress", "--run-dir", "run"])
    model, _, _ = load_model("run")
    layers = defenses.noise_layers(model)
    assert layers and all(m.mc for m in layers)
    model.eval()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
