"""Bounded ReLU (efficient-defenses-brelu-gda.txt): min(max(x, 0), t), through torch's hardtanh."""

import math

from torch import nn


class BReLU(nn.Hardtanh):
    """min(max(x, 0), t)."""

    def __init__(self, t=1.0, inplace=False):
        if not (isinstance(t, (int, float)) and t > 0 and math.isfinite(t)):
            raise ValueError(f"t must be a finite float > 0, got {t!r}")
        super().__init__(0.0, float(t), inplace=inplace)

    def extra_repr(self):
        return f"t={self.max_val}"


def to_brelu(model, t=1.0):
    """Replaces every nn.ReLU in model (in place, recursively) by BReLU(t); returns model."""
    BReLU(t)  # validates t before anything changes
    for name, child in list(model.named_children()):
        if type(child) is nn.ReLU:
            setattr(model, name, BReLU(t, inplace=child.inplace))
        else:
            to_brelu(child, t)
    return model
