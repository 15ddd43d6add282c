"""Nothing lost on a crash: a checkpoint commits weights, state and metrics in one atomic step, so a
kill before any file operation of a commit, then --resume, equals the uninterrupted run bit for bit
with each epoch's metrics line once; resuming nothing or a partial checkpoint is refused, and bad
checkpoint files are usage errors naming the file (no traceback), the run directory left as it was."""

import builtins
import dataclasses
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
    """Logs the file operations train.py calls as (name, basename of the first string argument);
    the kill_before-th (from 0) raises Killed instead."""
    log = []
    for module, name in FILE_OPS:
        def op(*args, _real=getattr(module, name), _name=name, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") == train.__name__:
                if len(log) == kill_before:
                    raise Killed(_name)
                log.append((_name, next((os.path.basename(a) for a in args if isinstance(a, str)), None)))
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
    commits = [i for i, (name, _) in enumerate(log) if name == "makedirs"]
    assert len(commits) == 3 and log[-1] == ("rmtree", "checkpoint-2")  # the commit removed the epoch before
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
    state, expected = (torch.load(os.path.join(r, "checkpoint", "state.pt"), weights_only=True)
                       for r in (run, reference))
    assert state["epoch"] == expected["epoch"] and state["optimizer"]["state"] and _equal(state, expected)
    assert _metrics(run) == _metrics(reference)
    assert [r["epoch"] for r in _metrics(run)] == list(range(1, state["epoch"] + 1))
    assert sorted(os.listdir(run)) == sorted(os.listdir(reference))  # the kill's leftovers are gone


@pytest.mark.parametrize("epoch", [1, 2])
def test_kill_at_any_file_operation_of_a_commit_then_resume_is_the_uninterrupted_run(
        ds, tmp_path, uninterrupted, epoch):
    reference, log, commits = uninterrupted
    switch = log.index(("replace", "checkpoint.tmp"), commits[epoch - 1])  # the commit: the link switched
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


@pytest.mark.parametrize("commit", [1, 2])  # the teacher's second epoch; the student's first
def test_kill_in_a_distillation_run_then_restart_is_the_uninterrupted_run(ds, tmp_path, commit):
    config = dataclasses.replace(CONFIG, defense="distill", options={"temperature": 20.0}, epochs=2)
    reference = str(tmp_path / "full")
    with pytest.MonkeyPatch.context() as mp:
        log = inject(mp)
        Trainer(config, reference, dataset=ds).fit()
    switches = [i for i, op in enumerate(log) if op == ("replace", "checkpoint.tmp")]  # teacher 1, 2; student 1, 2
    assert len(switches) == 4
    run = str(tmp_path / "killed")
    with pytest.MonkeyPatch.context() as mp:
        inject(mp, kill_before=switches[commit])
        with pytest.raises(Killed):
            Trainer(config, run, dataset=ds).fit()
    teacher_metrics = os.path.join(run, "teacher", "metrics.jsonl")
    with open(teacher_metrics) as f:
        committed_lines = f.readlines()
    assert len(committed_lines) == commit
    # the student committed nothing: nothing to resume; a restart resumes the teacher from its checkpoint
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Trainer(config, run, dataset=ds, resume=True)
    Trainer(config, run, dataset=ds).fit()
    with open(teacher_metrics) as f:  # the committed epochs were kept (timings and all), not trained again
        assert f.readlines()[:commit] == committed_lines
    assert_same_run(run, reference)
    assert_same_run(os.path.join(run, "teacher"), os.path.join(reference, "teacher"))


# ----------------------------------------------------------------------------- refusals and bad files

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One-epoch CLI runs: `standard` (resumed in the tests), and two whose weights do not fit it."""
    root = tmp_path_factory.mktemp("trained")
    for name, argv in (("standard", []), ("rse", ["--defense", "rse"]),
                       ("wider", ["--model-option", "widths=[4,12]"])):
        cli.main(["train", *CLI_TINY, *argv, "--epochs", "1", "--run-dir", str(root / name)])
    return root


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the standard run to damage."""
    return str(shutil.copytree(trained / "standard", tmp_path / "run", symlinks=True))


def resume_argv(run):
    return ["train", *CLI_TINY, "--epochs", "2", "--run-dir", run, "--resume"]


def eval_argv(run, out):
    return ["eval", run, "--n", "1", "--ns", "1", "--limit", "8", "--out", out]


def snapshot(run):
    """Every file's bytes and every link's target under run: what a refusal must leave as it was."""
    out = {}
    for root, dirs, files in os.walk(run):
        for name in dirs + files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                out[path] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    out[path] = f.read()
    return out


def refused(argv, capsys, *fragments):
    """The CLI's usage error (exit 2, no traceback) naming each fragment; the files under argv's run
    left untouched."""
    run = argv[argv.index("--run-dir") + 1] if "--run-dir" in argv else argv[1]
    before = snapshot(run)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert snapshot(run) == before
    return err


def committed(run, file):
    return os.path.join(run, os.readlink(os.path.join(run, "checkpoint")), file)


def test_resume_continues_the_run(run, capsys):
    cli.main(resume_argv(run))
    assert "epoch 2" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in open(os.path.join(run, "metrics.jsonl"))] == [1, 2]
    assert sorted(os.listdir(run)) == ["checkpoint", "checkpoint-2", "config.json", "metrics.jsonl"]


