"""Additive noise layers: fixed Gaussian / uniform / Laplace noise (RSE), learnable noise on
activations and weights (PNI). Each owns a Stream; noise comes from the fused noise_add op.

In these defenses the noise is part of the model at test time (RSE, PNI, the random-perturbation
defenses), so every layer here is on in eval mode too by default (mc=True); mc=False makes a layer
a training-only regulariser, the identity in eval mode."""

import torch
from torch import nn

from ..replicas import current as replica_count, expansion, layer_settings, noise_is_off, repeat_rows
from ..ops.noise_add import DISTS, check_dist, check_scale_value, noise_add, noise_add_stream
from ..ops._args import compute_dtype
from ..stream import Stream
from .._extension import REFERENCE_ONLY

if not REFERENCE_ONLY:
    from .. import _C


class _NoiseLayer(nn.Module):
    """Active in training and, with mc=True (the default), in eval mode too."""

    def __init__(self, dist, mc, seed):
        super().__init__()
        self.dist = dist
        self.mc = bool(mc)
        self.stream = Stream(seed)

    @property
    def dist(self):
        return self._dist

    @dist.setter
    def dist(self, value):  # checked when set, so a forward need not check it again
        self._code = check_dist(value)
        self._dist = value

    def active(self):
        return (self.training or self.mc) and not noise_is_off()

    def add_noise(self, x, scale, segments=1):
        return noise_add(x, scale, stream=self.stream, dist=self.dist, segments=segments)


class AdditiveNoise(_NoiseLayer):
    """x + scale * eps with eps ~ N(0, 1) ("gaussian"), U(-1, 1) ("uniform") or Laplace(0, 1).

    Inside the engine's prefix sharing (replicas.expanding(layer, n), per thread) the input holds B
    rows and the output n*B noisy replicas, made in one fused pass (the counters of repeating the
    input first)."""

    _plan_ignores = ("_scale_tensors",)  # a cache: the engine's plans do not depend on it

    def __init__(self, scale, dist="gaussian", mc=True, seed=None, name="scale"):
        super().__init__(dist, mc, seed)
        self.scale_name = name
        self.scale = scale

    @property
    def scale(self):
        return self._scale

    @scale.setter
    def scale(self, value):  # checked when set; forwards reuse its tensor (one per device and dtype)
        self._scale = check_scale_value(value, self.scale_name)
        self._scale_tensors = {}

    def _scale_tensor(self, x):
        key = (x.device, compute_dtype(x.dtype))
        # A traced forward (torch.compile) or one under a dispatch mode (FakeTensorMode, make_fx) makes
        # its own: a cached tensor would be fake or traced in later real calls, or real among fakes.
        if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
            return torch.full((1,), self._scale, dtype=key[1], device=x.device)
        flat = self._scale_tensors.get(key)
        if flat is None:
            flat = self._scale_tensors[key] = torch.full((1,), self._scale, dtype=key[1], device=x.device)
        return flat

    def forward(self, x):
        # A layer's call costs about as much as the kernel of a small one (RSE runs 13 a step), so
        # this path is lean: the settings in one read, modules and buffers looked up directly
        # (nn.Module.__getattr__ costs 0.7 us a lookup), and in plain eager mode the checks, the
        # reservation and the noise in one C++ call. The scale and dist were checked when set.
        n, replicas, off = layer_settings(self)
        if not (self.training or self.mc) or off or (self._scale == 0 and n == 1):
            return x
        # The output holds `replicas` replicas, one stream segment each (section 3).
        stream = self._modules["stream"]
        if stream.plain_eager():
            buffers = stream._buffers
            return _C.noise_layer_add(x, self._scale, buffers["seed"], buffers["offset"], self._code, n, replicas)
        return noise_add_stream(x, self._scale_tensor, stream, self._code, n, replicas)

    def extra_repr(self):
        return f"{self.scale_name}={self.scale}, dist={self.dist!r}, mc={self.mc}"


class GaussianNoise(AdditiveNoise):
    """x + N(0, sigma^2): RSE's noise layer (random-self-ensemble.txt), on at test time too."""

    def __init__(self, sigma, mc=True, seed=None):
        super().__init__(sigma, "gaussian", mc, seed, name="sigma")


class UniformNoise(AdditiveNoise):
    """x + U(-b, b)."""

    def __init__(self, b, mc=True, seed=None):
        super().__init__(b, "uniform", mc, seed, name="b")


class LaplaceNoise(AdditiveNoise):
    """x + Laplace(0, b)."""

    def __init__(self, b, mc=True, seed=None):
        super().__init__(b, "laplace", mc, seed, name="b")


def _alpha(shape, init):
    init = check_scale_value(init, "init")
    if isinstance(shape, int):
        shape = (shape,)
    return nn.Parameter(torch.full(tuple(shape), init))


class LearnableNoise(_NoiseLayer):
    """PNI on activations: x + alpha * eps with learnable alpha of shape () (layer-wise), (C,)
    (channel-wise) or (C, H, W) (element-wise). alpha starts at `init` (0.25 in PNI). On at test
    time too, as in PNI."""

    def __init__(self, shape=(), init=0.25, dist="gaussian", mc=True, seed=None):
        super().__init__(dist, mc, seed)
        self.alpha = _alpha(shape, init)

    def forward(self, x):
        if not self.active():
            return x
        return self.add_noise(repeat_rows(x, expansion(self)), self.alpha, replica_count())

    def extra_repr(self):
        return f"alpha_shape={tuple(self.alpha.shape)}, dist={self.dist!r}, mc={self.mc}"


class WeightNoise(_NoiseLayer):
    """PNI on weights, as a parametrization: w + alpha * std(w) * eps, std taken on the device and
    not differentiated (as in PNI). alpha: () layer-wise (PNI's default) or (out_channels, 1, ...)
    per output channel. On at test time too, as in PNI. Register with noisekernels.nn.add_weight_noise
    or torch.nn.utils.parametrize.register_parametrization(module, "weight", WeightNoise()).
    The weight needs at least two elements (its std sets the scale)."""

    def __init__(self, shape=(), init=0.25, dist="gaussian", mc=True, seed=None):
        super().__init__(dist, mc, seed)
        self.alpha = _alpha(shape, init)

    def forward(self, w):
        if w.numel() < 2:
            raise ValueError(f"WeightNoise needs a weight with at least 2 elements (its scale is alpha * std(w)), "
                             f"got shape {tuple(w.shape)}")
        return self.add_noise(w, self.alpha * w.detach().std()) if self.active() else w

    def extra_repr(self):
        return f"alpha_shape={tuple(self.alpha.shape)}, dist={self.dist!r}, mc={self.mc}"


def add_weight_noise(module, **kwargs):
    """Registers WeightNoise(**kwargs) on module.weight and returns the WeightNoise."""
    noise = WeightNoise(**kwargs)
    torch.nn.utils.parametrize.register_parametrization(module, "weight", noise)
    return noise


__all__ = ["AdditiveNoise", "GaussianNoise", "UniformNoise", "LaplaceNoise", "LearnableNoise", "WeightNoise",
           "add_weight_noise", "DISTS"]
