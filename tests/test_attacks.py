"""FGSM, PGD, C&W and the multi-surrogate attack: step for step equal to torchattacks on a
deterministic model, in agreement with torchattacks.EOTPGD on a noisy one, and well behaved."""

import math

import pytest
import torch
import torchattacks

import noisekernels as nk
from attack_models import make_data, trained
from noisekernels.attacks import CW, FGSM, PGD, MultiSurrogate, rotate_targets
from noisekernels.attacks.multi_surrogate import _SurrogateSum


@pytest.fixture(scope="module")
def data():
    return make_data(64, 7)


@pytest.mark.parametrize("steps", [1, 3, 10])
@pytest.mark.parametrize("targeted", [False, True])
def test_pgd_linf_matches_torchattacks(data, steps, targeted):
    model, (x, y) = trained(), data
    labels = (y + 1) % 4 if targeted else y
    ours = PGD(model, eps=0.1, alpha=0.02, steps=steps, random_start=False, targeted=targeted)(x, labels)
    ref = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=steps, random_start=False)
    if targeted:
        ref.set_mode_targeted_by_label(quiet=True)
    torch.testing.assert_close(ours, ref(x, labels), rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 5])
def test_pgd_l2_matches_torchattacks(data, steps):
    model, (x, y) = trained(), data
    ours = PGD(model, eps=0.5, alpha=0.1, steps=steps, random_start=False, norm="L2")(x, y)
    ref = torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=steps, random_start=False)(x, y)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_fgsm_matches_torchattacks(data):
    model, (x, y) = trained(), data
    torch.testing.assert_close(FGSM(model, eps=0.08)(x, y), torchattacks.FGSM(model, eps=0.08)(x, y), rtol=0, atol=1e-6)


def test_eot_pgd_agrees_with_torchattacks_eotpgd():
    model = trained(spike=True)
    x, y = make_data(300, 11)
    judge = dict(mode="mean", n=20)
    torch.manual_seed(0)
    ours = PGD(model, eps=0.23, alpha=0.0575, steps=5, eot=10, judge_n=20)(x, y)
    ref = torchattacks.EOTPGD(model, eps=0.23, alpha=0.0575, steps=5, eot_iter=10)(x, y)
    acc_ours = nk.metrics.accuracy(model, ours, y, **judge)
    acc_ref = nk.metrics.accuracy(model, ref, y, **judge)
    print(f"robust accuracy: noisekernels {acc_ours:.3f}, torchattacks.EOTPGD {acc_ref:.3f}")
    clean = nk.metrics.accuracy(model, x, y, **judge)
    assert acc_ours < clean - 0.2  # the attack works
    p = (acc_ours + acc_ref) / 2
    assert abs(acc_ours - acc_ref) <= 4 * math.sqrt(2 * p * (1 - p) / len(y)) + 0.01


def test_cw_l2_no_larger_than_torchattacks(data):
    model, (x, y) = trained(), data
    ours = CW(model, c=10.0, kappa=0.0, steps=25, binary_steps=4, lr=0.05)  # 100 steps, as the reference
    x_ours = ours(x, y)
    x_ref = torchattacks.CW(model, c=10.0, kappa=0, steps=100, lr=0.05)(x, y)
    ok_ours = ours.succeeded(x_ours, y)
    ok_ref = model(x_ref).argmax(1) != y
    both = ok_ours & ok_ref
    assert ok_ours.sum() >= ok_ref.sum() and both.sum() > 10
    l2_ours = (x_ours - x).flatten(1).norm(dim=1)
    l2_ref = (x_ref - x).flatten(1).norm(dim=1)
    assert l2_ours[both].mean() <= l2_ref[both].mean() * 1.02
    torch.testing.assert_close(ours.l2[ok_ours], l2_ours[ok_ours])
    assert torch.isinf(ours.l2[~ok_ours]).all()


def test_attacks_leave_mode_rng_and_streams_alone():
    model = trained(spike=True)
    model.train()  # no BatchNorm: batching is allowed in training mode
    x, y = make_data(8, 3)
    rng = torch.get_rng_state()  # neither building an attack without a seed nor running one touches it
    attacks = (FGSM(model, eot=3), PGD(model, steps=2, eot=3), CW(model, steps=2, binary_steps=1, eot=2))
    offset = model.spike.stream.offset.clone()
    for attack in attacks:
        attack(x, y)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert model.spike.stream.offset > offset  # the noise streams advance as in any forward pass
    model.eval()


