"""APGD: step for step equal to torchattacks' APGD on a deterministic model from the same start,
no weaker than torchattacks' APGD(eot_iter) on a noisy one, and auto-attack's checkpoints and
DLR losses as the paper defines them."""

import math

import pytest
import torch
import torchattacks

import noisekernels as nk
from attack_models import make_data, trained
from noisekernels.attacks import APGD
from noisekernels.attacks.apgd import checkpoints, dlr_loss, dlr_targeted_loss


class FixedStart(APGD):
    """APGD from a given starting point (torchattacks draws its start from torch's global RNG)."""

    def __init__(self, *args, start, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = start

    def _start(self, x):
        return self.start


def torchattacks_start(x, norm, eps, seed=0):
    """The start torchattacks' APGD draws after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    if norm == "Linf":
        t = 2 * torch.rand(x.shape) - 1
        return (x + eps * t / t.flatten(1).abs().amax(1).view(-1, 1, 1, 1)).clamp(0, 1)
    t = torch.randn(x.shape)
    return (x + eps * t / (t.square().sum((1, 2, 3), keepdim=True).sqrt() + 1e-12)).clamp(0, 1)


@pytest.mark.parametrize("norm,eps,loss", [("Linf", 0.18, "ce"), ("Linf", 0.19, "dlr"), ("L2", 1.1, "ce"), ("L2", 1.0, "dlr")])
def test_matches_torchattacks_on_a_deterministic_model(norm, eps, loss):
    model = trained()
    x, y = make_data(64, 7)
    correct = model(x).argmax(1) == y
    start = torchattacks_start(x[correct], norm, eps)
    ours = FixedStart(model, norm=norm, eps=eps, steps=20, loss=loss, seed=0, start=start)
    x_ours = ours(x, y)
    x_ref = torchattacks.APGD(model, norm=norm, eps=eps, steps=20, loss=loss, seed=0)(x, y)
    fooled_ref = model(x_ref).argmax(1) != y
    assert 0 < fooled_ref.sum() < len(y)  # the comparison says something
    assert torch.equal(~ours.success, ~fooled_ref)
    torch.testing.assert_close(x_ours[fooled_ref], x_ref[fooled_ref], rtol=0, atol=2e-6)


def test_no_weaker_than_torchattacks_eot_on_a_noisy_model():
    model = trained(spike=True)
    x, y = make_data(300, 11)
    judge = dict(mode="mean", n=20)
    ours = APGD(model, eps=0.2, steps=10, eot=10, judge_n=20, seed=0)(x, y)
    ref = torchattacks.APGD(model, eps=0.2, steps=10, eot_iter=10, seed=0)(x, y)
    acc_ours = nk.metrics.accuracy(model, ours, y, **judge)
    acc_ref = nk.metrics.accuracy(model, ref, y, **judge)
    print(f"robust accuracy: noisekernels {acc_ours:.3f}, torchattacks.APGD(eot_iter=10) {acc_ref:.3f}")
    assert acc_ours < nk.metrics.accuracy(model, x, y, **judge) - 0.2  # the attack works
    p = (acc_ours + acc_ref) / 2
    assert acc_ours <= acc_ref + 3 * math.sqrt(2 * p * (1 - p) / len(y)) + 0.01


def test_targeted_dlr_agrees_with_torchattacks_apgdt():
    model = trained()
    x, y = make_data(200, 5)
    ours = APGD(model, eps=0.18, steps=10, loss="dlr-targeted", n_targets=3, seed=0)
    x_ours = ours(x, y)
    x_ref = torchattacks.APGDT(model, eps=0.18, steps=10, n_classes=4, seed=0)(x, y)
    acc_ours = (model(x_ours).argmax(1) == y).float().mean().item()
    acc_ref = (model(x_ref).argmax(1) == y).float().mean().item()
    assert acc_ours == (~ours.success).float().mean().item()
    p = (acc_ours + acc_ref) / 2
    assert 0 < acc_ref < 1 and abs(acc_ours - acc_ref) <= 4 * math.sqrt(2 * p * (1 - p) / len(y)) + 0.01


def test_checkpoints_follow_the_paper():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); w_j = p_j * N_iter.
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1:
            break
        p.append(nxt)
    assert [i + 1 for i, _ in checkpoints(100)] == [round(q * 100) for q in p[1:]]


def test_dlr_losses_follow_the_paper():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 10, generator=g)
    y = torch.randint(0, 10, (50,), generator=g)
    t = (y + 3) % 10
    zs = z.sort(1, descending=True).values
    max_other = z.scatter(1, y[:, None], -math.inf).amax(1)
    z_y, z_t = z[torch.arange(50), y], z[torch.arange(50), t]
    torch.testing.assert_close(dlr_loss(z, y), -(z_y - max_other) / (zs[:, 0] - zs[:, 2] + 1e-12))
    torch.testing.assert_close(dlr_targeted_loss(z, y, t), -(z_y - z_t) / (zs[:, 0] - (zs[:, 2] + zs[:, 3]) / 2 + 1e-12))


def test_stays_in_the_ball_and_leaves_rng_mode_alone():
    model = trained(spike=True)
    model.train()
    x, y = make_data(16, 3)
    linf = APGD(model, eps=0.1, steps=4, eot=3, seed=1)
    l2 = APGD(model, norm="L2", eps=0.5, steps=4, eot=3, restarts=2, seed=1)
    rng = torch.get_rng_state()
    a, b = linf(x, y), l2(x, y)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    model.eval()
    assert ((a - x).abs() <= 0.1 + 1e-6).all() and ((b - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
    assert a.min() >= 0 and a.max() <= 1


def test_seeded_runs_repeat():
    model = trained()
    x, y = make_data(32, 3)
    a = APGD(model, eps=0.18, steps=5, seed=3)(x, y)
    b = APGD(model, eps=0.18, steps=5, seed=3)(x, y)
    c = APGD(model, eps=0.18, steps=5, seed=4)(x, y)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_arguments():
    model = trained()
    with pytest.raises(ValueError, match="loss must be one of"):
        APGD(model, loss="hinge")
    with pytest.raises(ValueError, match="targeted=True needs loss='ce'"):
        APGD(model, loss="dlr", targeted=True)
    with pytest.raises(ValueError, match=r"rho must be in \[0, 1\]"):
        APGD(model, rho=2.0)
    with pytest.raises(ValueError, match="n_targets=9 needs at least 10 classes, the model has 4"):
        APGD(model, loss="dlr-targeted", steps=2)(*make_data(4, 1))
    two, (x, y) = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 2)).eval(), make_data(4, 1)
    with pytest.raises(ValueError, match="loss='dlr' needs at least 3 classes, the model has 2"):
        APGD(two, loss="dlr", steps=2)(x, y % 2)
