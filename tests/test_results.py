"""Results a paper can cite: eval.json, attack.json and certify.json hold counts, exact fractions,
Clopper-Pearson intervals (checked with scipy), per-example records (checked against the returned
adversarial examples) and the same numbers as the Python API; the plots carry titles, settings
and bands; progress never writes redraws into a redirected log; one default of judging passes."""

import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from scipy import stats

from attack_models import coin_flip_model, make_data, trained
from noisekernels import certify as smoothing
from noisekernels import cli, data, distributed, evaluate, metrics
from noisekernels.attacks import PGD
from noisekernels.attacks.base import JUDGE_N
from noisekernels.demo import Settings
from noisekernels.train import load_model

TINY = ["--model", "mnist-cnn", "--model-option", "widths=[4,8]", "--model-option", "dense=16"]
ENV = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")


@pytest.fixture(autouse=True)
def one_thread(threads):
    threads(1)


def clopper_pearson(k, n):
    """The exact 95% interval from the beta quantiles (Clopper & Pearson 1934)."""
    lo = stats.beta.ppf(0.025, k, n - k + 1) if k > 0 else 0.0
    hi = stats.beta.ppf(0.975, k + 1, n - k) if k < n else 1.0
    return lo, hi


def check_proportion(p, count=None, total=None):
    """A results file's {count, total, fraction, ci95}: fraction exactly count / total, the interval scipy's."""
    assert p["fraction"] == p["count"] / p["total"]
    assert count in (None, p["count"]) and total in (None, p["total"])
    assert p["ci95"] == pytest.approx(clopper_pearson(p["count"], p["total"]), abs=1e-9)


def run_cli(*argv, cwd=None):
    """The CLI in a subprocess, stdout and stderr to pipes (not a terminal): (returncode, output)."""
    done = subprocess.run([sys.executable, "-m", "noisekernels", *argv], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    code, out = run_cli("train", "--defense", "rs1", *TINY, "--epochs", "2", "--batch-size", "128", "--threads", "1",
                        "--run-dir", str(root / "rs1"))
    assert code == 0, out
    # a redirected log: no progress-bar redraws, one plain line per epoch
    assert "\r" not in out and len(out) < 1000
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("rs1 epoch")] == [
        "rs1 epoch 1/2", "rs1 epoch 2/2"]
    return root / "rs1"


def digits(limit):
    ds = data.digits()
    return ds.x_test[:limit], ds.y_test[:limit]


def test_proportion_is_exact_and_has_scipys_interval():
    for k, n in ((0, 7), (3, 7), (7, 7), (952, 1000)):
        p = metrics.Proportion(k, n)
        assert p == k / n and repr(p) == repr(k / n) and (p.count, p.total) == (k, n)
        assert p.interval() == pytest.approx(clopper_pearson(k, n), abs=1e-12)
        check_proportion(p.as_dict(), k, n)
    assert math.isnan(metrics.Proportion(0, 0)) and all(math.isnan(v) for v in metrics.Proportion(0, 0).interval())
    with pytest.raises(ValueError, match="0 <= count <= total"):
        metrics.Proportion(5, 4)


def test_robust_accuracy_records_every_example():
    model = trained(spike=True)
    x, y = make_data(20, 5)
    result = evaluate.robust_accuracy(model, x, y, "PGD", [0.1, 0.3], {"steps": 3, "eot": 2, "alpha_ratio": 0.25},
                                      judge_n=8, seed=4, batch_size=8, keep_adversarial=True)
    clean_ok = None
    for eps, table in result.examples.items():
        assert table["index"].tolist() == list(range(20)) and torch.equal(table["label"], y)
        distance = (table["x_adv"].double() - x.double()).flatten(1)
        assert torch.equal(table["linf"], distance.abs().amax(1)) and torch.equal(table["l2"], distance.norm(dim=1))
        assert (table["linf"] <= eps + 1e-6).all() and (table["linf"] > 0).any()
        assert torch.equal(table["success"], table["adversarial_prediction"] != y)
        ok = table["clean_prediction"] == y
        assert torch.equal(table["clean_correct"], ok)
        assert clean_ok is None or torch.equal(ok, clean_ok)  # one clean judgement per input
        clean_ok = ok
        assert result.robust[eps].count == int((ok & ~table["success"]).sum()) and result.robust[eps].total == 20
    assert result.clean.count == int(clean_ok.sum()) and result.robust[0.1] >= result.robust[0.3]
    assert set(result.seconds) == {"attack", "judging"} and all(s > 0 for s in result.seconds.values())
    with pytest.raises(ValueError, match="eps 0.1 given more than once"):  # results are keyed by eps
        evaluate.robust_accuracy(model, x, y, "FGSM", [0.1, 0.3, 0.1], {})
    # the records are the attack's: batch 1 redone by hand gives the same adversarial examples
    with distributed.reseeded(model, 4, 1):
        attack = PGD(model, eps=0.1, alpha=0.025, steps=3, eot=2, judge_n=8, seed=distributed.batch_seed(4, 1))
        attack.predict(x[8:16])  # the clean judgement comes first
        assert torch.equal(attack.perturb(x[8:16], y[8:16]), result.examples[0.1]["x_adv"][8:16])


