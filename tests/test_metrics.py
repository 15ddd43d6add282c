"""Robustness metrics against their definitions, on the small trained models."""

import math

import pytest
import torch

from attack_models import make_data, trained
from noisekernels import metrics
from noisekernels.attacks import FGSM, PGD


@pytest.fixture(scope="module")
def data():
    return make_data(64, 21)


def test_accuracy_modes(data):
    model, (x, y) = trained(spike=True), data
    for mode in ("single", "mean", "vote"):
        acc = metrics.accuracy(model, x, y, mode=mode, n=8)
        assert 0.9 <= acc <= 1.0
    with pytest.raises(ValueError, match="mode must be one of"):
        metrics.accuracy(model, x, y, mode="median")


def test_robust_accuracy_falls_with_eps(data):
    model, (x, y) = trained(), data
    accs = metrics.robust_accuracy(model, x, y, lambda e: PGD(model, eps=e, alpha=e / 4, steps=10), [0.0, 0.2, 0.4], mode="single")
    assert accs[0.0] == metrics.accuracy(model, x, y, mode="single") and accs[0.4] <= accs[0.2] <= accs[0.0]


def test_l2_buckets_and_empirical_robustness(data):
    model, (x, y) = trained(), data
    x_adv = PGD(model, eps=0.3, alpha=0.075, steps=10)(x, y)
    success = model(x_adv).argmax(1) != y
    buckets = metrics.l2_distortion(x, x_adv, success)
    assert sum(buckets.values()) == int(success.sum())
    l2 = (x_adv - x).flatten(1).norm(dim=1)
    assert buckets[(0.5, 1.0)] == int(((l2 >= 0.5) & (l2 < 1.0) & success).sum())
    rho = metrics.empirical_robustness(x, x_adv, success)
    assert math.isclose(rho, (l2 / x.flatten(1).norm(dim=1))[success].mean().item(), rel_tol=1e-6)
    assert math.isnan(metrics.empirical_robustness(x, x, torch.zeros_like(success)))


def test_loss_sensitivity_is_the_mean_per_input_gradient_norm(data):
    model, (x, y) = trained(), data
    norms = []
    for i in range(8):
        xi = x[i:i + 1].clone().requires_grad_()
        torch.nn.functional.cross_entropy(model(xi), y[i:i + 1]).backward()
        norms.append(xi.grad.norm())
    assert math.isclose(metrics.loss_sensitivity(model, x[:8], y[:8]), torch.stack(norms).mean().item(), rel_tol=1e-4)


def test_prediction_stability(data):
    model, (x, _) = trained(), data
    assert metrics.prediction_stability(model, x, 0.0, trials=3, mode="single") == 1.0
    high = metrics.prediction_stability(model, x, 0.5, trials=5, mode="single")
    low = metrics.prediction_stability(model, x, 20.0, trials=5, mode="single")
    assert low < high <= 1.0


def test_obfuscation_report_on_an_honest_model(data):
    model, (x, y) = trained(), data
    report = metrics.obfuscation_report(model, x, y, [0.15, 0.25], surrogate=trained(seed=3), mode="single", n=1)
    assert set(report) == {"iterative beats one-step", "white-box beats transfer", "unbounded attack reaches 100%",
                           "random sampling does not beat gradients", "larger eps never helps the defender"}
    assert all(passed for passed, _ in report.values()), report
    fgsm = (model(FGSM(model, eps=0.15)(x, y)).argmax(1) != y).double().mean().item()
    assert report["iterative beats one-step"][1]["fgsm"] == fgsm


def test_obfuscation_report_leaves_the_global_rng_alone(data):
    model, (x, y) = trained(spike=True), data
    rng = torch.get_rng_state()
    metrics.obfuscation_report(model, x[:16], y[:16], [0.15], steps=2, n=4)
    assert torch.equal(torch.get_rng_state(), rng)


def test_metric_floats_are_exact_ratios(data):
    model, (x, y) = trained(), data
    x, y = x[:25], y[:25].clone()
    y[:3] = (model(x[:3]).argmax(1) + 1) % 4  # exactly three wrong labels
    correct = int((model(x).argmax(1) == y).sum())
    acc = metrics.accuracy(model, x, y, mode="single")
    assert acc == correct / 25 and repr(acc) == repr(correct / 25)  # e.g. 0.88, not 0.8799999952316284


def test_the_module_exports_only_metrics():
    namespace = {}
    exec("from noisekernels.metrics import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(metrics.__all__)
    assert set(metrics.__all__) == {"MODES", "L2_BUCKETS", "NO_CLASS", "Proportion", "accuracy", "decide", "vote_counts", "empirical_robustness", "l2_distortion",
                                    "loss_sensitivity", "obfuscation_report", "prediction_stability", "predict",
                                    "robust_accuracy"}
    assert not any(hasattr(metrics, name) for name in ("PGD", "FGSM", "Stream", "normal", "uniform"))
