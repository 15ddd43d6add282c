"""FAB: its projections equal auto-attack's (torchattacks' copy); on deterministic models at least as
strong as torchattacks' FAB at equal steps and restarts (L-inf and L2, FAB and FAB-T, a CNN and an
MLP); targeted runs reach the target; points stay in the clip range and scale with it; the EOT
differences are the loop's mean over draws; runs are reproducible from the seed; bad arguments."""

import functools

import pytest
import torch
import torchattacks
from torch import nn
from torchattacks.attacks.fab import projection_l2, projection_linf

import noisekernels as nk
from attack_models import CLASSES, SIZE, make_data, trained
from loop_reference import restore, snapshot
from noisekernels.attacks import APGD, FAB
from noisekernels.attacks.fab import project


@functools.lru_cache(maxsize=None)
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    x, y = make_data(1024, 200)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def norms(d, norm):
    flat = d.flatten(1)
    return flat.abs().amax(1) if norm == "Linf" else flat.norm(dim=1)


@pytest.mark.parametrize("norm,reference", [("Linf", projection_linf), ("L2", projection_l2)])
def test_projection_equals_auto_attacks(norm, reference):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 40, generator=g, dtype=torch.float64)
    w = torch.randn(200, 40, generator=g, dtype=torch.float64)
    w[:, :5] = 0  # coordinates the hyperplane ignores
    scale = torch.tensor([0.01, 0.3, 3.0, 30.0], dtype=torch.float64).repeat(50)  # near, far, out of reach
    b = (w * x).sum(1) + scale * torch.randn(200, generator=g, dtype=torch.float64)
    d = project(x, w, b, norm, (0.0, 1.0))
    torch.testing.assert_close(d, reference(x, w, b), rtol=0, atol=1e-12)
    reached = ((w * (x + d)).sum(1) - b).abs() < 1e-9
    assert 0.2 < reached.float().mean() < 1  # both cases occur
    # Another box: the problem on [lo, hi] is the one on [0, 1] scaled by hi - lo.
    lo, hi = -1.0, 3.0
    d_box = project(lo + (hi - lo) * x, w, lo * w.sum(1) + (hi - lo) * b, norm, (lo, hi))
    torch.testing.assert_close(d_box, (hi - lo) * d, rtol=0, atol=1e-11)


def _reference(model, x, y, norm, eps, steps, n_targets):
    """torchattacks' FAB at budget eps: the norms of its examples, inf where it returns none (its
    FAB-T runs the next target only on the points not fooled within eps)."""
    kind = dict(multi_targeted=True) if n_targets else {}
    x_ref = torchattacks.FAB(model, norm=norm, eps=eps, steps=steps, n_restarts=1, n_classes=CLASSES, **kind)(x, y)
    fooled = model(x_ref).argmax(1) != y
    return torch.where(fooled, norms(x_ref - x, norm), torch.inf)


@pytest.mark.parametrize("net,norm,n_targets", [("cnn", "Linf", None), ("cnn", "L2", None), ("cnn", "Linf", 3),
                                                ("cnn", "L2", 3), ("mlp", "Linf", None), ("mlp", "L2", None)])
def test_at_least_as_strong_as_torchattacks(net, norm, n_targets):
    model = trained() if net == "cnn" else mlp()
    x, y = make_data(32, 7)
    unbounded = _reference(model, x, y, norm, 100.0, 10, n_targets)
    assert unbounded.isfinite().all()
    eps = unbounded.median().item()  # torchattacks' FAB fools about half within it: the comparison says something
    ref = _reference(model, x, y, norm, eps, 10, n_targets)
    attack = FAB(model, norm=norm, eps=eps, steps=10, n_targets=n_targets, seed=0)
    x_adv = attack(x, y)
    ours = attack.norms
    print(f"{net} {norm} n_targets={n_targets}: median norm {ours.median():.4f} (torchattacks {eps:.4f}), "
          f"robust at eps {(ours > eps).float().mean():.3f} (torchattacks {(ref > eps).float().mean():.3f})")
    assert ours.median() <= eps * 1.001
    assert (ours > eps).sum() <= (ref > eps).sum() + 1
    # What FAB returns: the example found where its norm is within eps (judged fooled), else x.
    within = ours <= eps
    assert torch.equal(attack.success, within)
    torch.testing.assert_close(norms(x_adv - x, norm)[within], ours[within])
    assert torch.equal(x_adv[~within], x[~within])


