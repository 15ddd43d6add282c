"""AutoAttack: the 'rand' version against torchattacks' AutoAttack(version='rand') at the same
budget (APGD-CE and APGD-DLR, 10 steps, EOT 20), both judged by the same MC prediction; its log;
the 'standard' version's four stages (APGD-CE, APGD-T, FAB-T, Square) on a deterministic model."""

import math

import pytest
import torch
import torchattacks
from torch import nn

import noisekernels as nk
from attack_models import coin_flip_model, make_data, trained
from loop_reference import snapshot
from noisekernels.attacks import APGD, FAB, AutoAttack


@pytest.mark.slow
def test_rand_no_weaker_than_torchattacks_rand():
    model = trained(spike=True)
    x, y = make_data(100, 13)
    attack = AutoAttack(model, eps=0.2, version="rand", steps=10, seed=0)
    x_ours = attack(x, y)
    x_ref = torchattacks.AutoAttack(model, eps=0.2, version="rand", n_classes=4, seed=0)(x, y)
    acc_ours = nk.metrics.accuracy(model, x_ours, y, n=50)
    acc_ref = nk.metrics.accuracy(model, x_ref, y, n=50)
    print(f"robust accuracy: noisekernels {acc_ours:.3f}, torchattacks AutoAttack(rand) {acc_ref:.3f}; log {attack.log}")
    p = (acc_ours + acc_ref) / 2
    assert acc_ours <= acc_ref + 3 * math.sqrt(2 * p * (1 - p) / len(y)) + 0.01
    # The report is an MC judgement on fresh noise: it agrees with another one within sampling error.
    assert abs(attack.robust_accuracy - acc_ours) <= 4 * math.sqrt(acc_ours * (1 - acc_ours) / len(y)) + 0.02


def test_rand_log_and_report():
    model = trained(spike=True)
    x, y = make_data(40, 13)
    attack = AutoAttack(model, eps=0.25, version="rand", steps=4, eot=4, judge_n=10, seed=0)
    x_adv = attack(x, y)
    assert [e["attack"] for e in attack.log] == ["clean", "apgd-ce", "apgd-dlr", "final"]
    running = [e["robust_accuracy"] for e in attack.log[:-1]]
    assert running == sorted(running, reverse=True) and running[-1] < running[0]
    assert attack.robust_accuracy == attack.log[-1]["robust_accuracy"] == (~attack.success).float().mean().item()
    assert ((x_adv - x).abs() <= 0.25 + 1e-6).all()


def test_standard_runs_its_stages_on_the_robust_points(capsys):
    model = trained()
    x, y = make_data(40, 5)
    attack = AutoAttack(model, eps=0.18, version="standard", steps=10, queries=50, n_targets=3, seed=1, verbose=True)
    x_adv = attack(x, y)
    assert [e["attack"] for e in attack.log] == ["clean", "apgd-ce", "apgd-t", "fab-t", "square", "final"]
    assert "robust accuracy after APGD-CE" in capsys.readouterr().out
    fooled = model(x_adv).argmax(1) != y
    assert torch.equal(~fooled, ~attack.success)
    ce = APGD(model, eps=0.18, steps=10, seed=5)
    ce(x, y)
    assert (~attack.success).sum() <= (~ce.success).sum() + 3  # more stages, never much weaker than the first alone
    assert ((x_adv - x).abs() <= 0.18 + 1e-6).all()


def test_standard_fab_t_is_torchattacks_fab_t_on_the_points_the_apgds_left():
    model = trained()
    x, y = make_data(40, 5)
    attack = AutoAttack(model, eps=0.18, version="standard", steps=2, queries=1, n_targets=3, seed=1)
    x_adv = attack(x, y)
    robust = {e["attack"]: e["robust_accuracy"] for e in attack.log}
    assert robust["clean"] == 1 and robust["fab-t"] < robust["apgd-t"]  # FAB-T fools points both APGDs left
    (_, ce), (_, apgd_t), (_, fab), _ = attack.stages
    left = (~ce.success).nonzero().squeeze(1)
    left = left[~apgd_t.success]
    ref = torchattacks.FAB(model, eps=0.18, steps=2, n_restarts=1, multi_targeted=True, n_classes=4)(x[left], y[left])
    fooled_ref = model(ref).argmax(1) != y[left]
    assert (fooled_ref ^ fab.success).sum() <= 1  # equal, but for a norm that rounds to either side of eps
    assert ((x_adv - x).abs().amax((1, 2, 3)) <= 0.18 + 1e-6).all()


def test_rng_mode_and_arguments():
    model = trained(spike=True)
    model.train()
    x, y = make_data(8, 1)
    rng = torch.get_rng_state()
    AutoAttack(model, eps=0.2, steps=2, eot=2, judge_n=2, seed=0)(x, y)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    model.eval()
    with pytest.raises(ValueError, match="judge_n must be >= 2"):
        AutoAttack(model, judge_n=1)
    with pytest.raises(ValueError, match="version must be one of"):
        AutoAttack(model, version="plus")
    with pytest.raises(ValueError, match="L-inf only in this library .no L2 Square.: norm must be 'Linf'"):
        AutoAttack(model, version="standard", norm="L2")
    with pytest.raises(ValueError, match="queries and n_targets belong to version='standard'"):
        AutoAttack(model, queries=100)


