"""The shared base of the attacks: EOT gradients from the batched engine, success judged by the
MC-ensemble prediction (as the papers judge stochastic defenses), random starts from the attack's
own Stream. An attack never changes the model's train/eval mode and never touches torch's global
RNG; the model's noise streams advance as any forward pass advances them."""

import abc
import math

import torch
from torch import nn

from .. import ensemble
from ..stream import Stream


def _check_positive_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_nonnegative(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


class Attack(abc.ABC):
    """Base of FGSM, PGD, CW: called as attack(x, y) -> adversarial batch, like torchattacks.

    eot: noise draws averaged per gradient (1 = a plain gradient). judge_n / judge: the MC
    prediction that decides success (n passes, "mean" or "vote"). clip: the input range.
    targeted: y holds target labels and the attack drives the prediction to them.
    """

    def __init__(self, model, *, eot=1, targeted=False, clip=(0.0, 1.0), judge_n=1, judge="mean", seed=None):
        self.model = model
        self.eot = _check_positive_int(eot, "eot")
        self.judge_n = _check_positive_int(judge_n, "judge_n")
        if judge not in ("mean", "vote"):
            raise ValueError(f"judge must be 'mean' or 'vote', got {judge!r}")
        self.judge = judge
        self.targeted = bool(targeted)
        lo, hi = (float(v) for v in clip)
        if not lo < hi:
            raise ValueError(f"clip must be (lo, hi) with lo < hi, got {clip!r}")
        self.clip = (lo, hi)
        self.stream = Stream(seed)

    def loss(self, logits, y):
        """The loss the attack ascends: cross-entropy, or minus it toward targets."""
        ce = nn.functional.cross_entropy(logits, y)
        return -ce if self.targeted else ce

    def gradient(self, x, y):
        """EOT gradient of self.loss over self.eot draws, in one batched pass."""
        grad, _ = ensemble.eot_grad(self.model, self.loss, x, y, self.eot)
        return grad

    @torch.no_grad()
    def predict(self, x, model=None):
        """The defended prediction of model (default: the attacked one): argmax of the MC ensemble
        (ties to the smaller index)."""
        return ensemble.mc_predict(self.model if model is None else model, x, self.judge_n, reduce=self.judge).argmax(1)

    @torch.no_grad()
    def succeeded(self, x_adv, y, model=None):
        pred = self.predict(x_adv, model)
        return pred == y if self.targeted else pred != y

    def project_to_range(self, x):
        return x.clamp(*self.clip)

    def __call__(self, x, y):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating tensor")
        if not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]:
            raise ValueError(f"y must be a tensor of x's batch size {x.shape[0]}")
        return self.forward(x.detach(), y.detach())

    @abc.abstractmethod
    def forward(self, x, y):
        """The adversarial batch for x (detached) and labels or targets y."""
