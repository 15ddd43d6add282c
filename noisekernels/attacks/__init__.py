"""Attacks on stochastic defenses, one small class per attack over a shared base, all EOT-aware:
called like torchattacks, attack(x, y) -> adversarial batch."""

from .base import Attack
from .cw import CW
from .multi_surrogate import MultiSurrogate, rotate_targets
from .pgd import FGSM, PGD

__all__ = ["Attack", "CW", "FGSM", "MultiSurrogate", "PGD", "rotate_targets"]
