"""Square: no weaker than torchattacks' Square at the same query budget on a deterministic model,
and with EOT margins stronger than it on a noisy one (which has no EOT Square); auto-attack's
schedule of p; the ball, the seed, the RNG and the mode."""

import math

import pytest
import torch
import torchattacks

import noisekernels as nk
from attack_models import make_data, trained
from noisekernels.attacks import Square
from noisekernels.attacks.square import p_schedule


def no_higher(ours, ref, n, z=3):
    p = (ours + ref) / 2
    return ours <= ref + z * math.sqrt(2 * p * (1 - p) / n) + 0.01


@pytest.mark.parametrize("spike,eps,eot", [(False, 0.2, 1), (True, 0.3, 10)])
def test_no_weaker_than_torchattacks_square(spike, eps, eot):
    model = trained(spike=spike)
    x, y = make_data(128, 7)
    attack = Square(model, eps=eps, queries=100, eot=eot, judge_n=20, seed=1)
    x_ours = attack(x, y)
    x_ref = torchattacks.Square(model, eps=eps, n_queries=100, seed=0)(x, y)
    acc_ours = nk.metrics.accuracy(model, x_ours, y, n=50)
    acc_ref = nk.metrics.accuracy(model, x_ref, y, n=50)
    print(f"robust accuracy (eps {eps}, eot {eot}): noisekernels {acc_ours:.3f}, torchattacks.Square {acc_ref:.3f}")
    assert acc_ours < nk.metrics.accuracy(model, x, y, n=50) - 0.1  # the attack works
    assert no_higher(acc_ours, acc_ref, len(y))
    assert ((x_ours - x).abs() <= eps + 1e-6).all() and x_ours.min() >= 0 and x_ours.max() <= 1
    assert attack.robust.float().mean().item() == pytest.approx(acc_ours, abs=0.12)


def test_p_schedule_is_auto_attacks():
    def reference(p_init, it, queries):  # fra31/auto-attack square.py p_selection, rescaled
        it = int(it / queries * 10000)
        for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256)):
            if it <= bound:
                return p_init / div
        return p_init / 512
    for queries in (100, 5000, 10000):
        assert [p_schedule(0.8, i, queries) for i in range(queries)] == [reference(0.8, i, queries) for i in range(queries)]


def test_margin_is_the_mean_over_draws():
    model = trained(spike=True)
    x, y = make_data(8, 2)
    attack = Square(model, eot=6, seed=0)
    offset = model.spike.stream.offset.clone()
    margin = attack.margin(x, y)
    model.spike.stream.offset.copy_(offset)
    logits = nk.ensemble.replica_logits(model, x, 6)
    own = logits[:, torch.arange(8), y]
    other = torch.stack([torch.cat([row[:c], row[c + 1:]]).max() for draw in logits for row, c in zip(draw, y)]).view(6, 8)
    torch.testing.assert_close(margin, (own - other).mean(0))


def test_seed_rng_and_mode():
    model = trained(spike=True)
    model.train()
    x, y = make_data(8, 3)
    rng = torch.get_rng_state()
    a = Square(model, eps=0.3, queries=5, eot=2, seed=3)(x, y)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    model.eval()
    model2 = trained()
    b = Square(model2, eps=0.3, queries=5, seed=3)(x, y)
    c = Square(model2, eps=0.3, queries=5, seed=3)(x, y)
    d = Square(model2, eps=0.3, queries=5, seed=4)(x, y)
    assert torch.equal(b, c) and not torch.equal(b, d) and a.shape == x.shape


def test_bad_arguments():
    model = trained()
    with pytest.raises(ValueError, match="queries must be an int >= 1"):
        Square(model, queries=0)
    with pytest.raises(ValueError, match=r"p_init must be in \(0, 1\]"):
        Square(model, p_init=2.0)
    with pytest.raises(ValueError, match=r"needs \(B, C, H, W\) inputs"):
        Square(model)(torch.rand(4, 144), torch.zeros(4, dtype=torch.long))
