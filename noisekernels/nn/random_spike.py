"""RandomSpike: the Random Spiking layer, drop-in like nn.Dropout."""

from torch import nn

from .. import replicas
from ..ops._args import check_probability
from ..ops.random_spike import RANGES, random_spike
from ..stream import Stream


class RandomSpike(nn.Module):
    """Random Spiking (random-spiking.txt section 4.2): keeps each unit with probability p, else
    replaces it by a value uniform in [min, max] of its batch (or sample); spiked units pass no
    gradient. The paper uses it once, after the first conv layer and before pooling, p = 0.8.

    Like nn.Dropout it is active in training and the identity in eval mode; mc=True keeps it on in
    eval mode too, for Monte-Carlo inference. Inside noisekernels.replicas.replicas(n) the batch
    holds n replicas and min/max are taken per replica.

    p: keep probability in [0, 1]. range: "batch" (default) or "sample". seed: the stream's seed
    (default: drawn from torch's generator).
    """

    def __init__(self, p=0.8, range="batch", mc=False, seed=None):
        super().__init__()
        if range not in RANGES:
            raise ValueError(f"range must be one of {RANGES}, got {range!r}")
        self.p = check_probability(p)
        self.range = range
        self.mc = bool(mc)
        self.stream = Stream(seed)

    def forward(self, x):
        if not (self.training or self.mc):
            return x
        return random_spike(x, self.p, stream=self.stream, range=self.range, replicas=replicas.current())

    def extra_repr(self):
        return f"p={self.p}, range={self.range!r}, mc={self.mc}"
