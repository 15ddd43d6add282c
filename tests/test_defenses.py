"""Defense presets: placement and test-time noise as the papers specify, each preset's loss falls
when it trains, A2SNN's projection and loss, PNI's scale outside weight decay, clear option errors."""

import math

import pytest
import torch
from torch import nn

import noisekernels as nk
from noisekernels import data, defenses
from noisekernels.train import TrainConfig, Trainer

TINY = {"mnist-cnn": {"widths": (4, 8), "dense": 16}, "lenet++": {"widths": (4, 8, 8)}, "resnet18": {"width": 4},
        "vgg": {"width": 1 / 32}}


@pytest.fixture(autouse=True)
def one_thread(threads):
    threads(1)  # tiny models: one thread is faster, and spin-waiting threads suffer on a shared machine


@pytest.fixture(scope="module")
def digits():
    return data.digits()


def tiny(digits, n=64):
    return data.Dataset("digits", digits.x_train[:n], digits.y_train[:n], digits.x_test[:32], digits.y_test[:32], 10,
                        digits.mean, digits.std)


def trainer(ds, defense, tmp_path, **kw):
    # every preset on the small MNIST CNN: training speed, not the architecture, is what matters here
    cfg = TrainConfig(defense=defense, model="mnist-cnn", model_options=TINY["mnist-cnn"], progress=False, **kw)
    return Trainer(cfg, str(tmp_path / defense), dataset=ds)


ALL = ["standard", "dropout", "rs1", "rsd1", "rse", "pni", "a2snn", "gda", "distill", "rs1-adv"]


