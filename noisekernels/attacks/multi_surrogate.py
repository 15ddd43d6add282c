"""The translucent-box multi-surrogate attack with validation (random-spiking.txt 3.2, 5.4).

Examples are crafted by a base attack of the library (PGD, FGSM, MinimalFGSM, or C&W-L2, targeted
with kappa as the paper uses it) against the sum of the losses of t surrogate models, and kept only
if they fool every surrogate and at least k of v validation models, each judged by its own MC
prediction on fresh noise; their transfer is then measured on a held-out target. rotate_targets
repeats this with each model of a pool in turn as the target. Surrogates of one architecture
without noise layers run as one vmapped forward over their stacked weights (torch.func); others
run in a loop.
"""

import copy
import functools

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from ..stream import Stream
from .base import Attack, _check_positive_int
from .cw import CW
from .minimal_fgsm import MinimalFGSM
from .pgd import FGSM, PGD

BASE_ATTACKS = (PGD, FGSM, MinimalFGSM, CW)


def _stackable(models):
    first = models[0]
    shapes = [tuple(p.shape) for p in first.parameters()]
    return len(models) > 1 and all(
        type(m) is type(first) and [tuple(p.shape) for p in m.parameters()] == shapes
        # A module drawing from a Stream (noise layers, the zoo's Dropout) would draw once for all
        # surrogates under vmap.
        and not any(isinstance(x, Stream) for x in m.modules())
        for m in models)


class _SurrogateSum(nn.Module):
    """Logits of t surrogates as one (B, t, C) output: one row per input, so the engine batches
    its replicas and sees every surrogate's noise layers, BatchNorm and streams (state_dict too)."""

    def __init__(self, surrogates):
        super().__init__()
        self.surrogates = nn.ModuleList(surrogates)
        self.stacked = _stackable(list(self.surrogates))
        if self.stacked:
            # Stacked copies of the weights (taken now) and a weightless skeleton, kept out of the
            # module tree so they are neither parameters nor state.
            self._stack = stack_module_state(list(self.surrogates))
            self._base = (copy.deepcopy(self.surrogates[0]).to("meta"),)

    def forward(self, x):
        # The skeleton runs in the surrogates' train/eval modes of now (BatchNorm's statistics), which
        # must be one for all of them to be stacked.
        modes = [[m.training for m in s.modules()] for s in self.surrogates]
        if self.stacked and all(mode == modes[0] for mode in modes):
            for m, training in zip(self._base[0].modules(), modes[0]):
                m.training = training
            call = lambda p, b, x: functional_call(self._base[0], (p, b), (x,))  # noqa: E731
            return torch.vmap(call, in_dims=(0, 0, None))(*self._stack, x).transpose(0, 1)
        return torch.stack([m(x) for m in self.surrogates], dim=1)


class _SummedGradient:
    """Gradient attacks (PGD, FGSM, MinimalFGSM) on (rows, t, C) logits: the cross-entropy summed
    over surrogates, averaged over rows (the engine's EOT rule)."""

    def loss(self, logits, y):
        t = logits.shape[1]
        ce = nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(t), reduction="sum") / y.shape[0]
        return -ce if self.targeted else ce

    def _fooled_now(self, logits, y):
        # MinimalFGSM's stopping rule: every surrogate's prediction is fooled.
        pred = logits.argmax(-1)
        fooled = pred == y[:, None] if self.targeted else pred != y[:, None]
        return fooled.all(1)


class _SummedCW:
    """C&W on (n, B, t, C) logits: f is the sum over surrogates of each one's hinge (averaged over
    the n draws); a candidate is selected when every surrogate's mean prediction is fooled."""

    def _hinge(self, logits, y):
        n, b, t, c = logits.shape
        return t * super()._hinge(logits.permute(0, 2, 1, 3).reshape(n * t, b, c), y)

    def _fooled(self, logits, y):
        return torch.stack([super(_SummedCW, self)._fooled(logits[:, :, s], y) for s in range(logits.shape[2])]).all(0)