@functools.lru_cache(maxsize=None)
def ten_classes():
    """Not the 4-class fixtures: a 10-class MLP on 20 features labelled by a random linear map, and
    64 of its inputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2000, 20, generator=g)
    y = (x @ torch.randn(20, 10, generator=g)).argmax(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x[:64], y[:64]


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_equals_torchattacks_with_one_restart_on_a_ten_class_model(norm):
    model, x, y = ten_classes()
    ref = torchattacks.FAB(model, norm=norm, eps=100.0, steps=10, n_restarts=1, n_classes=10)(x, y)
    attack = FAB(model, norm=norm, eps=100.0, steps=10, seed=0)
    attack(x, y)
    # Both start at x and take the same steps: the same minimal norms, but where float32 rounding (our
    # batches have other shapes) flips a decision at a point within 1e-3 of a boundary.
    close = torch.isclose(attack.norms, norms(ref - x, norm), rtol=1e-3, atol=1e-5)
    assert close.sum() >= len(x) - 2
    # FAB-T over all 9 other classes at an eps that leaves points to the later targets.
    eps = attack.norms.median().item()
    ref = torchattacks.FAB(model, norm=norm, eps=eps, steps=10, n_restarts=1, n_classes=10, multi_targeted=True)(x, y)
    fooled_ref = (model(ref).argmax(1) != y) & (norms(ref - x, norm) <= eps)
    fab_t = FAB(model, norm=norm, eps=eps, steps=10, n_targets=9, seed=0)
    fab_t(x, y)
    assert 0.2 < fooled_ref.float().mean() < 0.9
    assert (fooled_ref ^ fab_t.success).sum() <= 1  # equal, but for a norm that rounds to either side of eps


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_random_starts_lie_at_half_eps_as_auto_attacks(norm):
    x = torch.full((8, 1, SIZE, SIZE), 0.5)  # inside the range: no clipping
    starts = [FAB(trained(), norm=norm, eps=0.2, seed=0)._start(x) for _ in range(2)]
    torch.testing.assert_close(norms(starts[0] - x, norm), torch.full((8,), 0.1))
    assert torch.equal(starts[0], starts[1]) and not torch.equal(starts[0][0], starts[0][1])  # seeded, fresh per input


def test_targeted_reaches_the_target():
    model = trained()
    x, y = make_data(24, 3)
    target = (y + 1) % CLASSES
    for norm in ("Linf", "L2"):
        attack = FAB(model, norm=norm, eps=10.0, steps=10, targeted=True, seed=0)
        x_adv = attack(x, target)
        assert attack.success.float().mean() >= 0.9
        assert torch.equal(model(x_adv).argmax(1) == target, attack.success)
        untargeted = FAB(model, norm=norm, eps=10.0, steps=10, seed=0)
        untargeted(x, y)
        # Reaching one given class costs at least as much as leaving y for the nearest one.
        assert attack.norms.median() >= untargeted.norms.median()


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_points_stay_in_the_clip_range_and_scale_with_it(norm):
    model = trained()
    x, y = make_data(16, 9)
    attack = FAB(model, norm=norm, eps=10.0, steps=8, restarts=2, seed=0)
    x_adv = attack(x, y)
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and (attack.norms < 10).all()
    # The same model on inputs in [-1, 1] (clip (-1, 1)): FAB is equivariant, the norms double
    # (up to rounding and auto-attack's absolute thresholds, which do not scale).
    shifted = nn.Sequential(Affine(), model).eval()
    attack2 = FAB(shifted, norm=norm, eps=20.0, steps=8, restarts=2, clip=(-1.0, 1.0), seed=0)
    x2_adv = attack2(2 * x - 1, y)
    assert x2_adv.min() >= -1 and x2_adv.max() <= 1
    torch.testing.assert_close(attack2.norms.median(), 2 * attack.norms.median(), rtol=0.01, atol=0)


class Affine(nn.Module):
    def forward(self, x):
        return (x + 1) / 2


def test_eot_differences_are_the_loop_mean_and_runs_reproduce():
    model = trained(spike=True)
    x, y = make_data(6, 4)
    others = torch.stack([(y + k) % CLASSES for k in (1, 2, 3)], 1)
    attack = FAB(model, eot=5, seed=0)
    start = snapshot(model)
    diff, grad = attack.differences(x, y, others)
    restore(model, start)
    loop_diff, loop_grad = 0, 0
    for _ in range(5):  # the loop of 5 passes over the 3 copies of x, from the same stream offsets
        xs = x.repeat(3, 1, 1, 1).requires_grad_()
        logits = model(xs)
        d = logits.gather(1, others.T.reshape(-1, 1)) - logits.gather(1, y.repeat(3)[:, None])
        loop_grad = loop_grad + torch.autograd.grad(d.sum(), xs)[0] / 5
        loop_diff = loop_diff + d.detach().view(3, -1).T / 5
    torch.testing.assert_close(diff, loop_diff, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, loop_grad.view(3, 6, *x.shape[1:]).transpose(0, 1), rtol=1e-4, atol=1e-6)

    x, y = make_data(16, 4)
    rng, start = torch.get_rng_state(), snapshot(model)
    runs = []
    model.train()  # the attack leaves the mode as it finds it (SmallNet's layers act the same in both)
    try:
        for _ in range(2):
            restore(model, start)
            attack = FAB(model, eps=0.3, steps=4, restarts=2, eot=3, judge_n=8, seed=5)
            runs.append((attack(x, y), attack.norms, attack.success))
        assert model.training
    finally:
        model.eval()
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][2], runs[1][2]) and runs[0][2].any()
    assert torch.equal(torch.get_rng_state(), rng)


def test_bad_arguments():
    model = trained()
    with pytest.raises(ValueError, match="norm must be one of"):
        FAB(model, norm="L1")
    with pytest.raises(ValueError, match="alpha_max must be in"):
        FAB(model, alpha_max=1.5)
    with pytest.raises(ValueError, match="eta .* must be >= 1"):
        FAB(model, eta=0.9)
    with pytest.raises(ValueError, match="beta must be in"):
        FAB(model, beta=0.0)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        FAB(model, steps=0)
    with pytest.raises(ValueError, match="restarts must be an int >= 1"):
        FAB(model, restarts=1.5)
    with pytest.raises(ValueError, match="cannot be combined with targeted=True"):
        FAB(model, n_targets=3, targeted=True)
    x, y = make_data(4, 0)
    noisy = trained(spike=True)
    start = snapshot(noisy)
    with pytest.raises(ValueError, match="n_targets=4 needs at least 5 classes, the model has 4"):
        FAB(noisy, n_targets=4)(x, y)
    assert all(map(torch.equal, snapshot(noisy), start))  # refused before any draw
    attack = FAB(model, steps=1)
    with pytest.raises(ValueError, \
            match=r"y must hold class indices \(int64\) in \[0, 4\), got torch.int64 with \[4\]"):
        attack(x, torch.tensor([0, 1, 4, 2]))
    assert attack.norms is None and attack.success is None  # nothing half-updated


class VoteAndMeanDisagree(nn.Module):
    """Four classes: class 0 wins about 70% of the draws by a hair, class 1 the rest by a mile, so
    the vote says 0 and the mean softmax ranks 1 first (as a noisy model near a boundary can)."""

    def __init__(self):
        super().__init__()
        self.noise = nk.nn.GaussianNoise(1.0, seed=3)

    def forward(self, x):
        h = self.noise(x).flatten(1)[:, :1]
        return torch.cat([0.05 + 0 * h, 50 * torch.relu(h - 0.5), -10 + 0 * h, -10 + 0 * h], 1)


@pytest.mark.parametrize("kind", ["fab-t", "apgd-t"])
def test_targets_are_the_likeliest_classes_other_than_y(kind):
    model, x, y = VoteAndMeanDisagree().eval(), torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    probs = nk.ensemble.mc_predict(model, x, 100)
    assert (probs.argmax(1) == 1).all()  # y (0) ranks second in the mean: the 2nd most likely class is y itself
    options = dict(eps=0.1, steps=1, n_targets=1, judge="vote", seed=0)
    attack = FAB(model, **options) if kind == "fab-t" else APGD(model, loss="dlr-targeted", **options)
    targets, run_once = [], attack.run_once
    attack.run_once = lambda xs, ys, columns, **kw: targets.append(columns.flatten()) or run_once(xs, ys, columns, **kw)
    attack(x, y)
    assert len(targets) == 1 and torch.equal(targets[0], torch.ones(4, dtype=torch.long))
