"""FGSM and PGD, L-inf and L2 (Madry et al.; random-spiking.txt and random-self-ensemble.txt use
them with EOT against stochastic defenses). Steps follow torchattacks' FGSM / PGD / PGDL2, so
with eot=1 and no random start they agree step for step."""

from ..random import normal, uniform
from .base import Attack, _check_nonnegative, _check_positive_int

NORMS = ("Linf", "L2")
_TINY = 1e-10


def _per_sample_norm(t):
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


class FGSM(Attack):
    """x + eps * sign(grad), clipped to the input range (one step; EOT-aware)."""

    def __init__(self, model, eps=8 / 255, **kwargs):
        super().__init__(model, **kwargs)
        self.eps = _check_nonnegative(eps, "eps")

    def forward(self, x, y):
        return self.project_to_range(x + self.eps * self.gradient(x, y).sign())


class PGD(Attack):
    """Projected gradient descent in the L-inf or L2 ball of radius eps around x.

    PGD(model, eps=8/255, alpha=2/255, steps=10, random_start=True, norm="Linf", eot=20)(x, y).
    L-inf steps alpha * sign(grad); L2 steps alpha * grad / |grad|. The random start is uniform in
    the L-inf ball, or uniform-radius along a normal direction in the L2 ball (torchattacks' rule),
    drawn from the attack's stream.
    """

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True, norm="Linf", **kwargs):
        super().__init__(model, **kwargs)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.eps = _check_nonnegative(eps, "eps")
        self.alpha = _check_nonnegative(alpha, "alpha")
        self.steps = _check_positive_int(steps, "steps", minimum=0)
        self.random_start = bool(random_start)
        self.norm = norm

    def _start(self, x):
        if self.norm == "Linf":
            delta = (uniform(x.shape, stream=self.stream, dtype=x.dtype) * 2 - 1) * self.eps
        else:
            direction = normal(x.shape, stream=self.stream, dtype=x.dtype)
            radius = uniform((x.shape[0],), stream=self.stream, dtype=x.dtype)
            delta = direction / _per_sample_norm(direction) * radius.view(-1, *([1] * (x.dim() - 1))) * self.eps
        return self.project_to_range(x + delta.to(x.device))

    def _project(self, x, x_adv):
        delta = x_adv - x
        if self.norm == "Linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            delta = delta * (self.eps / (_per_sample_norm(delta) + _TINY)).clamp(max=1.0)
        return self.project_to_range(x + delta)

    def forward(self, x, y):
        x_adv = self._start(x) if self.random_start else x.clone()
        for _ in range(self.steps):
            g = self.gradient(x_adv, y)
            step = g.sign() if self.norm == "Linf" else g / (_per_sample_norm(g) + _TINY)
            x_adv = self._project(x, x_adv + self.alpha * step)
        return x_adv
