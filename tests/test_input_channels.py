"""Colour-depth, FFT and SVD input channels, and their straight-through (BPDA) backward."""

import pytest
import torch

from noisekernels.input_channels import color_depth, fft_compress, svd_compress


def test_color_depth_levels():
    x = torch.rand(2, 3, 8, 8)
    y = color_depth(x, 2)
    assert set(torch.unique(y).tolist()) <= set((torch.arange(4.0) / 3).tolist())
    assert (y - x).abs().max() <= 1 / 6 + 1e-6
    assert torch.equal(color_depth(torch.tensor([0.0, 1.0]), 8), torch.tensor([0.0, 1.0]))


def test_fft_compress_removes_high_frequencies_and_keeps_low_ones():
    i = torch.arange(16.0)
    smooth = torch.cos(2 * torch.pi * i / 16)[:, None] * torch.ones(16)[None, :]
    checker = ((i[:, None] + i[None, :]) % 2) * 2 - 1
    torch.testing.assert_close(fft_compress(smooth, 0.5), smooth, atol=1e-5, rtol=0)
    assert fft_compress(checker, 0.5).abs().max() < 1e-5
    x = torch.rand(2, 3, 12, 10)
    torch.testing.assert_close(fft_compress(x, 0.0), x, atol=1e-5, rtol=0)


def test_svd_compress_rank():
    x = torch.rand(2, 3, 10, 8)
    y = svd_compress(x, 0.5)
    assert (torch.linalg.matrix_rank(y) == 4).all()
    torch.testing.assert_close(svd_compress(x, 0.0), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channel", [lambda x, b: color_depth(x, 3, bpda=b), lambda x, b: fft_compress(x, 0.5, bpda=b),
                                     lambda x, b: svd_compress(x, 0.5, bpda=b)], ids=["cd", "fft", "svd"])
def test_bpda_forward_is_the_channel_backward_is_identity(channel):
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    y = channel(x, True)
    torch.testing.assert_close(y, channel(x.detach(), False))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"bits must be an int in \[1, 24\]"):
        color_depth(torch.rand(3), 0)
    with pytest.raises(ValueError, match=r"rate must be a float in \[0, 1\)"):
        fft_compress(torch.rand(4, 4), 1.0)
    with pytest.raises(ValueError, match=r"rate must be a float in \[0, 1\)"):
        svd_compress(torch.rand(4, 4), -0.1)
