"""The model zoo: the papers' layer structure, sized by argument, normalisation inside."""

import pytest
import torch
from torch import nn

from noisekernels import models


def convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_mnist_cnn_is_the_cw_magnet_model():
    # random-spiking.txt Table 6: Conv32 x2, MaxPool, Conv64 x2, MaxPool, Dense200 x2, 10 outputs.
    model = models.build("mnist-cnn", (1, 28, 28), 10, (0.1,), (0.3,))
    assert [c.out_channels for c in convs(model)] == [32, 32, 64, 64]
    assert all(c.kernel_size == (3, 3) and c.padding == (0, 0) for c in convs(model))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64 * 4 * 4, 200), (200, 200), (200, 10)]
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_normalize_is_inside_the_model():
    model = models.build("mnist-cnn", (1, 8, 8), 10, (0.3,), (0.4,), widths=(4, 8), dense=16)
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(model.normalize(x), (x - 0.3) / 0.4)
    h = model.body((x - 0.3) / 0.4)
    assert torch.allclose(model(x), model.classifier(h))
    with pytest.raises(ValueError, match="std > 0"):
        models.Normalize((0.0,), (0.0,))


@pytest.mark.parametrize("name, options, shape, head", [
    ("lenet++", dict(widths=(4, 8, 8), embed=32), (1, 28, 28), 32),
    ("resnet18", dict(width=4, embed=32), (3, 32, 32), 32),
    ("vgg", dict(width=1 / 16), (3, 32, 32), 32),
    ("wide-resnet", dict(depth=10, widen=2), (3, 32, 32), 128),
])
def test_heads_and_shapes(name, options, shape, head):
    model = models.build(name, shape, 10, (0.5,) * shape[0], (0.25,) * shape[0], **options)
    assert model.classifier.in_features == head
    assert model(torch.rand(2, *shape)).shape == (2, 10)


def test_resnet18_and_wrn_depth():
    r18 = models.build("resnet18", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, width=4)
    assert len([m for m in r18.modules() if isinstance(m, models.resnet.BasicBlock)]) == 8
    # 17 3x3 convs (stem + 16 in blocks) and 3 1x1 shortcuts
    assert sum(c.kernel_size == (3, 3) for c in convs(r18)) == 17
    wrn = models.build("wide-resnet", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, depth=16, widen=1)
    assert len([m for m in wrn.modules() if isinstance(m, models.resnet.WideBlock)]) == 6
    with pytest.raises(ValueError, match="6n \\+ 4"):
        models.build("wide-resnet", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, depth=12)


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="model must be one of"):
        models.build("alexnet", (1, 8, 8), 10, (0.0,), (1.0,))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['depth'\] for model 'vgg'"):
        models.build("vgg", (1, 8, 8), 10, (0.0,), (1.0,), depth=3)
    with pytest.raises(ValueError, match="widths must hold 2"):
        models.build("mnist-cnn", (1, 8, 8), 10, (0.0,), (1.0,), widths=(4,))


def test_stream_dropout_uses_no_global_rng():
    drop = models.Dropout(0.5, seed=3)
    x = torch.ones(4, 1000)
    state = torch.get_rng_state()
    out = drop(x)
    assert torch.equal(torch.get_rng_state(), state)
    kept = out != 0
    assert 0.45 < kept.float().mean() < 0.55 and torch.all(out[kept] == 2.0)
    again = models.Dropout(0.5, seed=3)
    assert torch.equal(again(x), out)  # same stream, same mask
    drop.eval()
    assert torch.equal(drop(x), x)
