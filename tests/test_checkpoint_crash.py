"""Nothing lost on a crash: a checkpoint commits weights, state and metrics in one atomic step, so a
kill before any file operation of a commit, then --resume, equals the uninterrupted run bit for bit
with each epoch's metrics line once; resuming nothing or a partial checkpoint is refused, and bad
checkpoint files are usage errors naming the file (no traceback), the run directory left as it was."""

import builtins
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from noisekernels import cli, data, train
from noisekernels.train import CheckpointError, TrainConfig, Trainer

TINY = {"widths": (4, 8), "dense": 16}
CLI_TINY = ["--model", "mnist-cnn", "--model-option", "widths=[4,8]", "--model-option", "dense=16",
            "--batch-size", "256", "--no-progress", "--threads", "1"]
TIMING = ("seconds", "samples_per_s")  # the only fields of a metrics line a rerun of an epoch may change
# Everything train.py may call to write a checkpoint; a kill can fall before any of them.
FILE_OPS = [(os, "makedirs"), (os, "symlink"), (os, "replace"), (os, "remove"), (os, "fsync"), (shutil, "rmtree"),
            (torch, "save"), (train, "save_file"), (builtins, "open")]


class Killed(BaseException):  # not an Exception: nothing on the way may catch it, as nothing catches a kill
    pass


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # module-wide: the reference run (a module fixture) must run as the tests do
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ds():
    d = data.digits()
    return data.Dataset("digits", d.x_train[:512], d.y_train[:512], d.x_test[:64], d.y_test[:64], 10, d.mean, d.std)


CONFIG = TrainConfig(defense="rs1", model="mnist-cnn", model_options=TINY, epochs=3, batch_size=256, progress=False)


def inject(monkeypatch, kill_before=None):
    """Logs the file operations train.py calls; the kill_before-th (from 0) raises Killed instead."""
    log = []
    for module, name in FILE_OPS:
        def op(*args, _real=getattr(module, name), _name=name, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") == train.__name__:
                if len(log) == kill_before:
                    raise Killed(_name)
                log.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, op)
    return log


@pytest.fixture(scope="module")
def uninterrupted(ds, tmp_path_factory):
    """The reference run and the file operations of its fit (each commit starts with makedirs)."""
    run = str(tmp_path_factory.mktemp("full") / "run")
    t = Trainer(CONFIG, run, dataset=ds)
    with pytest.MonkeyPatch.context() as mp:
        log = inject(mp)
        t.fit()
    commits = [i for i, name in enumerate(log) if name == "makedirs"]
    assert len(commits) == 3 and log[-1] == "rmtree"  # and the commit removed the epoch before
    return run, log, commits


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def assert_same_run(run, reference):
    a, b = load_file(os.path.join(run, "checkpoint", "weights.safetensors")), \
        load_file(os.path.join(reference, "checkpoint", "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state, expected = (torch.load(os.path.join(r, "checkpoint", "state.pt"), weights_only=True) for r in (run, reference))
    assert state["epoch"] == 3 and state["optimizer"]["state"] and _equal(state, expected)
    assert _metrics(run) == _metrics(reference) and [r["epoch"] for r in _metrics(run)] == [1, 2, 3]
    assert sorted(os.listdir(run)) == sorted(os.listdir(reference))  # the kill's leftovers are gone


@pytest.mark.parametrize("epoch", [1, 2])
def test_kill_at_any_file_operation_of_a_commit_then_resume_is_the_uninterrupted_run(
        ds, tmp_path, uninterrupted, epoch):
    reference, log, commits = uninterrupted
    switch = log.index("replace", commits[epoch - 1])  # the commit: the link swapped to the new directory
    # from before this epoch's first operation to before the next commit's first (= after this one's last)
    for k in range(commits[epoch - 1], commits[epoch] + 1):
        run = str(tmp_path / f"killed-{k}")
        t = Trainer(CONFIG, run, dataset=ds)
        with pytest.MonkeyPatch.context() as mp:
            inject(mp, kill_before=k)
            with pytest.raises(Killed):
                t.fit()
        committed = epoch if k > switch else epoch - 1
        if committed == 0:  # nothing to resume: refused, and a fresh start over the leftovers is the same run
            with pytest.raises(CheckpointError, match="nothing to resume"):
                Trainer(CONFIG, run, dataset=ds, resume=True)
            Trainer(CONFIG, run, dataset=ds).fit()
        else:
            resumed = Trainer(CONFIG, run, dataset=ds, resume=True)
            assert resumed.epoch == committed, (k, log[k])
            resumed.fit()
        assert_same_run(run, reference)
