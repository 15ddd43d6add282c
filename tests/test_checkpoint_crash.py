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
@pytest.mark.parametrize("resume", [True, False])
def test_kill_in_a_distillation_run_then_resume_or_restart_is_the_uninterrupted_run(ds, tmp_path, commit, resume):
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
    # the student committed nothing: resuming (or restarting) continues the teacher from its checkpoint
    Trainer(config, run, dataset=ds, resume=resume).fit()
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
    assert sorted(os.listdir(run)) == [".lock", "checkpoint", "checkpoint-2", "config.json", "metrics.jsonl"]


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


def test_resume_of_a_checkpoint_that_is_neither_link_nor_directory_is_refused(run, capsys):
    os.remove(os.path.join(run, "checkpoint"))
    with open(os.path.join(run, "checkpoint"), "w") as f:
        f.write("not a checkpoint")
    refused(resume_argv(run), capsys, os.path.join(run, "checkpoint"),
            "is neither a link to a committed checkpoint nor a checkpoint directory")


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


def test_state_of_other_content_is_refused(run, capsys):
    with open(committed(run, "state.pt"), "w") as f:
        f.write("hello\n")  # torch.load raises KeyError on it
    refused(resume_argv(run), capsys, committed(run, "state.pt"), "is truncated or not a torch.save file")
    torch.save({"epoch": "one", "optimizer": {}}, committed(run, "state.pt"))
    refused(resume_argv(run), capsys, committed(run, "state.pt"), "does not hold this run's training state")


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


@pytest.mark.parametrize("damage", [lambda text: text[:50], lambda text: text.replace('"epoch": 1', '"epoch": 3')])
def test_metrics_line_that_is_not_its_epoch_is_refused(run, capsys, damage):
    path = committed(run, "metrics.jsonl")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(damage(text))
    refused(resume_argv(run), capsys, path, "line 1 is not the metrics of epoch 1")


def test_resume_with_fewer_epochs_than_committed_is_refused(run, capsys):
    cli.main(resume_argv(run))
    argv = resume_argv(run)
    argv[argv.index("--epochs") + 1] = "1"
    refused(argv, capsys, "epochs 1", "committed epoch 2")


def test_resume_takes_the_flags_not_given_from_config_json(trained, tmp_path, capsys):
    run = str(shutil.copytree(trained / "rse", tmp_path / "rse", symlinks=True))
    with open(os.path.join(run, "config.json")) as f:
        recorded = json.load(f)
    refused(["train", "--run-dir", run, "--resume", "--lr", "0.5"], capsys, "lr (recorded 0.001, given 0.5)")
    cli.main(["train", "--run-dir", run, "--resume", "--epochs", "2", "--no-progress", "--threads", "1"])
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f) == {**recorded, "epochs": 2, "progress": False}
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]


def test_resume_reads_moved_data_of_the_same_content_and_refuses_other_content(ds, tmp_path, capsys):
    def npz(path, dataset):
        data_path = str(tmp_path / path)
        torch_arrays = dict(x_train=dataset.x_train, y_train=dataset.y_train, x_test=dataset.x_test,
                            y_test=dataset.y_test)
        import numpy as np
        np.savez(data_path, **{k: v.numpy() for k, v in torch_arrays.items()})
        return data_path

    first = npz("first.npz", ds)
    run = str(tmp_path / "run")
    cli.main(["train", *CLI_TINY, "--epochs", "1", "--dataset", first, "--run-dir", run])
    with open(os.path.join(run, "config.json")) as f:
        recorded = json.load(f)
    moved = str(tmp_path / "elsewhere.npz")
    os.rename(first, moved)
    other = npz("other.npz", dataclasses.replace(ds, x_train=ds.x_train.flip(0)))
    refused(["train", "--run-dir", run, "--resume", "--epochs", "2", "--dataset", other], capsys,
            f"dataset_sha256 (recorded {recorded['dataset_sha256']!r}, given {data.load(other).sha256()!r})",
            f"dataset (recorded {first!r}, given {other!r})")
    cli.main(["train", "--run-dir", run, "--resume", "--epochs", "2", "--dataset", moved, "--no-progress"])
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f) == {**recorded, "epochs": 2, "dataset": moved, "dataset_name": "elsewhere"}


def test_a_run_directory_being_trained_in_is_refused_to_another_trainer(ds, tmp_path):
    import subprocess
    run = str(tmp_path / "run")
    first = Trainer(dataclasses.replace(CONFIG, epochs=1), run, dataset=ds)  # holds the lock until fit returns
    with pytest.raises(train.RunDirectoryLocked, match=f"{run} is locked .*another process trains there"):
        Trainer(dataclasses.replace(CONFIG, epochs=1), run, dataset=ds)
    first.fit()
    # another process holding it (a trainer's flock on run/.lock): the CLI refuses, changing nothing
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               os.path.join(run, ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = snapshot(run)
        with pytest.raises(train.RunDirectoryLocked, match=f"{run} is locked .*another process trains there"):
            Trainer(dataclasses.replace(CONFIG, epochs=2), run, dataset=ds, resume=True)
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
    Trainer(dataclasses.replace(CONFIG, epochs=2), run, dataset=ds, resume=True).fit()  # free again
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]


@pytest.fixture(scope="module")
def one_epoch_copied(ds, tmp_path_factory):
    """A one-epoch run of CONFIG copied with its links followed (cp -rL): checkpoint/ a real
    directory, metrics.jsonl a real file."""
    run = str(tmp_path_factory.mktemp("one") / "run")
    Trainer(dataclasses.replace(CONFIG, epochs=1), run, dataset=ds).fit()
    copy = str(tmp_path_factory.mktemp("copied") / "run")
    shutil.copytree(run, copy, symlinks=False)
    assert not os.path.islink(os.path.join(copy, "checkpoint")) and os.path.isdir(os.path.join(copy, "checkpoint"))
    assert not os.path.islink(os.path.join(copy, "metrics.jsonl"))
    return copy


def test_a_copy_with_links_followed_resumes_and_a_kill_in_its_first_commit_loses_nothing(
        ds, tmp_path, uninterrupted, one_epoch_copied):
    reference = uninterrupted[0]
    probe = str(shutil.copytree(one_epoch_copied, tmp_path / "probe", symlinks=True))
    resumed = Trainer(CONFIG, probe, dataset=ds, resume=True)
    with pytest.MonkeyPatch.context() as mp:
        log = inject(mp)
        resumed.fit()
    commits = [i for i, (name, _) in enumerate(log) if name == "makedirs"]
    aside = log.index(("replace", "checkpoint"))  # the real directory moved aside
    switch = log.index(("replace", "checkpoint.tmp"))
    assert len(commits) == 2 and commits[0] < aside < switch < commits[1]
    assert_same_run(probe, reference)
    for k in range(commits[0], commits[1] + 1):  # before each file operation of the first commit
        run = str(shutil.copytree(one_epoch_copied, tmp_path / f"killed-{k}", symlinks=True))
        t = Trainer(CONFIG, run, dataset=ds, resume=True)
        with pytest.MonkeyPatch.context() as mp:
            inject(mp, kill_before=k)
            with pytest.raises(Killed):
                t.fit()
        resumed = Trainer(CONFIG, run, dataset=ds, resume=True)
        assert resumed.epoch == (2 if k > switch else 1), (k, log[k])
        resumed.fit()
        assert os.readlink(os.path.join(run, "checkpoint")) == "checkpoint-3"
        assert_same_run(run, reference)
