"""The translucent-box multi-surrogate attack with validation (random-spiking.txt 3.2).

Examples are crafted by PGD against the sum of the losses of t surrogate models, and kept only if
they fool at least k of v validation models; their transfer is then measured on a held-out target.
rotate_targets repeats this with each model of a pool as the target. Surrogates of one
architecture without noise layers run as one vmapped forward over their stacked weights
(torch.func); others run in a loop.
"""

import copy

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from ..nn.noise import _NoiseLayer
from ..nn.anisotropic import AnisotropicNoise
from ..nn.random_spike import RandomSpike
from .base import _check_positive_int
from .pgd import PGD


def _stackable(models):
    first = models[0]
    shapes = [tuple(p.shape) for p in first.parameters()]
    return len(models) > 1 and all(
        type(m) is type(first) and [tuple(p.shape) for p in m.parameters()] == shapes
        and not any(isinstance(x, (_NoiseLayer, RandomSpike, AnisotropicNoise)) for x in m.modules())
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
        if self.stacked:
            call = lambda p, b, x: functional_call(self._base[0], (p, b), (x,))  # noqa: E731
            return torch.vmap(call, in_dims=(0, 0, None))(*self._stack, x).transpose(0, 1)
        return torch.stack([m(x) for m in self.surrogates], dim=1)


class MultiSurrogate(PGD):
    """MultiSurrogate(surrogates, validators, k=5, eps=..., alpha=..., steps=...)(x, y) crafts
    against sum_s loss(s(x'), y); attack.kept (also attack.success) marks the examples that fool
    at least k validators, each judged by its MC prediction on fresh noise."""

    def __init__(self, surrogates, validators, k, **pgd_options):
        self.surrogates, self.validators = list(surrogates), list(validators)
        if not self.surrogates:
            raise ValueError("surrogates must hold at least one model")
        self.k = _check_positive_int(k, "k", minimum=0)
        if self.k > len(self.validators):
            raise ValueError(f"k={k} must be at most the number of validators ({len(self.validators)})")
        self.summed = _SurrogateSum(self.surrogates)
        super().__init__(self.summed, **pgd_options)
        self.kept = None

    def loss(self, logits, y):
        t = len(self.surrogates)
        # Summed over surrogates, averaged over rows (the engine's EOT rule).
        ce = nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(t), reduction="sum") / y.shape[0]
        return -ce if self.targeted else ce

    def judge_success(self, x_adv, y):
        votes = sum(self.succeeded(x_adv, y, v).long() for v in self.validators)
        self.kept = votes >= self.k if self.validators else torch.ones_like(y, dtype=torch.bool)
        return self.kept


def rotate_targets(models, x, y, *, t, v, k, **pgd_options):
    """Each model of the pool in turn is the held-out target: the next t models are surrogates and
    the v after them validators. Returns one dict per target: target (its index in the pool), kept
    (how many examples passed validation), transfer (the fraction of kept examples that fool the
    target, judged by its MC prediction; nan when none was kept)."""
    models = list(models)
    if t + v + 1 > len(models):
        raise ValueError(f"need t + v + 1 <= len(models), got t={t}, v={v} for {len(models)} models")
    results = []
    for i, target in enumerate(models):
        others = models[i + 1:] + models[:i]
        attack = MultiSurrogate(others[:t], others[t:t + v], k, **pgd_options)
        x_adv = attack(x, y)
        kept = attack.kept
        fooled = attack.succeeded(x_adv[kept], y[kept], target) if kept.any() else torch.zeros(0, dtype=torch.bool)
        results.append({"target": i, "kept": int(kept.sum()), "transfer": fooled.double().mean().item() if kept.any() else float("nan")})
    return results
