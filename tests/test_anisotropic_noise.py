"""A2SNN's anisotropic noise: draws with covariance L L^T, per-sample and batch-shared draws (per
replica), the WCA and max-entropy losses, the unit-norm projection, errors and torch.compile."""

import math

import pytest
import torch

import noisekernels as nk
from noisekernels.nn import AnisotropicNoise, max_entropy_loss, project_unit_rows_, wca_loss

L_FIXED = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [-0.3, 0.2, 0.4]])


def _layer(draw="sample"):
    layer = AnisotropicNoise(3, draw=draw, seed=11)
    with torch.no_grad():
        layer.L.copy_(L_FIXED + torch.triu(torch.ones(3, 3), 1) * 7)  # upper part must be ignored
    return layer


def test_draws_have_covariance_L_LT():
    n = 400_000
    z = _layer()(torch.zeros(n, 3)).detach().double()
    sigma = (L_FIXED @ L_FIXED.T).double()
    cov = torch.cov(z.T)
    # sd of an empirical covariance entry: sqrt((S_ii S_jj + S_ij^2) / n)
    sd = ((sigma.diagonal()[:, None] * sigma.diagonal()[None, :] + sigma.square()) / n).sqrt()
    assert ((cov - sigma).abs() < 5 * sd).all()
    assert z.mean(0).abs().max() < 5 * (sigma.diagonal().max() / n) ** 0.5


def test_batch_draw_is_shared_within_each_replica():
    layer = _layer("batch")
    x = torch.randn(6, 3)
    z = layer(x) - x
    assert torch.allclose(z, z[:1].expand(6, 3))
    with nk.replicas(3):
        z = (layer(x) - x).detach()
    for r in range(3):
        assert torch.allclose(z[2 * r:2 * r + 2], z[2 * r:2 * r + 1].expand(2, 3))
    assert not torch.allclose(z[0], z[2]) and not torch.allclose(z[2], z[4])
    per_sample = _layer("sample")(x) - x
    assert not torch.allclose(per_sample[0], per_sample[1])


def test_gradients_reach_only_the_lower_triangle():
    layer = _layer()
    x = torch.randn(5, 3, requires_grad=True)
    layer(x).square().sum().backward()
    assert torch.equal(layer.L.grad.triu(1), torch.zeros(3, 3)) and layer.L.grad.tril().abs().sum() > 0
    assert x.grad is not None


def test_losses_match_their_definitions():
    layer = _layer()
    sigma = (L_FIXED @ L_FIXED.T).double()
    w = torch.randn(10, 3)
    expected_wca = sum(math.log(float(wi.double() @ sigma @ wi.double())) for wi in w)
    assert math.isclose(wca_loss(layer, w).item(), expected_wca, rel_tol=1e-5)
    expected_me = 0.5 * torch.logdet(2 * math.pi * math.e * sigma).item()
    assert math.isclose(max_entropy_loss(layer).item(), expected_me, rel_tol=1e-5)
    (wca_loss(layer, w) + max_entropy_loss(layer)).backward()
    assert layer.L.grad is not None


def test_unit_norm_projection():
    head = torch.nn.Linear(3, 10)
    project_unit_rows_(head)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(10))


def test_eval_and_errors():
    layer = AnisotropicNoise(3, mc=False, seed=1).eval()
    x = torch.randn(2, 3)
    assert layer(x) is x
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3\)"):
        AnisotropicNoise(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="draw must be one of"):
        AnisotropicNoise(3, draw="channel")
    with pytest.raises(ValueError, match="dim must be an int >= 1"):
        AnisotropicNoise(0)
    with pytest.raises(ValueError, match="init_std must be a finite float > 0"):
        AnisotropicNoise(3, init_std=-1.0)
    with nk.replicas(4), pytest.raises(ValueError, match="replicas=4 must divide the batch size 6"):
        _layer("batch")(torch.randn(6, 3))


def test_compile_fullgraph():
    eager, other = _layer(), _layer()
    step = torch.compile(other, fullgraph=True)
    x = torch.randn(4, 3)
    a, b = step(x), step(x)
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, eager(x))
    torch.testing.assert_close(b, eager(x))
