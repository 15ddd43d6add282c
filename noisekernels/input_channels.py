"""Deterministic input channels of random-perturbations-analysis.txt (appendix D): colour-depth
reduction, FFT band-limit compression and SVD compression, in plain PyTorch. bpda=True gives the
straight-through (BPDA) backward adaptive attacks use: forward the channel, backward the identity.
"""

import math

import torch


def _straight_through(x, y, bpda):
    return x + (y - x).detach() if bpda else y


def _check_rate(rate):
    if not (isinstance(rate, (int, float)) and 0 <= rate < 1):
        raise ValueError(f"rate must be a float in [0, 1), got {rate!r}")


def color_depth(x, bits, *, bpda=False):
    """C(v, b) = round((2^b - 1) v) / (2^b - 1) for values in [0, 1] (D.1)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 24:
        raise ValueError(f"bits must be an int in [1, 24], got {bits!r}")
    levels = 2**bits - 1
    return _straight_through(x, torch.round(x * levels) / levels, bpda)


def fft_compress(x, rate, *, bpda=False):
    """Band-limits each (H, W) image to its lowest frequencies, discarding a `rate` fraction of
    the spectrum (D.2): F^-1(F(x) M_f) with M_f keeping |k_h| <= f H/2 and k_w <= f W/2,
    f = sqrt(1 - rate)."""
    _check_rate(rate)
    h, w = x.shape[-2:]
    f = math.sqrt(1 - rate)
    spectrum = torch.fft.rfft2(x)
    kh = torch.fft.fftfreq(h, device=x.device).abs() * h
    kw = torch.fft.rfftfreq(w, device=x.device) * w
    mask = (kh[:, None] <= f * h / 2) & (kw[None, :] <= f * w / 2)
    return _straight_through(x, torch.fft.irfft2(spectrum * mask, s=(h, w)), bpda)


def svd_compress(x, rate, *, bpda=False):
    """Keeps the dominant max(1, round((1 - rate) min(H, W))) singular values of each (H, W) image (D.3)."""
    _check_rate(rate)
    k = max(1, round((1 - rate) * min(x.shape[-2:])))
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return _straight_through(x, (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :], bpda)
