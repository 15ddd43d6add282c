"""`noisekernels audit` on models with known answers: a gradient-masking model (input quantisation,
zero gradient) is flagged by the zero-gradient and unbounded checks; a deterministic model is
reported deterministic; a model whose single-draw gradient is mostly noise is flagged by the EOT
check until the cap lets EOT grow large enough; the worst-case figure is never above the pooled one;
the intervals cover the true value in a simulation; check 4's frozen draw is never seen by a later
pass; every input is attacked; a NaN gradient is flagged; a seed reproduces a report (torch's
generators too); the command line on a tiny trained run; bad arguments."""

import json
import re

import pytest
import torch
from torch import nn

import noisekernels as nk
from noisekernels import cli
from noisekernels.audit import VERDICTS, _doubling, _FixedNoise, audit
from noisekernels.metrics import Proportion
from noisekernels.random import normal, uniform
from noisekernels.stream import Stream

CLASSES, SIDE = 4, 8
BUDGET = dict(steps=5, queries=10, judge_n=2)  # small: the models are linear, their answers clear


@pytest.fixture(autouse=True)
def one_thread(threads):
    threads(1)


def _templates():
    return torch.where(uniform((CLASSES, SIDE * SIDE), stream=Stream(0)) < 0.5, -1.0, 1.0)


def _data(n, seed=1):
    """8x8 images 0.5 + r * (the label's +-1 template), r uniform in [0.05, 0.15]: an L-inf attack of
    eps needs about r <= eps on a linear template classifier, so robust accuracy spreads over eps."""
    stream = Stream(seed)
    y = (uniform((n,), stream=stream) * CLASSES).long().clamp(max=CLASSES - 1)
    r = 0.05 + 0.1 * uniform((n, 1), stream=stream)
    return (0.5 + r * _templates()[y]).view(n, 1, SIDE, SIDE), y


class Template(nn.Module):
    """Deterministic: logits are the correlation with each class's template."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", _templates())

    def forward(self, x):
        return (x.flatten(1) - 0.5) @ self.w.T


class Quantised(Template):
    """Gradient masking: the input rounded to 1/32 (round has zero gradient everywhere)."""

    def forward(self, x):
        return super().forward((x * 32).round() / 32)


class Dropped(Template):
    """Noise from torch's own generator: nn.Dropout left in training mode."""

    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return super().forward(self.dropout(x))


class GradientNoise(Template):
    """The template classifier's logits (plus a trace of noise, so passes differ) with a gradient
    that carries a noise term of std `scale` per pixel per draw and no value: one draw's gradient
    is mostly noise, the EOT mean over n draws has its noise shrunk by sqrt(n)."""

    def __init__(self, scale):
        super().__init__()
        self.noise = nk.nn.GaussianNoise(scale, mc=True)
        self.register_buffer("v", normal((CLASSES, SIDE * SIDE), stream=Stream(2)))

    def forward(self, x):
        flat = x.flatten(1)
        zeta = self.noise(torch.zeros_like(flat))
        wobble = (flat * zeta) @ self.v.T
        return (flat - 0.5) @ self.w.T + (wobble - wobble.detach()) + 1e-3 * zeta[:, :CLASSES]


class NoisyTemplate(Template):
    """The template classifier on its input plus Gaussian noise of std sigma (a library stream)."""

    def __init__(self, sigma):
        super().__init__()
        self.noise = nk.nn.GaussianNoise(sigma, mc=True)

    def forward(self, x):
        return super().forward(self.noise(x))


class NaNGradient(Template):
    """Finite logits, a NaN input gradient: d sqrt(u)/du is inf at u = 0, times du/dx = 0."""

    def forward(self, x):
        return super().forward(x) + (0 * x.flatten(1)[:, :1]).sqrt()


def _verdicts(report):
    return {c.name: c.verdict for c in report.checks}


def _check_figures(report):
    assert all(c.verdict in VERDICTS for c in report.checks) and len(report.checks) == 9
    assert report.robust_accuracy_worst.count <= report.robust_accuracy.count <= report.clean_accuracy.count
    for p in (report.clean_accuracy, report.robust_accuracy, report.robust_accuracy_worst, *report.attacks.values()):
        assert p.total == report.settings["inputs"]