def test_minimum_norm_attacks_keep_x_beyond_the_budget():
    model = trained()
    x, y = make_data(8, 6)
    result = evaluate.robust_accuracy(model, x, y, "CW", [0.0, 10.0], {"steps": 30, "lr": 0.1, "binary_steps": 1, "c": 10.0},
                                      judge_n=4, batch_size=8, keep_adversarial=True)
    assert torch.equal(result.examples[0.0]["x_adv"], x) and (result.examples[0.0]["l2"] == 0).all()
    assert (result.examples[10.0]["l2"] > 0).any()


@pytest.mark.parametrize("name", ["APGD", "AutoAttack"])
def test_inputs_the_attack_skipped_as_fooled_are_not_robust(name):
    # coin_flip_model: every attacked input is fooled (x - 0.1), while x is a coin flip for a judgement.
    # APGD and AutoAttack skip the inputs their own clean judgement finds fooled (attack.clean_fooled,
    # about half); robust_accuracy judged x afresh for those and counted a quarter of them robust
    # (14% and 16% robust instead of 0).
    model = coin_flip_model()
    x, y = torch.full((100, 1, 4, 4), 0.5), torch.zeros(100, dtype=torch.long)
    result = evaluate.robust_accuracy(model, x, y, name, [0.1], {"steps": 5, "eot": 4}, judge_n=20, seed=0)
    table = result.examples[0.1]
    assert 0.3 < result.clean < 0.7  # the coin flips arose: x alone is no verdict
    assert result.robust[0.1] == 0 and table["success"].all()


