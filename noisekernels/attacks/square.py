"""The Square attack, L-inf (Andriushchenko et al. 2020; fra31/auto-attack's square.py), with EOT.

A score-based random search: from vertical stripes of +-eps, each query changes one random
s x s square of every input to x +- eps (one sign per channel) and keeps the change when it lowers
the margin z_y - max_{j != y} z_j (targeted: max_{j != t} z_j - z_t). The square's side follows
auto-attack's schedule of p (the fraction of pixels changed), rescaled to the query budget. With
eot > 1 the margin of every query is the mean over eot noise draws, all in one batched pass of
the engine (auto-attack leaves EOT Square out: eot passes per query). Inputs whose mean margin is
<= 0 stop querying; what the attack returns is then judged by the attack's MC prediction on
independent noise (attack.robust).
"""

import math

import torch

from .. import ensemble
from ..random import uniform
from .base import Attack, _check_nonnegative, _check_positive_int

# auto-attack's schedule: p_init / 2**j after the (rescaled) iteration thresholds.
_P_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init, iteration, queries):
    """The fraction of pixels a query changes at `iteration` of a `queries` budget."""
    it = int(iteration / queries * 10000)
    halvings = sum(it > t for t in _P_THRESHOLDS)
    return p_init / 2**halvings


class Square(Attack):
    """Square(model, eps=8/255, queries=5000, p_init=0.8, eot=1)(x, y) for (B, C, H, W) inputs."""

    def __init__(self, model, eps=8 / 255, queries=5000, p_init=0.8, **kwargs):
        super().__init__(model, **kwargs)
        self.eps = _check_nonnegative(eps, "eps")
        self.queries = _check_positive_int(queries, "queries")
        self.p_init = _check_nonnegative(p_init, "p_init")
        if not 0 < self.p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
        self.robust = None

    @torch.no_grad()
    def margin(self, x, y):
        """The margin averaged over self.eot draws (one batched pass): > 0 where the defense holds."""
        logits = ensemble.replica_logits(self.model, x, self.eot)  # (eot, B, C)
        own = logits.gather(2, y.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(2)
        others = logits.scatter(2, y.view(1, -1, 1).expand(logits.shape[0], -1, 1), -torch.inf).amax(2)
        margin = others - own if self.targeted else own - others
        return margin.mean(0)

    def _uniform(self, shape, device, dtype):
        seed, offset = self.stream.reserve(math.prod(shape))
        return uniform(shape, seed, offset, dtype=dtype).to(device)

    def _signs(self, shape, x):
        return torch.where(self._uniform(shape, x.device, x.dtype) < 0.5, -1.0, 1.0).to(x.dtype)

    @torch.no_grad()
    def forward(self, x, y):
        if x.dim() != 4:
            raise ValueError(f"Square needs (B, C, H, W) inputs, got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        lo, hi = self.clip
        x_best = (x + self.eps * self._signs((b, c, 1, w), x)).clamp(lo, hi)
        margin = self.margin(x_best, y)
        rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        for i in range(self.queries):
            idx = (margin > 0).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            n = idx.numel()
            s = max(int(round(math.sqrt(p_schedule(self.p_init, i, self.queries) * h * w))), 1)
            s = min(s, h, w)
            corner = self._uniform((n, 2), x.device, torch.float32)
            top = (corner[:, 0] * (h - s + 1)).long().clamp(max=h - s).view(n, 1, 1, 1)
            left = (corner[:, 1] * (w - s + 1)).long().clamp(max=w - s).view(n, 1, 1, 1)
            square = ((rows.view(1, 1, h, 1) >= top) & (rows.view(1, 1, h, 1) < top + s)
                      & (cols.view(1, 1, 1, w) >= left) & (cols.view(1, 1, 1, w) < left + s))
            xs = x[idx]
            candidate = torch.where(square, xs + self.eps * self._signs((n, c, 1, 1), x), x_best[idx]).clamp(lo, hi)
            new_margin = self.margin(candidate, y[idx])
            better = new_margin < margin[idx]
            x_best[idx] = torch.where(better.view(n, 1, 1, 1), candidate, x_best[idx])
            margin[idx] = torch.where(better, new_margin, margin[idx])
        self.robust = ~self.succeeded(x_best, y)
        return x_best