def test_gradient_masking_is_flagged_by_zero_gradient_and_unbounded_checks():
    x, y = _data(200)
    report = audit(Quantised().eval(), x, y, 0.15, **BUDGET)
    _check_figures(report)
    verdicts = _verdicts(report)
    assert verdicts["zero gradients"] == "fail" and verdicts["unbounded attack"] == "fail"
    assert report.checks[6].numbers["inputs_with_zero_gradient"] == 1.0
    # the unbounded attack starts at x, so without a gradient it never moves (a random start in the whole
    # range would be a random input, fooling most of them with no gradient at all)
    assert report.checks[4].numbers["robust_accuracy"].count == report.clean_accuracy.count
    # the same classifier without the rounding: every attack has a gradient and succeeds
    clear = audit(Template().eval(), x, y, 0.15, **BUDGET)
    assert _verdicts(clear)["zero gradients"] == _verdicts(clear)["unbounded attack"] == "pass"
    assert clear.robust_accuracy == 0.0 and report.robust_accuracy > 0.5


def test_a_deterministic_model_is_reported_deterministic():
    x, y = _data(100)
    report = audit(Template().eval(), x, y, 0.1, **BUDGET)
    randomness = report.checks[0]
    assert randomness.verdict == "pass" and randomness.numbers["protocol"].startswith("deterministic")
    assert randomness.numbers["passes_differing_from_the_first"] == 0
    assert randomness.numbers["active_noise_layers"] == []
    assert list(report.curves["eot"]) == [1] and report.settings["eot_chosen"] == 1
    # an exact model: every judgement agrees, so the two figures are one
    assert report.robust_accuracy.count == report.robust_accuracy_worst.count
    noisy = audit(Dropped().train(), x, y, 0.1, **BUDGET).checks[0]
    assert noisy.verdict == "warn" and noisy.numbers["torch_generators"] is True


def test_eot_check_flags_a_noisy_gradient_until_eot_is_large_enough():
    x, y = _data(400)
    model = GradientNoise(2.0).eval()
    with nk.ensemble.fixed_chunk(4):  # the same figures whatever the engine would measure fastest under load
        capped = {cap: audit(model, x, y, 0.15, eot_cap=cap, **BUDGET) for cap in (2, 4)}
        untested = audit(model, x[:40], y[:40], 0.15, eot_cap=1, **BUDGET).checks[1]
        report = audit(model, x, y, 0.15, eot_cap=64, **BUDGET)
    for cap, r in capped.items():  # robust accuracy still falls at the cap
        assert _verdicts(r)["EOT sufficiency"] == "warn" and max(r.curves["eot"]) == cap
        _check_figures(r)
    # nothing compared: no claim of change
    assert untested.verdict == "warn" and "untested" in untested.meaning and "still lowered" not in untested.meaning
    _check_figures(report)
    curve = report.curves["eot"]
    assert _verdicts(report)["EOT sufficiency"] == "pass" and report.settings["eot_chosen"] >= 8
    assert curve[1] > curve[report.settings["eot_chosen"]] + 0.2  # one draw over-rated the model by far


def test_doubling_is_a_paired_test_that_sees_what_overlapping_intervals_miss():
    """12 of 100 robust inputs lost by doubling, none gained: the two figures' intervals overlap (the
    rule the checks used), yet the exact paired test's p-value is 0.5 ** 12."""
    before = torch.zeros(200, dtype=torch.bool)
    before[:100] = True
    after = before.clone()
    after[:12] = False
    a, b = (Proportion(int(v.sum()), 200) for v in (before, after))
    assert a.interval()[0] <= b.interval()[1]  # the intervals overlap
    assert _doubling(before, after) == {"lost": 12, "gained": 0, "p_value": 0.5**12}
    both = after.clone()
    both[150:162] = True  # as many gained elsewhere: no evidence that doubling lowers robust accuracy
    assert _doubling(before, both)["p_value"] > 0.5


