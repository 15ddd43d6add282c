"""Minimal-perturbation FGSM (efficient-defenses-brelu-gda.txt section 5: "crafted incrementally
using FGSM with small perturbations, and the algorithm stops when the prediction changes"), the
attack behind its empirical robustness rho (metrics.empirical_robustness) as ART computes it: the
sign of the (EOT) input gradient at x, scaled by eps = eps_step, 2 eps_step, ... up to eps_max;
each input keeps the first eps at which its prediction (the mean of `eot` draws) changes."""

import math

import torch

from .. import ensemble
from .base import Attack, _check_nonnegative

_TOL = 1e-9


class MinimalFGSM(Attack):
    """MinimalFGSM(model, eps_step=0.01, eps_max=1.0)(x, y): x + eps * sign(grad) with the smallest
    eps on the grid that fools the model (x + eps_max * sign(grad) where none does). attack.eps
    holds each input's eps (inf where none fooled it); attack.success the independent judgement."""

    def __init__(self, model, eps_step=0.01, eps_max=1.0, **kwargs):
        super().__init__(model, **kwargs)
        self.eps_step = _check_nonnegative(eps_step, "eps_step")
        self.eps_max = _check_nonnegative(eps_max, "eps_max")
        if not 0 < self.eps_step <= self.eps_max:
            raise ValueError(f"eps_step must be in (0, eps_max={self.eps_max}], got {eps_step!r}")
        self.eps = None

    def _fooled_now(self, logits, y):
        """The stopping rule on the (B, C) mean softmax of this step's draws."""
        pred = logits.argmax(-1)
        return pred == y if self.targeted else pred != y

    def forward(self, x, y):
        direction = self.gradient(x, y).sign()
        x_adv = self.project_to_range(x + self.eps_max * direction)
        eps = torch.full((x.shape[0],), math.inf, device=x.device)
        steps = int(math.floor(self.eps_max / self.eps_step + _TOL))
        for i in range(1, steps + 1):
            todo = torch.isinf(eps).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            candidate = self.project_to_range(x[todo] + i * self.eps_step * direction[todo])
            with torch.no_grad():
                probs = ensemble.replica_logits(self.model, candidate, self.eot).softmax(-1).mean(0)
            fooled = self._fooled_now(probs, y[todo])
            done = todo[fooled]
            eps[done] = i * self.eps_step
            x_adv[done] = candidate[fooled]
        self.eps = eps
        return x_adv