def test_unseeded_attacks_get_distinct_streams_without_touching_the_global_rng(data):
    model, (x, y) = trained(), data
    rng = torch.get_rng_state()
    a, b = PGD(model, steps=0)(x, y), PGD(model, steps=0)(x, y)
    assert torch.equal(torch.get_rng_state(), rng) and not torch.equal(a, b)


def test_random_start_comes_from_the_attack_stream(data):
    model, (x, y) = trained(), data
    a = PGD(model, steps=0, seed=5)(x, y)
    b = PGD(model, steps=0, seed=5)(x, y)
    c = PGD(model, steps=0, seed=6)(x, y)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a - x).abs() <= 8 / 255 + 1e-6).all()
    l2 = PGD(model, eps=0.3, steps=0, norm="L2", seed=1)(x, y)
    assert ((l2 - x).flatten(1).norm(dim=1) <= 0.3 + 1e-5).all()


def test_stacked_surrogates_equal_the_loop(data):
    models = [trained(seed=s) for s in (1, 2, 3)]
    x, _ = data
    stacked = _SurrogateSum(models)
    assert stacked.stacked
    torch.testing.assert_close(stacked(x), torch.stack([m(x) for m in models], 1), rtol=1e-5, atol=1e-5)


def test_multi_surrogate_validation_and_rotation(data):
    pool = [trained(seed=s) for s in range(1, 6)]
    x, y = data
    attack = MultiSurrogate(pool[1:3], pool[3:5], k=2, eps=0.2, alpha=0.04, steps=10)
    x_adv = attack(x, y)
    votes = sum((v(x_adv).argmax(1) != y).long() for v in pool[3:5])
    assert torch.equal(attack.kept, votes >= 2) and attack.kept.any()
    kept_transfer = (pool[0](x_adv[attack.kept]).argmax(1) != y[attack.kept]).float().mean()
    assert kept_transfer > 0.5
    results = rotate_targets(pool, x, y, t=2, v=2, k=1, eps=0.25, alpha=0.05, steps=10)
    assert [r["target"] for r in results] == list(range(5)) and all(r["kept"] > 0 for r in results)


def test_bad_arguments():
    model = trained()
    with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
        PGD(model, eps=-1.0)
    with pytest.raises(ValueError, match="norm must be one of"):
        PGD(model, norm="L1")
    with pytest.raises(ValueError, match="eot must be an int >= 1"):
        FGSM(model, eot=0)
    with pytest.raises(ValueError, match=r"k=3 must be at most the number of validators \(2\)"):
        MultiSurrogate([model], [model, model], k=3)
    with pytest.raises(ValueError, match="y must be a tensor of x's batch size 4"):
        FGSM(model)(torch.rand(4, 1, 12, 12), torch.tensor([1]))


def _noisy(sigma=0.35):
    """A trained model behind heavy input noise: single draws are often wrong, the MC mean rarely."""
    return torch.nn.Sequential(nk.nn.GaussianNoise(sigma, seed=4), trained()).eval()


def test_cw_success_on_a_noisy_model_agrees_with_an_independent_mc_check(data):
    model, (x, y) = _noisy(), data
    cw = CW(model, c=0.5, steps=15, binary_steps=2, lr=0.05, eot=1)
    x_adv = cw(x, y)
    independent = nk.metrics.predict(model, x_adv, mode="mean", n=200) != y
    assert cw.success.shape == y.shape and torch.isfinite(cw.l2).eq(cw.success).all()
    agree = (cw.success == independent).double().mean().item()
    assert agree >= 0.9, (agree, cw.success.double().mean().item(), independent.double().mean().item())


@pytest.mark.parametrize("judge", ["mean", "vote"])
def test_pgd_success_is_judged_by_its_mc_prediction(data, judge):
    model, (x, y) = _noisy(), data
    attack = PGD(model, eps=0.1, alpha=0.025, steps=3, eot=2, judge_n=64, judge=judge)
    x_adv = attack(x, y)
    independent = nk.metrics.predict(model, x_adv, mode=judge, n=400) != y
    assert (attack.success == independent).double().mean().item() >= 0.9
    det = PGD(trained(), eps=0.1, alpha=0.025, steps=3)
    x_det = det(x, y)
    assert torch.equal(det.success, trained()(x_det).argmax(1) != y)