def test_fixed_noise_is_one_frozen_draw_that_no_later_pass_of_the_model_sees():
    """Check 4's model repeats one draw, on counters the model's own passes (the judgements of its
    examples) never reach, moves no stream, and refuses a batch whose rows would get other draws."""
    x, _ = _data(6)
    model = NoisyTemplate(0.5).eval()
    stream = model.noise.stream
    before = stream.seed.clone(), stream.offset.clone()
    fixed = _FixedNoise(model, x.shape)
    with torch.no_grad():
        frozen = fixed(x)
        assert torch.equal(fixed(x), frozen)
        assert torch.equal(stream.seed, before[0]) and torch.equal(stream.offset, before[1])
        later = nk.ensemble.mc_predict(model, x, 4, reduce="none")  # what judgements draw next
    assert not any(torch.equal(later[r], frozen) for r in range(4))
    with pytest.raises(ValueError, match=r"frozen for batches of shape \(6, 1, 8, 8\), got \(2, 1, 8, 8\)"):
        fixed(x[:2])
    offset = stream.offset.clone()
    model.w = None  # the model's own pass now raises: the streams are put back all the same
    with pytest.raises(AttributeError):
        fixed(x)
    assert torch.equal(stream.seed, before[0]) and torch.equal(stream.offset, offset)


def test_every_input_is_attacked_whatever_the_attacks_own_clean_judgement_says():
    """Inputs near the boundary of a noisy differentiable model, labelled by its MC decision: an
    attack allowed the whole input range fools every one. An attack that first screens the inputs
    by its own clean MC judgement leaves some it misjudges unattacked, and the audit then counted
    them robust (a lucky draw: 'unbounded attack' failed on a model with nothing masked)."""
    x, _ = _data(100)
    model = NoisyTemplate(0.3).eval()
    with torch.no_grad():
        y = nk.ensemble.mc_predict(model, x, 200).argmax(1)
    report = audit(model, x, y, 0.01, steps=2, eot_cap=1, queries=2, judge_n=2)
    unbounded = report.checks[4]
    assert unbounded.numbers["robust_accuracy"].count == 0 and unbounded.verdict == "pass"


def test_a_nan_gradient_is_flagged_like_a_zero_one():
    x, y = _data(40)
    check = audit(NaNGradient().eval(), x, y, 0.1, **BUDGET).checks[6]
    assert check.name == "zero gradients" and check.verdict == "fail"
    assert check.numbers["inputs_with_nonfinite_gradient"] == 1.0 and check.numbers["inputs_with_zero_gradient"] == 0


def test_torch_generator_noise_repeats_with_the_seed_and_the_callers_generator_is_untouched():
    x, _ = _data(40)
    model = Dropped().train()
    y = model.eval()(x).argmax(1)
    model.train()
    state = torch.get_rng_state()
    runs = [audit(model, x, y, 0.05, seed=5, **BUDGET).to_json() for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state) and model.training
    for r in runs:
        r.pop("seconds")
    assert runs[0] == runs[1]


def test_one_seed_reproduces_a_report_and_another_seed_differs():
    x, y = _data(100)
    model = GradientNoise(2.0).eval()
    with nk.ensemble.fixed_chunk(4):  # bit for bit: the chunks the engine would measure differ by float rounding
        runs = [audit(model, x, y, 0.15, seed=seed, **BUDGET).to_json() for seed in (3, 3, 4)]
    for r in runs:
        r.pop("seconds")  # the only part a rerun changes
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert json.loads(json.dumps(runs[0])) == runs[0]  # plain JSON


def test_clopper_pearson_intervals_cover_the_true_value_in_a_simulation():
    """Binomial counts simulated from the library's uniforms: the 95% intervals the report gives
    (Proportion.interval) cover the true proportion at least 95% of the time (they are exact, so
    conservative), up to the simulation's own error."""
    trials, total = 4000, 60
    for p in (0.05, 0.3, 0.5):
        counts = (uniform((trials, total), stream=Stream(7)) < p).sum(1)
        covers = {c: lo <= p <= hi for c in counts.unique().tolist() for lo, hi in [Proportion(c, total).interval()]}
        coverage = sum(covers[c] for c in counts.tolist()) / trials
        assert coverage >= 0.95 - 0.01, (p, coverage)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    before = torch.get_num_threads()
    cli.main(["train", "--defense", "rs1", "--model", "mnist-cnn", "--model-option", "widths=[4,8]", "--model-option",
              "dense=16", "--epochs", "2", "--batch-size", "32", "--lr", "0.01", "--no-progress", "--run-dir",
              str(root / "rs1"), "--threads", "1"])
    torch.set_num_threads(before)
    return root / "rs1"


