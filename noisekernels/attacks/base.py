"""The shared base of the attacks: EOT gradients from the batched engine, success judged by an MC
prediction on fresh noise, random starts from the attack's own Stream.

Honest judgement: whatever an attack selects with (the draws of its own EOT passes), the success it
reports, `attack.success`, is decided after the attack by an MC prediction of `judge_n` passes
(default 100) on noise the attack never saw: the model's streams have advanced past every draw the
attack used. A stochastic defense never looks weaker because of a lucky draw, nor stronger.

An attack never changes the model's train/eval mode and never touches torch's global RNG (an
attack without a seed takes one from a copy of its state); the model's noise streams advance as
any forward pass advances them."""

import abc
import itertools
import math

import torch
from torch import nn

from .. import ensemble
from ..stream import Stream, _random_seed, derive_seed

JUDGE_N = 100  # the one default of judging passes: every attack's judge_n, `noisekernels attack --judge-n`, the demo
_unseeded = itertools.count()  # attacks built without a seed get distinct streams


def _check_positive_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_nonnegative(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


def check_classes(classes, needs):
    """Refuses a model with `classes` outputs where an entry (fewest classes, what needs them) of
    needs asks for more."""
    for needed, what in needs:
        if classes < needed:
            raise ValueError(f"{what} needs at least {needed} classes, the model has {classes}")


def likely_targets(probs, y, n_targets):
    """APGD-T's and FAB-T's target classes, (B, n_targets): per input, the n_targets classes other
    than y that the clean MC mean prediction probs (B, C) ranks highest, most likely first. Where y
    ranks first these are auto-attack's 2nd .. (n_targets+1)-th classes; on a noisy model (or with
    judge="vote") the judgement that kept an input robust need not rank y first, and y is no target."""
    check_classes(probs.shape[1], [(n_targets + 1, f"n_targets={n_targets}")])
    ranked = probs.scatter(1, y[:, None], -torch.inf).argsort(dim=1, descending=True, stable=True)
    return ranked[:, :n_targets]


def attack_stream(seed):
    """The attack's Stream: from `seed`, or, with seed=None, from torch's default generator without
    advancing it (torch.manual_seed still reproduces the run)."""
    if seed is not None:
        return Stream(seed)
    with torch.random.fork_rng(devices=[]):
        base = _random_seed()
    return Stream(derive_seed(base, next(_unseeded)))


class Attack(abc.ABC):
    """Base of the attacks: called as attack(x, y) -> adversarial batch, like torchattacks; then
    attack.success holds each input's success, judged by an independent MC prediction.
    attack.perturb(x, y) crafts without judging.

    eot: noise draws averaged per gradient (1 = a plain gradient). judge_n / judge: the MC
    prediction that decides success (n passes on fresh noise, "mean" or "vote"). clip: the input
    range. targeted: y holds target labels and the attack drives the prediction to them.

    Attacks that skip the inputs their clean MC prediction already gets wrong (APGD, FAB,
    AutoAttack, as auto-attack does) mark them in attack.clean_fooled, and attack.success counts
    them fooled: x itself is their example. A fresh judgement of x must not count an input the
    attack never touched robust.
    """

    def __init__(self, model, *, eot=1, targeted=False, clip=(0.0, 1.0), judge_n=JUDGE_N, judge="mean", seed=None):
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
        self.stream = attack_stream(seed)
        self.success = None
        self.clean_fooled = None  # per input of the last batch: skipped, x itself judged fooled

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
        """The defended prediction of model (default: the attacked one): argmax of its MC prediction
        over judge_n passes (ties to the smaller index; ensemble.NO_CLASS where its scores are NaN
        or no replica voted, which is never a correct prediction)."""
        scores = ensemble.mc_predict(self.model if model is None else model, x, self.judge_n, reduce=self.judge)
        return ensemble.decide(scores, votes=self.judge == "vote")

    @torch.no_grad()
    def succeeded(self, x_adv, y, model=None):
        """Per input: does model's MC prediction on fresh noise miss y (or hit the target)?"""
        pred = self.predict(x_adv, model)
        return pred == y if self.targeted else pred != y

    def judge_success(self, x_adv, y):
        """The success reported in attack.success (MultiSurrogate: its validators decide): the MC
        judgement of x_adv, and fooled wherever the attack skipped x as already fooled."""
        return self.with_skipped(self.succeeded(x_adv, y))

    def with_skipped(self, success):
        """success, and fooled wherever this attack skipped x as already fooled (clean_fooled): a fresh
        judgement of x must not count an input the attack never touched robust."""
        return success if self.clean_fooled is None else success | self.clean_fooled

    def project_to_range(self, x):
        return x.clamp(*self.clip)

    def perturb(self, x, y):
        """The adversarial batch alone, not judged (attack.success is left as it was): for
        adversarial training and timing, where no verdict is needed."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating tensor")
        if not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]:
            raise ValueError(f"y must be a tensor of x's batch size {x.shape[0]}")
        x, y = x.detach(), y.detach()
        self._refuse_too_few_classes(x)
        self.clean_fooled = None
        return self.forward(x, y)

    def class_needs(self):
        """[(fewest classes, what needs them)] of this attack's losses and targets."""
        return []

    def _refuse_too_few_classes(self, x):
        """Before any draw (and before an AutoAttack's first stage): the class count comes from the
        engine's plan for the judging prediction, tuned without drawing and reused by it. A compiled
        model's plan does not know its outputs: likely_targets refuses it once its outputs are known."""
        needs = self.class_needs()
        shape = ensemble.plan(self.model, x, self.judge_n).out_shape if needs else None
        if shape is not None and len(shape) == 2:
            check_classes(shape[1], needs)

    def __call__(self, x, y):
        """The adversarial batch; attack.success then holds the independent MC verdict on it."""
        x_adv = self.perturb(x, y)
        self.success = self.judge_success(x_adv, y)
        return x_adv

    @abc.abstractmethod
    def forward(self, x, y):
        """The adversarial batch for x (detached) and labels or targets y."""
