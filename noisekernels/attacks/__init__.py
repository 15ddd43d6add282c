"""Attacks on stochastic defenses, one small class per attack over a shared base, all EOT-aware:
called like torchattacks, attack(x, y) -> adversarial batch."""

from .apgd import APGD
from .autoattack import AutoAttack
from .base import Attack
from .cw import CW
from .fab import FAB
from .minimal_fgsm import MinimalFGSM
from .multi_surrogate import MultiSurrogate, rotate_targets
from .pgd import FGSM, PGD
from .square import Square

__all__ = ["APGD", "Attack", "AutoAttack", "CW", "FAB", "FGSM", "MinimalFGSM", "MultiSurrogate", "PGD", "Square", "rotate_targets"]
