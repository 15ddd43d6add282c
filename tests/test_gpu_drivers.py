"""The engine, an attack and certification on the device's tensors (`make gpu-check` runs the `cuda`
cases; the `cpu` ones check the same assertions everywhere): MC logits and EOT gradients equal the
loop of n passes from the same streams, PGD-EOT stays in its budget and lowers the MC accuracy,
and the certification counts equal the paper's sampling loop on the same noise."""

import numpy as np
import pytest
import torch
from torch import nn

import noisekernels as nk
from attack_models import make_data, trained
from conftest import HAS_CUDA
from loop_reference import loop_eot, loop_logits, restore, snapshot
from models import MODELS
from noisekernels import certify, ensemble
from noisekernels.attacks import PGD
from test_certify import SIGMA, paper_sample_counts

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU"))]


def _model(name, device):
    torch.manual_seed(0)
    return MODELS[name]().to(device).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["rs1", "rse", "a2snn", "skip"])
def test_engine_equals_the_loop(name, device):
    model = _model(name, device)
    x, y = torch.rand(5, 1, 28, 28, device=device), torch.tensor([1, 2, 3, 4, 5], device=device)
    start = snapshot(model)
    batched = ensemble.mc_predict(model, x, 7, reduce="none")
    restore(model, start)
    torch.testing.assert_close(batched, loop_logits(model, x, 7), rtol=1e-4, atol=1e-5)
    restore(model, start)
    grad, loss = ensemble.eot_grad(model, nn.functional.cross_entropy, x, y, 6)
    restore(model, start)
    ref_grad, ref_loss = loop_eot(model, x, y, 6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert batched.device.type == grad.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_pgd_eot_on_the_device(device):
    model = trained().to(device)
    x, y = (t.to(device) for t in make_data(32, 3))
    x_adv = PGD(model, eps=0.3, alpha=0.05, steps=10, eot=4, judge_n=8, seed=0)(x, y)
    assert x_adv.device.type == device
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert nk.metrics.accuracy(model, x_adv, y, n=8) < nk.metrics.accuracy(model, x, y, n=8)


@pytest.mark.parametrize("device", DEVICES)
def test_certify_counts_equal_the_paper_loop_on_the_device(device):
    model = trained().to(device)
    x = make_data(6, 1)[0].to(device)
    ours = certify.sample_counts(model, x, SIGMA, 300, nk.Stream(11).to(device), batch_size=40 * x.shape[0])
    stream = nk.Stream(11).to(device)
    # The paper's loop counts on the host: its rows there, the classifier on the device.
    ref = paper_sample_counts(lambda rows: model(rows.to(device)).cpu(), x.cpu(), SIGMA, 300, 40,
                              lambda shape: nk.random.normal(shape, stream=stream).cpu())
    assert ours.device.type == device
    np.testing.assert_array_equal(ours.cpu().numpy(), ref)