def test_too_few_classes_are_refused_before_any_stage_or_draw():
    model = trained(spike=True)
    x, y = make_data(8, 1)
    start = snapshot(model)
    attack = AutoAttack(model, eps=0.2, version="standard", steps=2, queries=1, seed=0)  # n_targets: auto-attack's 9
    with pytest.raises(ValueError,
                       match="AutoAttack's apgd-t stage: n_targets=9 needs at least 10 classes, the model has 4"):
        attack(x, y)
    assert attack.log == [] and all(map(torch.equal, snapshot(model), start))
    two = nn.Sequential(nn.Flatten(), nn.Linear(144, 2)).eval()
    with pytest.raises(ValueError,
                       match="AutoAttack's apgd-dlr stage: loss='dlr' needs at least 3 classes, the model has 2"):
        AutoAttack(two, eps=0.2, steps=2, seed=0)(x, y % 2)


@pytest.mark.parametrize("make", [
    lambda m: AutoAttack(m, eps=0.1, version="rand", steps=5, eot=4, judge_n=20, seed=0),
    lambda m: APGD(m, eps=0.1, steps=5, eot=4, judge_n=20, seed=0),
], ids=["autoattack-rand", "apgd"])
def test_input_never_attacked_is_not_counted_robust(make):
    # Every input here is fooled once attacked (the oracle above). An attack skips the inputs its clean
    # MC judgement already found fooled (about half); a fresh judgement of x must not then count them
    # robust (it did for about a quarter of them: robust accuracy ~0.3 instead of 0).
    from scipy import integrate, stats
    p0 = integrate.quad(lambda t: stats.norm.pdf(t, -1.6, 1) / (1 + math.exp(-t)), -12, 9)[0]
    assert p0 < 0.3
    model = coin_flip_model()
    x, y = torch.full((100, 1, 4, 4), 0.5), torch.zeros(100, dtype=torch.long)
    attack = make(model)
    attack(x, y)
    assert attack.success.all()
    assert attack.clean_fooled.any() and not attack.clean_fooled.all()  # the case arose


def test_fab_input_at_norm_zero_is_counted_fooled():
    # FAB records norm 0 where x itself is judged fooled (and does not attack it): success must agree.
    model = coin_flip_model()
    x, y = torch.full((100, 1, 4, 4), 0.5), torch.zeros(100, dtype=torch.long)
    fab = FAB(model, eps=0.1, steps=5, eot=4, judge_n=20, seed=0)
    fab(x, y)
    assert (fab.norms == 0).any()
    assert fab.success[fab.norms == 0].all()


class _BoundaryCoin(nn.Module):
    """Classes [0, z, -10] plus N(0, 1) noise on the logits, z = 10 (mean(x) - 0.5): correct at
    mean(x) = 0.4, a coin flip between classes 0 and 1 at mean(x) = 0.5, where an L-inf attack of
    eps 0.1 ends (its gradient raises every pixel)."""

    def __init__(self):
        super().__init__()
        self.noise = nk.nn.GaussianNoise(1.0, seed=3)

    def forward(self, x):
        z = 10 * (x.flatten(1).mean(1) - 0.5)
        return self.noise(torch.stack([torch.zeros_like(z), z, torch.full_like(z, -10.0)], 1))


def test_rand_no_weaker_than_its_first_stage_alone_on_fresh_noise():
    # Every attacked example is a coin flip for an MC judgement. AutoAttack used to return x for the
    # inputs no stage's judgement found fooled, and the final judgement passed x almost surely: 67%
    # robust on fresh noise against 55% for its APGD-CE stage alone. Judged here independently.
    model = _BoundaryCoin().eval()
    n = 600
    x = 0.4 + 0.05 * (2 * torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(0)) - 1)
    x = x - x.mean((1, 2, 3), keepdim=True) + 0.4
    y = torch.zeros(n, dtype=torch.long)

    def fresh_robust(x_adv, judgements=4):
        return torch.stack([nk.ensemble.decide(nk.ensemble.mc_predict(model, x_adv, 10)) == y
                            for _ in range(judgements)]).float().mean().item()

    budget = dict(eps=0.1, steps=5, eot=2, judge_n=10, seed=0)
    with nk.ensemble.fixed_chunk(2):
        alone = fresh_robust(APGD(model, **budget)(x, y))
        attack = AutoAttack(model, version="rand", **budget)
        ours = fresh_robust(attack(x, y))
    assert 0.4 < alone < 0.7  # the coin flips arose
    assert ours <= alone + 0.05  # std of the difference ~0.015
    assert abs(attack.robust_accuracy - ours) <= 0.07  # one judgement of 600 coin flips: std ~0.02


class _Scripted:
    """A stand-in stage: returns `example` and reports `success` / `clean_fooled` (rows of the points it gets)."""

    def __init__(self, example, success, clean_fooled):
        self.example, self.outcome, self.skips = example, success, clean_fooled

    def __call__(self, x, y):
        self.success, self.clean_fooled = self.outcome[: len(x)], self.skips[: len(x)]
        return self.example[: len(x)]

    def class_needs(self):
        return []


def test_stage_bookkeeping_keeps_the_attacked_example():
    # Stage 1 attacks both inputs and fools neither; stage 2 skips input 0 (its judgement of x says
    # fooled) and attacks input 1. Input 0 must be judged on stage 1's example (not x), input 1 on
    # stage 2's; neither is counted fooled without a judgement, since both were attacked.
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 4)).eval()
    x, y = torch.zeros(2, 1, 12, 12), model(torch.zeros(2, 1, 12, 12)).argmax(1)
    attack = AutoAttack(model, eps=0.5, version="rand", steps=1, eot=1, judge_n=2, seed=0)
    no, yes = torch.tensor([False, False]), torch.tensor([True, False])
    attack.stages = [("one", _Scripted(x + 0.1, no, no)), ("two", _Scripted(x + 0.2, yes, yes))]
    x_adv = attack.perturb(x, y)
    assert torch.equal(x_adv[0], x[0] + 0.1) and torch.equal(x_adv[1], x[1] + 0.2)
    assert not attack.clean_fooled.any()