def test_resume_of_nothing_is_refused(tmp_path, capsys):
    never = str(tmp_path / "never")
    refused(resume_argv(str(tmp_path)), capsys, "nothing to resume", os.path.join(str(tmp_path), "checkpoint"))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Trainer(CONFIG, never, resume=True)
    assert not os.path.exists(never)


@pytest.mark.parametrize("file", ["config.json", *train.CHECKPOINT_FILES])
def test_resume_of_a_partial_run_is_refused_naming_the_missing_file(run, capsys, file):
    path = os.path.join(run, file) if file == "config.json" else committed(run, file)
    os.remove(path)
    refused(resume_argv(run), capsys, path, "is missing")


def test_resume_of_a_checkpoint_directory_not_committed_by_a_link_is_refused(run, capsys):
    target = committed(run, "")
    os.remove(os.path.join(run, "checkpoint"))
    os.rename(target, os.path.join(run, "checkpoint"))  # the layout of older versions
    refused(resume_argv(run), capsys, os.path.join(run, "checkpoint"), "is not a link to a committed checkpoint")


def _truncate(path):
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[:len(blob) // 2])


def _garbage(path):
    with open(path, "wb") as f:
        f.write(b"not a checkpoint\n" * 100)


@pytest.mark.parametrize("damage", [_truncate, _garbage])
def test_unreadable_weights_are_usage_errors_naming_the_file(run, capsys, tmp_path, damage):
    damage(committed(run, "weights.safetensors"))
    refused(resume_argv(run), capsys, committed(run, "weights.safetensors"), "is truncated or not a safetensors file")
    refused(eval_argv(run, str(tmp_path)), capsys, os.path.join(run, "checkpoint", "weights.safetensors"),
            "is truncated or not a safetensors file")


@pytest.mark.parametrize("damage", [_truncate, _garbage])
def test_unreadable_state_is_a_usage_error_naming_the_file(run, capsys, damage):
    damage(committed(run, "state.pt"))
    refused(resume_argv(run), capsys, committed(run, "state.pt"), "is truncated or not a torch.save file")


def test_state_without_the_training_state_is_refused(run, capsys):
    torch.save({"epoch": 1}, committed(run, "state.pt"))
    refused(resume_argv(run), capsys, committed(run, "state.pt"), "does not hold this run's training state",
            "KeyError: 'optimizer'")


def test_damaged_config_is_refused(run, capsys):
    _truncate(os.path.join(run, "config.json"))
    refused(resume_argv(run), capsys, os.path.join(run, "config.json"), "is not a JSON file")


def test_metrics_of_another_epoch_are_refused(run, capsys):
    with open(committed(run, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"epoch": 2}) + "\n")
    refused(resume_argv(run), capsys, committed(run, "metrics.jsonl"), "holds 2 lines, its checkpoint is of epoch 1")


@pytest.mark.parametrize("other", ["rse", "wider"])  # another preset (noise layers added); a wider model
def test_weights_of_another_run_are_refused_saying_which_run_and_keys_do_not_fit(trained, run, capsys, tmp_path, other):
    weights = trained / other / "checkpoint" / "weights.safetensors"
    state, expected = load_file(weights), train.load_model(str(trained / "standard"))[0].state_dict()
    problems = {"missing keys": [k for k in expected if k not in state],
                "unexpected keys": [k for k in state if k not in expected],
                "other shapes for": [k for k in expected if k in state and state[k].shape != expected[k].shape]}
    assert any(problems.values())
    shutil.copyfile(weights, committed(run, "weights.safetensors"))
    for argv, path, expected_run in (
            (resume_argv(run), committed(run, "weights.safetensors"), f"{run} (standard preset, model mnist-cnn)"),
            (eval_argv(run, str(tmp_path)), os.path.join(run, "checkpoint", "weights.safetensors"),
             f"{run} (standard preset, model mnist-cnn in its config.json)")):
        err = refused(argv, capsys, path, f"does not hold the weights of {expected_run}")
        for what, keys in problems.items():  # each kind of mismatch said, with some of its keys
            assert (what in err) == bool(keys) and (not keys or any(k in err for k in keys)), (what, err)
