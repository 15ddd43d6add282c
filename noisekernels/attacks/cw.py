"""Carlini-Wagner L2 (random-spiking.txt 2.1; random-self-ensemble.txt eq. 2-3) with EOT.

Minimises |x' - x|^2 + c * f(x') over w, x' = lo + (hi - lo) (tanh(w) + 1) / 2, with Adam, where
f averages over `eot` noise draws the hinge max(Z_y - max_{j != y} Z_j, -kappa) (untargeted) or
max(max_{j != t} Z_j - Z_t, -kappa) (targeted); the draws come from one batched pass. A binary
search over c (binary_steps rounds) keeps, per input, the candidate of smallest L2 whose step's
draws (their mean prediction) were fooled. Those draws selected the candidate, so they cannot
judge it: attack.success comes from an independent MC prediction afterwards, and attack.l2 is
inf wherever that prediction was not fooled.
"""

import torch

from .. import ensemble
from .base import Attack, _check_nonnegative, _check_positive_int


class CW(Attack):
    """CW(model, c=1e-2, kappa=0, steps=100, lr=1e-2, binary_steps=5, eot=1)(x, y) returns the best
    candidate per input (x where none was found); attack.success and attack.l2 (inf where not
    successful) are judged by an MC prediction on fresh noise."""

    def __init__(self, model, c=1e-2, kappa=0.0, steps=100, lr=1e-2, binary_steps=5, **kwargs):
        super().__init__(model, **kwargs)
        self.c = _check_nonnegative(c, "c")
        self.kappa = _check_nonnegative(kappa, "kappa")
        self.steps = _check_positive_int(steps, "steps")
        self.lr = _check_nonnegative(lr, "lr")
        self.binary_steps = _check_positive_int(binary_steps, "binary_steps")
        self._best_l2 = None

    @property
    def l2(self):
        """Each input's L2 distortion where the attack succeeded (independently judged), else inf."""
        if self._best_l2 is None:
            return None
        return torch.where(self.success, self._best_l2, torch.full_like(self._best_l2, torch.inf))

    def _to_x(self, w):
        lo, hi = self.clip
        return lo + (hi - lo) * (torch.tanh(w) + 1) / 2

    def _to_w(self, x):
        lo, hi = self.clip
        return torch.atanh(((x - lo) / (hi - lo) * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))

    def _hinge(self, logits, y):
        """f averaged over the (n, B, C) draws."""
        one_hot = torch.nn.functional.one_hot(y, logits.shape[-1]).bool()
        real = logits.masked_select(one_hot.expand_as(logits)).view(logits.shape[:2])
        other = logits.masked_fill(one_hot, -torch.inf).amax(-1)
        margin = other - real if self.targeted else real - other
        return margin.clamp(min=-self.kappa).mean(0)

    def _fooled(self, logits, y):
        """Selection: is the mean prediction of this step's draws fooled?"""
        pred = torch.softmax(logits, -1).mean(0).argmax(-1)
        return pred == y if self.targeted else pred != y

    def forward(self, x, y):
        batch = x.shape[0]
        lower = torch.zeros(batch, device=x.device)
        upper = torch.full((batch,), 1e10, device=x.device)
        c = torch.full((batch,), self.c, device=x.device)
        best_l2 = torch.full((batch,), torch.inf, device=x.device)
        best = x.clone()
        w0 = self._to_w(x)
        shape = (-1,) + (1,) * (x.dim() - 1)
        for _ in range(self.binary_steps):
            w = w0.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=self.lr)
            found = torch.zeros(batch, dtype=torch.bool, device=x.device)
            for _ in range(self.steps):
                x_adv = self._to_x(w)
                l2sq = (x_adv - x).flatten(1).square().sum(1)
                logits = ensemble.replica_logits(self.model, x_adv, self.eot)
                loss = l2sq.sum() + (c * self._hinge(logits, y)).sum()
                # Gradient for w alone: the model's parameters (and any pending .grad) are left alone.
                (w.grad,) = torch.autograd.grad(loss, [w])
                optimizer.step()
                with torch.no_grad():
                    ok = self._fooled(logits.detach(), y)
                    l2 = l2sq.detach().sqrt()
                    better = ok & (l2 < best_l2)
                    best_l2 = torch.where(better, l2, best_l2)
                    best = torch.where(better.view(shape), x_adv.detach(), best)
                    found |= ok
            # Binary search: a success lowers c's upper bound; a failure raises the lower bound.
            upper = torch.where(found, torch.minimum(upper, c), upper)
            lower = torch.where(found, lower, torch.maximum(lower, c))
            c = torch.where(upper < 1e9, (lower + upper) / 2, c * 10)
        self._best_l2 = best_l2
        return best.detach()