@functools.lru_cache(maxsize=None)
def _summed(attack):
    """attack's class with its loss taken over every surrogate (cached: one class per base)."""
    mixin = _SummedCW if issubclass(attack, CW) else _SummedGradient
    return type(f"Summed{attack.__name__}", (mixin, attack), {})


class MultiSurrogate(Attack):
    """MultiSurrogate(surrogates, validators, k=5, attack=PGD, **attack_options)(x, y) crafts with
    `attack` (one of BASE_ATTACKS) against sum_s loss(s(x'), y). attack.kept marks the examples
    that pass validation (fool at least k validators); attack.success those kept that also fool
    every surrogate: the examples a multi-surrogate attacker would deploy. Each model judges by its
    MC prediction on fresh noise. With one surrogate and no validators this is the plain attack on
    that model, draw for draw (a C&W base's attack.base.l2 then equals the plain C&W's l2)."""

    def __init__(self, surrogates, validators, k, attack=PGD, **attack_options):
        self.surrogates, self.validators = list(surrogates), list(validators)
        if not self.surrogates:
            raise ValueError("surrogates must hold at least one model")
        if not (isinstance(attack, type) and issubclass(attack, BASE_ATTACKS)):
            raise ValueError(f"attack must be one of {[a.__name__ for a in BASE_ATTACKS]} (or a subclass), got {attack!r}")
        self.k = _check_positive_int(k, "k", minimum=0)
        if self.k > len(self.validators):
            raise ValueError(f"k={k} must be at most the number of validators ({len(self.validators)})")
        self.summed = _SurrogateSum(self.surrogates)
        self.base = _summed(attack)(self.summed, **attack_options)
        shared = ("eot", "judge_n", "judge", "targeted", "clip")
        super().__init__(self.summed, **{name: getattr(self.base, name) for name in shared})
        self.stream = self.base.stream
        self.kept = None

    def loss(self, logits, y):
        return self.base.loss(logits, y)

    def gradient(self, x, y):
        return self.base.gradient(x, y)

    def forward(self, x, y):
        return self.base.forward(x, y)

    def judge_success(self, x_adv, y):
        fooled = torch.ones_like(y, dtype=torch.bool)
        for s in self.surrogates:
            fooled &= self.succeeded(x_adv, y, s)
        votes = sum(self.succeeded(x_adv, y, v).long() for v in self.validators)
        self.kept = votes >= self.k if self.validators else torch.ones_like(y, dtype=torch.bool)
        self.base.success = fooled & self.kept  # C&W's l2 is then inf wherever it was not deployed
        return self.base.success


def rotate_targets(models, x, y, *, t, v, k, rotations=None, attack=PGD, **attack_options):
    """Each of the first `rotations` models of the pool (default: all) in turn is the held-out
    target: the next t models are surrogates and the v after them validators. Returns one dict per
    target: target (its index in the pool), kept (how many examples fooled the surrogates and
    passed validation: attack.success), transfer (the fraction of those that fool the target,
    judged by its MC prediction; nan when none was kept), and per kept example its L2 distortion
    (l2) and whether it fooled the target (fooled), as lists."""
    models = list(models)
    if t + v + 1 > len(models):
        raise ValueError(f"need t + v + 1 <= len(models), got t={t}, v={v} for {len(models)} models")
    rotations = len(models) if rotations is None else _check_positive_int(rotations, "rotations")
    if rotations > len(models):
        raise ValueError(f"rotations must be at most the pool size {len(models)}, got {rotations}")
    results = []
    for i in range(rotations):
        others = models[i + 1:] + models[:i]
        crafter = MultiSurrogate(others[:t], others[t:t + v], k, attack=attack, **attack_options)
        x_adv = crafter(x, y)
        kept = crafter.success
        fooled = crafter.succeeded(x_adv[kept], y[kept], models[i]) if kept.any() else torch.zeros(0, dtype=torch.bool)
        l2 = (x_adv[kept] - x[kept]).flatten(1).norm(dim=1)
        results.append({"target": i, "kept": int(kept.sum()),
                        "transfer": fooled.double().mean().item() if kept.any() else float("nan"),
                        "l2": l2.tolist(), "fooled": fooled.tolist()})
    return results