def _noisy_surrogate(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(nk.nn.GaussianNoise(0.3, seed=seed), trained(seed=seed)).eval()


def test_multi_surrogate_sees_its_surrogates_noise(data):
    x, y = data[0][:8], data[1][:8]
    surrogates = [_noisy_surrogate(s) for s in (1, 2)]
    attack = MultiSurrogate(surrogates, [], k=0, eps=0.1, alpha=0.02, steps=1, eot=10)
    assert len(attack.summed.state_dict()) > 0
    streams = [m.stream for s in surrogates for m in s.modules() if isinstance(m, nk.nn.GaussianNoise)]
    start = [st.offset.clone() for st in streams]
    grad = attack.gradient(x, y)
    for st, o in zip(streams, start):
        st.offset.copy_(o)
    loop = []
    for _ in range(10):
        xi = x.clone().requires_grad_()
        loss = sum(torch.nn.functional.cross_entropy(s(xi), y) for s in surrogates)
        loop.append(torch.autograd.grad(loss, xi)[0])
    torch.testing.assert_close(grad, torch.stack(loop).mean(0), rtol=1e-4, atol=1e-6)
    one = MultiSurrogate(surrogates, [], k=0, eps=0.1, alpha=0.02, steps=1, eot=1).gradient(x, y)
    assert not torch.allclose(grad, one)


def test_multi_surrogate_refuses_batch_statistics(data):
    bn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(),
                             torch.nn.Linear(2 * 10 * 10, 4)).train()
    attack = MultiSurrogate([bn, trained()], [], k=0, eps=0.1, alpha=0.02, steps=1)
    with pytest.raises(ValueError, match="BatchNorm2d at 'surrogates.0.1' is in training mode"):
        attack(*data)


def test_perturb_crafts_the_same_batch_without_judging(data):
    model, (x, y) = trained(spike=True), data
    a, b = PGD(model, steps=2, eot=2, seed=3), PGD(model, steps=2, eot=2, seed=3)
    offset = model.spike.stream.offset.clone()
    crafted = a.perturb(x, y)
    used = model.spike.stream.offset - offset
    model.spike.stream.offset.copy_(offset)
    assert a.success is None and torch.equal(crafted, b(x, y)) and b.success is not None
    assert model.spike.stream.offset - offset > used  # the verdict drew fresh noise past the attack's


def test_cw_leaves_the_models_gradients_alone(data):
    model, (x, y) = trained(spike=True), data
    for p in model.parameters():
        p.grad = None
    CW(model, steps=2, binary_steps=1, eot=2)(x[:8], y[:8])
    assert all(p.grad is None for p in model.parameters())


class _NaNWhereLarge(torch.nn.Module):
    """Logits (x0, 0, -1) for rows whose first input is <= 0.5, all NaN above it."""

    def forward(self, x):
        first = x.flatten(1)[:, :1]
        logits = torch.cat([first, torch.zeros_like(first), -torch.ones_like(first)], 1)
        return torch.where(first > 0.5, torch.nan, logits)


@pytest.mark.parametrize("judge", ["mean", "vote"])
def test_nan_logits_are_never_a_correct_verdict(judge):
    x = torch.tensor([[0.2, 0.0], [0.9, 0.0], [0.4, 1.0]])
    attack = PGD(_NaNWhereLarge(), eps=0.0, steps=1, judge_n=4, judge=judge, seed=0)
    assert attack.predict(x).tolist() == [0, nk.ensemble.NO_CLASS, 0]  # argmax would say class 0 for the NaN row
    attack(x, torch.zeros(3, dtype=torch.long))
    assert attack.success.tolist() == [False, True, False]  # the NaN row is not classified correctly
    targeted = PGD(_NaNWhereLarge(), eps=0.0, steps=1, judge_n=4, judge=judge, targeted=True, seed=0)
    targeted(x, torch.zeros(3, dtype=torch.long))
    assert targeted.success.tolist() == [True, False, True]  # nor does it reach a target
