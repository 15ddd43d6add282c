"""A2SNN's anisotropic learned noise (a2snn-anisotropic-noise.txt): z = x + L eps at the
penultimate features, eps ~ N(0, I), L lower-triangular and learnable (Sigma = L L^T), with the
paper's regularisers and the unit-norm projection of the classifier rows."""

import math

import torch
from torch import nn

from ..replicas import current as replica_count, expansion, noise_is_off, repeat_rows
from ..ops._args import check_floating_tensor
from ..random import normal
from ..stream import Stream

DRAWS = ("sample", "batch")


class AnisotropicNoise(nn.Module):
    """x + L eps for features x of shape (B, dim).

    draw="sample" (default, for MC use): one eps per sample. draw="batch": one eps shared by the
    batch, as the published code does; per replica inside noisekernels.replicas(n). The noise is
    part of the model (a stochastic network), so it is on in eval mode too unless mc=False.
    L starts at init_std * I.
    """

    def __init__(self, dim, init_std=1.0, draw="sample", mc=True, seed=None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if draw not in DRAWS:
            raise ValueError(f"draw must be one of {DRAWS}, got {draw!r}")
        if not (isinstance(init_std, (int, float)) and init_std > 0 and math.isfinite(init_std)):
            raise ValueError(f"init_std must be a finite float > 0, got {init_std!r}")
        self.dim, self.draw, self.mc = dim, draw, bool(mc)
        self.L = nn.Parameter(torch.eye(dim) * float(init_std))
        self.stream = Stream(seed)

    def scale_tril(self):
        """L, lower-triangular (the upper part of the parameter is ignored)."""
        return self.L.tril()

    def covariance(self):
        """Sigma = L L^T."""
        lower = self.scale_tril()
        return lower @ lower.T

    def forward(self, x):
        if not (self.training or self.mc) or noise_is_off():
            return x
        check_floating_tensor(x)
        x = repeat_rows(x, expansion(self))  # the engine's prefix sharing: B rows in, n*B out
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        draws = x.shape[0] if self.draw == "sample" else replica_count()
        if x.shape[0] == 0:
            return x.clone()
        if x.shape[0] % draws:
            raise ValueError(f"replicas={draws} must divide the batch size {x.shape[0]}")
        eps = normal((draws, self.dim), stream=self.stream, segments=replica_count(), dtype=x.dtype)
        z = eps @ self.scale_tril().to(x.dtype).T
        if draws != x.shape[0]:
            z = z.repeat_interleave(x.shape[0] // draws, dim=0)  # replica-major rows
        return x + z

    def extra_repr(self):
        return f"dim={self.dim}, draw={self.draw!r}, mc={self.mc}"


def wca_loss(noise, weight):
    """Weight-covariance alignment (eq. 4): sum_i ln(w_i^T Sigma w_i) over the classifier rows."""
    lower = noise.scale_tril()
    projected = weight @ lower  # w_i^T L, so w_i^T Sigma w_i = |w_i^T L|^2
    return torch.log(projected.square().sum(1)).sum()


def max_entropy_loss(noise):
    """Maximum entropy (eq. 2): 1/2 ln det(2 pi e Sigma) = d/2 ln(2 pi e) + sum_i ln |L_ii|."""
    return 0.5 * noise.dim * math.log(2 * math.pi * math.e) + noise.scale_tril().diagonal().abs().log().sum()


@torch.no_grad()
def project_unit_rows_(linear):
    """After each optimiser step: every classifier row w_i scaled to unit L2 norm (section 3.2)."""
    linear.weight.div_(linear.weight.norm(dim=1, keepdim=True))
    return linear
