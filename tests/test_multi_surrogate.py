"""MultiSurrogate on any base attack: targeted C&W with kappa (random-spiking.txt 5.4) and the
minimal incremental FGSM; the validation and rotation rules; one surrogate without validation is
the plain attack."""

import pytest
import torch

import noisekernels as nk
from attack_models import CLASSES, make_data, trained
from noisekernels.attacks import CW, PGD, MinimalFGSM, MultiSurrogate, rotate_targets
from noisekernels.attacks.multi_surrogate import _SurrogateSum
from noisekernels.models import Dropout

CW_OPTS = dict(c=0.5, kappa=2.0, steps=12, lr=0.05, binary_steps=2, targeted=True, seed=0)


@pytest.fixture(scope="module")
def data():
    x, y = make_data(24, 3)
    return x, y, (y + 1) % CLASSES


def _noisy(seed):
    return torch.nn.Sequential(nk.nn.GaussianNoise(0.2, seed=seed), trained(seed=seed)).eval()


def test_one_surrogate_without_validation_is_plain_cw(data):
    x, _, t = data
    plain = CW(_noisy(7), eot=2, **CW_OPTS)
    multi = MultiSurrogate([_noisy(7)], [], k=0, attack=CW, eot=2, **CW_OPTS)
    x_plain, x_multi = plain(x, t), multi(x, t)
    torch.testing.assert_close(x_multi, x_plain, rtol=0, atol=0)
    assert torch.equal(multi.success, plain.success) and plain.success.any()
    torch.testing.assert_close(multi.base.l2, plain.l2, rtol=0, atol=0)


def test_summed_cw_hinge_is_the_sum_of_each_surrogates_hinge():
    models = [trained(seed=s) for s in (1, 2, 3)]
    multi = MultiSurrogate(models, [], k=0, attack=CW, kappa=3.0, targeted=True)
    single = CW(models[0], kappa=3.0, targeted=True)
    logits = torch.randn(4, 5, 3, CLASSES)  # (draws, rows, surrogates, classes)
    y = torch.randint(0, CLASSES, (5,))
    expected = sum(single._hinge(logits[:, :, s], y) for s in range(3))
    torch.testing.assert_close(multi.base._hinge(logits, y), expected)
    fooled_all = torch.stack([single._fooled(logits[:, :, s], y) for s in range(3)]).all(0)
    assert torch.equal(multi.base._fooled(logits, y), fooled_all)


def test_validation_rule_with_cw(data):
    x, _, t = data
    pool = [trained(seed=s) for s in range(1, 6)]
    attack = MultiSurrogate(pool[:2], pool[2:5], k=2, attack=CW, **CW_OPTS)
    x_adv = attack(x, t)
    hits = lambda m: m(x_adv).argmax(1) == t  # noqa: E731  (deterministic models: one pass is the MC prediction)
    votes = sum(hits(v).long() for v in pool[2:5])
    assert torch.equal(attack.kept, votes >= 2)
    deployed = hits(pool[0]) & hits(pool[1]) & (votes >= 2)
    assert torch.equal(attack.success, deployed) and deployed.any() and not deployed.all()
    l2 = (x_adv - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(attack.base.l2, torch.where(deployed, l2, torch.full_like(l2, torch.inf)))


def test_rotation_rule(data):
    x, _, t = data
    pool = [trained(seed=s) for s in range(1, 6)]
    results = rotate_targets(pool, x, t, t=2, v=2, k=1, rotations=3, attack=CW, **CW_OPTS)
    assert [r["target"] for r in results] == [0, 1, 2]
    for i, r in enumerate(results):
        # Reference: target i, surrogates the next two models (cyclically), validators the two after.
        role = [pool[(i + j) % 5] for j in range(1, 5)]
        ref = MultiSurrogate(role[:2], role[2:], k=1, attack=CW, **CW_OPTS)
        adv = ref(x, t)
        hits = lambda m: m(adv).argmax(1) == t  # noqa: E731
        deployed = hits(role[0]) & hits(role[1]) & ((hits(role[2]).long() + hits(role[3]).long()) >= 1)
        assert r["kept"] == int(deployed.sum()) > 0
        fooled = hits(pool[i])[deployed]
        assert r["fooled"] == fooled.tolist()
        assert r["transfer"] == pytest.approx(fooled.double().mean().item())
        torch.testing.assert_close(torch.tensor(r["l2"]), (adv - x).flatten(1).norm(dim=1)[deployed])
    with pytest.raises(ValueError, match="rotations must be at most the pool size 5"):
        rotate_targets(pool, x, t, t=2, v=2, k=1, rotations=6, attack=CW, **CW_OPTS)


def test_multi_surrogate_refuses_other_attacks():
    with pytest.raises(ValueError, match="attack must be one of"):
        MultiSurrogate([trained()], [], k=0, attack=nk.attacks.Square)


def test_minimal_fgsm_matches_a_grid_search(data):
    x, y, _ = data
    model = trained()
    attack = MinimalFGSM(model, eps_step=0.02, eps_max=0.5, judge_n=1)
    x_adv = attack(x, y)
    # Reference: the sign of the cross-entropy gradient at x, eps grown on the grid until wrong.
    xr = x.clone().requires_grad_()
    torch.nn.functional.cross_entropy(model(xr), y).backward()
    direction = xr.grad.sign()
    for i in range(len(y)):
        eps = next((k * 0.02 for k in range(1, 26)
                    if model((x[i:i + 1] + k * 0.02 * direction[i:i + 1]).clamp(0, 1)).argmax(1) != y[i]), None)
        if eps is None:
            assert attack.eps[i] == float("inf") and not attack.success[i]
        else:
            assert attack.eps[i] == pytest.approx(eps) and attack.success[i]
            torch.testing.assert_close(x_adv[i], (x[i] + eps * direction[i]).clamp(0, 1))
    assert attack.success.any()


def test_multi_surrogate_with_pgd_still_sums_losses(data):
    x, y, _ = data
    models = [trained(seed=s) for s in (1, 2)]
    attack = MultiSurrogate(models, [], k=0, attack=PGD, eps=0.1, alpha=0.02, steps=1, random_start=False)
    xr = x.clone().requires_grad_()
    sum(torch.nn.functional.cross_entropy(m(xr), y) for m in models).backward()
    torch.testing.assert_close(attack.gradient(x, y), xr.grad, rtol=1e-5, atol=1e-7)


def test_stacked_surrogates_run_in_their_current_mode():
    """The stacked forward runs a copy of the first surrogate's modules: it must follow train/eval
    changes made after construction (BatchNorm's running statistics), as the surrogates do."""
    torch.manual_seed(0)
    nn = torch.nn
    models = [nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)) for _ in range(2)]
    for m in models:
        m(torch.randn(64, 4) * 3 + 1)  # running statistics far from a test batch's
    both = _SurrogateSum(models).eval()
    assert both.stacked
    x = torch.randn(5, 4)
    torch.testing.assert_close(both(x), torch.stack([m(x) for m in models], 1))


def test_surrogates_drawing_from_streams_are_not_stacked():
    """The zoo's Dropout draws from a Stream: under vmap one draw would serve every surrogate, so such
    surrogates run in a loop, each drawing its own mask."""
    models = [torch.nn.Sequential(torch.nn.Linear(4, 4), Dropout(0.5, seed=s)) for s in (1, 2)]
    both = _SurrogateSum(models)
    assert not both.stacked
    both(torch.randn(5, 4))
    assert all(m[1].stream.offset.item() > 0 for m in models)