def test_progress_bar_draws_on_a_terminal_only(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    model = trained()
    x, y = make_data(8, 7)
    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        evaluate.robust_accuracy(model, x, y, "FGSM", [0.1], {}, judge_n=2, batch_size=4, progress=True)
        assert ("\r" in stream.getvalue() and "FGSM" in stream.getvalue()) == drawn


def test_eval_json_matches_the_python_api(run, tmp_path):
    code, out = run_cli("eval", os.path.relpath(run, tmp_path), "--n", "7", "--limit", "30", "--threads", "1",
                        "--out", str(tmp_path), cwd=tmp_path)
    assert code == 0, out
    assert "\r" not in out and "eval rs1: noise off" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["versions"]["torch"] == torch.__version__ and report["settings"]["ns"] == [1, 2, 5, 7]
    result = report["runs"]["rs1"]  # keyed by the run's name, its absolute path a field
    assert result["run"] == str(run) and set(result["accuracy_vs_n"]) == {"1", "2", "5", "7"}
    model, _, _ = load_model(str(run))
    x, y = digits(30)
    clean = evaluate.clean_accuracy(model, x, y, 7)
    for mode, p in clean.items():
        assert result[mode] == p.as_dict()
        check_proportion(result[mode], total=30)
    assert result["accuracy_vs_n"]["7"] == result["mean"]  # the plot's point at --n is the table's
    assert Image.open(tmp_path / "accuracy_vs_n.png").text["Title"].startswith("MC mean prediction")


def test_attack_json_matches_the_python_api(run, tmp_path):
    argv = ["--eps", "0.1", "0.3", "--set", "steps=2", "--set", "eot=2", "--judge-n", "5", "--limit", "24",
            "--batch-size", "10", "--seed", "3", "--threads", "1"]
    code, out = run_cli("attack", str(run), *argv, "--out", str(tmp_path))
    assert code == 0, out
    assert "\r" not in out and "PGD on rs1: clean" in out
    report = json.loads((tmp_path / "attack.json").read_text())
    settings = report["settings"]
    assert settings["attack_settings"]["steps"] == 2 and settings["attack_settings"]["random_start"] is True
    assert (settings["seed"], settings["judge_n"], settings["eps"]) == (3, 5, [0.1, 0.3])
    assert set(report["versions"]) >= {"noisekernels", "torch", "python"}
    config = json.loads((run / "config.json").read_text())
    assert settings["data"] == {k: config[k] for k in ("dataset", "data_root", "dataset_name", "dataset_sha256")}
    assert config["dataset_sha256"] == data.digits().sha256()
    result = report["runs"]["rs1"]
    assert (result["model"], result["model_options"], result["model_sha256"]) == (
        "mnist-cnn", {"widths": [4, 8], "dense": 16}, None)
    model, _, _ = load_model(str(run))
    x, y = digits(24)
    api = evaluate.robust_accuracy(model, x, y, "PGD", [0.1, 0.3], {"steps": 2, "eot": 2}, judge_n=5, seed=3,
                                   batch_size=10).as_json()
    api_seconds, seconds = api.pop("seconds"), result.pop("seconds")
    assert {k: result[k] for k in api} == api and set(seconds) == {"attack", "judging", "wall"}
    check_proportion(result["clean_accuracy"], total=24)
    for eps, p in result["robust_accuracy"].items():
        check_proportion(p, total=24)
        rows = result["examples"][eps]
        robust = [c == lab and not s for c, lab, s in zip(rows["clean_prediction"], rows["label"], rows["success"])]
        assert p["count"] == sum(robust) and len(rows["l2"]) == 24
        assert all(d <= float(eps) + 1e-6 for d in rows["linf"])
    title = Image.open(tmp_path / "robust_accuracy.png").text["Title"]
    assert title.startswith("PGD: robust accuracy against eps")


def test_attack_eps_zero_keeps_the_clean_point_and_repeats_are_refused(run, tmp_path, monkeypatch, capsys):
    plotted = {}
    monkeypatch.setattr(evaluate, "plot", lambda path, curves, *args, **kwargs: plotted.update(curves))
    cli.main(["attack", str(run), "--eps", "0", "0.2", "--set", "steps=1", "--judge-n", "2", "--limit", "8",
              "--no-progress", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "attack.json").read_text())["runs"]["rs1"]
    robust = result["robust_accuracy"]
    assert plotted == {"rs1 (clean)": {0.0: result["clean_accuracy"]["fraction"]},
                       "rs1": {0.0: robust["0.0"]["fraction"], 0.2: robust["0.2"]["fraction"]}}
    for rows in result["examples"].values():
        assert rows["clean_correct"] == [c == lab for c, lab in zip(rows["clean_prediction"], rows["label"])]
    with pytest.raises(SystemExit):
        cli.main(["attack", str(tmp_path / "no-run"), "--eps", "0.1", "0.2", "0.1"])  # before any run is read
    assert "eps 0.1 given more than once" in capsys.readouterr().err


def test_certify_json_records_every_example(run, tmp_path):
    code, out = run_cli("certify", str(run), "--N0", "10", "--N", "50", "--alpha", "0.01", "--limit", "6",
                        "--batch-size", "60", "--threads", "1", "--out", str(tmp_path))
    assert code == 0, out
    assert "\r" not in out and "certify rs1: r=0" in out
    report = json.loads((tmp_path / "certify.json").read_text())
    assert (report["settings"]["n0"], report["settings"]["n"], report["settings"]["sigma"]) == (10, 50, 0.25)
    result = report["runs"]["rs1"]
    model, _, _ = load_model(str(run))
    x, y = digits(6)
    api = smoothing.certify_dataset(model, x, y, 0.25, 10, 50, 0.01, batch_size=60)
    assert result["examples"] == {k: v.tolist() for k, v in api.items()}
    assert result["examples"]["samples"] == [60] * 6
    for r, p in result["certified_accuracy"].items():
        check_proportion(p, total=6)
        assert p["count"] == sum(c and rad >= float(r) for c, rad in zip(api["correct"].tolist(), api["radius"].tolist()))
    assert Image.open(tmp_path / "certified_rs1.png").text["Title"].startswith("rs1: certified accuracy")


@pytest.fixture
def figures(monkeypatch):
    """The figures the plots save, kept open for inspection."""
    import matplotlib.figure
    saved = []
    real = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig)
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return saved


