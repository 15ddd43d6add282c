"""MCClassifier: the MC-averaged classifier as a module equals the loop of n passes (same streams)
in its values and its gradients, collapses to one pass on a deterministic model, runs inside
torchattacks' PGD and APGD unchanged, draws disjoint noise in two threads, and refuses bad
arguments before any draw."""

import copy
import threading

import pytest
import torch
import torchattacks
from torch import nn

import noisekernels as nk
from attack_models import make_data, trained
from loop_reference import restore, snapshot
from models import MODELS
from noisekernels.ensemble import MCClassifier

N = 6


def _model(name):
    torch.manual_seed(0)
    return MODELS[name]().eval()


def _loop_scores(model, x, n, output):
    """The loop's reference with autograd: n passes, combined the plain way."""
    logits = torch.stack([model(x) for _ in range(n)])
    if output == "logits":
        return logits.mean(0)
    probs = logits.softmax(-1).mean(0)
    return probs if output == "prob" else probs.log()


def _weighted_sum(scores):
    """A fixed linear function of the scores, so every output's gradient is compared."""
    return (scores * torch.cos(torch.arange(scores.numel(), dtype=scores.dtype) * 0.7).view_as(scores)).sum()


# Every output on a prefix-shared model; the log_prob on a replicated one and on the loop (weight noise).
@pytest.mark.parametrize("name, output", [("rs1", "log_prob"), ("rs1", "prob"), ("rs1", "logits"),
                                          ("skip", "log_prob"), ("weight-noise", "log_prob")])
def test_values_and_gradients_equal_the_loop(name, output):
    model, x = _model(name), torch.rand(4, 1, 28, 28)
    clf, params = MCClassifier(model, N, output), list(model.parameters())
    start = snapshot(model)
    xi = x.clone().requires_grad_()
    scores = clf(xi)
    grads = torch.autograd.grad(_weighted_sum(scores), [xi, *params])
    after = snapshot(model)
    restore(model, start)
    xr = x.clone().requires_grad_()
    ref = _loop_scores(model, xr, N, output)
    ref_grads = torch.autograd.grad(_weighted_sum(ref), [xr, *params])
    assert scores.shape == (4, 10)
    torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):  # to the input, then to every parameter
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(after, snapshot(model)))  # streams advance as the loop's


def test_each_forward_draws_fresh_noise_and_log_prob_is_finite_where_a_probability_underflows():
    model, x = _model("rs1"), torch.rand(3, 1, 28, 28)
    clf = MCClassifier(model, N)
    with torch.no_grad():
        first, second = clf(x), clf(x)
        assert not torch.allclose(first, second)
        torch.testing.assert_close(first.exp().sum(1), torch.ones(3))
        scaled = MCClassifier(nn.Sequential(model, _Scale(1e4)), N)(x)
    assert scaled.isfinite().all() and (scaled < -200).any()  # exp(-200) underflows: a plain log would give -inf


class _Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


@pytest.mark.parametrize("name", ["rs1", "weight-noise"])
def test_two_threads_draw_disjoint_noise_and_advance_the_streams_as_two_calls(name):
    model, x = _model(name), torch.rand(4, 1, 28, 28)
    clf = MCClassifier(model, N)
    start = snapshot(model)
    with torch.no_grad():
        clf(x), clf(x)
    two_calls = snapshot(model)
    restore(model, start)
    scores, ready = [None, None], threading.Barrier(2)

    def call(i):
        ready.wait()
        with torch.no_grad():
            scores[i] = clf(x)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(map(torch.equal, snapshot(model), two_calls))
    assert not torch.allclose(scores[0], scores[1])  # no counter handed out twice
    for s in scores:
        torch.testing.assert_close(s.exp().sum(1), torch.ones(4))


