"""RandomSpike: the Random Spiking layer, drop-in like nn.Dropout."""

from torch import nn

from ..replicas import current as replica_count, expansion, noise_is_off, repeat_rows
from ..ops._args import check_probability
from ..ops.random_spike import RANGES, random_spike
from ..stream import Stream


class RandomSpike(nn.Module):
    """Random Spiking (random-spiking.txt section 4.2): keeps each unit with probability `keep`,
    else replaces it by a value uniform in [min, max] of its batch (or sample); spiked units pass no
    gradient. The paper uses it once, after the first conv layer and before pooling, keep = 0.8.

    keep is the probability a unit is KEPT: the opposite of nn.Dropout's p, which is the
    probability a unit is dropped. RandomSpike(keep=0.8) spikes 20% of the units.

    Like nn.Dropout it is active in training and the identity in eval mode (the paper's "single
    prediction"); mc=True keeps it on in eval mode too, for its "MC Avg" and "Voting" predictions.
    Inside noisekernels.replicas(n) the batch holds n replicas and min/max are taken per replica.

    range: "batch" (default) or "sample". seed: the stream's seed (default: drawn from torch's
    generator).
    """

    def __init__(self, keep=0.8, range="batch", mc=False, seed=None, **kwargs):
        super().__init__()
        if "p" in kwargs:
            raise TypeError("RandomSpike takes keep=, the probability a unit is KEPT (0.8 in the paper), not p=: "
                            "nn.Dropout's p is the probability a unit is dropped, the opposite")
        if kwargs:
            raise TypeError(f"RandomSpike got unexpected arguments {sorted(kwargs)}; it takes keep, range, mc, seed")
        if range not in RANGES:
            raise ValueError(f"range must be one of {RANGES}, got {range!r}")
        self.keep = check_probability(keep, "keep")
        self.range = range
        self.mc = bool(mc)
        self.stream = Stream(seed)

    def forward(self, x):
        if not (self.training or self.mc) or noise_is_off():
            return x
        x = repeat_rows(x, expansion(self))  # the engine's prefix sharing: B rows in, n*B out
        return random_spike(x, self.keep, stream=self.stream, range=self.range, replicas=replica_count())

    def extra_repr(self):
        return f"keep={self.keep}, range={self.range!r}, mc={self.mc}"