@pytest.mark.parametrize("defense", ALL)
def test_each_preset_loss_falls(digits, tmp_path, defense):
    t = trainer(tiny(digits), defense, tmp_path, lr=3e-3, options={"adv_steps": 2} if t_adv(defense) else {})
    x, y = t.data.x_train[:32], t.data.y_train[:32]
    losses = [float(t.step(x, y)[0]) for _ in range(15)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def t_adv(name):
    return defenses.get(name).adversarial


def test_test_time_noise_as_the_papers(digits):
    info = tiny(digits)
    expected = {"standard": False, "dropout": False, "rs1": True, "rsd1": True, "rse": True, "pni": True,
                "a2snn": True, "gda": False, "distill": False}
    for name, on in expected.items():
        preset = defenses.get(name)
        model, _, _ = defenses.build(name, info, model_options=TINY[preset.model])
        assert preset.test_noise is on
        assert all(m.mc is on for m in defenses.noise_layers(model))
        model.eval()
        x = info.x_test[:4]
        a, b = model(x), model(x)
        assert torch.equal(a, b) is (not on or not defenses.noise_layers(model)), name


def test_placements(digits):
    info = tiny(digits)
    rs, _, opts = defenses.build("rs1", info, model_options=TINY["mnist-cnn"])
    first = [m for m in rs.body if isinstance(m, nn.Conv2d)][0]
    assert isinstance(first.random_spike, nk.nn.RandomSpike) and first.random_spike.p == 0.8  # keep probability
    assert len([m for m in rs.modules() if isinstance(m, nk.nn.RandomSpike)]) == 1
    # the spike acts on conv1's output: with p=0 every unit is spiked into conv1's [min, max]
    first.random_spike.p = 0.0
    with torch.no_grad():
        out = first(info.x_train[:8] * 0 + 0.5)
        raw = nn.functional.conv2d(info.x_train[:8] * 0 + 0.5, first.weight, first.bias, padding=1)
    assert float(out.min()) >= float(raw.min()) - 1e-6 and not torch.equal(out, raw.detach())

    rse, _, _ = defenses.build("rse", info, model_options=TINY["vgg"])
    assert isinstance(rse.input_noise, nk.nn.GaussianNoise) and rse.input_noise.scale == 0.2
    convs = [m for m in rse.body.modules() if isinstance(m, nn.Conv2d)]
    assert not hasattr(convs[0], "rse_noise") and all(c.rse_noise.scale == 0.1 for c in convs[1:])

    a2, _, _ = defenses.build("a2snn", info, model_options=TINY["lenet++"])
    assert isinstance(a2.penultimate, nk.nn.AnisotropicNoise) and a2.penultimate.dim == 32

    pni, _, opts = defenses.build("pni", info, model_options=TINY["resnet18"])
    layers = [m for m in pni.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(isinstance(m.parametrizations.weight[0], nk.nn.WeightNoise) for m in layers)
    assert opts["adv_weight"] == 0.5 and defenses.get("pni").adversarial

    gda, _, _ = defenses.build("gda", info, model_options=TINY["mnist-cnn"], options={"brelu": 1.0})
    assert not any(type(m) is nn.ReLU for m in gda.modules()) and any(isinstance(m, nk.nn.BReLU) for m in gda.modules())


def test_rse_noise_is_on_the_unit_range_input(digits):
    model, _, _ = defenses.build("rse", tiny(digits), model_options=TINY["vgg"], options={"inner_sigma": 0.0})
    model.eval()
    seen = []
    model.normalize.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x = torch.full((2000, 1, 8, 8), 0.5)
    model(x)
    noise = seen[0] - x
    assert abs(float(noise.std()) - 0.2) < 0.005 and abs(float(noise.mean())) < 0.005


def test_a2snn_loss_and_projection_keeps_unit_rows(digits, tmp_path):
    t = trainer(tiny(digits), "a2snn", tmp_path, lr=1e-2)
    x, y = t.data.x_train[:32], t.data.y_train[:32]
    for _ in range(5):
        t.step(x, y)
        norms = t.model.classifier.weight.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # the loss is CE - 0.1 * ME - 0.5 * WCA (Table 7, F-MNIST), written out from the paper here
    model, noise, w = t.model, t.model.penultimate, t.model.classifier.weight.detach()
    logits = torch.randn(4, 10)
    labels = torch.tensor([0, 1, 2, 3])
    sigma = noise.scale_tril() @ noise.scale_tril().T
    me = 0.5 * torch.logdet(2 * math.pi * math.e * sigma)
    wca = torch.log(torch.einsum("ij,jk,ik->i", w, sigma, w)).sum()
    expected = nn.functional.cross_entropy(logits, labels) - 0.1 * me - 0.5 * wca
    got = defenses.get("a2snn").loss(model, logits, labels, t.options, None)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_pni_scale_is_excluded_from_weight_decay(digits, tmp_path):
    ds = tiny(digits)
    x, y = ds.x_train[:32], ds.y_train[:32]
    after = {}
    for wd in (0.0, 5.0):
        t = trainer(ds, "pni", tmp_path / str(wd), schedule="cw-mnist", weight_decay=wd, options={"adv_steps": 1})
        t.step(x, y)
        after[wd] = {k: v.clone() for k, v in t.model.named_parameters()}
    alphas = [k for k in after[0.0] if k.endswith("alpha")]
    assert alphas and all(torch.equal(after[0.0][k], after[5.0][k]) for k in alphas)
    assert not torch.equal(after[0.0]["classifier.parametrizations.weight.original"],
                           after[5.0]["classifier.parametrizations.weight.original"])


def test_gda_trains_on_clean_and_noisy_copies(digits, tmp_path):
    t = trainer(tiny(digits), "gda", tmp_path, options={"copies": 3, "sigma": 0.3})
    x, y = t.data.x_train[:8], t.data.y_train[:8]
    xs, ys = defenses.get("gda").augment(x, y, t.options, t.streams.augment)
    assert xs.shape == (32, 1, 8, 8) and torch.equal(xs[:8], x) and torch.equal(ys, y.repeat(4))
    noise = xs[8:] - x.repeat(3, 1, 1, 1)
    inside = (xs[8:] > 0) & (xs[8:] < 1)
    assert abs(float(noise[inside].std()) - 0.3) < 0.05 and float(xs.min()) >= 0 and float(xs.max()) <= 1
    assert t.step(x, y)[2] == 32


def test_distillation_losses(digits):
    preset = defenses.get("distill")
    opts = defenses.resolve_options(preset, {"temperature": 40.0})
    logits, teacher, y = torch.randn(5, 10), torch.randn(5, 10) * 30, torch.randint(0, 10, (5,))
    hard = preset.loss(None, logits, y, opts, None)
    assert torch.allclose(hard, nn.functional.cross_entropy(logits / 40, y))
    soft = preset.loss(None, logits, y, opts, teacher)
    p = torch.softmax(teacher / 40, 1)
    assert torch.allclose(soft, -(p * torch.log_softmax(logits / 40, 1)).sum(1).mean())


def test_option_errors():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sigma'\] for defense 'rs1'; accepted"):
        defenses.resolve_options(defenses.get("rs1"), {"sigma": 0.1})
    with pytest.raises(ValueError, match="option copies must be an int >= 1"):
        defenses.resolve_options(defenses.get("gda"), {"copies": 0})
    with pytest.raises(ValueError, match="option adv_weight must be in"):
        defenses.resolve_options(defenses.get("rs1-adv"), {"adv_weight": 2.0})
    with pytest.raises(ValueError, match="defense must be one of"):
        defenses.get("pni-adv")  # PNI already trains adversarially
    assert defenses.get("rse-adv").adversarial and "adv_eps" in defenses.get("rse-adv").options