def test_a_deterministic_model_runs_one_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).eval()
    x, calls = torch.rand(3, 1, 4, 4), []
    model.register_forward_hook(lambda *_: calls.append(1))
    clf = MCClassifier(model, 8, "prob")
    clf(x)  # the first call plans
    calls.clear()
    xi = x.clone().requires_grad_()
    probs = clf(xi)
    assert len(calls) == 1
    torch.testing.assert_close(probs, model(x).softmax(-1))
    xr = x.clone().requires_grad_()
    ref_grad = torch.autograd.grad(_weighted_sum(model(xr).softmax(-1)), xr)[0]
    torch.testing.assert_close(torch.autograd.grad(_weighted_sum(probs), xi)[0], ref_grad)
    torch.testing.assert_close(MCClassifier(model, 8)(x), model(x).log_softmax(-1))
    torch.testing.assert_close(MCClassifier(model, 8, "logits")(x), model(x))


def test_the_model_is_a_submodule():
    model = _model("rs1")
    clf = MCClassifier(model, 4).train()
    assert model.training and clf.model is model
    clf.eval()
    assert not model.training
    assert set(clf.state_dict()) == {f"model.{k}" for k in model.state_dict()}
    assert "n=4, output='log_prob'" in repr(clf)
    assert clf.to(torch.float64).model.fc.weight.dtype == torch.float64


def test_a_state_dict_round_trip_repeats_a_forward():
    clf, x = MCClassifier(_model("rs1"), 4), torch.rand(3, 1, 28, 28)
    state = copy.deepcopy(clf.state_dict())  # weights and every noise layer's stream position
    with torch.no_grad():
        first = clf(x)
        torch.manual_seed(1)
        other = MCClassifier(MODELS["rs1"]().eval(), 4)  # another seed: other weights and streams
        assert not torch.allclose(other(x), first)
        other.load_state_dict(state)
        torch.testing.assert_close(other(x), first)
        clf.load_state_dict(state)
        torch.testing.assert_close(clf(x), first)
        assert not torch.allclose(clf(x), first)  # and on from there: fresh noise


@pytest.mark.parametrize("tool", ["PGD", "APGD"])
def test_torchattacks_runs_unchanged_and_lowers_accuracy(tool):
    model = trained(spike=True)
    x, y = make_data(64, 7)
    clf = MCClassifier(model, 8)
    start = snapshot(model)
    if tool == "PGD":
        x_adv = torchattacks.PGD(clf, eps=0.25, alpha=0.05, steps=10, random_start=False)(x, y)
    else:
        x_adv = torchattacks.APGD(clf, eps=0.25, steps=10, n_restarts=1)(x, y)
    assert not any(map(torch.equal, snapshot(model), start))  # the attack drew through the model's streams
    assert (x_adv - x).abs().max() <= 0.25 + 1e-6
    clean = nk.metrics.accuracy(model, x, y, n=32)
    robust = nk.metrics.accuracy(model, x_adv, y, n=32)
    assert clean >= 0.9 and robust <= clean - 0.3, (clean, robust)


def test_bad_arguments_are_refused_before_any_draw():
    model = _model("rs1")
    for n in (0, -1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            MCClassifier(model, n)
    with pytest.raises(ValueError, match=r"output must be one of \('log_prob', 'prob', 'logits'\), got 'probs'"):
        MCClassifier(model, 4, "probs")
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got function"):
        MCClassifier(lambda t: t, 4)
    images = nn.Sequential(nk.nn.GaussianNoise(0.1, mc=True), nn.Conv2d(1, 2, 3)).eval()
    start = snapshot(images)
    with pytest.raises(ValueError, match=r"MCClassifier needs \(B, C\) logits from the model, got outputs of shape"):
        MCClassifier(images, 4)(torch.rand(2, 1, 8, 8))
    assert all(map(torch.equal, snapshot(images), start))
    with pytest.raises(ValueError, match="x must be a batched tensor"):
        MCClassifier(model, 4)(torch.tensor(1.0))