def test_cli_writes_the_report_and_plots(run_dir, tmp_path, capsys):
    out = tmp_path / "audit"
    cli.main(["audit", str(run_dir), "--eps", "0.1", "--limit", "24", "--out", str(out), "--steps", "3",
              "--eot-cap", "2", "--queries", "5", "--judge-n", "3"])
    printed = capsys.readouterr().out
    saved = json.loads((out / "audit.json").read_text())
    assert set(saved) == {"settings", "versions", "runs"} and saved["settings"]["eps"] == 0.1
    report = saved["runs"]["rs1"]
    assert report["defense"] == "rs1" and [c["name"] for c in report["checks"]][0] == "randomness"
    assert report["checks"][0]["numbers"]["active_noise_layers"] == ["body.0.random_spike"]
    worst, mean = report["robust_accuracy_worst"], report["robust_accuracy"]
    assert report["clean_accuracy"]["count"] > 0  # a model that classifies nothing is refused, not audited
    assert worst["count"] <= mean["count"] and mean["total"] == 24 and len(mean["ci95"]) == 2
    page = (out / "audit.md").read_text()
    assert page.startswith("# Audit of rs1 (rs1)") and page.count("| **") == 9
    for name in ("audit_eot.png", "audit_steps.png"):
        assert (out / name).stat().st_size > 1000 and f"({name})" in page
    assert "robust accuracy" in printed


@pytest.mark.parametrize("argv, message", [
    (["--eps", "0"], "--eps: must be a number > 0, got '0'"),
    (["--eps", "-1"], "--eps: must be a number > 0, got '-1'"),
    ([], "the following arguments are required: --eps"),
    (["--eps", "0.1", "--judgements", "2"], "judgements must be an int >= 3, got 2"),
    (["--eps", "0.1", "--norm", "L3"], "invalid choice: 'L3'"),
])
def test_cli_bad_arguments_are_usage_errors(run_dir, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["audit", str(run_dir), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_out_that_is_a_file_is_a_usage_error(run_dir, tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["audit", str(run_dir), "--eps", "0.1", "--out", str(tmp_path / "taken")])
    assert exit_info.value.code == 2 and "taken is a file: give a directory" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    ({"eps": 0.0}, "eps must be > 0"),
    ({"eps": float("nan")}, "eps must be a finite float >= 0"),
    ({"norm": "L3"}, "norm must be one of"),
    ({"judgements": 2}, "judgements must be an int >= 3"),
    ({"eot_cap": 0}, "eot_cap must be an int >= 1"),
    ({"seed": -1}, "seed must be an int >= 0"),
    ({"clip": (1.0, 0.0)}, "clip must be finite (lo, hi) with lo < hi"),
    ({"clip": (0.0, 0.5)}, "x must be finite and lie in clip (0.0, 0.5)"),
    ({"y": torch.zeros(3, dtype=torch.long)}, "y must be integer labels, one per input (8)"),
    ({"y": torch.zeros(8, dtype=torch.bool)}, "y must be integer labels, one per input (8)"),
    ({"y": torch.full((8,), CLASSES)}, f"y must hold class indices in [0, {CLASSES}) (the model has {CLASSES} classes), "
                                       f"got labels in [{CLASSES}, {CLASSES}]"),
    ({"y": torch.full((8,), -1)}, "y must hold class indices in [0, 4)"),
    ({"x": torch.full((8, 1, SIDE, SIDE), float("nan"))}, "x must be finite and lie in clip (0.0, 1.0)"),
    ({"y": (Template()(_data(8)[0]).argmax(1) + 1) % CLASSES}, "no input is classified correctly clean (0 of 8"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    x, y = _data(8)
    args = {"model": Template(), "x": x, "y": y, "eps": 0.1, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        audit(**args)
