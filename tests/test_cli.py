"""The command line end to end on tiny settings: train, eval, attack, bench (demo: test_demo.py),
run-directory outputs, --help, and clear errors for bad arguments."""

import json
import os
import subprocess
import sys

import pytest
import torch

from noisekernels import certify as smoothing
from noisekernels import cli

TINY = ["--model", "mnist-cnn", "--model-option", "widths=[4,8]", "--model-option", "dense=16"]


@pytest.fixture(autouse=True)
def one_thread(threads):
    threads(1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    before = torch.get_num_threads()
    for defense in ("rs1", "standard"):
        cli.main(["train", "--defense", defense, *TINY, "--epochs", "1", "--batch-size", "128", "--no-progress",
                  "--run-dir", str(root / defense), "--threads", "1"])
    assert torch.get_num_threads() == 1  # --threads took effect
    torch.set_num_threads(before)
    return root


def test_train_writes_a_run_directory(runs, capsys):
    run = runs / "rs1"
    assert {"config.json", "metrics.jsonl", "checkpoint"} <= set(os.listdir(run))
    assert {"weights.safetensors", "state.pt"} <= set(os.listdir(run / "checkpoint"))
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 1
    cli.main(["train", "--defense", "rs1", *TINY, "--epochs", "2", "--batch-size", "128", "--no-progress",
              "--run-dir", str(run), "--resume"])
    assert "epoch 2" in capsys.readouterr().out


def test_eval(runs, capsys):
    cli.main(["eval", str(runs / "rs1"), str(runs / "standard"), "--n", "3", "--ns", "1", "3", "--limit", "40"])
    out = capsys.readouterr().out
    assert "noise off" in out and "MC mean" in out and "rs1" in out
    results = json.loads((runs / "eval.json").read_text())["runs"]  # in the runs' common parent, keyed by name
    assert set(results["rs1"]) >= {"noise_off", "single", "mean", "vote", "accuracy_vs_n"}
    assert (runs / "accuracy_vs_n.png").stat().st_size > 1000


@pytest.mark.parametrize("attack, options", [
    ("PGD", ["--set", "steps=2", "--set", "eot=2", "--set", "alpha_ratio=0.5"]),
    ("FGSM", ["--set", "eot=2"]),
    ("CW", ["--set", "steps=3", "--set", "binary_steps=1", "--set", "c=1.0"]),
])
def test_attack(runs, capsys, tmp_path, attack, options):
    cli.main(["attack", str(runs / "rs1"), "--attack", attack, "--eps", "0.1", "0.5", *options, "--judge-n", "3",
              "--limit", "16", "--out", str(tmp_path)])
    assert "robust accuracy" in capsys.readouterr().out
    result = json.loads((tmp_path / "attack.json").read_text())["runs"]["rs1"]
    acc = result["robust_accuracy"]
    assert set(acc) == {"0.1", "0.5"} and all(0 <= v["fraction"] <= 1 for v in acc.values())
    assert (tmp_path / "robust_accuracy.png").stat().st_size > 1000


def test_certify(runs, capsys, tmp_path):
    cli.main(["certify", str(runs / "standard"), "--sigma", "0.25", "--N0", "10", "--N", "100", "--alpha", "0.01",
              "--limit", "4", "--batch-size", "50", "--out", str(tmp_path)])
    assert "certified accuracy" in capsys.readouterr().out
    result = json.loads((tmp_path / "certify.json").read_text())["runs"]["standard"]
    accuracy = result["certified_accuracy"]
    assert len(result["examples"]["radius"]) == 4 and accuracy["0.0"]["count"] >= accuracy["1.0"]["count"]
    assert (tmp_path / "certified_standard.png").stat().st_size > 1000


def test_certify_sequential(runs, capsys, tmp_path, monkeypatch):
    import matplotlib.figure
    saved, savefig = {}, matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, path, **kw: (saved.__setitem__(os.path.basename(path), fig), savefig(fig, path, **kw)))
    cli.main(["certify", str(runs / "standard"), "--sigma", "0.25", "--N0", "10", "--method", "sequential",
              "--radius", "0.25", "--n-max", "400", "--alpha", "0.01", "--limit", "4", "--batch-size", "200",
              "--out", str(tmp_path)])
    assert "method sequential, n_max 400, radius 0.25" in capsys.readouterr().out
    report = json.loads((tmp_path / "certify.json").read_text())
    result = report["runs"]["standard"]
    examples = result["examples"]
    assert set(examples["radius"]) <= {0.0, 0.25} and all(10 < s <= 410 for s in examples["samples"])
    assert result["mean_samples"] == sum(examples["samples"]) / 4
    assert report["settings"]["method"] == "sequential" and report["settings"]["n"] == 400
    assert list(result["certified_accuracy"]) == ["0.25"]  # a run at one radius answers for that radius only
    # and so does its plot: the point at 0.25 (it drew a curve, the same value down to radius 0, 0 above)
    assert all(list(line.get_xdata()) == [0.25] for line in saved["certified_standard.png"].axes[0].get_lines())
    assert (tmp_path / "certified_standard.png").stat().st_size > 1000
    assert (tmp_path / "samples_standard.png").stat().st_size > 1000