def test_plots_have_titles_settings_bands_and_distinct_lines(tmp_path, figures):
    same = {0.0: metrics.Proportion(9, 10), 0.1: metrics.Proportion(5, 10)}
    evaluate.plot(tmp_path / "a.png", {"one": same, "two": dict(same)}, "eps", "robust accuracy", "PGD",
                  settings={"steps": 7, "seed": 3})
    ax = figures[-1].axes[0]
    assert ax.get_title().splitlines() == ["PGD", "steps 7, seed 3"]
    lines = ax.get_lines()
    assert len({(line.get_marker(), line.get_linestyle()) for line in lines}) == 2  # overlapping, still told apart
    assert len(ax.collections) == 2  # one band per curve
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(same[0.1].interval()[0]) and band.max() == pytest.approx(same[0.0].interval()[1])
    results = {"radius": torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64), "correct": torch.tensor([False, True, True])}
    smoothing.plot_certified_accuracy(results, tmp_path / "c.png", settings={"sigma": 0.25})
    ax = figures[-1].axes[0]
    assert ax.get_title().splitlines() == ["certified accuracy against L2 radius", "sigma 0.25"]
    xs, ys = ax.get_lines()[0].get_data()
    assert ys[0] == pytest.approx(2 / 3) and ys[-1] == 0 and xs[-1] > 0.6  # down to 0 past the largest radius
    assert 0.6 in xs and ys[list(xs).index(0.6)] == pytest.approx(1 / 3)  # the exact step at each radius
    assert len(ax.collections) == 1


def test_a_run_at_one_radius_is_plotted_as_that_one_point(tmp_path, figures):
    # a run of certify_sequential(radius=0.25): 0.25 or 0 per input. Its curve used to claim 1/4 certified at
    # radius 0 (inputs given up on may hold a smaller radius) and 0 above 0.25, where nothing was asked
    results = {"radius": torch.tensor([0.0, 0.25, 0.25, 0.0], dtype=torch.float64),
               "correct": torch.tensor([True, True, False, False])}
    smoothing.plot_certified_accuracy(results, tmp_path / "r.png", radius=0.25, label="seq")
    ax = figures[-1].axes[0]
    assert all(list(line.get_xdata()) == [0.25] for line in ax.get_lines())  # the point and its caps, nowhere else
    assert list(ax.get_lines()[0].get_ydata()) == [0.25]  # 1 of 4 certified correct at 0.25
    bar = ax.collections[0].get_segments()[0][:, 1]  # the error bar: Clopper-Pearson's 95% interval of 1 in 4
    assert (bar.min(), bar.max()) == pytest.approx(metrics.Proportion(1, 4).interval())
    assert len(ax.collections) == 1 and "at r = 0.25" in ax.get_legend().get_texts()[0].get_text()
    with pytest.raises(ValueError, match="radius must be None or a finite float >= 0"):
        smoothing.plot_certified_accuracy(results, tmp_path / "bad.png", radius=-1.0)


def test_accuracy_against_n_reaches_the_n_asked_for():
    assert cli._ns_up_to(100) == [1, 2, 5, 10, 20, 50, 100] and cli._ns_up_to(7) == [1, 2, 5, 7]
    assert cli._ns_up_to(1) == [1]


def test_one_default_of_judging_passes():
    attack = PGD(trained(), eps=0.1)
    parser = cli.parser()
    args = parser.parse_args(["attack", "RUN"])
    assert attack.judge_n == JUDGE_N == args.judge_n == Settings().judge_n


def test_runs_sharing_a_name_are_refused(run, tmp_path, capsys):
    other = tmp_path / "elsewhere" / "rs1"
    other.parent.mkdir()
    os.symlink(run, other)
    with pytest.raises(SystemExit):
        cli.main(["eval", str(run), str(other), "--limit", "4", "--out", str(tmp_path)])
    assert "share the name 'rs1'" in capsys.readouterr().err