def test_certify_sequential_records_the_tolerance_it_used(runs, capsys, tmp_path):
    cli.main(["certify", str(runs / "standard"), "--N0", "10", "--method", "sequential", "--n-max", "200", "--limit", "2",
              "--out", str(tmp_path)])
    assert f"method sequential, n_max 200, tolerance {smoothing.TOLERANCE}" in capsys.readouterr().out
    settings = json.loads((tmp_path / "certify.json").read_text())["settings"]
    assert (settings["tolerance"], settings["radius"], settings["n"]) == (smoothing.TOLERANCE, None, 200)


def test_attack_and_certify_across_two_processes_equal_one(runs, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    common = {"attack": ["--attack", "PGD", "--eps", "0.2", "--set", "steps=2", "--set", "eot=2", "--judge-n", "3",
                         "--batch-size", "8"],
              "certify": ["--N0", "10", "--N", "60", "--alpha", "0.01", "--batch-size", "30"]}
    for command, options in common.items():
        outs = []
        for launcher in ([sys.executable, "-m", "noisekernels"],
                         [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "noisekernels"]):
            out = tmp_path / f"{command}{len(outs)}"
            done = subprocess.run([*launcher, command, str(runs / "rs1"), *options, "--limit", "24", "--threads", "1",
                                   "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
            assert done.returncode == 0, done.stderr[-2000:]
            outs.append(json.loads((out / f"{command}.json").read_text()))
        single, sharded = outs
        assert sharded["settings"].pop("processes") == 2 and single["settings"].pop("processes") == 1
        assert single["settings"] == sharded["settings"]
        single, sharded = single["runs"]["rs1"], sharded["runs"]["rs1"]
        single.pop("seconds"), sharded.pop("seconds")
        assert single == sharded


def test_bench(runs, capsys, tmp_path):
    cli.main(["bench", str(runs / "rs1"), "--n", "3", "--batch", "16", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "MC engine" in out and "shared" in out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["runs"]["rs1"]["n"] == 3 and report["runs"]["rs1"]["run"] == str((runs / "rs1").resolve())
    assert report["settings"]["n"] == 3 and "torch" in report["versions"]


@pytest.mark.parametrize("argv, message", [
    (["train", "--defense", "magic"], "invalid choice: 'magic'"),
    (["train", "--defense", "rs1", "--set", "keep=2"], "option keep must be a probability in [0, 1]"),
    (["train", "--defense", "rs1", "--set", "p=0.8"], "option p of defense 'rs1' is now called keep"),
    (["train", "--defense", "rs1", "--set", "sigma=0.1"], "unknown option(s) ['sigma'] for defense 'rs1'"),
    (["train", "--set", "novalue"], "--set takes key=value"),
    (["train", "--batch-size", "0"], "--batch-size: must be an int >= 1"),
    (["train", "--epochs", "-2"], "epochs must be an int >= 0"),
    (["train", "--dataset", "mnist"], "--data-root"),
    (["train", "--dataset", "mnist", "--data-root", "/nonexistent"], "does not exist"),
    (["train", "--model-option", "depth=3"], "unknown option(s) ['depth'] for model 'mnist-cnn'"),
    (["attack", "RUN", "--set", "foo=1"], "unknown option(s) ['foo'] for attack PGD"),
    (["attack", "RUN", "--set", "eps=0.1"], "give the budgets with --eps"),
    (["attack", "RUN", "--set", "seed=3"], "give seed with --seed"),
    (["attack", "RUN", "--set", "judge_n=500"], "give judge_n with --judge-n"),
    (["attack", "RUN", "--set", "alpha=0.5", "--set", "alpha_ratio=0.1"], "give alpha or alpha_ratio"),
    (["attack", "RUN", "--set", "steps=-1"], "steps must be an int >= 0"),
    (["attack", "RUN", "--attack", "Magic"], "invalid choice: 'Magic'"),
    (["eval", "/nonexistent/run"], "is not a run directory"),
    (["eval", "RUN", "--n", "0"], "--n: must be an int >= 1"),
    (["certify", "RUN", "--n-max", "500"], "--n-max applies to --method sequential"),
    (["certify", "RUN", "--method", "sequential", "--N", "500"], "--method sequential takes --n-max"),
    (["certify", "RUN", "--radius", "0.5"], "--radius applies to --method sequential"),
    (["certify", "RUN", "--tolerance", "0.1"], "--tolerance applies to --method sequential"),
    (["certify", "RUN", "--method", "sequential", "--radius", "0.5", "--tolerance", "0.1"], "--tolerance applies to"),
    (["certify", "RUN", "--method", "sequential", "--tolerance", "0"], "tolerance must be a finite float > 0"),
    (["certify", "RUN", "--method", "sequential", "--radius", "-1"], "--radius: must be a number >= 0"),
    ([], "the following arguments are required"),
])
def test_bad_arguments_are_clear_errors(runs, capsys, tmp_path, argv, message):
    argv = [str(runs / "rs1") if a == "RUN" else a for a in argv]
    if argv and argv[0] == "train":
        argv += ["--run-dir", str(tmp_path / "r"), "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_module_entry_point_and_help(capsys):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-m", "noisekernels", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and all(c in out.stdout for c in ("train", "eval", "attack", "certify", "audit", "bench",
                                                                  "demo", "reproduce"))
    expected = {"train": "--defense", "eval": "--ns", "attack": "--judge-n", "certify": "--sigma", "audit": "--eot-cap", "bench": "--batch",
                "demo": "--quick", "reproduce": "--report"}
    assert set(cli.COMMANDS) == set(expected)
    for name, flag in expected.items():
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0 and flag in capsys.readouterr().out
